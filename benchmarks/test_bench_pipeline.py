"""pytest-benchmark suite for the whole pipeline: fre_torch ``evaluate_category`` vs the reference pipeline.

    python -m pytest benchmarks/test_bench_pipeline.py -s

Both sides fit on ``train/good`` and score ``test/*`` of one category with the same backbone (efficientnet_lite0),
decoding included. The data is ../shared/data/magnetic_tile when present (the issue's measurement), else a
generated MVTec-layout category, so the suite runs anywhere. Variants: our default (image metrics only, like the
reference), the same with a warm preprocessed-image cache (``--cache``'s second run), and the reference pipeline
(PIL in the main process, batches of 64, scikit-learn PCA). Each prints images/s and its ratio to the reference
measured in the same session. The side-by-side table in BENCHMARKS.md comes from ``benchmarks/run_pipeline.py``
(cold processes, wall time); this suite times warm in-process calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import REPO
from benchmarks.reference_pipeline import run_reference
from fre_torch.data import MVTecCategory
from fre_torch.detector import DetectorConfig, FREDetector
from fre_torch.evaluate import evaluate_category
from fre_torch.synthetic import write_synthetic_mvtec

MAGNETIC = REPO.parent / "shared" / "data" / "magnetic_tile"
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


@pytest.mark.parametrize("cached", [False, True], ids=["default", "cache_warm"])
def test_fre_torch_evaluate(benchmark, dataset, cached, tmp_path):
    root, cat, n = dataset
    det = FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu")
    cache = tmp_path / "cache" if cached else None
    if cached:  # fill the cache first: the timed call is a second run
        evaluate_category(det, root, cat, pixel_metrics=False, cache=cache)
    result = benchmark.pedantic(evaluate_category, args=(det, root, cat),
                                kwargs={"pixel_metrics": False, "cache": cache}, rounds=1, iterations=1)
    assert result["image_auroc"] > 0.5
    _report(f"fre_torch {'cache_warm' if cached else 'default'}", benchmark.stats.stats.min, n)
