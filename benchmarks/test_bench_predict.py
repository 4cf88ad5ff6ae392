"""pytest-benchmark suite for fit / predict on a folder of images (PNG decoding included).

    python -m pytest benchmarks/test_bench_predict.py -s

Target (issue 7): efficientnet_lite0 on the 2-core CPU, fit + save on 200 images, predict on 1,000 images at
>= 25 images/s end to end, model file under 50 MB. The images are generated once per session (not timed) by
``benchmarks.run_predict.make_images``; each case prints its figures. Throughput is reported, not asserted: the
machine may be shared (compare ``uptime``); the model-file size is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.run_predict import TARGET_IMAGES_PER_S, TARGET_MODEL_MB, fit_and_save, make_images, predict

N_FIT = 200
N_PREDICT = 1000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_images(tmp_path_factory.mktemp("bench_predict") / "ds", N_FIT, N_PREDICT)


@pytest.fixture(scope="module")
def model_file(images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_model") / "model.pt"
    fit_and_save(images[0], path)
    return path


def test_fit_and_save_200(benchmark, images, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    figures = benchmark.pedantic(fit_and_save, args=(images[0], path), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print(f"\nfit + save on {N_FIT} images: {figures['fit_save_s']:.1f} s, model file {figures['model_mb']:.1f} MB")
    assert figures["model_mb"] < TARGET_MODEL_MB


def test_predict_1000(benchmark, images, model_file: Path) -> None:
    figures = benchmark.pedantic(predict, args=(model_file, images[1]), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    rate = figures["predict_images_per_s"]
    print(f"\npredict {figures['n_predict']} images end to end: {rate:.1f} images/s "
          f"(target >= {TARGET_IMAGES_PER_S:g}: {'met' if rate >= TARGET_IMAGES_PER_S else 'NOT met'})")
    assert figures["n_predict"] == N_PREDICT
