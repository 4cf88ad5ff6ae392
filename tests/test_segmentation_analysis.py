"""benchmarks/studies/segmentation_analysis: the per-class breakdown of pixel AUROC, checked against brute-force pair counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.studies.segmentation_analysis import (breakdown, far_from, image_far_leak, knn_grid_maps,
                                              local_statistics)


def _pair_auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), by counting every pair in float64."""
    p, n = pos.double().flatten()[:, None], neg.double().flatten()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def _far_brute(mask: torch.Tensor, far: int) -> torch.Tensor:
    h, w = mask.shape
    defects = mask.nonzero().tolist()
    out = torch.zeros(h, w, dtype=torch.bool)
    if not defects:
        return out
    for y, x in itertools.product(range(h), range(w)):
        out[y, x] = all(max(abs(y - dy), abs(x - dx)) > far for dy, dx in defects)
    return out


def test_far_from_matches_brute_force_chebyshev_distance():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 12, 10, generator=g) > 0.93
    masks[3] = False  # an image without defective pixels has no 'far' region
    for far in (0, 1, 3):
        expected = torch.stack([_far_brute(m, far) for m in masks])
        assert torch.equal(far_from(masks, far), expected)
    with pytest.raises(ValueError, match="far"):
        far_from(masks, -1)


def _scene() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two good images, a 'strong' defect whose whole image scores high, a 'faint' one that only scores at the
    defect, on a 16 x 16 grid with a little noise so that no two scores tie."""
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    masks[2, 2:5, 2:5] = True            # strong
    masks[3, 10:14, 9:15] = True         # faint, larger
    masks[4, 0:3, 12:16] = True          # faint
    maps = torch.rand(5, 16, 16, generator=g) * 0.1
    maps[2] += 3.0                       # the strong image is elevated everywhere ...
    maps[2][masks[2]] += 1.0             # ... and most at its defect
    maps[3][masks[3]] += 2.0
    maps[4][masks[4]] += 2.0
    return maps, masks, ["good", "good", "strong", "faint", "faint"]


def test_breakdown_matches_pair_counts():
    maps, masks, names = _scene()
    far = 2
    b = breakdown(maps, masks, names, far=far)
    good = maps[:2]
    pos, neg = maps[masks], maps[~masks]
    assert b["pixel_auroc"] == pytest.approx(_pair_auroc(pos, neg), abs=1e-9)
    assert b["pixel_auroc"] < 0.9  # the faint defects rank below the strong image's normal pixels
    far_px = torch.stack([_far_brute(m, far) for m in masks])
    assert b["far_leak"] == pytest.approx(_pair_auroc(maps[far_px], good), abs=1e-9)
    oracle = maps.clone()
    oracle[far_px] = maps.min()
    assert b["if_no_far_leak"] == pytest.approx(_pair_auroc(oracle[masks], oracle[~masks]), abs=1e-9)
    assert b["largest_class"] == "faint"
    keep = [0, 1, 2]
    assert b["without_largest"] == pytest.approx(_pair_auroc(maps[keep][masks[keep]], maps[keep][~masks[keep]]),
                                                 abs=1e-9)
    strong, faint = b["classes"]["strong"], b["classes"]["faint"]
    assert strong["images"] == 1 and faint["images"] == 2
    assert faint["defect_pixel_share"] == pytest.approx(36 / 45)
    assert strong["far_leak"] == 1.0 and faint["far_leak"] == pytest.approx(
        _pair_auroc(maps[3:][far_px[3:]], good), abs=1e-9)
    assert 0.2 < faint["far_leak"] < 0.8  # faint images' far pixels look like good ones
    assert strong["vs_good"] == faint["vs_good"] == 1.0
    within = [_pair_auroc(maps[i][masks[i]], maps[i][~masks[i]]) for i in (3, 4)]
    assert faint["within"] == pytest.approx(sum(within) / 2, abs=1e-9)
    sel = [0, 1, 3, 4]
    assert faint["pixel_auroc"] == pytest.approx(_pair_auroc(maps[sel][masks[sel]], maps[sel][~masks[sel]]),
                                                 abs=1e-9)


def test_breakdown_rejects_what_it_cannot_split():
    maps, masks, names = _scene()
    with pytest.raises(ValueError, match="same"):
        breakdown(maps, masks[:4], names)
    with pytest.raises(ValueError, match="good test images"):
        breakdown(maps, masks, ["strong"] * 5)


def test_knn_maps_are_nearest_neighbour_distances():
    g = torch.Generator().manual_seed(2)
    grid = 4
    train = [torch.randn(3, 5 * grid * grid, generator=g), torch.randn(3, 2 * grid * grid, generator=g)]
    test = [torch.randn(2, 5 * grid * grid, generator=g), torch.randn(2, 2 * grid * grid, generator=g)]
    test = [torch.cat([t, tr[:1]]) for t, tr in zip(test, train)]  # the third test image is a training image

    def cells(rows):
        m = torch.cat([r.view(r.shape[0], -1, grid, grid) for r in rows], 1)
        m = torch.nn.functional.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)
        return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]).double()

    expected = torch.cdist(cells(test), cells(train)).amin(1).view(-1, grid, grid)
    got = knn_grid_maps(train, test, grid, bank_size=10_000)  # the bank holds every training cell
    # The distance is sqrt(|q|^2 - 2 q.b + |b|^2) in float32: a zero distance comes out as sqrt(rounding) ~ 1e-3.
    assert torch.allclose(got.double(), expected, atol=2e-3)
    assert float(got[2].abs().max()) < 2e-3 and float(expected[:2].min()) > 0.1


def test_image_far_leak_sees_a_brighter_far_region_and_not_an_equal_one():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(90, 110, (4, 3, 40, 40), generator=g, dtype=torch.uint8)
    masks = torch.zeros(4, 40, 40, dtype=torch.bool)
    masks[2:, 0:4, 0:4] = True
    equal = image_far_leak(images, masks, ["good", "good", "d", "d"], far=8)
    assert 0.3 < equal["grey_level"] < 0.7 and 0.3 < equal["contrast"] < 0.7
    images[2:] += 60  # the defective images are brighter everywhere
    brighter = image_far_leak(images, masks, ["good", "good", "d", "d"], far=8)
    assert brighter["grey_level"] == 1.0
    mean, std = local_statistics(images[:1].float(), window=3)
    grey = images[0].float().mean(0)
    assert float(mean[0, 5, 5]) == pytest.approx(float(grey[4:7, 4:7].mean()), rel=1e-5)
    assert float(std[0, 5, 5]) == pytest.approx(float(grey[4:7, 4:7].std(unbiased=False)), rel=1e-4)
