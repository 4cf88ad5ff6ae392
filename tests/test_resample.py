"""fre_torch.features.resample: PIL's LANCZOS resize, computed with matrix products, gives PIL's pixels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fre_torch.features.resample import lanczos_resize


def _pil(channel: torch.Tensor, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(channel.numpy()).resize((w, h), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("in_hw, out_hw", [
    ((37, 53), (224, 224)),    # enlarge, not square
    ((257, 300), (224, 224)),  # shrink a little (magnetic_tile's sizes)
    ((700, 1000), (160, 224)),  # shrink a lot: the kernel is stretched
    ((384, 384), (224, 224)),  # bottle
    ((224, 100), (224, 224)),  # one axis only
    ((5, 7), (3, 1)),          # tiny
    ((373, 248), (224, 224)),  # Pillow 13 starts with the height here (it removes > 2x the columns' count of rows)
    ((100, 100), (10, 94)),
])
def test_lanczos_resize_equals_pil(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(in_hw) + sum(out_hw))
    images = torch.randint(0, 256, (2, 3, *in_hw), generator=g, dtype=torch.uint8)
    images[:, :, : in_hw[0] // 2] = (torch.arange(in_hw[1]) * 7 % 256).to(torch.uint8)  # smooth ramps: rounding
    got = lanczos_resize(images, out_hw)
    assert got.shape == (2, 3, *out_hw) and got.dtype == torch.uint8
    want = np.stack([np.stack([_pil(c, *out_hw) for c in image]) for image in images])
    assert np.array_equal(got.numpy(), want)  # bit for bit, ringing clipped as PIL clips it


def test_lanczos_resize_equals_pil_on_random_sizes() -> None:
    """Shrinking and enlarging either axis, square or not: whichever order PIL takes its passes in, the same pixels."""
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(4, 200, (60, 4), generator=g).tolist()
    for n_h, n_w, h, w in sizes:
        image = torch.randint(0, 256, (n_h, n_w), generator=g, dtype=torch.uint8)
        assert np.array_equal(lanczos_resize(image, (h, w)).numpy(), _pil(image, h, w)), (n_h, n_w, h, w)


def test_lanczos_resize_shapes_and_errors() -> None:
    x = torch.randint(0, 256, (4, 9, 11), dtype=torch.uint8)
    assert lanczos_resize(x, (9, 11)) is x  # already at that size
    assert lanczos_resize(x, 6).shape == (4, 6, 6) and lanczos_resize(x[0], (3, 5)).shape == (3, 5)
    assert torch.equal(lanczos_resize(x, 6)[1], lanczos_resize(x[1], 6))  # each image alone
    with pytest.raises(ValueError, match="uint8"):
        lanczos_resize(x.float(), 6)
    with pytest.raises(ValueError, match="positive"):
        lanczos_resize(x, (0, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch: it checks "
                    "that CUDA gives the CPU's results")
def test_lanczos_resize_on_cuda_equals_cpu() -> None:
    x = torch.randint(0, 256, (3, 3, 257, 300), dtype=torch.uint8)
    assert torch.equal(lanczos_resize(x.cuda(), 224).cpu(), lanczos_resize(x, 224))
