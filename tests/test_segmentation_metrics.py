"""Segmentation metrics (pixel AUROC, pixel F1-max, PRO) and connected components against independent references.

The PRO reference is written here in float64 with plain loops: over every distinct score as a threshold and over
regions found by a breadth-first search, then the trapezoid rule up to the FPR limit with linear interpolation.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from conftest import NEEDS_CUDA
from sklearn import metrics as skm

from fre_torch.detection import metrics as M
from fre_torch.detection.metrics import pixel_auroc, pixel_f1_max, pro, segmentation_metrics
from fre_torch.detection.regions import label_components

SCIPY_REASON = "scipy.ndimage, the reference labelling, comes with scikit-learn (requirements.txt); pip install scipy"

# ---------------------------------------------------------------------------------------------------------------
# References


def bfs_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of a 2-D bool mask, each a list of (y, x), in raster order of their first pixel."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            queue, region = deque([(y0, x0)]), []
            while queue:
                y, x = queue.popleft()
                region.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            queue.append((v, u))
            regions.append(region)
    return regions


def reference_pro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Plain-loop float64 PRO: every distinct score is a threshold, every BFS region is averaged."""
    maps = np.asarray(maps, dtype=np.float64)
    regions = [(i, *np.array(r).T) for i in range(len(masks)) for r in bfs_regions(masks[i])]  # (i, ys, xs)
    normal = ~masks
    n_normal = normal.sum()
    fpr, overlap = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fpr.append(flagged[normal].sum() / n_normal)
        overlap.append(np.mean([flagged[i, ys, xs].mean() for i, ys, xs in regions]))
    area = 0.0
    for j in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], overlap[j - 1], overlap[j]
        if x1 >= limit:  # cut the last segment exactly at the limit
            y_limit = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def sk_f1_max(maps: np.ndarray, masks: np.ndarray) -> float:
    precision, recall, _ = skm.precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nan_to_num(2 * precision * recall / (precision + recall)).max())


# ---------------------------------------------------------------------------------------------------------------
# Data: maps with known regions


