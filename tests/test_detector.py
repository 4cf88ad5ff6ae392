"""FREDetector: the score formula vs direct PCA math, --reference parity with scikit-learn, model files, bad input,
and image AUROC on the real data sets (skipped when ../shared/data is absent)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA

from conftest import NEEDS_NO_CUDA, require_category
from fre_torch import PCA
from fre_torch.features.images import MVTecCategory, load_image
from fre_torch.detection.detector import DetectorConfig, FREDetector, ModelFileError
from fre_torch.jobs.evaluate import evaluate_category
from fre_torch.features.synthetic import write_synthetic_mvtec


def _load(paths, size: int) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in paths])


def _max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the tolerance unit of the parity checks."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max())


def _sklearn_fre(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, int]:
    """The reference pipeline's score: sklearn PCA(0.97) and the squared reconstruction error, in float64."""
    pca = SkPCA(0.97).fit(train)
    return ((test - pca.inverse_transform(pca.transform(test))) ** 2).sum(1), int(pca.n_components_)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Generated images at 224 px: 40 normal training images and 12 test images (4 normal, 8 defective)."""
    root = write_synthetic_mvtec(tmp_path_factory.mktemp("synth") / "data", categories=("texture",), n_train=40,
                                 n_test_good=4, n_test_defect=4, size=64)
    cat = MVTecCategory.load(root, "texture")
    return {"train": _load(cat.train, 224), "test": _load(cat.test_paths, 224), "labels": cat.test_labels}


@pytest.fixture(scope="module")
def fitted_default(synth) -> FREDetector:
    return FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu").fit(synth["train"])


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------------------
# The default configuration and its score formula
# ------------------------------------------------------------------------------------------------------------------


def test_default_config_shape() -> None:
    cfg = DetectorConfig()
    assert cfg.backbone == "efficientnet_lite0"
    assert cfg.layers == ("blocks.8", "blocks.14") and cfg.map_layers == ("blocks.3", "blocks.4", "blocks.8")
    assert cfg.input_size == 224 and cfg.load_size == 224 and cfg.map_input_size == 0  # one backbone pass
    assert cfg.score_head.grid == (7, 7) and cfg.map_head.grid == (14, 14)
    assert cfg.detail_layers == ("blocks.2", "blocks.3", "blocks.4") and cfg.detail_pool == 2  # stride 4 pooled by 2
    assert cfg.detail_head.grid == (28, 28) == cfg.map_grid
    # score head: 112 x 7 x 7, 192 x 7 x 7; map head: 40 x 14 x 14 (twice), 112 x 14 x 14; detail: 24 x 28 x 28,
    # 40 x 28 x 28 (twice)
    assert cfg.layer_features == (5488, 9408, 7840, 7840, 21952, 18816, 31360, 31360)
    assert cfg.n_score_subspaces == 2 and cfg.n_map_subspaces == 3


@pytest.mark.full
def test_fre_score_is_sum_of_fre_over_residual_variance(synth) -> None:
    """image_score='fre': the sum over the score layers of each layer's FRE divided by its training residual
    variance (the default 'top' is built from the same layers' cells: tests/test_heads.py)."""
    det = FREDetector(DetectorConfig("efficientnet_lite0", image_score="fre"), device="cpu").fit(synth["train"])
    train_feats = det.features(synth["train"])[:2]  # the score head's rows (the map head's follow)
    test_feats = det.features(synth["test"])[:2]
    assert [tuple(f.shape) for f in train_feats] == [(40, 5488), (40, 9408)]
    expected = torch.zeros(len(synth["test"]), dtype=torch.float64)
    for layer, (sub, tr, te) in enumerate(zip(det.subspaces, train_feats, test_feats)):
        pca = PCA(0.97).fit(tr)
        assert sub.n_components == pca.n_components_ < tr.shape[0] - 1  # a real cut, not the whole span
        total = tr.double().var(dim=0).sum()  # unbiased, as the explained variances
        scale = total - pca.explained_variance_.double().sum()
        torch.testing.assert_close(sub.total_variance, total, rtol=1e-6, atol=0)
        torch.testing.assert_close(det.scales[layer], scale, rtol=1e-5, atol=0)
        expected += pca.reconstruction_error(te).double() / scale
    scores = det.score(synth["test"])
    assert scores.dtype == torch.float32 and scores.shape == (12,)
    assert _max_rel_diff(scores, expected) < 1e-4


def test_scores_finite_when_subspace_keeps_every_direction(small_images: torch.Tensor) -> None:
    # 12 noise images: PCA(0.97) keeps all 11 directions they span, the training residual is 0 up to rounding.
    det = FREDetector(DetectorConfig(input_size=64, image_score="fre"), device="cpu").fit(small_images)
    assert all(sub.n_components == 11 for sub in det.subspaces)
    totals = torch.stack([sub.total_variance for sub in det.subspaces])
    assert bool((det.scales >= 1e-6 * totals * (1 - 1e-12)).all())
    other = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scores = det.score(other)
    assert bool(torch.isfinite(scores).all()) and bool((scores > 0).all())


# ------------------------------------------------------------------------------------------------------------------
# --reference parity with scikit-learn
# ------------------------------------------------------------------------------------------------------------------


def _reference_parity(train: torch.Tensor, test: torch.Tensor) -> None:
    det = FREDetector(DetectorConfig.reference("efficientnet_lite0"), device="cpu")
    assert det.config.layers == ("blocks.8",) and det.config.layer_features == (5488,)
    (train_feats,) = det.features(train)
    (test_feats,) = det.features(test)
    assert train_feats.shape == (len(train), 5488) and test_feats.shape == (len(test), 5488)
    expected, k = _sklearn_fre(train_feats.double().numpy(), test_feats.double().numpy())
    # The same numbers from float32 features: scikit-learn's own float32 path agrees as well.
    expected32, k32 = _sklearn_fre(train_feats.numpy(), test_feats.numpy())
    assert k32 == k
    det.fit(train)
    assert det.subspaces[0].n_components == k
    assert torch.equal(det.scales, torch.ones(1, dtype=torch.float64))
    scores = det.score(test)
    assert _max_rel_diff(scores, torch.from_numpy(expected)) < 1e-4
    assert _max_rel_diff(scores, torch.from_numpy(expected32.astype(np.float64))) < 1e-4


def test_reference_parity_with_sklearn_generated(synth) -> None:
    _reference_parity(synth["train"], synth["test"])


@pytest.mark.full
def test_reference_parity_with_sklearn_bottle() -> None:
    cat = MVTecCategory.load(require_category("bottle"), "bottle")
    test = cat.test_paths[::4][:20]  # every defect type and good ones
    _reference_parity(_load(cat.train[:60], 224), _load(test, 224))


# ------------------------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(fitted_default: FREDetector, synth, tmp_path: Path) -> None:
    path = fitted_default.save(tmp_path / "sub" / "model.pt")
    assert path == tmp_path / "sub" / "model.pt" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no .partial left behind
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "fre_torch.detector" and payload["config"] == fitted_default.config.to_dict()

    loaded = FREDetector.load(path, device="cpu")
    assert loaded.config == fitted_default.config
    assert torch.equal(loaded.scales, fitted_default.scales)
    assert torch.equal(loaded.score(synth["test"]), fitted_default.score(synth["test"]))


def test_save_before_fit_raises(tmp_path: Path) -> None:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu")
    with pytest.raises(ValueError, match="not fitted"):
        det.save(tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def small_model_file(small_images: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu").fit(small_images)
    return det.save(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "foreign_dict", "empty", "wrong_version"])
def test_corrupt_model_file_raises(kind: str, small_model_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    good = small_model_file.read_bytes()
    if kind == "random_bytes":
        bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
                        .numpy().tobytes())
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "foreign_dict":
        torch.save({"x": 1}, bad)
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        payload = torch.load(small_model_file, weights_only=True)
        torch.save({**payload, "version": 999}, bad)
    with pytest.raises(ModelFileError) as info:
        FREDetector.load(bad, device="cpu")
    assert isinstance(info.value, ValueError)
    assert str(bad) in str(info.value)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model file not found"):
        FREDetector.load(tmp_path / "absent.pt")


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "nope"}, "unknown backbone"),
        ({"layers": ("blocks.99",)}, "no layer"),
        ({"layers": ("blocks.8", "blocks.8")}, "distinct"),
        ({"pool": 15}, "pool"),  # blocks.8 gives a 14 x 14 map at 224 px
        ({"pool": 0}, "pool"),
        ({"input_size": 31}, "input_size"),
        ({"input_size": 224.0}, "input_size"),
        ({"normalization": "foo"}, "normalization"),
        ({"n_components": 1.5}, "n_components"),
        ({"n_components": 0}, "n_components"),
        ({"solver": "magic"}, "solver"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**kwargs)


