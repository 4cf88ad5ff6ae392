"""Linear autoencoders (modes 'tae' / 'ae'): convergence to the PCA subspace of synthetic low-rank data against
scikit-learn's float64 PCA, k chosen as PCA chooses it, determinism, principal angles against closed forms and scipy,
bad input -> ValueError, the detector in mode 'tae' / 'ae' (fit, scores, maps, model files), and
``cli.py evaluate --modes``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA as SkPCA

import cli
from fre_torch.core.autoencoder import LinearAutoencoder, principal_angles
from fre_torch.features.images import MVTecCategory, load_image
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.features.synthetic import write_synthetic_mvtec

D, RANK, NOISE = 64, 5, 0.05
SCALES = (5.0, 4.0, 3.0, 2.0, 1.5)  # distinct signal scales: the top-5 subspace and its axes are well determined
# The sample PCA of 500 rows lies 0.2..0.6 degrees from the true signal subspace (sampling error). The AEs must
# reach the sample PCA itself, an order of magnitude closer than that (measured: tied 4e-6, untied 0.008 degrees).
MAX_ANGLE_DEG = 0.05


def _low_rank(n: int, seed: int) -> torch.Tensor:
    """(n, 64) float32: a rank-5 signal (fixed basis) + isotropic noise of std 0.05 + an offset of 3 (so centring
    matters)."""
    basis, _ = torch.linalg.qr(torch.randn(D, RANK, generator=torch.Generator().manual_seed(123),
                                           dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, RANK, generator=gen, dtype=torch.float64) * torch.tensor(SCALES, dtype=torch.float64)
    noise = NOISE * torch.randn(n, D, generator=gen, dtype=torch.float64)
    return (z @ basis.T + noise + 3.0).float()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return {"train": _low_rank(500, 0), "test": _low_rank(200, 1)}


@pytest.fixture(scope="module")
def reference(data) -> dict[str, torch.Tensor]:
    """scikit-learn PCA(5) in float64: components (5, D) and the FRE of the held-out rows."""
    train, test = data["train"].double().numpy(), data["test"].double().numpy()
    pca = SkPCA(RANK, svd_solver="full").fit(train)
    fre = ((test - pca.inverse_transform(pca.transform(test))) ** 2).sum(1)
    left_out = (train - train.mean(0)).var(0, ddof=1).sum() - pca.explained_variance_.sum()
    return {"components": torch.from_numpy(pca.components_), "fre": torch.from_numpy(fre),
            "left_out": torch.tensor(left_out)}


@pytest.fixture(scope="module")
def tied(data) -> LinearAutoencoder:
    return LinearAutoencoder(RANK, tied=True).fit(data["train"])


@pytest.fixture(scope="module")
def untied(data) -> LinearAutoencoder:
    return LinearAutoencoder(RANK, tied=False).fit(data["train"])


# ------------------------------------------------------------------------------------------------------------------
# Convergence to PCA
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.full
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_autoencoder_reaches_the_pca_subspace(which: str, request: pytest.FixtureRequest, reference) -> None:
    ae = request.getfixturevalue(which)
    angles = torch.rad2deg(principal_angles(reference["components"].T, ae.basis()))
    assert angles.shape == (RANK,)
    assert float(angles.max()) < MAX_ANGLE_DEG, angles


def test_tied_fre_matches_pca(tied: LinearAutoencoder, data, reference) -> None:
    """Held-out FRE per row within 0.1 % of PCA's (measured: 1e-6), and the score scale (training residual
    variance) within 0.1 % of PCA's left-out variance; the tied weights end orthonormal."""
    rel = tied.fre(data["test"]).double() / reference["fre"] - 1
    assert float(rel.abs().max()) < 1e-3
    assert float(tied.residual_variance / reference["left_out"] - 1) == pytest.approx(0, abs=1e-3)
    w = tied.encoder.double()
    assert torch.allclose(w.T @ w, torch.eye(RANK, dtype=torch.float64), atol=1e-3)


