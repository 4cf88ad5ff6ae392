"""Kernel FRE against a direct float64 construction of kernel PCA, and the explicit maps against the exact model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import NEEDS_CUDA

from fre_torch.core.kernel import (
    ExactKernelFRE,
    KernelFRE,
    NystroemFeatures,
    RandomFourierFeatures,
    kernel_matrix,
    median_heuristic,
    select_landmarks,
)

F64 = torch.float64


def manifold(n: int, d: int = 64, *, seed: int = 0, off_manifold: float = 0.0, noise: float = 0.05) -> torch.Tensor:
    """(n, d) float64 rows near a curved 2-D manifold (a torus-like surface) in R^d, plus noise and an offset.

    The surface is the same for every seed (fixed projection); ``off_manifold`` adds isotropic noise that moves
    rows off it (the anomalies).
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, 2, generator=g, dtype=F64) * (2 * torch.pi)
    u, v = t[:, 0], t[:, 1]
    base = torch.stack([u.cos(), u.sin(), v.cos(), v.sin(), (u + v).cos(), (2 * u - v).sin()], dim=1)
    proj = torch.randn(6, d, generator=torch.Generator().manual_seed(123), dtype=F64)
    x = base @ proj + 3.0
    x = x + (noise + off_manifold) * torch.randn(n, d, generator=g, dtype=F64)
    return x


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """500 training rows, 200 test rows (100 on the manifold, 100 off it), D = 64."""
    train = manifold(500, seed=0)
    test = torch.cat([manifold(100, seed=1), manifold(100, seed=2, off_manifold=0.6)])
    return train, test


@pytest.fixture(scope="module")
def exact(data) -> ExactKernelFRE:
    return ExactKernelFRE(0.97).fit(data[0])


def ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v, dtype=F64)
    r[v.argsort()] = torch.arange(len(v), dtype=F64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (no ties in continuous scores): Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


# ------------------------------------------------------------------------------------------------ exact kernel FRE
def direct_kernel(a: np.ndarray, b: np.ndarray, kernel: str, s: float) -> float:
    if kernel == "rbf":
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)))
    return float(np.exp(-np.sum(np.abs(a - b)) / s))


def direct_kernel_fre(train: np.ndarray, test: np.ndarray, kernel: str, s: float, n_components):
    """Kernel-PCA FRE the long way, float64: explicit feature vectors of all rows, then linear PCA on them.

    The full Gram matrix of train + test is built pair by pair; centring in feature space on the training mean is
    the matrix ``A = I - 1 e^T`` (e = 1/N on training rows); ``A K A^T = F F^T`` gives explicit coordinates F of
    the centred feature vectors; PCA of the training rows of F (their mean is 0) with scikit-learn's
    explained-variance rule, then the residual ``f - V V^T f`` of every test row and its squared norm.
    """
    z = np.concatenate([train, test])
    n, t = len(train), len(test)
    k = np.empty((n + t, n + t))
    for i in range(n + t):
        for j in range(n + t):
            k[i, j] = direct_kernel(z[i], z[j], kernel, s)
    e = np.zeros(n + t)
    e[:n] = 1.0 / n
    a = np.eye(n + t) - np.outer(np.ones(n + t), e)
    kc = a @ k @ a.T
    lam, u = np.linalg.eigh((kc + kc.T) / 2)
    f = u * np.sqrt(np.clip(lam, 0.0, None))  # (n + t, n + t): rows are centred feature vectors
    f_train, f_test = f[:n], f[n:]
    # centred on the training mean (up to sqrt(eps): a null direction's column is sqrt of a rounding-level value)
    assert np.abs(f_train.sum(axis=0)).max() < 1e-6
    var, vecs = np.linalg.eigh(f_train.T @ f_train / (n - 1))
    var, vecs = var[::-1].clip(0.0), vecs[:, ::-1]
    if isinstance(n_components, float):
        ratio = var / var.sum()
        k_keep = int(np.searchsorted(np.cumsum(ratio), n_components, side="right") + 1)
    else:
        k_keep = n_components
    v = vecs[:, :k_keep]
    fre = np.empty(t)
    for i in range(t):
        r = f_test[i] - v @ (v.T @ f_test[i])
        fre[i] = r @ r
    return fre, k_keep


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
@pytest.mark.parametrize("n_components", [0.9, 7])
def test_exact_kernel_fre_matches_direct_construction(kernel: str, n_components) -> None:
    train = manifold(60, 5, seed=3)
    test = torch.cat([manifold(10, 5, seed=4), manifold(10, 5, seed=5, off_manifold=0.5)])
    model = ExactKernelFRE(n_components, kernel=kernel).fit(train)
    ref, k_ref = direct_kernel_fre(train.numpy(), test.numpy(), kernel, model.bandwidth_, n_components)
    assert model.n_components_ == k_ref
    got = model.score(test).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=0)
    # training rows: the same formula, and a kernel-PCA residual no larger than a test anomaly's
    np.testing.assert_allclose(model(train[:5]).numpy(), direct_kernel_fre(train.numpy(), train[:5].numpy(), kernel,
                                                                          model.bandwidth_, n_components)[0],
                               rtol=1e-8, atol=1e-14)