def test_largest_pool_is_accepted() -> None:
    assert DetectorConfig(pool=14).score_head.grid == (1, 1)


def test_score_before_fit_raises(small_images: torch.Tensor) -> None:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu")
    with pytest.raises(ValueError, match="not fitted"):
        det.score(small_images)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 3, 64, 64),  # float
        torch.zeros(2, 3, 64, 64, dtype=torch.int64),
        torch.zeros(2, 1, 64, 64, dtype=torch.uint8),  # grey
        torch.zeros(2, 4, 64, 64, dtype=torch.uint8),  # RGBA
        torch.zeros(64, 64, dtype=torch.uint8),
    ],
    ids=["float32", "int64", "1-channel", "4-channel", "2-D"],
)
def test_bad_images_raise(images: torch.Tensor, small_images: torch.Tensor) -> None:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu")
    with pytest.raises(ValueError, match="uint8 RGB"):
        det.fit(images)
    det.fit(small_images)
    with pytest.raises(ValueError, match="uint8 RGB"):
        det.score(images)


def test_too_few_training_images(small_images: torch.Tensor) -> None:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu")
    with pytest.raises(ValueError, match="at least 2"):
        det.fit(small_images[:1])


@pytest.mark.skipif(torch.cuda.is_available(), reason=NEEDS_NO_CUDA)
def test_cuda_without_cuda_raises() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        FREDetector(DetectorConfig(input_size=64), device="cuda")


