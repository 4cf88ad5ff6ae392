"""A seeded synthetic anomaly-detection data set in the MVTec AD layout.

Used by ``cli.py demo`` and the end-to-end tests: it needs no download, is written in about a second and gives a
pretrained CNN + PCA detector a task that is easy but not trivial. Two category kinds exist:

- ``texture``: a woven, canvas-like texture (two crossed gratings, a harmonic, smoothed noise) whose phase,
  orientation, period, brightness, contrast and tint vary slightly from image to image;
  defects ``scratch`` (a thin dark line at a random angle) and ``spot`` (a coloured, irregular blob).
- ``object``: a shaded disc with a dark rim and a groove, centred on a plain background with small random position,
  scale, colour and lighting jitter; defects ``scratch`` (a thin dark line on the disc face) and ``missing``
  (a bite cut out of the rim, showing the background).

Every image is drawn from its own generator, seeded from ``(seed, category, split, defect, index)``, so a file's
content depends only on those and not on how many other images are written. Rendering is element-wise float64
torch arithmetic on one thread, and PNGs are written with fixed settings and no metadata, so the same seed gives the
same bytes.

The layout written is::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png ...   (L mode, 0 = normal, 255 = anomalous)
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["CATEGORY_DEFECTS", "MIN_SIZE", "write_synthetic_mvtec"]

CATEGORY_DEFECTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "texture": ("scratch", "spot"),
    "object": ("missing", "scratch"),
})
"""Category names ``write_synthetic_mvtec`` knows, and the defect folders written for each."""

MIN_SIZE = 32
"""Smallest image side accepted: below it a defect is only a few pixels."""

_Grid = tuple[Tensor, Tensor]  # (y, x) pixel-centre coordinates, each float64 (S, S)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry helpers (pixel units; all return float64 (S, S) unless noted)
# ----------------------------------------------------------------------------------------------------------------------


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One draw from U(low, high)."""
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _coverage(signed_distance: Tensor) -> Tensor:
    """Anti-aliased coverage of a shape from its signed distance (negative inside): 1 inside, 0 outside, a 1-pixel
    linear ramp across the edge, so coverage > 0.5 exactly where the pixel centre lies inside."""
    return (0.5 - signed_distance).clamp(0.0, 1.0)


def _segment_distance(grid: _Grid, p0: tuple[float, float], p1: tuple[float, float]) -> Tensor:
    """Distance of every pixel centre to the segment ``p0 -> p1`` (points given as (y, x))."""
    y, x = grid
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    t = (((y - p0[0]) * dy + (x - p0[1]) * dx) / (dy * dy + dx * dx)).clamp(0.0, 1.0)
    return torch.hypot(y - (p0[0] + t * dy), x - (p0[1] + t * dx))


def _smooth_noise(gen: torch.Generator, size: int, cells: int) -> Tensor:
    """Zero-mean, unit-ish smooth noise: ``cells x cells`` Gaussian values, bicubic-upsampled to ``(size, size)``."""
    coarse = torch.randn(1, 1, cells, cells, generator=gen, dtype=torch.float64)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]


def _blend(image: Tensor, colour: Tensor, alpha: Tensor) -> Tensor:
    """``image + alpha * (colour - image)``: image ``(3, S, S)``, colour ``(3, S, S)`` or ``(3, 1, 1)``, alpha
    ``(S, S)``."""
    return image + alpha * (colour - image)


def _scratch_alpha(gen: torch.Generator, grid: _Grid, size: int, centre: tuple[float, float],
                   max_offset: float, length: tuple[float, float]) -> Tensor:
    """Coverage of a thin straight line (width 1.5-2.2 px at 128 px) at a random angle near ``centre``."""
    scale = size / 128
    angle = _uniform(gen, 0.0, math.pi)
    half = 0.5 * _uniform(gen, *length) * size
    cy = centre[0] + _uniform(gen, -max_offset, max_offset)
    cx = centre[1] + _uniform(gen, -max_offset, max_offset)
    width = max(1.2, _uniform(gen, 1.2, 2.0) * scale)  # never below 1.2 px, so the mask is never empty
    dy, dx = half * math.sin(angle), half * math.cos(angle)
    return _coverage(_segment_distance(grid, (cy - dy, cx - dx), (cy + dy, cx + dx)) - 0.5 * width)


