"""pytest-benchmark suite for the segmentation metrics: fre_torch against the usual numpy / scikit-learn code.

    python -m pytest benchmarks/test_bench_metrics.py --benchmark-group-by=group

Data: 300 anomaly maps of 384 x 384 (44.2 M pixels, float32, non-negative like FRE maps: smooth noise plus raised
defects) with masks of 1-4 elliptic defects in 2 of every 3 images. Groups pair fre_torch with its baseline, run once
each in the same session: pixel AUROC against ``sklearn.metrics.roc_auc_score``, PRO against the MVTec AD evaluation
algorithm (``scipy.ndimage.label`` + one numpy argsort + cumulative sums; skipped without scipy). The target of the
segmentation issue is pixel AUROC + PRO in under 5 s on the 2-core CPU: ``test_total_fre_torch``. Each case prints
and records in ``extra_info`` the pixels and input bytes, the peak RSS above what was resident before the call, the
value, and for a baseline its time over fre_torch's (``baseline_over_fre_torch``). Run with ``-s`` to see the lines.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from fre_torch.detection.metrics import pixel_auroc, pro

N, SIZE = 300, 384
_SECONDS: dict[str, float] = {}  # group -> fre_torch's time in this session, for the baselines' ratio


def make_maps_and_masks(n: int = N, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps: (n, size, size)`` float32 >= 0 and ``masks: (n, size, size)`` bool, seeded."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # a normal image
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.random(2) * size
            ry, rx = 4 + rng.random(2) * 36
            c, s = math.cos(angle := rng.random() * math.pi), math.sin(angle)
            r = int(max(ry, rx)) + 1  # the ellipse's bounding box, clipped to the image
            y0, x0 = max(int(cy) - r, 0), max(int(cx) - r, 0)
            yy, xx = np.mgrid[y0:min(int(cy) + r + 1, size), x0:min(int(cx) + r + 1, size)]
            u, v = (xx - cx) * c + (yy - cy) * s, (yy - cy) * c - (xx - cx) * s
            masks[i, y0:y0 + yy.shape[0], x0:x0 + xx.shape[1]] |= (u / rx) ** 2 + (v / ry) ** 2 <= 1
    g = torch.Generator().manual_seed(seed)
    masks_t = torch.from_numpy(masks)
    coarse = torch.rand(n, 1, size // 16, size // 16, generator=g)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    maps += 0.5 * torch.rand(n, size, size, generator=g)
    raised = F.avg_pool2d(masks_t[:, None].float(), 9, stride=1, padding=4).squeeze(1)  # soft defect edges
    maps += 0.8 * raised
    return maps, masks_t


@pytest.fixture(scope="module")
def data():
    return make_maps_and_masks()


def _run(benchmark, data, group: str, impl: str, fn) -> None:
    """Times one call of ``fn()`` and records the work, the peak memory above what was resident before, the value
    and, for a baseline, its time over fre_torch's in the same session."""
    maps, masks = data
    peak = {}

    def call():
        base = current_rss_bytes()
        reset_peak_rss()
        out = fn()
        peak["bytes"] = max(peak_rss_bytes() - base, 0)
        return out

    value = benchmark.pedantic(call, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.min
    info = {"pixels": maps.numel(), "input_bytes": maps.numel() * maps.element_size() + masks.numel(),
            "anomalous_pixels": int(masks.sum()), "threads": torch.get_num_threads(),
            "peak_extra_bytes": peak["bytes"], "value": value}
    if impl == "fre_torch":
        _SECONDS[group] = seconds
    elif group in _SECONDS:
        info["baseline_over_fre_torch"] = seconds / _SECONDS[group]
    benchmark.extra_info.update(info)
    ratio = f", {info['baseline_over_fre_torch']:.1f}x fre_torch's time" if "baseline_over_fre_torch" in info else ""
    print(f"\n{group} {impl}: {seconds:.2f} s for {maps.numel() / 1e6:.1f} M pixels "
          f"({maps.numel() / seconds / 1e6:.1f} M pixels/s), peak +{peak['bytes'] / 2**20:.0f} MiB{ratio}; {value}")


@pytest.mark.benchmark(group="pixel_auroc")
def test_pixel_auroc_fre_torch(benchmark, data):
    maps, masks = data
    _run(benchmark, data, "pixel_auroc", "fre_torch", lambda: float(pixel_auroc(maps, masks)))


@pytest.mark.benchmark(group="pixel_auroc")
def test_pixel_auroc_sklearn(benchmark, data):
    skm = pytest.importorskip("sklearn.metrics")
    maps, masks = data
    m, k = maps.numpy().ravel(), masks.numpy().ravel()
    _run(benchmark, data, "pixel_auroc", "sklearn", lambda: float(skm.roc_auc_score(k, m)))


@pytest.mark.benchmark(group="pro")
def test_pro_fre_torch(benchmark, data):
    maps, masks = data
    _run(benchmark, data, "pro", "fre_torch", lambda: float(pro(maps, masks)))


def mvtec_pro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AD evaluation's PRO: per-pixel FPR and PRO increments, one argsort, cumulative sums."""
    from scipy import ndimage

    fp_change = np.zeros(maps.shape, np.uint32)
    pro_change = np.zeros(maps.shape, np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labeled, k = ndimage.label(mask, np.ones((3, 3), int))
        n_regions += k
        fp_change[i] = labeled == 0
        sizes = np.bincount(labeled.ravel())
        inv = np.zeros(k + 1)
        inv[1:] = 1.0 / sizes[1:]
        pro_change[i] = inv[labeled]
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pros = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    x, y = np.concatenate([[0.0], fprs[keep]]), np.concatenate([[0.0], pros[keep]])
    i = int(np.searchsorted(x, limit))
    y_limit = y[i - 1] + (limit - x[i - 1]) * (y[i] - y[i - 1]) / (x[i] - x[i - 1])
    return float((np.trapezoid(y[:i], x[:i]) + (limit - x[i - 1]) * (y[i - 1] + y_limit) / 2) / limit)


@pytest.mark.benchmark(group="pro")
def test_pro_mvtec_numpy(benchmark, data):
    pytest.importorskip("scipy.ndimage")
    maps, masks = data
    _run(benchmark, data, "pro", "mvtec_numpy", lambda: mvtec_pro(maps.numpy(), masks.numpy()))


@pytest.mark.benchmark(group="total")
def test_total_fre_torch(benchmark, data):
    """The issue's target: pixel AUROC and PRO over 300 maps of 384 x 384 in under 5 s."""
    maps, masks = data
    _run(benchmark, data, "total", "fre_torch", lambda: (float(pixel_auroc(maps, masks)), float(pro(maps, masks))))