def test_unknown_device_raises() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        FREDetector(DetectorConfig(input_size=64), device="tpu9")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_features_fail_fit(value: float, small_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    det = FREDetector(DetectorConfig(input_size=64), device="cpu")
    forward = det.extractor.forward
    monkeypatch.setattr(det.extractor, "forward",
                        lambda x, layers=None: {name: torch.full_like(m, value)
                                                for name, m in forward(x, layers).items()})
    with pytest.raises(ValueError, match="NaN"):
        det.fit(small_images)
    assert not det.is_fitted


# ------------------------------------------------------------------------------------------------------------------
# Accuracy on the real data sets (REFERENCE.md: the figures to beat)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.full
def test_bottle_default_auroc() -> None:
    result = evaluate_category(FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu"),
                               require_category("bottle"), "bottle")
    assert (result["n_train"], result["n_test"]) == (209, 83)
    assert result["image_auroc"] == 1.0


@pytest.fixture(scope="module")
def magnetic_default() -> dict:
    return evaluate_category(FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu"),
                             require_category("magnetic_tile"), "magnetic_tile")


@pytest.fixture(scope="module")
def magnetic_reference() -> dict:
    return evaluate_category(FREDetector(DetectorConfig.reference("efficientnet_lite0"), device="cpu"),
                             require_category("magnetic_tile"), "magnetic_tile")


@pytest.mark.full
def test_magnetic_tile_default_beats_reference(magnetic_default: dict) -> None:
    assert (magnetic_default["n_train"], magnetic_default["n_test"]) == (666, 678)
    assert magnetic_default["image_auroc"] >= 0.985


@pytest.mark.full
def test_magnetic_tile_reference_matches_measured(magnetic_reference: dict) -> None:
    assert magnetic_reference["image_auroc"] == pytest.approx(0.977, abs=0.002)


def test_concat_fusion_is_one_subspace_on_the_concatenated_vectors() -> None:
    """fusion='concat': the score is the plain FRE of one PCA(0.97) on [layer_1 | layer_2] (scikit-learn parity)."""
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (24, 3, 64, 64), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g)
    cfg = DetectorConfig("efficientnet_lite0", input_size=64, pool=2, fusion="concat", normalize_scores=False,
                         map_layers=None, image_score="fre")
    assert cfg.layer_features == (sum(DetectorConfig("efficientnet_lite0", input_size=64,
                                                     map_layers=None).layer_features),)
    det = FREDetector(cfg, device="cpu").fit(train)
    (f_train,) = det.features(train)
    (f_test,) = det.features(test)
    ref = SkPCA(0.97).fit(f_train.double().numpy())
    x = f_test.double().numpy()
    expected = ((x - ref.inverse_transform(ref.transform(x))) ** 2).sum(axis=1)
    got = det.score(test).double().numpy()
    assert det.subspaces[0].n_components == ref.n_components_
    assert abs(got - expected).max() / abs(expected).max() < 1e-4


