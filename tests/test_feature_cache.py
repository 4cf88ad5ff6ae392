"""FeatureCache: a repeated run reads each image's features instead of running the backbone, and an entry can never
be stale (keyed by the exact pixels, the weights and every feature setting)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fre_torch.features.images import FeatureCache
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import evaluate_category
from fre_torch.features.synthetic import write_synthetic_mvtec

CONFIG = DetectorConfig("efficientnet_lite0", input_size=64)


def _images(seed: int, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)


def _detector(cache: Path | FeatureCache | None, seed: int = 0, config: DetectorConfig = CONFIG,
              **kwargs) -> FREDetector:
    torch.manual_seed(seed)  # random weights: the same seed builds the same backbone
    return FREDetector(config, pretrained=False, feature_cache=cache, **kwargs)


class _Counting:
    """Wraps a detector's backbone step, counting the images it is run on."""

    def __init__(self, det: FREDetector) -> None:
        self.step, self.images = det._backbone, 0
        det._backbone = self

    def __call__(self, x: torch.Tensor, *pass_index: int) -> list[list[torch.Tensor]]:
        self.images += x.shape[0]
        return self.step(x, *pass_index)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # Rows computed in a batch of another size may differ in the last float bits (convolution blocking).
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.f32"))


def test_hit_is_bit_identical_and_skips_the_backbone(tmp_path):
    images = _images(0)
    plain = _detector(None).features(images)
    first = _detector(tmp_path)
    counted = _Counting(first)
    assert all(torch.equal(a, b) for a, b in zip(first.features(images), plain))
    assert counted.images == 5 and len(_entries(tmp_path)) == 5
    second = _detector(tmp_path)  # a new process would build the same weights; the same settings hash
    counted = _Counting(second)
    again = second.features(images)
    assert counted.images == 0, "every image was cached: the backbone must not run"
    assert all(torch.equal(a, b) for a, b in zip(again, plain))
    assert [r.shape for r in again] == [(5, d) for d in CONFIG.layer_features]


def test_partial_hits_run_the_backbone_on_the_misses_only(tmp_path):
    images = _images(0)
    _detector(tmp_path).features(images[:3])
    det = _detector(tmp_path)
    counted = _Counting(det)
    mixed = det.features(images[[4, 0, 3, 1]])  # two cached, two new, interleaved
    assert counted.images == 2
    direct = _detector(None).features(images[[4, 0, 3, 1]])
    for got, want in zip(mixed, direct):
        _close(got, want)
    assert len(_entries(tmp_path)) == 5


def test_concat_fusion_uses_the_same_per_layer_entries(tmp_path):
    images = _images(0, 3)
    summed = _detector(tmp_path).features(images)
    concat = _detector(tmp_path, config=DetectorConfig("efficientnet_lite0", input_size=64, fusion="concat"))
    counted = _Counting(concat)
    score_row, map_row, detail_row = concat.features(images)  # one concatenated row per head
    assert counted.images == 0 and torch.equal(score_row, torch.cat(summed[:2], dim=1))
    assert torch.equal(map_row, torch.cat(summed[2:5], dim=1)) and torch.equal(detail_row, torch.cat(summed[5:], 1))


@pytest.mark.full
@pytest.mark.parametrize("change", ["weights", "layers", "input_size", "pool", "normalization", "precision",
                                    "pixel"])
def test_any_change_that_shapes_the_features_misses(tmp_path, change):
    images = _images(0, 3)
    base = _detector(tmp_path)
    base.features(images)
    config, seed, kwargs = CONFIG, 0, {}
    if change == "weights":
        seed = 1
    elif change == "layers":
        config = DetectorConfig("efficientnet_lite0", input_size=64, layers=("blocks.8",))
    elif change == "input_size":
        config = DetectorConfig("efficientnet_lite0", input_size=96)
    elif change == "pool":
        config = DetectorConfig("efficientnet_lite0", input_size=64, pool=1)
    elif change == "normalization":
        config = DetectorConfig("efficientnet_lite0", input_size=64, normalization="imagenet")
    elif change == "precision":
        kwargs = {"precision": "bf16"}
    elif change == "pixel":
        images = images.clone()
        images[1, 0, 5, 7] ^= 1  # one bit of one pixel
    det = _detector(tmp_path, seed=seed, config=config, **kwargs)
    if change != "pixel":
        assert det.feature_settings() != base.feature_settings()
    counted = _Counting(det)
    det.features(images)
    assert counted.images == (1 if change == "pixel" else 3)


