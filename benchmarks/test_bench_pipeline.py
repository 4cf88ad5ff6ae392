"""pytest-benchmark suite for the whole pipeline: fre_torch ``evaluate_category`` vs the reference pipeline.

    python -m pytest benchmarks/test_bench_pipeline.py -s

Both sides fit on ``train/good`` and score ``test/*`` of one category with the same backbone (efficientnet_lite0),
decoding included. The data is $FRE_TORCH_DATA/magnetic_tile when present (the issue's measurement), else a
generated MVTec-layout category, so the suite runs anywhere. Variants: our default (image metrics only, like the
reference), the same as a second run with a warm cache of preprocessed images only (``--cache_images_only``) and of
images and features (``--cache``), and the reference pipeline (PIL in the main process, batches of 64, scikit-learn
PCA). Each prints images/s and its ratio to the reference measured in the same session. The side-by-side table in
BENCHMARKS.md comes from ``benchmarks/run_pipeline.py`` (cold processes, wall time); this suite times warm
in-process calls and leaves the allocator at glibc's default for both sides (``cli.py``'s setting, see
``fre_torch.jobs.allocator``, is not applied here), so its ratios show the engine alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import data_root
from benchmarks.reference_pipeline import run_reference
from fre_torch.features.images import MVTecCategory
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import evaluate_category
from fre_torch.features.synthetic import write_synthetic_mvtec

MAGNETIC = data_root() / "magnetic_tile"
_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, str, int]:
    if MAGNETIC.is_dir():
        root, cat = MAGNETIC, "magnetic_tile"
    else:
        root, cat = write_synthetic_mvtec(tmp_path_factory.mktemp("bench"), categories=("texture",), n_train=120,
                                          n_test_good=40, n_test_defect=40, size=256), "texture"
    c = MVTecCategory.load(root, cat)
    return root, cat, len(c.train) + len(c.test)


def _report(name: str, seconds: float, n_images: int) -> None:
    _times[name] = seconds
    ref = _times.get("reference")
    ratio = f", {ref / seconds:.2f}x the reference" if ref and name != "reference" else ""
    print(f"\n{name}: {seconds:.2f} s, {n_images / seconds:.1f} images/s{ratio}")


def test_reference_pipeline(benchmark, dataset):
    root, cat, n = dataset
    benchmark.pedantic(run_reference, args=(root, cat, "efficientnet_lite0"), rounds=1, iterations=1)
    _report("reference", benchmark.stats.stats.min, n)


@pytest.mark.parametrize("cached", ["none", "images", "features"],
                         ids=["default", "images_cache_warm", "cache_warm"])
def test_fre_torch_evaluate(benchmark, dataset, cached, tmp_path):
    root, cat, n = dataset
    det = FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu")
    cache = None if cached == "none" else tmp_path / "cache"
    kwargs = {"pixel_metrics": False, "cache": cache, "cache_features": cached == "features"}
    if cache is not None:  # fill the cache first: the timed call is a second run
        evaluate_category(det, root, cat, **kwargs)
    result = benchmark.pedantic(evaluate_category, args=(det, root, cat), kwargs=kwargs, rounds=1, iterations=1)
    assert result["image_auroc"] > 0.5
    _report(f"fre_torch {benchmark.name.split('[')[-1].rstrip(']')}", benchmark.stats.stats.min, n)