def test_median_heuristic_known_answers() -> None:
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=F64)  # distances 1 2 3 4 6 7 -> (3 + 4) / 2
    assert median_heuristic(line) == pytest.approx(3.5, rel=1e-15)
    assert median_heuristic(line, "laplacian") == pytest.approx(3.5, rel=1e-15)
    tri = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]])  # L2: sqrt2, 3, sqrt5; L1: 2, 3, 3
    assert median_heuristic(tri) == pytest.approx(5 ** 0.5, rel=1e-7)
    assert median_heuristic(tri, "laplacian") == pytest.approx(3.0, rel=1e-7)
    # the documented subsample: rows randperm(N, seeded generator)[:max_samples]
    x = manifold(50, 8, seed=6)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(11))[:10]
    sub = x[idx]
    pair = torch.cdist(sub, sub)[tuple(torch.triu_indices(10, 10, offset=1))]  # 45 pairs: one middle value
    assert median_heuristic(x, max_samples=10, seed=11) == pytest.approx(float(pair.median()), rel=1e-12)
    # the default bandwidth of the models is this rule on the training rows
    assert ExactKernelFRE(3).fit(x).bandwidth_ == median_heuristic(x)
    assert KernelFRE(3, kernel_features=16).fit(x).bandwidth_ == pytest.approx(median_heuristic(x), rel=1e-15)


# ------------------------------------------------------------------------------------------------ explicit maps
def gram_error(phi: torch.Tensor, k: torch.Tensor) -> float:
    """Relative Frobenius error of the explicit-feature Gram matrix."""
    return float((phi.to(F64) @ phi.to(F64).T - k).norm() / k.norm())


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
def test_random_features_error_falls_with_m(data, kernel: str) -> None:
    x = data[0][:300]
    s = median_heuristic(x, kernel)
    k = kernel_matrix(x, x, kernel, s)
    errors = []
    for m in (256, 1024, 4096):
        errors.append(np.mean([gram_error(RandomFourierFeatures(64, m, bandwidth=s, kernel=kernel, seed=seed,
                                                                dtype=F64)(x), k) for seed in range(3)]))
    print(f"{kernel} RFF Gram relative error, M = 256 / 1024 / 4096:", [f"{e:.4f}" for e in errors])
    # Monte Carlo: the error falls as 1 / sqrt(M), i.e. halves for each 4x; allow slack for three seeds
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1]


def test_orthogonal_features_are_at_least_as_good(data) -> None:
    x = data[0][:300]
    s = median_heuristic(x)
    k = kernel_matrix(x, x, "rbf", s)
    for m in (64, 256):  # one block, and four blocks of D = 64 orthogonal rows
        plain = np.mean([gram_error(RandomFourierFeatures(64, m, bandwidth=s, seed=seed, dtype=F64)(x), k)
                         for seed in range(8)])
        ortho = np.mean([gram_error(RandomFourierFeatures(64, m, bandwidth=s, orthogonal=True, seed=seed,
                                                          dtype=F64)(x), k) for seed in range(8)])
        print(f"M = {m}: Gram relative error plain {plain:.4f}, orthogonal {ortho:.4f}")
        assert ortho <= plain


def test_orthogonal_rows_are_orthogonal_within_blocks() -> None:
    w = RandomFourierFeatures(16, 40, bandwidth=2.0, orthogonal=True, dtype=F64).weight * 2.0  # (40, 16), s = 2
    for block in (w[:16], w[16:32], w[32:]):
        g = block @ block.T
        off = g - torch.diag(torch.diagonal(g))
        assert off.abs().max() < 1e-12 * g.diagonal().max()


def test_nystroem_is_exact_on_landmarks() -> None:
    lm = manifold(40, 6, seed=7)
    ny = NystroemFeatures(lm, bandwidth=2.5, dtype=F64)
    phi = ny(lm)
    torch.testing.assert_close(phi @ phi.T, kernel_matrix(lm, lm, "rbf", 2.5), rtol=0, atol=1e-10)
    torch.testing.assert_close(ny.out_of_span(phi), torch.zeros(40, dtype=F64), rtol=0, atol=1e-10)