@pytest.mark.full
def test_corrupt_entry_is_recomputed_and_rewritten(tmp_path):
    images = _images(0, 2)
    want = _detector(tmp_path).features(images)
    entry = _entries(tmp_path)[0]
    size = entry.stat().st_size
    entry.write_bytes(entry.read_bytes()[:64])  # truncated
    det = _detector(tmp_path)
    counted = _Counting(det)
    got = det.features(images)
    assert counted.images == 1 and entry.stat().st_size == size
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.full
def test_unusable_cache_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        FeatureCache(blocker)
    det = _detector(blocker / "sub")  # its parent is a file: every write fails, features are still right
    got = det.features(_images(0, 2))
    for a, b in zip(got, _detector(None).features(_images(0, 2))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="uint8 CPU"):
        FeatureCache(tmp_path / "c").key(torch.zeros(3, 4, 4), "s")


@pytest.mark.full
def test_evaluate_second_run_reads_features_and_restores_the_detector(tmp_path):
    root = write_synthetic_mvtec(tmp_path / "data", categories=("object",), n_train=12, n_test_good=3,
                                 n_test_defect=3, size=80, seed=5)
    base = evaluate_category(_detector(None), root, "object", batch_size=8, num_workers=0)
    first = evaluate_category(_detector(None), root, "object", batch_size=8, num_workers=0, cache=tmp_path / "c")
    det = _detector(None)
    counted = _Counting(det)
    second = evaluate_category(det, root, "object", batch_size=8, num_workers=0, cache=tmp_path / "c",
                               keep_maps=True)  # the cross-fitting pass reads the training features as well
    assert counted.images == 0 and det.feature_cache is None
    assert base["scores"] == first["scores"] == second["scores"]
    assert base["pixel_auroc"] == first["pixel_auroc"] == second["pixel_auroc"]
    n_images = base["n_train"] + base["n_test"]
    assert len(_entries(tmp_path / "c" / "features")) == n_images
    images_only = _detector(None)
    counted = _Counting(images_only)
    evaluate_category(images_only, root, "object", batch_size=8, num_workers=0, cache=tmp_path / "c",
                      cache_features=False)
    assert counted.images == n_images


def test_fit_folder_second_fit_reads_features(tmp_path, monkeypatch):
    from fre_torch.jobs import predict

    root = write_synthetic_mvtec(tmp_path / "data", categories=("object",), n_train=10, n_test_good=1,
                                 n_test_defect=1, size=64, seed=2)
    train = root / "object" / "train"
    built: list[FREDetector] = []

    class Seeded(FREDetector):  # random weights, the same in both fits; counts backbone images
        def __init__(self, *args, **kwargs):
            torch.manual_seed(0)
            super().__init__(*args, **{**kwargs, "pretrained": False})
            built.append(self)
            self.counter = _Counting(self)

    monkeypatch.setattr(predict, "FREDetector", Seeded)
    fits = [predict.fit_folder(train, CONFIG, batch_size=4, num_workers=0, cache=tmp_path / "c").detector
            for _ in range(2)]
    assert built[0].counter.images == 10 and built[1].counter.images == 0
    assert all(d.feature_cache is None for d in fits)
    assert torch.equal(fits[0].threshold, fits[1].threshold)
    for a, b in zip(fits[0].subspaces, fits[1].subspaces):
        assert torch.equal(a.components, b.components)


@pytest.mark.full
def test_cross_fitting_reads_the_fit_features_from_memory(tmp_path):
    from fre_torch.jobs.crossfit import cross_fit
    from fre_torch.features.images import MVTecCategory, make_loader, ImageDataset
    from fre_torch.jobs.evaluate import THRESHOLD_QUANTILE

    root = write_synthetic_mvtec(tmp_path / "data", categories=("object",), n_train=12, n_test_good=3,
                                 n_test_defect=3, size=80, seed=5)
    det = _detector(None)
    counted = _Counting(det)
    r = evaluate_category(det, root, "object", batch_size=8, num_workers=0, keep_maps=True)
    # One backbone pass per image: the cross-fitting pass read the training features kept from the fit.
    assert counted.images == r["n_train"] + r["n_test"] and det.feature_cache is None
    # The same threshold as cross-fitting on features extracted afresh (no cache at all).
    train = make_loader(ImageDataset(list(MVTecCategory.load(root, "object").train), 64), 8, "cpu", num_workers=0)
    fresh = cross_fit(det, train, quantile=THRESHOLD_QUANTILE, batch_size=8)
    assert counted.images == 2 * r["n_train"] + r["n_test"]
    assert r["threshold"] == fresh.threshold and r["map_scale"] == fresh.map_scale


def test_memory_cache_keeps_its_own_copies():
    cache = FeatureCache(None)
    values = torch.arange(4, dtype=torch.float32)
    cache.put("k", values)
    values += 1  # the caller reuses its buffer
    assert torch.equal(cache.get("k", 4), torch.arange(4, dtype=torch.float32))
    assert cache.get("k", 5) is None and cache.get("other", 4) is None