def random_case(seed: int, n: int = 6, size: int = 20, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blobby masks (some images empty, some regions touching only diagonally) and maps raised on the defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 has no defect
        if i == 3:
            continue  # nor image 3
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            hy, wx = rng.integers(1, 5, 2)
            masks[i, y:y + hy, x:x + wx] = True
        masks[i] |= rng.random((size, size)) < 0.03  # isolated pixels
    # Two squares meeting at one corner: one region under 8-connectivity.
    masks[1, 0:3, 0:3] = True
    masks[1, 3:5, 3:5] = True
    maps = rng.random((n, size, size)) + 0.6 * masks
    if ties:
        maps = np.round(maps * 6) / 6
    return maps.astype(np.float32), masks


CASES = [(seed, ties) for seed in range(4) for ties in (False, True)]


# ---------------------------------------------------------------------------------------------------------------
# Connected components


def test_label_components_matches_bfs_numbering():
    _, masks = random_case(0)
    labels, n = label_components(torch.from_numpy(masks))
    assert labels.dtype == torch.int64 and labels.shape == masks.shape
    expected, offset = np.zeros(masks.shape, dtype=np.int64), 0
    for i in range(len(masks)):
        for region in bfs_regions(masks[i]):
            offset += 1
            for y, x in region:
                expected[i, y, x] = offset
    assert n == offset
    np.testing.assert_array_equal(labels.numpy(), expected)


def test_diagonal_touch_is_one_region_and_batch_ids_are_unique():
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = True  # a diagonal line: one region
    masks[0, 0, 4] = True  # a second one
    masks[2, 4, 0] = masks[2, 3, 1] = True  # anti-diagonal: one region, in the third image
    labels, n = label_components(masks)
    assert n == 3
    assert labels[0, 0, 0] == labels[0, 1, 1] == labels[0, 2, 2] == 1 and labels[0, 0, 4] == 2
    assert labels[2, 4, 0] == labels[2, 3, 1] == 3
    assert int(labels[1].abs().sum()) == 0 and int(labels[~masks].abs().sum()) == 0


@pytest.mark.parametrize("density", [0.05, 0.3, 0.45, 0.6, 0.9])
def test_label_components_matches_scipy(density):
    ndimage = pytest.importorskip("scipy.ndimage", reason=SCIPY_REASON)
    g = torch.Generator().manual_seed(int(density * 100))
    masks = torch.rand(8, 33, 47, generator=g) < density
    masks[3] = False
    masks[4] = True
    labels, n = label_components(masks.to(torch.uint8))  # integer masks are accepted
    offset = 0
    for i in range(len(masks)):
        ref, k = ndimage.label(masks[i].numpy(), np.ones((3, 3), dtype=int))
        np.testing.assert_array_equal(labels[i].numpy(), np.where(ref > 0, ref + offset, 0))
        offset += k
    assert n == offset


def test_label_components_long_winding_regions():
    ndimage = pytest.importorskip("scipy.ndimage", reason=SCIPY_REASON)
    size = 96
    serpentine = np.zeros((size, size), dtype=bool)
    serpentine[::2] = True  # rows joined alternately at the right and left ends: one long path
    serpentine[1::4, -1] = True
    serpentine[3::4, 0] = True
    comb = np.zeros((size, size), dtype=bool)
    comb[:, ::3] = True
    comb[-1] = True  # teeth joined at the bottom, so the lowest raster index comes last
    masks = torch.from_numpy(np.stack([serpentine, serpentine[::-1, ::-1].copy(), comb, comb[::-1].copy()]))
    labels, n = label_components(masks)
    assert n == 4
    for i in range(4):
        ref, _ = ndimage.label(masks[i].numpy(), np.ones((3, 3), dtype=int))
        np.testing.assert_array_equal(labels[i].numpy(), np.where(ref > 0, ref + i, 0))


def test_label_components_empty_and_errors():
    labels, n = label_components(torch.zeros(2, 4, 4, dtype=torch.bool))
    assert n == 0 and labels.dtype == torch.int64 and not labels.any()
    with pytest.raises(ValueError, match="\\(N, H, W\\)"):
        label_components(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        label_components(torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# PRO


@pytest.mark.full
@pytest.mark.parametrize("seed,ties", CASES)
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_matches_loop_reference(seed, ties, limit):
    maps, masks = random_case(seed, ties=ties)
    got = pro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=limit)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(reference_pro(maps, masks, limit), abs=1e-9)


def test_pro_dtypes_signs_and_integer_maps():
    maps, masks = random_case(7, ties=True)
    expected = reference_pro(maps, masks)
    t_masks = torch.from_numpy(masks)
    for dtype in (torch.float16, torch.float64):  # these sixths are exact in float16 too
        assert pro(torch.from_numpy(maps).to(dtype), t_masks).item() == pytest.approx(expected, abs=1e-9)
    # Negative scores, with -0.0 and +0.0 tied.
    shifted = maps - np.float32(0.5)
    signed = torch.from_numpy(shifted)
    signed[signed == 0] = torch.where(torch.rand(int((signed == 0).sum())) < 0.5, -0.0, 0.0)
    assert pro(signed, t_masks.long()).item() == pytest.approx(reference_pro(shifted, masks), abs=1e-9)
    as_int = torch.from_numpy(np.round(maps * 6).astype(np.int64))
    assert pro(as_int, t_masks).item() == pytest.approx(expected, abs=1e-9)


def test_pro_closed_forms():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # a region of 4 pixels
    masks[0, 3, 3] = True  # a region of 1 pixel
    perfect = masks.float() + 1
    assert pro(perfect, masks).item() == 1.0
    assert pro(-perfect, masks).item() == 0.0
    # All scores tied: one segment from (0, 0) to (1, 1), so PRO(FPR) = FPR and the area up to 0.3 is 0.3**2 / 2.
    assert pro(torch.zeros(2, 4, 4), masks).item() == pytest.approx(0.15, abs=1e-15)
    # Each region is averaged once, whatever its size: the 1-pixel region found first counts as much as the other.
    maps = torch.zeros(2, 4, 4)
    maps[0, 3, 3] = 2.0
    assert pro(maps, masks).item() == pytest.approx(reference_pro(maps.numpy(), masks.numpy()), abs=1e-12)


def test_pro_large_input_uses_the_cut_and_stays_exact():
    # 1.2 M pixels: above the size where only the top of the score range is sorted. Regions are placed squares,
    # so the float64 reference below needs no labelling: MVTec's per-pixel increments, one sort, cumulative sums.
    g = np.random.default_rng(3)
    n, size = 13, 304
    masks = np.zeros((n, size, size), dtype=bool)
    weight = np.zeros((n, size, size))
    regions = 0
    for i in range(1, n):
        for k in range(1 + i % 4):
            y, x, s = 10 + 70 * k, int(g.integers(0, 200)), int(g.integers(3, 60))
            masks[i, y:y + s, x:x + s] = True
            weight[i, y:y + s, x:x + s] = 1.0 / (s * s)
            regions += 1
    maps = (g.random((n, size, size)) + 0.7 * masks).astype(np.float32)
    maps[5] = np.round(maps[5] * 20) / 20  # ties across the cut
    flat, order = maps.ravel().astype(np.float64), np.argsort(-maps.ravel(), kind="stable")
    fpr = np.cumsum(~masks.ravel()[order]) / (~masks).sum()
    overlap = np.cumsum(weight.ravel()[order]) / regions
    last = np.append(np.diff(flat[order]) != 0, True)  # the last pixel of each tie closes a threshold
    x, y = np.concatenate([[0.0], fpr[last]]), np.concatenate([[0.0], overlap[last]])
    i = int(np.searchsorted(x, 0.3))
    y_limit = y[i - 1] + (0.3 - x[i - 1]) * (y[i] - y[i - 1]) / (x[i] - x[i - 1])
    expected = (np.trapezoid(y[:i], x[:i]) + (0.3 - x[i - 1]) * (y[i - 1] + y_limit) / 2) / 0.3
    assert pro(torch.from_numpy(maps), torch.from_numpy(masks)).item() == pytest.approx(expected, abs=1e-9)


def test_cut_falls_back_to_sorting_everything():
    # Keys whose strided sample sees only high values: the cut estimated from it leaves too few pixels above.
    n = 2**21
    stride = n // 2**18
    keys = torch.zeros(n, dtype=torch.int32)
    keys[::stride] = 1000
    got = M._top_sorted(keys, keys[:0], need=n // 2, period=1)
    assert torch.equal(got, torch.sort(keys).values)


@pytest.mark.parametrize("seed,ties", CASES)
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_segmentation_metrics_equal_each_metric_alone(seed, ties, limit):
    """One shared sort gives exactly what each metric gives alone (PRO from a suffix of the full sort)."""
    maps, masks = (torch.from_numpy(a) for a in random_case(seed, ties=ties))
    before = maps.clone()
    got = segmentation_metrics(maps, masks, fpr_limit=limit)
    assert list(got) == ["pixel_auroc", "pro", "pixel_f1_max"] and torch.equal(maps, before)
    assert got["pixel_auroc"].item() == pixel_auroc(maps, masks).item()
    assert got["pixel_f1_max"].item() == pixel_f1_max(maps, masks).item()
    assert got["pro"].item() == pytest.approx(pro(maps, masks, fpr_limit=limit).item(), abs=1e-12)
    assert got["pro"].item() == pytest.approx(reference_pro(maps.numpy(), masks.numpy(), limit), abs=1e-9)
    with pytest.raises(ValueError, match="fpr_limit"):
        segmentation_metrics(maps, masks, fpr_limit=0.0)


def test_segmentation_metrics_on_a_large_input_with_ties_across_the_cut():
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(12, 320, 320, dtype=torch.bool)
    masks[1:, 40:90, 100:130] = True
    maps = torch.rand(12, 320, 320, generator=g) + 0.5 * masks
    maps[3] = (maps[3] * 10).round() / 10  # ties
    got = segmentation_metrics(maps, masks)
    assert got["pro"].item() == pytest.approx(pro(maps, masks).item(), abs=1e-12)
    assert got["pixel_auroc"].item() == pixel_auroc(maps, masks).item()


def test_pro_errors():
    """PRO's own checks; those it shares with pixel AUROC / F1-max are in ``test_pixel_metric_errors``."""
    maps, masks = torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="same shape"):
        pro(maps, masks[:, :3])
    with pytest.raises(ValueError, match="\\(N, H, W\\)"):
        pro(maps[0], masks[0])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        pro(maps, masks.to(torch.uint8) * 255)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="fpr_limit"):
            pro(maps, masks, fpr_limit=bad)


# ---------------------------------------------------------------------------------------------------------------
# Pixel AUROC and F1-max


@pytest.mark.parametrize("seed,ties", CASES)
def test_pixel_auroc_and_f1_max_match_sklearn(seed, ties):
    maps, masks = random_case(seed, ties=ties)
    t_maps, t_masks = torch.from_numpy(maps), torch.from_numpy(masks)
    got = pixel_auroc(t_maps, t_masks)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    f1, threshold = pixel_f1_max(t_maps, t_masks, return_threshold=True)
    assert f1.item() == pytest.approx(sk_f1_max(maps, masks), abs=1e-9)
    assert threshold.dtype == t_maps.dtype
    assert skm.f1_score(masks.ravel(), maps.ravel() >= threshold.item()) == pytest.approx(f1.item(), abs=1e-9)
    assert pixel_f1_max(t_maps, t_masks).item() == f1.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_pixel_metrics_dtypes_and_signs(dtype):
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(4, 16, 16, generator=g) < 0.1
    maps = (torch.randn(4, 16, 16, generator=g) * 4 + 3 * masks).round().to(dtype)  # signed, tied
    maps[0, 0, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0]).to(dtype)
    ref_maps = maps.double().numpy()
    assert pixel_auroc(maps, masks).item() == pytest.approx(skm.roc_auc_score(masks.numpy().ravel(),
                                                                              ref_maps.ravel()), abs=1e-6)
    assert pixel_f1_max(maps, masks.long()).item() == pytest.approx(sk_f1_max(ref_maps, masks.numpy()), abs=1e-9)


