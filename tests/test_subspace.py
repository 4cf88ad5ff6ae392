"""The core engine against scikit-learn and float64 references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sklearn.decomposition import PCA as SkPCA

from conftest import NEEDS_CUDA
from fre_torch import PCA
from fre_torch.core.subspace import (
    CovarianceAccumulator,
    GramAccumulator,
    RowSpanSubspace,
    Subspace,
    fit_covariance,
    fit_gram,
    fit_row_span,
    gram_matrix,
    select_n_components,
)


def low_rank_plus_noise(n: int, d: int, *, rank: int = 12, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """Rows near a rank-`rank` affine subspace with a decaying spectrum, plus isotropic noise and a large offset."""
    g = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 1.0, rank)
    basis = np.linalg.qr(g.standard_normal((d, rank)))[0].T  # (rank, d) orthonormal
    x = (g.standard_normal((n, rank)) * scales) @ basis * np.sqrt(d / rank)
    x += 0.3 * g.standard_normal((n, d)) + 5.0  # noise and an offset far from zero
    return x.astype(dtype)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-300))


SHAPES = [
    pytest.param(300, 16384, "gram", id="300x16384-gram", marks=pytest.mark.full),
    # The covariance solver here needs a 2 GiB matrix and a 16384^3 eigh: ~8 minutes on 2 cores.
    pytest.param(300, 16384, "covariance", id="300x16384-covariance", marks=pytest.mark.slow),
    pytest.param(5000, 256, "gram", id="5000x256-gram", marks=pytest.mark.full),  # minutes on a busy 2-core CPU
    pytest.param(5000, 256, "covariance", id="5000x256-covariance", marks=pytest.mark.full),
    pytest.param(64, 64, "gram", id="64x64-gram"),
    pytest.param(64, 64, "covariance", id="64x64-covariance"),
]


@pytest.mark.parametrize("n,d,solver", SHAPES)
def test_parity_with_sklearn(n: int, d: int, solver: str) -> None:
    x = low_rank_plus_noise(n, d)
    x_test = low_rank_plus_noise(50, d, seed=1) + np.random.default_rng(2).standard_normal((50, d))
    ref = SkPCA(0.97, svd_solver="full").fit(x)
    ours = PCA(0.97, solver=solver).fit(x)

    assert ours.n_components_ == ref.n_components_
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-8)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-12)
    # components up to sign (our signs follow scikit-learn's rule, so they should agree exactly)
    signs = np.sign((ours.components_ * ref.components_).sum(axis=1))
    assert rel(ours.components_ * signs[:, None], ref.components_) < 1e-6

    recon_ref = ref.inverse_transform(ref.transform(x_test))
    fre_ref = ((x_test - recon_ref) ** 2).sum(axis=1)
    assert rel(ours.inverse_transform(ours.transform(x_test)), recon_ref) < 1e-4
    assert rel(ours.reconstruction_error(x_test), fre_ref) < 1e-4
    np.testing.assert_allclose(ours.error_map(x_test).sum(axis=1), fre_ref, rtol=1e-4)


@pytest.mark.full
@pytest.mark.parametrize("solver", ["gram", "covariance"])
def test_float32_data_fits_in_float64_and_scores_in_float32(solver: str) -> None:
    x = low_rank_plus_noise(400, 512)
    ref = SkPCA(0.97, svd_solver="full").fit(x)  # float64 reference
    ours = PCA(0.97, solver=solver).fit(x.astype(np.float32))
    assert ours.components_.dtype == np.float32
    assert ours.n_components_ == ref.n_components_
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, atol=1e-6)
    xt = low_rank_plus_noise(30, 512, seed=3)
    fre = ours.reconstruction_error(xt.astype(np.float32))
    assert fre.dtype == np.float32
    fre_ref = ((xt - ref.inverse_transform(ref.transform(xt))) ** 2).sum(axis=1)
    assert rel(fre, fre_ref) < 1e-4


@pytest.mark.parametrize("n_components", [1, 5, 0.5, 0.9, 0.999, None])
def test_n_components_rule_matches_sklearn(n_components) -> None:
    x = low_rank_plus_noise(120, 80, seed=5)
    ref = SkPCA(n_components, svd_solver="full").fit(x)
    for solver in ("gram", "covariance"):
        assert PCA(n_components, solver=solver).fit(x).n_components_ == ref.n_components_


def test_select_rule_on_exact_boundaries() -> None:
    ev = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # cumulative ratios 0.4, 0.7, 0.9, 1.0
    assert select_n_components(ev, 0.7, 10, 4) == 3  # side='right': reaching 0.7 exactly still adds one
    assert select_n_components(ev, 0.69, 10, 4) == 2
    assert select_n_components(ev, 0.95, 10, 4) == 4
    assert select_n_components(ev, None, 3, 4) == 3


def test_auto_solver_choice() -> None:
    assert PCA(0.9).fit(low_rank_plus_noise(20, 100)).subspace_ is not None
    from fre_torch.core.subspace import resolve_solver
    assert resolve_solver("auto", 300, 16384) == "gram"
    assert resolve_solver("auto", 5000, 256) == "covariance"


def _batches(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))


UNEVEN = [1, 2, 97, 3, 150, 40, 7]  # 7 uneven batches, 300 rows


@pytest.mark.full
@pytest.mark.parametrize("kind", ["gram", "covariance"])
def test_streaming_equals_one_shot(kind: str) -> None:
    x = torch.from_numpy(low_rank_plus_noise(300, 200, seed=7))
    make = (lambda: GramAccumulator(200, dtype=torch.float64)) if kind == "gram" else (
        lambda: CovarianceAccumulator(200))
    one, many = make().update(x), make()
    for b in _batches(x, UNEVEN):
        many.update(b)
    fit = (lambda a: fit_gram(a.rows, 0.97, gram=a.gram)) if kind == "gram" else (
        lambda a: fit_covariance(a, 0.97, dtype=torch.float64))
    s1, s2 = fit(one), fit(many)
    assert s1.n_components == s2.n_components
    for name in ("mean", "explained_variance", "singular_values", "total_variance"):
        torch.testing.assert_close(getattr(s1, name), getattr(s2, name), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(s1.components.abs(), s2.components.abs(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", ["gram", "covariance"])
def test_merge_equals_one_shot(kind: str) -> None:
    x = torch.from_numpy(low_rank_plus_noise(300, 200, seed=8))
    make = (lambda: GramAccumulator(200, dtype=torch.float64)) if kind == "gram" else (
        lambda: CovarianceAccumulator(200))
    a, b, one = make(), make(), make().update(x)
    a.update(x[:113]).update(x[113:170])
    b.update(x[170:])
    a.merge(b)
    if kind == "gram":
        torch.testing.assert_close(a.gram, one.gram, rtol=1e-12, atol=1e-8)
        torch.testing.assert_close(a.rows, one.rows, rtol=0, atol=0)
    else:
        assert int(a.n_samples) == 300
        torch.testing.assert_close(a.mean, one.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.scatter, one.scatter, rtol=1e-10, atol=1e-8)


def test_covariance_accumulator_against_float64_numpy() -> None:
    x = low_rank_plus_noise(1000, 64, seed=9) * 1e3 + 1e6  # large offset: naive E[xx]-mu mu would lose digits
    acc = CovarianceAccumulator(64)
    for b in np.array_split(x, 13):
        acc.update(torch.from_numpy(b))
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-3)


@pytest.mark.parametrize("solver", ["auto", "gram", "covariance"])
def test_facade_partial_fit_equals_fit(solver: str) -> None:
    # 300 rows of 128 features: 'auto' starts on the Gram path and switches to covariance when N reaches D.
    x = low_rank_plus_noise(300, 128, seed=10)
    streamed = PCA(0.97, solver=solver)
    for b in np.split(x, np.cumsum(UNEVEN)[:-1]):
        streamed.partial_fit(b)
    one = PCA(0.97, solver=solver).fit(x)
    assert streamed.n_samples_seen_ == 300 == one.n_samples_seen_
    assert streamed.n_components_ == one.n_components_
    np.testing.assert_allclose(streamed.explained_variance_, one.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(streamed.components_), np.abs(one.components_), atol=1e-8)


def test_state_dict_round_trip_exact(tmp_path) -> None:
    x = low_rank_plus_noise(100, 300, seed=11).astype(np.float32)
    pca = PCA(0.97).fit(x)
    path = tmp_path / "pca.pt"
    torch.save(pca.state_dict(), path)
    loaded = PCA().load_state_dict(torch.load(path, weights_only=True))
    xt = low_rank_plus_noise(20, 300, seed=12).astype(np.float32)
    np.testing.assert_array_equal(loaded.reconstruction_error(xt), pca.reconstruction_error(xt))
    np.testing.assert_array_equal(loaded.components_, pca.components_)
    assert loaded.n_samples_seen_ == 100
    # the module alone: a fresh Subspace adopts the saved shapes
    sub = Subspace()
    buf = io.BytesIO()
    torch.save(pca.subspace_.state_dict(), buf)
    buf.seek(0)
    sub.load_state_dict(torch.load(buf, weights_only=True))
    for name, value in pca.subspace_.state_dict().items():
        assert torch.equal(sub.state_dict()[name], value), name


def test_inputs_are_not_mutated_and_kinds_are_preserved() -> None:
    x = low_rank_plus_noise(60, 40, seed=13)
    x_copy = x.copy()
    t = torch.from_numpy(low_rank_plus_noise(60, 40, seed=13))
    t_copy = t.clone()
    pca = PCA(5).fit(x)
    z = pca.transform(x)
    assert isinstance(z, np.ndarray) and z.shape == (60, 5)
    out_t = pca.reconstruction_error(t)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (60,)
    pca.inverse_transform(z)
    np.testing.assert_array_equal(x, x_copy)
    assert torch.equal(t, t_copy)
    tpca = PCA(5).fit(t)
    assert isinstance(tpca.components_, torch.Tensor)
    assert torch.equal(t, t_copy)


def test_fre_is_zero_inside_the_subspace() -> None:
    x = low_rank_plus_noise(200, 50, seed=14)
    pca = PCA(0.97).fit(x)
    inside = pca.inverse_transform(np.random.default_rng(0).standard_normal((10, pca.n_components_)))
    assert np.abs(pca.reconstruction_error(inside)).max() < 1e-18 * np.abs(inside).max() ** 2 * 50 + 1e-12


def test_fit_transform_matches_sklearn_up_to_sign() -> None:
    x = low_rank_plus_noise(150, 90, seed=15)
    ref = SkPCA(4).fit_transform(x)
    ours = PCA(4).fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,match", [
    (np.full((10, 4), np.nan), "NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0], [2.0, 2.0]]), "NaN or Inf"),
    (np.zeros(10), "2-D"),
    (np.zeros((2, 3, 4)), "2-D"),
    (np.zeros((1, 5)), "at least 2 samples"),
])
def test_bad_fit_input(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        PCA(2).fit(bad)


@pytest.mark.parametrize("n_components", [0, -1, 11, 1.0, 0.0, 1.5, "0.9", True])
def test_bad_n_components(n_components) -> None:
    with pytest.raises(ValueError, match="n_components"):
        PCA(n_components).fit(low_rank_plus_noise(10, 12))


def test_transform_before_fit() -> None:
    with pytest.raises(ValueError, match="not fitted"):
        PCA(0.9).transform(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="not fitted"):
        _ = PCA(0.9).components_


def test_feature_size_mismatch() -> None:
    pca = PCA(0.9).fit(low_rank_plus_noise(20, 12))
    with pytest.raises(ValueError, match="12"):
        pca.transform(np.zeros((3, 13)))
    stream = PCA(0.9).partial_fit(low_rank_plus_noise(5, 12))
    with pytest.raises(ValueError, match="12"):
        stream.partial_fit(np.zeros((3, 11)))


def test_failed_partial_fit_leaves_state_unchanged() -> None:
    for solver in ("gram", "covariance"):
        x = low_rank_plus_noise(40, 12, seed=16)
        pca = PCA(0.9, solver=solver).partial_fit(x[:20])
        before = {k: v.clone() for k, v in pca._acc.state_dict().items()}
        bad = x[20:].copy()
        bad[3, 4] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            pca.partial_fit(bad)
        for k, v in pca._acc.state_dict().items():
            assert torch.equal(v, before[k]), k
        pca.partial_fit(x[20:])
        ref = PCA(0.9, solver=solver).fit(x)
        np.testing.assert_allclose(pca.explained_variance_, ref.explained_variance_, rtol=1e-9)


def test_wrong_device_and_solver() -> None:
    with pytest.raises(ValueError, match="solver"):
        PCA(0.9, solver="svd")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PCA(0.9, device="cuda")


def test_partial_fit_with_one_sample_cannot_be_used() -> None:
    pca = PCA(0.9).partial_fit(np.ones((1, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        pca.transform(np.ones((1, 5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
@pytest.mark.parametrize("solver", ["gram", "covariance"])
def test_cpu_and_cuda_agree(solver: str) -> None:
    x = low_rank_plus_noise(300, 1024, seed=17).astype(np.float32)
    xt = low_rank_plus_noise(40, 1024, seed=18).astype(np.float32)
    cpu = PCA(0.97, solver=solver, device="cpu").fit(x)
    gpu = PCA(0.97, solver=solver, device="cuda").fit(torch.from_numpy(x).cuda())
    assert cpu.n_components_ == gpu.n_components_
    np.testing.assert_allclose(gpu.explained_variance_.cpu().numpy(), cpu.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(gpu.reconstruction_error(torch.from_numpy(xt).cuda()).cpu().numpy(),
                               cpu.reconstruction_error(xt), rtol=1e-4)
    moved = PCA().load_state_dict(cpu.state_dict()).to("cuda")
    np.testing.assert_allclose(moved.reconstruction_error(torch.from_numpy(xt).cuda()).cpu().numpy(),
                               cpu.reconstruction_error(xt), rtol=1e-5)


@pytest.mark.parametrize("n, one_thread_max", [(5, 2048), (300, 2048), (300, 100)])
def test_symmetric_eigh_equals_linalg_eigh_and_restores_threads(n: int, one_thread_max: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread up to the size limit (every Gram solve), the caller's thread count afterwards; the same
    decomposition on both sides of the limit."""
    from fre_torch.core import subspace

    monkeypatch.setattr(subspace, "_EIGH_ONE_THREAD_MAX", one_thread_max)
    g = torch.randn(n, 64 if n > 5 else 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = g @ g.T + torch.eye(n, dtype=torch.float64)
    threads = torch.get_num_threads()
    evals, evecs = subspace.symmetric_eigh(a)
    assert torch.get_num_threads() == threads
    ref = torch.linalg.eigh(a)
    torch.testing.assert_close(evals, ref.eigenvalues, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, a, rtol=1e-9, atol=1e-8)


def test_row_span_subspace_scores_as_fit_gram_on_the_kept_rows() -> None:
    """The dual form, fitted on a subset from a block of the whole Gram matrix, gives the subset's own fit: the same
    spectrum and the float64 reference's reconstruction errors (no components formed)."""
    x = torch.from_numpy(low_rank_plus_noise(90, 3000, seed=3)).float()
    held = torch.arange(90) % 5 == 2
    before = x.clone()
    dual = fit_row_span(x, 0.97, gram=gram_matrix(x), keep=~held)
    primal = fit_gram(x[~held], 0.97)
    assert isinstance(dual, RowSpanSubspace) and torch.equal(x, before)
    assert dual.n_components == primal.n_components
    assert rel(dual.explained_variance, primal.explained_variance) < 1e-10
    assert float(dual.total_variance) == pytest.approx(float(primal.total_variance), rel=1e-12)
    # reference: float64 SVD of the kept rows, errors of the held-out rows
    kept = x[~held].double()
    mean = kept.mean(dim=0)
    v = torch.linalg.svd(kept - mean, full_matrices=False)[2][:primal.n_components]
    xc = x[held].double() - mean
    ref = (xc - xc @ v.T @ v).square()
    err = dual.error_map(x[held])
    assert err.dtype == torch.float32 and err.shape == x[held].shape
    assert rel(err.double(), ref) < 1e-6
    assert rel(dual.fre(x[held]).double(), ref.sum(dim=1)) < 1e-6
    assert rel(primal.error_map(x[held]).double(), ref) < 1e-5  # the float32 primal form is the less exact one
    # The held-out rows' residuals from the Gram matrix (cross-fitting's path): the same float64 reference.
    index = torch.nonzero(held).flatten()
    from_gram = dual.residual_of_rows(index)
    assert from_gram.dtype == torch.float64 and rel(from_gram.square(), ref) < 1e-9
    assert rel(from_gram, dual.residual(x[held].double())) < 1e-9


def test_row_span_falls_back_to_components_where_directions_are_undetermined() -> None:
    x = torch.from_numpy(low_rank_plus_noise(6, 50, seed=1)[:3]).repeat(4, 1)  # rank 2 after centring, N = 12
    model = fit_row_span(x, 5)  # 5 components of a rank-2 set: completed to an orthonormal basis
    assert isinstance(model, Subspace) and model.n_components == 5
    assert rel(model.components.float() @ model.components.float().T, torch.eye(5)) < 1e-5
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_row_span(x, 0.9, keep=torch.arange(12) == 0)