# ----------------------------------------------------------------------------------------------------------------------
# Category renderers: (gen, grid, size, defect) -> (clean (3, S, S), defective (3, S, S), mask bool (S, S))
# ----------------------------------------------------------------------------------------------------------------------


def _render_texture(gen: torch.Generator, grid: _Grid, size: int, defect: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """Canvas-like texture; defects ``scratch`` (dark line) and ``spot`` (coloured blob).

    Returns float64 ``(clean (3, S, S), image (3, S, S), mask bool (S, S))``, values about [0, 1] (not clamped).
    """
    y, x = grid
    # Normal appearance: every parameter of the family is jittered a little.
    theta = 0.35 + _uniform(gen, -0.06, 0.06)
    f_u = 13.0 * _uniform(gen, 0.96, 1.04) / size  # cycles per pixel along u
    f_v = 9.0 * _uniform(gen, 0.96, 1.04) / size
    phases = [_uniform(gen, 0.0, 2 * math.pi) for _ in range(4)]
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    weave = (
        0.38 * torch.sin(2 * math.pi * f_u * u + phases[0])
        + 0.32 * torch.sin(2 * math.pi * f_v * v + phases[1])
        + 0.18 * torch.sin(4 * math.pi * f_u * u + phases[2]) * torch.sin(2 * math.pi * f_v * v + phases[3])
    )
    weave = weave + 0.30 * _smooth_noise(gen, size, 6) + 0.10 * _smooth_noise(gen, size, 24)
    brightness = _uniform(gen, 0.52, 0.60)
    contrast = _uniform(gen, 0.10, 0.13)
    tint = torch.tensor([1.0, 0.90, 0.72], dtype=torch.float64) + torch.empty(3, dtype=torch.float64).uniform_(
        -0.025, 0.025, generator=gen)
    base = (brightness + contrast * weave) * tint.view(3, 1, 1)  # (3, S, S)
    grain = 0.012 * torch.randn(3, size, size, generator=gen, dtype=torch.float64)
    clean = base + grain

    if defect is None:
        return clean, clean, torch.zeros(size, size, dtype=torch.bool)
    margin = 0.22 * size
    centre = (_uniform(gen, margin, size - margin), _uniform(gen, margin, size - margin))
    if defect == "scratch":
        alpha = _scratch_alpha(gen, grid, size, centre, 0.0, (0.15, 0.35))
        damaged = base * (1 - _uniform(gen, 0.30, 0.55) * alpha)
    elif defect == "spot":
        radius = max(2.5, _uniform(gen, 0.03, 0.055) * size)
        angle = torch.atan2(y - centre[0], x - centre[1])
        wobble = sum(_uniform(gen, 0.05, 0.15) * torch.cos(k * angle + _uniform(gen, 0.0, 2 * math.pi))
                     for k in (2, 3, 5))
        distance = torch.hypot(y - centre[0], x - centre[1]) - radius * (1 + wobble)
        alpha = _coverage(distance)
        palette = ((0.70, 0.22, 0.16), (0.20, 0.32, 0.62), (0.25, 0.50, 0.22))
        colour = torch.tensor(palette[int(torch.randint(3, (), generator=gen))], dtype=torch.float64)
        colour = colour.view(3, 1, 1) * (1 + 0.6 * (base.mean(0, keepdim=True) - brightness))
        damaged = _blend(base, colour, _uniform(gen, 0.45, 0.80) * alpha)
    else:
        raise ValueError(f"unknown texture defect {defect!r}; use one of {CATEGORY_DEFECTS['texture']}")
    return clean, damaged + grain, alpha > 0.5


def _render_object(gen: torch.Generator, grid: _Grid, size: int, defect: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """Shaded disc on a plain background; defects ``scratch`` (dark line on the face) and ``missing`` (bite out of
    the rim).

    Returns float64 ``(clean (3, S, S), image (3, S, S), mask bool (S, S))``, values about [0, 1] (not clamped).
    """
    y, x = grid
    background = torch.tensor([0.82, 0.82, 0.80], dtype=torch.float64).view(3, 1, 1) + _uniform(gen, -0.02, 0.02)
    background = background + _uniform(gen, -0.03, 0.03) * (y / size - 0.5)  # (3, S, S), faint vertical gradient
    cy = size / 2 + _uniform(gen, -0.03, 0.03) * size
    cx = size / 2 + _uniform(gen, -0.03, 0.03) * size
    radius = _uniform(gen, 0.29, 0.32) * size
    body = torch.tensor([0.30, 0.42, 0.58], dtype=torch.float64) + torch.empty(3, dtype=torch.float64).uniform_(
        -0.03, 0.03, generator=gen)
    light = _uniform(gen, -0.75 * math.pi - 0.3, -0.75 * math.pi + 0.3)  # light from the upper left
    dy, dx = y - cy, x - cx
    r = torch.hypot(dy, dx) / radius  # 0 at the centre, 1 on the outline
    shading = 1 + 0.28 * (dy * math.sin(light) + dx * math.cos(light)) / radius
    rim = 1 - 0.45 * ((r - 0.84) / 0.04).clamp(0.0, 1.0)  # dark outer ring from r = 0.88
    groove = 1 - 0.30 * torch.exp(-(((r - 0.52) / 0.025) ** 2))
    face = body.view(3, 1, 1) * (shading * rim * groove)  # (3, S, S)
    outline = torch.hypot(dy, dx) - radius  # signed distance to the disc outline
    coverage = _coverage(outline)
    grain = 0.008 * torch.randn(3, size, size, generator=gen, dtype=torch.float64)
    clean = _blend(background, face, coverage) + grain

    if defect is None:
        return clean, clean, torch.zeros(size, size, dtype=torch.bool)
    if defect == "scratch":
        inside = _coverage(outline + 0.2 * radius)  # keep the line on the face, off the rim
        alpha = _scratch_alpha(gen, grid, size, (cy, cx), 0.18 * radius, (0.14, 0.26)) * inside
        damaged = _blend(background, face * (1 - _uniform(gen, 0.30, 0.55) * alpha), coverage)
        mask = alpha > 0.5
    elif defect == "missing":
        angle = _uniform(gen, 0.0, 2 * math.pi)
        bite_r = max(3.0, _uniform(gen, 0.13, 0.25) * radius)
        depth = _uniform(gen, 0.95, 1.05) * radius  # distance of the bite's centre from the disc centre
        bite = _coverage(torch.hypot(y - cy - depth * math.sin(angle), x - cx - depth * math.cos(angle)) - bite_r)
        remaining = coverage * (1 - bite)
        damaged = _blend(background, face, remaining)
        mask = (coverage - remaining) > 0.5
    else:
        raise ValueError(f"unknown object defect {defect!r}; use one of {CATEGORY_DEFECTS['object']}")
    return clean, damaged + grain, mask


_RENDERERS: dict[str, Callable[[torch.Generator, _Grid, int, str | None], tuple[Tensor, Tensor, Tensor]]] = {
    "texture": _render_texture,
    "object": _render_object,
}


def _render(category: str, defect: str | None, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """One image of ``category`` from its own seeded generator.

    Args:
        category: a key of ``CATEGORY_DEFECTS``.
        defect: one of its defects, or None for a normal image.
        size: image side, pixels.
        seed: the image's seed (see ``_image_seed``).

    Returns:
        ``(clean, image, mask)``: ``uint8 (3, S, S)`` the normal image the defect was drawn on, ``uint8 (3, S, S)``
        the image itself (equal to ``clean`` when ``defect`` is None) and ``bool (S, S)`` its anomaly mask.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    grid = torch.meshgrid(coords, coords, indexing="ij")
    clean, image, mask = _RENDERERS[category](gen, grid, size, defect)
    return _quantize(clean), _quantize(image), mask


def _quantize(image: Tensor) -> Tensor:
    """float ``(3, S, S)`` in [0, 1] -> ``uint8 (3, S, S)``."""
    return (image * 255).round_().clamp_(0, 255).to(torch.uint8)


def _image_seed(seed: int, category: str, split: str, defect: str, index: int) -> int:
    """A 63-bit seed for one image, stable across runs, platforms and Python hash randomisation."""
    key = f"{seed}/{category}/{split}/{defect}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def _save_png(pixels: Tensor, path: Path) -> None:
    """``uint8 (3, H, W)`` -> RGB PNG, or ``uint8 (H, W)`` -> L PNG (fixed compression, no metadata)."""
    if pixels.ndim == 3:
        mode, data = "RGB", pixels.permute(1, 2, 0).contiguous()
    else:
        mode, data = "L", pixels.contiguous()
    height, width = data.shape[:2]
    buffer = bytearray(data.numel())
    torch.frombuffer(buffer, dtype=torch.uint8).copy_(data.view(-1))  # one memcpy, without numpy
    Image.frombytes(mode, (width, height), bytes(buffer)).save(path, format="PNG", compress_level=6)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Runs torch on one intra-op thread, then restores the caller's setting.

    Each image is only ~50k elements per op: splitting that over threads gains nothing, and on a busy machine the
    thread hand-offs made rendering ~100x slower (10 ms instead of 0.1 ms per float64 ``sin`` at 128 px).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _write_category(folder: Path, category: str, n_train: int, n_test_good: int, n_test_defect: int, size: int,
                    seed: int) -> None:
    """Writes one complete category into ``folder`` (which must exist and be empty)."""
    def write(split: str, defect: str, count: int) -> None:
        out = folder / split / defect
        out.mkdir(parents=True)
        if split == "test" and defect != "good":
            masks = folder / "ground_truth" / defect
            masks.mkdir(parents=True)
        for index in range(count):
            label = None if defect == "good" else defect
            _, image, mask = _render(category, label, size, _image_seed(seed, category, split, defect, index))
            _save_png(image, out / f"{index:03d}.png")
            if label is not None:
                _save_png(mask.to(torch.uint8) * 255, masks / f"{index:03d}_mask.png")

    write("train", "good", n_train)
    write("test", "good", n_test_good)
    for defect in CATEGORY_DEFECTS[category]:
        write("test", defect, n_test_defect)


def write_synthetic_mvtec(
    root: str | os.PathLike,
    *,
    categories: Sequence[str] = ("texture", "object"),
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Writes a small synthetic anomaly-detection data set in the MVTec AD layout.

    Each category is rendered into a hidden temporary folder under ``root`` and renamed into place only when
    complete, so an interrupted run never leaves a half-written category (at worst a hidden
    ``.synthetic-partial-*`` folder, which is not a category). Images are RGB PNGs of ``size x size``; masks are
    ``L`` PNGs, 0 = normal, 255 = anomalous, named ``<stem>_mask.png``.

    Args:
        root: the data root; created if missing.
        categories: category names, each a key of ``CATEGORY_DEFECTS`` (``"texture"``, ``"object"``).
        n_train: normal training images per category (``train/good``).
        n_test_good: normal test images per category (``test/good``).
        n_test_defect: anomalous test images per defect type (each category has two defect types).
        size: image side, pixels, >= ``MIN_SIZE``.
        seed: the same seed gives byte-identical files.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: an unknown or repeated category, a bad count or size, or a category path that already exists
            and is not an empty folder (the message names it); nothing is written then.
    """
    root = Path(root)
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of names, got the string {categories!r}; "
                         f"use ({categories!r},)")
    categories = list(categories)
    if not categories:
        raise ValueError("categories is empty; pass at least one of " + ", ".join(sorted(CATEGORY_DEFECTS)))
    for name in categories:
        if name not in CATEGORY_DEFECTS:
            raise ValueError(f"unknown synthetic category {name!r}; use some of {sorted(CATEGORY_DEFECTS)}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories {categories} repeat a name; list each category once")
    _check_count(n_train, "n_train", 1)
    _check_count(n_test_good, "n_test_good", 0)
    _check_count(n_test_defect, "n_test_defect", 0)
    if n_test_good + n_test_defect == 0:
        raise ValueError("n_test_good and n_test_defect are both 0: a category needs at least one test image")
    _check_count(size, "size", MIN_SIZE)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name in categories:
        target = root / name
        if target.is_dir():
            if any(target.iterdir()):
                raise ValueError(f"{target} already exists and is not empty; pass an empty or new root")
        elif target.exists() or target.is_symlink():
            raise ValueError(f"{target} already exists and is not a folder; pass an empty or new root")

    root.mkdir(parents=True, exist_ok=True)
    for name in categories:
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-partial-", dir=root))
        try:
            with _one_thread():
                _write_category(staging / name, name, n_train, n_test_good, n_test_defect, size, seed)
            target = root / name
            if target.is_dir():
                target.rmdir()  # empty (checked above); fails loudly if something was written there meanwhile
            os.rename(staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root