def test_untied_fre_close_to_pca(untied: LinearAutoencoder, data, reference) -> None:
    """The untied encoder converges more slowly off the signal subspace (its gradient there scales with the noise
    variance), so its held-out FRE is close rather than equal: mean within 1 %, each row within 3 % (measured
    0.2 % / 1 %)."""
    rel = untied.fre(data["test"]).double() / reference["fre"] - 1
    assert abs(float(rel.mean())) < 0.01
    assert float(rel.abs().max()) < 0.03


def test_minibatch_training_also_converges(data, reference) -> None:
    ae = LinearAutoencoder(RANK, tied=True).fit(data["train"], batch_size=100, steps=1500)
    angles = torch.rad2deg(principal_angles(reference["components"].T, ae.basis()))
    assert float(angles.max()) < 0.5


@pytest.mark.parametrize("n, fraction", [(500, 0.97), (500, 0.6), (30, 0.97), (30, 0.8)])
def test_fraction_picks_the_same_k_as_sklearn(n: int, fraction: float) -> None:
    """k from the float64 spectrum (Gram when N <= D, scatter otherwise) = scikit-learn's rule. One step of
    training: k is chosen before it."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, D, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, D, dtype=torch.float64)).float()
    expected = SkPCA(fraction, svd_solver="full").fit(x.double().numpy()).n_components_
    assert LinearAutoencoder(fraction).fit(x, steps=1).n_components_ == expected


def test_int_components_are_used_directly(data) -> None:
    assert LinearAutoencoder(3, tied=False).fit(data["train"], steps=1).n_components_ == 3


# ------------------------------------------------------------------------------------------------------------------
# Determinism, purity, state
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied_", [True, False])
def test_same_seed_same_weights(tied_: bool, data) -> None:
    fit = lambda seed: LinearAutoencoder(RANK, tied=tied_).fit(data["train"], steps=50, seed=seed)  # noqa: E731
    a, b, c = fit(0), fit(0), fit(1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.encoder, c.encoder)


def test_fit_and_score_do_not_modify_inputs(data) -> None:
    x, t = data["train"][:100].clone(), data["test"][:10].clone()
    ae = LinearAutoencoder(RANK).fit(x, steps=20)
    for f in (ae.fre, ae.error_map, ae.residual, ae.reconstruct, ae.project):
        f(t)
    assert torch.equal(x, data["train"][:100]) and torch.equal(t, data["test"][:10])


def test_fit_under_inference_mode(data) -> None:
    """The detector's features are inference tensors made under ``torch.inference_mode``; training still works and
    gives the same weights."""
    x = data["train"][:100]
    expected = LinearAutoencoder(RANK, tied=False).fit(x, steps=30)
    with torch.inference_mode():
        got = LinearAutoencoder(RANK, tied=False).fit(x.clone(), steps=30)
    assert torch.equal(got.encoder, expected.encoder) and torch.equal(got.decoder, expected.decoder)


def test_constant_rows_give_zero_residual_not_nan() -> None:
    ae = LinearAutoencoder(0.97).fit(torch.full((10, D), 2.0), steps=20)
    assert float(ae.residual_variance) == 0.0 and bool(torch.isfinite(ae.encoder).all())


def test_scoring_api_is_consistent(untied: LinearAutoencoder, data) -> None:
    t = data["test"][:16]
    assert torch.allclose(untied.reconstruct(t) - t, -untied.residual(t), atol=1e-5)
    assert torch.allclose(untied.error_map(t).sum(dim=1), untied.fre(t))
    assert untied.project(t).shape == (16, RANK) and untied.error_map(t).shape == (16, D)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_state_dict_round_trip(which: str, request: pytest.FixtureRequest, data) -> None:
    ae = request.getfixturevalue(which)
    state = ae.state_dict()
    assert ("decoder" in state) == (which == "untied")  # a tied model stores W once
    fresh = LinearAutoencoder(RANK, tied=which == "tied")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.fre(data["test"]), ae.fre(data["test"]))
    assert int(fresh.n_steps) == int(ae.n_steps) > 0


# ------------------------------------------------------------------------------------------------------------------
# principal_angles
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 1e-9, 1e-4, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_principal_angle_closed_form(theta: float) -> None:
    """span(e1, e3) vs span(cos t e1 + sin t e2, e3): angles (0, t); tiny angles survive (the sine branch)."""
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(theta), 0.0], [math.sin(theta), 0.0], [0.0, 2.0]], dtype=torch.float64)
    got = principal_angles(a, b)
    assert torch.allclose(got, torch.tensor([0.0, theta], dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_principal_angles_match_scipy() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randn(40, 4, generator=gen,
                                                                               dtype=torch.float64)
    expected = np.sort(subspace_angles(a.numpy(), b.numpy()))
    assert np.allclose(principal_angles(a, b).numpy(), expected, atol=1e-12)
    assert np.allclose(principal_angles(b, a).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("a, b, match", [
    (torch.ones(5, 2), torch.ones(4, 2), "same number of rows"),
    (torch.ones(5), torch.ones(5, 1), "2-D"),
    (torch.ones(5, 2), torch.eye(5)[:, :2], "linearly dependent"),
    (torch.randn(3, 4), torch.randn(3, 2), "more columns than rows"),
])
def test_principal_angles_bad_input(a, b, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        principal_angles(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def _with_nan() -> torch.Tensor:
    x = _low_rank(20, 3)
    x[4, 7] = float("nan")
    return x


@pytest.mark.parametrize("rows, kwargs, match", [
    (_with_nan(), {}, "NaN"),
    (torch.ones(1, D), {}, "at least 2 training rows"),
    (torch.ones(D), {}, "2-D"),
    (_low_rank(10, 3), {"n_components": 10}, r"exceeds min\(N - 1, D\) = 9"),
    (_low_rank(10, 3), {"n_components": 70}, "exceeds"),
    (_low_rank(10, 3), {"steps": 0}, "steps"),
    (_low_rank(10, 3), {"lr": -1.0}, "lr"),
    (_low_rank(10, 3), {"batch_size": 0}, "batch_size"),
    (_low_rank(10, 3), {"check_every": 0}, "check_every"),
])
def test_bad_fit_input_raises(rows: torch.Tensor, kwargs: dict, match: str) -> None:
    n_components = kwargs.pop("n_components", 3)
    with pytest.raises(ValueError, match=match):
        LinearAutoencoder(n_components).fit(rows, **kwargs)


def test_bad_construction_and_unfitted_use_raise(tied: LinearAutoencoder) -> None:
    with pytest.raises(ValueError, match="tied"):
        LinearAutoencoder(3, tied="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_components"):
        LinearAutoencoder(1.5)
    with pytest.raises(ValueError, match="not fitted"):
        LinearAutoencoder(3).fre(torch.ones(2, D))
    with pytest.raises(ValueError, match=f"shape \\(N, {D}\\)"):
        tied.fre(torch.ones(2, D + 1))


# ------------------------------------------------------------------------------------------------------------------
# The detector and the CLI
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mvtec(tmp_path_factory.mktemp("ae") / "ds", categories=("texture",), n_train=16,
                                 n_test_good=4, n_test_defect=3, size=64)


@pytest.fixture(scope="module")
def synth_images(synth_root: Path) -> dict[str, torch.Tensor]:
    cat = MVTecCategory.load(synth_root, "texture")
    return {"train": torch.stack([load_image(p, 64) for p in cat.train]),
            "test": torch.stack([load_image(p, 64) for p in cat.test_paths])}


@pytest.fixture(scope="module")
def pca_detector(synth_images) -> FREDetector:
    # image_score='fre': these tests compare the subspace fits, through the plain FRE they give
    return FREDetector(DetectorConfig("efficientnet_lite0", input_size=64, image_score="fre"),
                       device="cpu").fit(synth_images["train"])


@pytest.mark.full
@pytest.mark.parametrize("mode", ["tae", "ae"])
def test_detector_mode_fits_scores_maps_and_round_trips(mode: str, synth_images, pca_detector: FREDetector,
                                                        tmp_path: Path) -> None:
    # The detail head named: 64 px images at a 64 px input would leave the default one out (DetectorConfig.for_images).
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64, mode=mode, image_score="fre",
                                     detail_layers=("blocks.2", "blocks.3", "blocks.4")), device="cpu")
    det.fit(synth_images["train"])
    models = [*det.subspaces, *det.map_subspaces]  # all three heads train the same kind of model
    assert len(models) == len(det.config.layer_features) == 8
    assert all(isinstance(m, LinearAutoencoder) and m.tied == (mode == "tae") for m in models)
    # Same k as PCA on the same rows; the score scale is the AE's training residual variance.
    assert [m.n_components_ for m in det.subspaces] == [s.n_components for s in pca_detector.subspaces]
    assert torch.equal(det.scales, torch.stack([m.residual_variance for m in det.subspaces]))
    scores, maps = det.anomaly_maps(synth_images["test"])
    assert maps.shape == (len(scores), *det.config.map_grid) and bool(torch.isfinite(scores).all())
    score_maps = det.head_maps(det.features(synth_images["test"]), "score", stitched=False)
    assert torch.allclose(score_maps.sum(dim=(1, 2, 3)), scores, rtol=1e-4)  # 'fre': the sum of the score cells
    # Trained to convergence, the fused scores follow PCA's (tied: to float32 rounding; untied: within 5 %).
    rel = scores.double() / pca_detector.score(synth_images["test"]).double() - 1
    assert float(rel.abs().max()) < (1e-3 if mode == "tae" else 0.05)

    path = det.save(tmp_path / f"{mode}.pt")
    loaded = FREDetector.load(path, device="cpu")
    assert loaded.config.mode == mode
    assert torch.equal(loaded.score(synth_images["test"]), det.score(synth_images["test"]))
    assert torch.equal(loaded.anomaly_maps(synth_images["test"])[1], maps)


def test_model_file_without_mode_loads_as_pca(pca_detector: FREDetector, synth_images, tmp_path: Path) -> None:
    """Files written before the 'mode' setting existed have no such key: they load as PCA."""
    path = pca_detector.save(tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    del payload["config"]["mode"]
    torch.save(payload, path)
    loaded = FREDetector.load(path, device="cpu")
    assert loaded.config.mode == "pca"
    assert torch.equal(loaded.score(synth_images["test"]), pca_detector.score(synth_images["test"]))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "lae"}, "mode must be one of"),
    ({"mode": "tae", "kernel": "rbf"}, "do not combine"),
])
def test_bad_mode_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectorConfig("efficientnet_lite0", **kwargs)


def _tables(out: str) -> dict[str, dict[str, list[str]]]:
    """'mode: X' heading -> {first cell -> other cells} of that table's data rows."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("mode: "):
            current = tables.setdefault(line.split()[1], {})
        elif current is not None and line.split() and not set(line.strip()) <= {"-"}:
            current[line.split()[0]] = line.split()[1:]
    return tables