def test_maps_sum_to_scores_and_vanish_inside_the_subspace() -> None:
    """One head (map_layers=None, the reference's model): the fused map summed over its grid is the image score;
    a vector in the subspace has a zero map."""
    from fre_torch.detection.detector import upsample_maps

    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 256, (30, 3, 64, 64), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64, map_layers=None, image_score="fre"),
                      device="cpu").fit(train)
    scores, maps = det.anomaly_maps(test)
    gh, gw = det.config.map_grid
    assert maps.shape == (5, gh, gw) == (5, 2, 2) and bool((maps >= 0).all())
    torch.testing.assert_close(maps.sum(dim=(1, 2)), scores, rtol=1e-4, atol=0)
    torch.testing.assert_close(scores, det.score(test), rtol=0, atol=0)
    # rows reconstructed from subspace coordinates lie in the subspace: their maps are zero
    feats = det.features(test)
    inside = [sub.reconstruct(rows) for sub, rows in zip(det.subspaces, feats)]
    zero = det.maps_from_features(inside)
    assert float(zero.abs().max()) < 1e-5 * float(maps.abs().max())
    # resizing to the images' own sizes
    assert upsample_maps(maps, (100, 80)).shape == (5, 100, 80)
    sized = upsample_maps(maps, [(30, 40), (64, 64), (10, 90), (7, 7), (200, 100)])
    assert [tuple(m.shape) for m in sized] == [(30, 40), (64, 64), (10, 90), (7, 7), (200, 100)]


@pytest.mark.full
@pytest.mark.parametrize("method", ["rff", "nystroem"])
def test_kernel_mode_round_trip_and_no_maps(tmp_path, method: str) -> None:
    """Kernel FRE on the detector: fused scores equal the per-layer KernelFRE scores over their scales, a saved
    model scores identically, and maps are refused with the reason."""
    from fre_torch.core.kernel import KernelFRE

    g = torch.Generator().manual_seed(7)
    train = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g)
    cfg = DetectorConfig("efficientnet_lite0", input_size=64, kernel="rbf", kernel_features=32, kernel_method=method)
    det = FREDetector(cfg, device="cpu").fit(train)
    scores = det.score(test)
    feats_train, feats_test = det.features(train), det.features(test)
    expected = 0
    for rows, rows_test in zip(feats_train, feats_test):
        ref = KernelFRE(0.97, kernel="rbf", method=method, kernel_features=32).fit(rows)
        sub = ref.fitted_subspace()
        expected = expected + ref.score(rows_test) / (sub.total_variance - sub.explained_variance.sum()).float()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)
    path = det.save(tmp_path / "kernel.pt")
    assert torch.equal(FREDetector.load(path).score(test), scores)
    with pytest.raises(ValueError, match="linear mode"):
        det.anomaly_maps(test)


@pytest.mark.parametrize("kwargs", [{"kernel": "poly"}, {"kernel": "rbf", "kernel_method": "svd"},
                                    {"kernel": "rbf", "kernel_features": 0}])
def test_bad_kernel_settings(kwargs) -> None:
    with pytest.raises(ValueError, match="kernel"):
        DetectorConfig(**kwargs)


def test_fused_cpu_kernels_keep_scores_and_maps(fitted_default: FREDetector, synth) -> None:
    """The default CPU path runs the backbone in fused kernels; scores and maps equal the plain modules' within
    1e-5 relative (the issue's bound), on real-weight Lite0 features."""
    images = synth["test"][:8]
    extractor = fitted_default.extractor
    try:
        fused = fitted_default.score_and_maps(images)
        extractor.fused = False
        plain = fitted_default.score_and_maps(images)
    finally:
        extractor.fused = True
    assert _max_rel_diff(fused[0], plain[0]) < 1e-5
    assert _max_rel_diff(fused[1], plain[1]) < 1e-5
