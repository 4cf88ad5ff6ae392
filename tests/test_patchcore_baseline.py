"""The PatchCore baseline of the benchmarks (``benchmarks/patchcore.py``) against float64 references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from benchmarks.patchcore import (PatchCore, PatchCoreConfig, aggregate, gaussian_blur, greedy_coreset,
                                  nearest_distances, random_projection)
from conftest import REPO, require_category
from fre_torch.detection.metrics import auroc
from fre_torch.features.backbones import get_backbone_spec, normalize
from fre_torch.features.images import ImageDataset, MVTecCategory, make_loader


def _kcenter_float64(x: torch.Tensor, n: int, start: int) -> list[int]:
    """Brute-force greedy k-center in float64: every step recomputes each row's distance to every chosen row."""
    x = x.double()
    chosen = [start]
    while len(chosen) < n:
        d = torch.cdist(x, x[chosen]).min(dim=1).values
        chosen.append(int(torch.argmax(d)))
    return chosen


def test_lite_normalisation_is_minus_127_over_128():
    images = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    x = normalize(images, get_backbone_spec("efficientnet_lite0"))
    torch.testing.assert_close(x, (images.double() - 127) / 128, check_dtype=False, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_greedy_coreset_equals_float64_brute_force(offset):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 24, generator=g) * torch.linspace(0.2, 3.0, 24) + offset
    chosen = greedy_coreset(x, 40, start=17)
    assert chosen.tolist() == _kcenter_float64(x, 40, 17)
    assert len(set(chosen.tolist())) == 40


def test_greedy_coreset_leaves_input_and_checks_n():
    x = torch.randn(50, 4)
    before = x.clone()
    greedy_coreset(x, 5, 0)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="n must be in"):
        greedy_coreset(x, 51, 0)


def test_nearest_distances_equal_float64_cdist():
    g = torch.Generator().manual_seed(2)
    # Non-negative features with a large common level, like the backbone's: the product form alone cancels here.
    bank = torch.rand(300, 152, generator=g) * 2 + 4
    queries = torch.rand(1000, 152, generator=g) * 2.2 + 3.9
    expected = torch.cdist(queries.double(), bank.double()).min(dim=1).values
    got = nearest_distances(queries, bank, chunk_bytes=300 * 4 * 64)  # 64 rows a chunk: 16 chunks
    assert got.dtype == torch.float32 and got.shape == (1000,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_aggregate_pools_upsamples_and_concatenates():
    g = torch.Generator().manual_seed(3)
    fine, deep = torch.randn(2, 40, 28, 28, generator=g), torch.randn(2, 112, 14, 14, generator=g)
    out = aggregate([fine, deep], 3)
    assert out.shape == (2, 28, 28, 152)
    # An inner patch: the mean of its 3 x 3 neighbourhood; a corner: the sum of its 2 x 2 over 9 (zero padding).
    torch.testing.assert_close(out[1, 10, 5, :40], fine[1, :, 9:12, 4:7].mean(dim=(1, 2)))
    torch.testing.assert_close(out[0, 0, 0, :40], fine[0, :, :2, :2].sum(dim=(1, 2)) / 9)
    pooled = F.avg_pool2d(deep, 3, stride=1, padding=1)
    torch.testing.assert_close(out[..., 40:].permute(0, 3, 1, 2),
                               F.interpolate(pooled, size=(28, 28), mode="bilinear", align_corners=False))


def test_patchcore_shapes_on_random_weights():
    model = PatchCore(pretrained=False)
    assert (model.grid, model.dim) == (28, 152)
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=g)
    assert model.embed(images).shape == (2, 28, 28, 152)
    model.fit([images], 2)
    assert model.memory_bank.shape == (round(0.01 * 2 * 784), 152)
    scores, maps = model.score_and_maps([images[:1]], 1)
    assert scores.shape == (1,) and maps.shape == (1, 224, 224) and bool(torch.isfinite(maps).all())
    # Upsampling and blur average the patch distances, so the map never exceeds the image score (their maximum).
    assert float(maps.max()) <= float(scores[0]) + 1e-5


def test_gaussian_blur_equals_torchvision():
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(3, 224, 224, generator=g)
    expected = tv_gaussian_blur(maps[:, None], kernel_size=[33, 33], sigma=[4.0, 4.0])[:, 0]
    torch.testing.assert_close(gaussian_blur(maps, 4.0), expected, rtol=0, atol=1e-5)  # float32 rounding
    impulse = torch.zeros(1, 64, 64)
    impulse[0, 32, 32] = 1
    assert math.isclose(float(gaussian_blur(impulse, 4.0).sum()), 1.0, rel_tol=1e-6)


def test_random_projection_is_seeded():
    assert torch.equal(random_projection(152, 128, 0), random_projection(152, 128, 0))
    assert not torch.equal(random_projection(152, 128, 0), random_projection(152, 128, 1))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="coreset_fraction"):
        PatchCoreConfig(coreset_fraction=0)
    with pytest.raises(ValueError, match="odd"):
        PatchCoreConfig(aggregate=2)


def test_library_does_not_import_the_baseline():
    sources = [p for p in (REPO / "fre_torch").rglob("*.py") if "patchcore" in p.read_text(encoding="utf-8").lower()]
    assert sources == [], f"fre_torch/ must not use the benchmark baseline: {sources}"


@pytest.mark.full
def test_bottle_image_auroc():
    """Real data: every second training image of bottle (105), all 83 test images; about 20 s on one thread."""
    cat = MVTecCategory.load(require_category("bottle"), "bottle")
    train = cat.train[::2]
    model = PatchCore()

    def batches(paths: list[Path]):
        return (b["image"] for b in make_loader(ImageDataset(paths, 224), 32, "cpu"))

    model.fit(batches(train), len(train))
    scores, maps = model.score_and_maps(batches(cat.test_paths), len(cat.test_paths))
    assert maps.shape == (83, 224, 224)
    assert float(auroc(scores, cat.test_labels)) >= 0.99