def test_landmark_selection(data) -> None:
    x = data[0]
    for method in ("uniform", "kcenter"):
        lm = select_landmarks(x, 32, method, seed=1)
        assert lm.shape == (32, 64)
        assert torch.equal(lm, select_landmarks(x, 32, method, seed=1))  # seeded
        assert len(torch.unique(lm, dim=0)) == 32
    # k-center: the covering radius (max distance of a row to its nearest landmark) beats a uniform sample's
    radius = {m: float(torch.cdist(x, select_landmarks(x, 32, m)).min(dim=1).values.max())
              for m in ("uniform", "kcenter")}
    assert radius["kcenter"] < radius["uniform"]
    # a far outlier is always a k-center landmark
    xo = torch.cat([x, x[:1] + 100.0])
    assert (select_landmarks(xo, 5, "kcenter") == xo[-1]).all(dim=1).any()


# ------------------------------------------------------------------------------------------------ KernelFRE vs exact
def test_rff_kernel_fre_matches_exact(data, exact) -> None:
    train, test = data
    ref = exact.score(test)
    k = exact.n_components_  # the same k: the comparison is of the approximation, not of the k rule's rounding
    model = KernelFRE(k, kernel_features=4096, bandwidth=exact.bandwidth_).fit(train.float())
    got = model.score(test.float())
    rho, rho_normal = spearman(got, ref), spearman(got[:100], ref[:100])
    print(f"RFF M=4096 k={k}: Spearman {rho:.4f} (on-manifold rows only {rho_normal:.4f}), "
          f"relative error {rel_err(got, ref):.4f}")
    assert rho >= 0.99


def test_nystroem_kernel_fre_matches_exact(data, exact) -> None:
    train, test = data
    ref = exact.score(test)
    k = exact.n_components_
    model = KernelFRE(k, method="nystroem", kernel_features=256, bandwidth=exact.bandwidth_).fit(train.float())
    got = model.score(test.float())
    rho, rho_normal = spearman(got, ref), spearman(got[:100], ref[:100])
    print(f"Nystroem m=256 k-center k={k}: Spearman {rho:.4f} (on-manifold rows only {rho_normal:.4f}), "
          f"relative error {rel_err(got, ref):.4f}")
    assert rho >= 0.99
    # with every training row as a landmark (float64, full rank) the explicit model is the exact one
    full = KernelFRE(k, feature_map=NystroemFeatures(train, bandwidth=exact.bandwidth_)).fit(train)
    torch.testing.assert_close(full.score(test), ref, rtol=1e-8, atol=0)


@pytest.mark.full
def test_kernel_fre_error_falls_with_m(data, exact) -> None:
    train, test = data
    ref = exact.score(test)
    k = exact.n_components_
    errors = []
    for m in (256, 1024, 4096):
        errors.append(np.mean([rel_err(KernelFRE(k, kernel_features=m, bandwidth=exact.bandwidth_, seed=seed)
                                       .fit(train.float()).score(test.float()), ref) for seed in range(2)]))
    print("RFF kernel FRE relative error, M = 256 / 1024 / 4096:", [f"{e:.4f}" for e in errors])
    assert errors[0] > errors[1] > errors[2]


# ------------------------------------------------------------------------------------------------ streaming, state
# (M, solver): N = 300 < M stays on the Gram path; M = 128 crosses to the covariance path mid-stream
STREAM_CASES = {"rff-gram": (512, "auto"), "rff-switch": (128, "auto"), "rff-covariance": (512, "covariance")}


@pytest.mark.full
@pytest.mark.parametrize("case", [*STREAM_CASES, "nystroem"])
def test_streaming_equals_one_shot(data, case: str) -> None:
    train, test = data
    train, test = train[:300], test[::4]
    train_copy = train.clone()
    fmap = NystroemFeatures(select_landmarks(train, 64), bandwidth=9.0) if case == "nystroem" else None  # float64

    def make() -> KernelFRE:
        if fmap is not None:
            return KernelFRE(0.95, feature_map=fmap)
        m, solver = STREAM_CASES[case]
        return KernelFRE(0.95, kernel_features=m, bandwidth=9.0, solver=solver, seed=3)

    one_shot = make().fit(train)
    streamed = make()
    start = 0
    for size in (37, 100, 1, 62, 100):  # uneven, crossing the Gram -> covariance switch at M = 128
        streamed.partial_fit(train[start:start + size])
        start += size
    assert start == 300
    assert streamed.n_components_ == one_shot.n_components_
    torch.testing.assert_close(streamed.score(test), one_shot.score(test), rtol=1e-8, atol=0)
    assert torch.equal(train, train_copy)  # inputs are never modified


