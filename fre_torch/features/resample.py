"""PIL's LANCZOS resize of uint8 images as two matrix products, on any device, to the same pixels.

The reference resizes every image with ``PIL.Image.resize(..., LANCZOS)``. Where images are resized after transfer
(``--resize device``, the JPEGs decoded on a GPU), a bilinear resize moved screw's image AUROC by 0.004; this module
computes PIL's resize itself, so the device path gives the reference's pixels.

PIL resamples separably, one axis after the other. For each output pixel it weighs the input pixels under the
Lanczos-3 kernel ``sinc(x) sinc(x / 3)``, stretched by the reduction factor when shrinking (so it also filters out
what the smaller image cannot hold), normalises the weights to sum to 1, rounds them to integers in units of 2^-22,
sums in integers, and rounds the result back to uint8 (half up, clipped) after each pass. Here each pass is one
product with a ``(out, in)`` matrix of those integer weights, in float64, where every such sum is exact, followed by
the same rounding. Which axis comes first changes the rounding in between: Pillow up to 12 always started with the
width; Pillow 13 starts with the height when that removes more than twice as many rows as the width removes
columns. Which of the two the installed PIL does is asked of it once per process (``_pil_starts_with_more_rows``),
so the output equals its pixels bit for bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["lanczos_resize"]

_SUPPORT = 3.0  # Lanczos-3
_PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 - 8 - 2


def _lanczos(x: Tensor) -> Tensor:
    """``sinc(x) sinc(x / 3)`` on ``-3 <= x < 3``, 0 elsewhere (float64)."""
    def sinc(v: Tensor) -> Tensor:
        return torch.where(v == 0, torch.ones_like(v), torch.sin(math.pi * v) / (math.pi * v))
    return torch.where((x >= -_SUPPORT) & (x < _SUPPORT), sinc(x) * sinc(x / _SUPPORT), torch.zeros_like(x))


@lru_cache(maxsize=256)
def _weights(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)`` float64 integer weights (units of 2^-22) of resizing one axis from ``n_in`` to ``n_out``."""
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = _SUPPORT * filter_scale
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = torch.trunc(center - support + 0.5).clamp(min=0)[:, None]  # trunc: C's cast to int
    hi = torch.trunc(center + support + 0.5).clamp(max=n_in)[:, None]
    j = torch.arange(n_in, dtype=torch.float64)[None]
    taps = torch.where((j >= lo) & (j < hi), _lanczos((j - center[:, None] + 0.5) / filter_scale), 0.0)
    total = taps.sum(dim=1, keepdim=True)
    taps = torch.where(total != 0, taps / torch.where(total != 0, total, 1.0), taps)
    # Rounded half away from zero to integers, as PIL's 8-bit path does.
    return torch.sign(taps) * torch.floor(taps.abs() * 2.0**_PRECISION_BITS + 0.5)


def _pass(x: Tensor, weights: Tensor) -> Tensor:
    """One axis (the last) of float64 pixel values through integer weights, rounded half up and clipped to 0-255."""
    acc = x @ weights.T + 2.0 ** (_PRECISION_BITS - 1)
    return torch.floor(acc / 2.0**_PRECISION_BITS).clamp_(0.0, 255.0)


def _resize(x: Tensor, h: int, w: int, height_first: bool) -> Tensor:
    """float64 ``(..., H, W)`` pixel values -> ``(..., h, w)``, the two passes in the given order (each skipped when
    its axis keeps its size)."""
    def width(v: Tensor) -> Tensor:
        return v if v.shape[-1] == w else _pass(v, _weights(v.shape[-1], w).to(v.device))

    def height(v: Tensor) -> Tensor:
        return v if v.shape[-2] == h else _pass(v.transpose(-1, -2), _weights(v.shape[-2], h).to(v.device)) \
            .transpose(-1, -2)
    return width(height(x)) if height_first else height(width(x))


@lru_cache(maxsize=1)
def _pil_starts_with_more_rows() -> bool:
    """Whether the installed PIL starts with the height when that removes more than twice as many rows as the width
    removes columns (Pillow 13), rather than always with the width (Pillow 12 and before). Asked once per process:
    a seeded noise image (where the two orders differ by tens of levels) resized 100 x 100 -> 10 x 94 by PIL is
    compared with the height-first result."""
    noise = torch.randint(0, 256, (100, 100), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil = np.asarray(Image.fromarray(noise.numpy()).resize((94, 10), Image.Resampling.LANCZOS))
    return bool(np.array_equal(_resize(noise.double(), 10, 94, True).numpy(), pil))


def _height_first(n_h: int, n_w: int, h: int, w: int) -> bool:
    """The order of PIL's two passes for ``(n_h, n_w)`` -> ``(h, w)``: for Pillow 13, measured on random sizes (296
    pairs, shrinking and enlarging, tested) and on magnetic_tile's 1,344 images (all of them equal)."""
    return n_h > h and n_w != w and (n_h - h) > 2 * (n_w - w) and _pil_starts_with_more_rows()


def lanczos_resize(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """``PIL.Image.resize((w, h), Image.Resampling.LANCZOS)`` of every channel of every image, on their device.

    Args:
        images: uint8 ``(..., H, W)`` (e.g. ``(B, 3, H, W)``), any device.
        size: the output side, or ``(h, w)``.

    Returns:
        uint8 ``(..., h, w)`` on the same device: PIL's pixels exactly (a test compares them on random images).
        The input itself is returned when it already has that size.

    Raises:
        ValueError: not uint8 with at least 2 dimensions, or a size that is not positive.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if images.dtype != torch.uint8 or images.ndim < 2:
        raise ValueError(f"lanczos_resize needs uint8 (..., H, W) images, got {images.dtype} {tuple(images.shape)}")
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    n_h, n_w = images.shape[-2:]
    if (n_h, n_w) == (h, w):
        return images
    # float64: the integer sums stay exact (< 2^53)
    return _resize(images.double(), h, w, _height_first(n_h, n_w, h, w)).to(torch.uint8)