@pytest.mark.full
def test_cli_evaluate_modes(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "modes.json"
    code = cli.main(["evaluate", "--dataset_directory", str(synth_root), "--object_category", "texture",
                     "--model", "efficientnet_lite0", "--input_size", "64", "--device", "cpu", "--workers", "0",
                     "--modes", "pca", "tae", "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    tables = _tables(out)
    assert set(tables) == {"pca", "tae"}
    for rows in tables.values():
        assert {"category", "texture", "mean"} <= set(rows)
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"modes"} and set(doc["modes"]) == {"pca", "tae"}
    for mode, sub in doc["modes"].items():
        assert sub["config"]["mode"] == mode
        assert 0.0 <= sub["categories"]["texture"]["image_auroc"] <= 1.0
        assert "pixel_auroc" in sub["mean"]
    # The tied AE reaches PCA's subspace, so it ranks the test images as PCA does.
    auroc = {m: doc["modes"][m]["mean"]["image_auroc"] for m in ("pca", "tae")}
    assert auroc["tae"] == pytest.approx(auroc["pca"], abs=1e-9)


def test_cli_modes_with_kernel_is_a_usage_error(synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["evaluate", "--dataset_directory", str(synth_root), "--model", "efficientnet_lite0",
                     "--kernel", "rbf", "--modes", "tae"])
    _, err = capsys.readouterr()
    assert code == 2 and "do not combine" in err and "Traceback" not in err