def test_pixel_auroc_large_input_matches_sklearn():
    g = torch.Generator().manual_seed(6)
    masks = torch.rand(20, 256, 256, generator=g) < 0.02
    maps = torch.rand(20, 256, 256, generator=g) + 0.3 * masks
    maps[:5] = (maps[:5] * 50).round() / 50  # ties
    expected = skm.roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())
    assert pixel_auroc(maps, masks).item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("fn", [pixel_auroc, pixel_f1_max, pro])
def test_pixel_metric_errors(fn):
    maps, masks = torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="same shape"):
        fn(maps, masks[None])
    with pytest.raises(ValueError, match="\\(N, H, W\\)"):
        fn(maps.flatten(), masks.flatten())
    with pytest.raises(ValueError, match="all 32 pixels are normal"):
        fn(maps, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="all 32 pixels are anomalous"):
        fn(maps, torch.ones_like(masks))
    nan_maps = maps.clone()
    nan_maps[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan_maps, masks)


def test_inputs_not_mutated():
    maps, masks = random_case(2, ties=True)
    t_maps, t_masks = torch.from_numpy(maps).clone(), torch.from_numpy(masks).clone()
    for fn in (pixel_auroc, pixel_f1_max, pro):
        fn(t_maps, t_masks)
    label_components(t_masks)
    assert np.array_equal(t_maps.numpy(), maps) and np.array_equal(t_masks.numpy(), masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_cuda_equals_cpu():
    maps, masks = random_case(1, ties=True)
    t_maps, t_masks = torch.from_numpy(maps), torch.from_numpy(masks)
    for fn in (pixel_auroc, pixel_f1_max, pro):
        got = fn(t_maps.cuda(), t_masks.cuda())
        assert got.device.type == "cuda"
        assert got.item() == pytest.approx(fn(t_maps, t_masks).item(), abs=1e-12)
    labels, n = label_components(t_masks.cuda())
    ref_labels, ref_n = label_components(t_masks)
    assert labels.device.type == "cuda" and n == ref_n and torch.equal(labels.cpu(), ref_labels)