@pytest.mark.parametrize("method", ["rff", "nystroem"])
def test_state_dict_round_trip(data, method: str) -> None:
    train, test = data[0][:200].float(), data[1][::4].float()
    config = dict(kernel_features=64, method=method, orthogonal=method == "rff")
    model = KernelFRE(0.9, **config)
    model.partial_fit(train[:120]).partial_fit(train[120:])  # state_dict() solves the pending statistics
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = KernelFRE(0.9, **config)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(restored.score(test), model.score(test))
    assert restored.bandwidth_ == model.bandwidth_

    exact = ExactKernelFRE(0.9, kernel="laplacian").fit(train)
    again = ExactKernelFRE(0.9, kernel="laplacian")
    again.load_state_dict(exact.state_dict())
    assert torch.equal(again.score(test), exact.score(test))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
@pytest.mark.parametrize("method", ["rff", "nystroem"])
def test_cpu_and_cuda_agree(data, method: str) -> None:
    train, test = data[0].float(), data[1].float()
    cpu = KernelFRE(20, method=method, kernel_features=256, device="cpu").fit(train)
    gpu = KernelFRE(20, method=method, kernel_features=256, device="cuda").fit(train.cuda())
    torch.testing.assert_close(gpu.score(test.cuda()).cpu(), cpu.score(test), rtol=1e-3, atol=1e-5)
    moved = KernelFRE(20, method=method, kernel_features=256)
    moved.load_state_dict(cpu.state_dict())
    moved = moved.to("cuda")
    torch.testing.assert_close(moved.score(test.cuda()).cpu(), cpu.score(test), rtol=1e-4, atol=1e-6)
    ex_cpu = ExactKernelFRE(20).fit(data[0])
    ex_gpu = ExactKernelFRE(20, device="cuda").fit(data[0])
    torch.testing.assert_close(ex_gpu.score(data[1]).cpu(), ex_cpu.score(data[1]), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    (lambda: RandomFourierFeatures(8, 16, bandwidth=0.0), "bandwidth"),
    (lambda: RandomFourierFeatures(8, 16, bandwidth=-1.0), "bandwidth"),
    (lambda: RandomFourierFeatures(8, 16, bandwidth=float("nan")), "bandwidth"),
    (lambda: RandomFourierFeatures(8, 16, bandwidth=float("inf")), "bandwidth"),
    (lambda: RandomFourierFeatures(8, 0, bandwidth=1.0), "n_components"),
    (lambda: RandomFourierFeatures(8, 16, bandwidth=1.0, kernel="laplacian", orthogonal=True), "orthogonal"),
    (lambda: RandomFourierFeatures(8, 16, bandwidth=1.0, kernel="poly"), "kernel"),
    (lambda: KernelFRE(kernel_features=0), "kernel_features"),
    (lambda: KernelFRE(bandwidth=-2.0), "bandwidth"),
    (lambda: KernelFRE(bandwidth=float("nan")), "bandwidth"),
    (lambda: KernelFRE(method="svm"), "method"),
    (lambda: KernelFRE(n_components=1.5), "n_components"),
    (lambda: ExactKernelFRE(bandwidth=0), "bandwidth"),
    (lambda: NystroemFeatures(torch.ones(5), bandwidth=1.0), "landmarks"),
    (lambda: NystroemFeatures(torch.ones(0, 3), bandwidth=1.0), "landmarks"),
    (lambda: NystroemFeatures(torch.full((2, 3), float("nan")), bandwidth=1.0), "NaN"),
    (lambda: NystroemFeatures(torch.ones(2, 3), bandwidth=0.0), "bandwidth"),
    (lambda: select_landmarks(torch.ones(4, 3), 5), "landmarks"),
    (lambda: select_landmarks(torch.ones(4, 3), 0), "landmarks"),
    (lambda: select_landmarks(torch.ones(4, 3), 2, "random"), "method"),
    (lambda: median_heuristic(torch.ones(6, 3)), "bandwidth explicitly"),
    (lambda: KernelFRE(method="nystroem", kernel_features=64).fit(torch.randn(20, 3)), "kernel_features"),
    (lambda: KernelFRE(kernel_features=8).fit(torch.randn(20, 3)).score(torch.randn(2, 4)), "features"),
    (lambda: KernelFRE(kernel_features=8).score(torch.randn(2, 3)), "not fitted"),
    (lambda: NystroemFeatures(torch.randn(4, 3), bandwidth=1.0)(torch.randn(2, 5)), "shape"),
]


@pytest.mark.parametrize("make,match", BAD, ids=range(len(BAD)))
def test_bad_input_raises(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
