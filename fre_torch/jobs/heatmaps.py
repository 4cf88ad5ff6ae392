"""Heatmap panels: the image, its anomaly map overlaid on it, and the ground-truth outline, side by side in one PNG.

Colours mean the same thing on every image of a model: a map value ``v`` is coloured by ``t = clip((v - floor) /
(scale - floor), 0, 1)`` through the fixed colour map ``COLORMAP`` (indigo -> magenta -> orange -> pale yellow,
lightness increasing) and blended over the image with opacity ``OVERLAY_ALPHA * t``. So a value up to ``floor``
leaves the image untouched (pixel for pixel), ``scale`` and above get the full colour at the full opacity, and
nothing is ever normalised per image or from test scores. Both come from normal images' map values, never from a
test image: ``floor`` is their ``MAP_FLOOR_QUANTILE`` (0.99), the level normal images stay under, so about 99 % of a
normal image stays plain and colour means "above normal"; ``scale`` their ``MAP_SCALE_QUANTILE`` (0.999), so almost
nothing of a normal image reaches the full colour. For ``predict`` they are the detector's ``map_floor`` and
``map_scale`` (``FREDetector.calibrate`` on held-out images, as ``cli.py fit`` does), for ``evaluate`` the same
quantiles of the training images' out-of-fold maps (``fre_torch.jobs.crossfit``). A model file written before the
floor existed has ``map_floor = 0``: colour starts at 0, as it was drawn then.

A PNG is ``panels * W`` wide and ``H`` high, ``(H, W)`` the image file's own size (maps are upsampled to it):

1. the image;
2. the overlay;
3. (with ground truth) the image with the mask's boundary drawn in ``OUTLINE_COLOUR`` just inside the mask; an image
   known to be normal shows no outline; a defective image whose mask file is missing is labelled "no mask".

``cli.py predict`` writes 2-panel files (no ground truth); ``cli.py evaluate --save_heatmaps`` 3-panel ones.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from ..features.images import _decode, _to_rgb, cpu_count, load_mask
from ..detection.detector import FREDetector, upsample_maps
from ..features.files import atomic_write

__all__ = ["COLORMAP", "OUTLINE_COLOUR", "OVERLAY_ALPHA", "PNG_COMPRESS_LEVEL", "colorize", "encode_png",
           "heatmap_floor", "heatmap_names", "heatmap_scale", "mask_outline", "render_file", "render_panel",
           "save_heatmaps", "write_png"]

# Stops of the colour map (position, RGB): lightness rises monotonically, so a brighter colour always means a
# larger value, also in greyscale print; no stop is green, which stays free for the ground-truth outline.
_STOPS = (
    (0.00, (45, 25, 110)),
    (0.30, (150, 35, 135)),
    (0.60, (232, 78, 48)),
    (0.85, (250, 178, 35)),
    (1.00, (255, 248, 150)),
)
_LUT_SIZE = 256
PNG_COMPRESS_LEVEL = 1
"""zlib level of every PNG written (heatmaps, the report's panels): lossless at any level; with PIL, level 1 wrote a
1152 x 384 panel in 26 ms against 99 ms at its default 6, for files about a fifth larger; ``encode_png`` at level 1
takes 12-13 ms."""


def _build_lut() -> Tensor:
    """``(_LUT_SIZE, 3)`` float32 RGB in [0, 255], linear between the stops."""
    pos = torch.tensor([p for p, _ in _STOPS], dtype=torch.float64)
    rgb = torch.tensor([c for _, c in _STOPS], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, _LUT_SIZE, dtype=torch.float64)
    hi = torch.searchsorted(pos, t, right=True).clamp(1, len(_STOPS) - 1)
    w = ((t - pos[hi - 1]) / (pos[hi] - pos[hi - 1]))[:, None]
    return (rgb[hi - 1] * (1 - w) + rgb[hi] * w).float()


COLORMAP: Tensor = _build_lut()
"""``(256, 3)`` float32 RGB in [0, 255]: entry ``i`` is the colour of ``t = i / 255`` (``t = (value - floor) /
(scale - floor)``)."""

OVERLAY_ALPHA = 0.7
"""Opacity of the overlay at ``t = 1`` (``value >= scale``); it is ``OVERLAY_ALPHA * t`` below, 0 at ``floor`` and
under, so the image's texture stays visible under the strongest colour and a map at the normal level leaves the image
unchanged."""

OUTLINE_COLOUR = (40, 255, 40)
"""RGB of the ground-truth outline: green, which the colour map never uses."""

_NAME_CHARS = re.compile(r"[^\w.-]+")


def heatmap_scale(detector: FREDetector) -> float:
    """The detector's ``map_scale`` as a float, checked: the value drawn at full colour.

    Raises:
        ValueError: the detector is in kernel mode (no maps), or has no map scale (a model file written before
            heatmaps existed, or a detector that was never calibrated); the message says how to fix it.
    """
    if detector.config.kernel is not None:
        raise ValueError("heatmaps need anomaly maps, which kernel FRE does not give (it scores whole-image vectors); "
                         "fit without --kernel")
    scale = float(detector.map_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError("this model has no heatmap scale (map_scale is unset: an older model file or an "
                         "uncalibrated detector); re-fit it with `cli.py fit`, or call det.calibrate(held_out) / "
                         "det.set_map_scale(normal_images)")
    return scale


def heatmap_floor(detector: FREDetector) -> float:
    """The detector's ``map_floor`` as a float: the value up to which heatmaps stay uncoloured (0 for a model file
    written before the floor existed)."""
    return float(detector.map_floor)


def _check_scale(scale: float | Tensor) -> float:
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"heatmap scale must be a finite number > 0, got {value}; use the detector's map_scale "
                         "(set by calibrate or set_map_scale)")
    return value


def _check_levels(scale: float | Tensor, floor: float | Tensor) -> tuple[float, float]:
    """``(scale, floor)`` as floats, checked: ``0 <= floor <= scale``, ``scale > 0``, both finite."""
    value, start = _check_scale(scale), float(floor)
    if not (math.isfinite(start) and 0.0 <= start <= value):
        raise ValueError(f"heatmap floor must be a finite number in [0, scale = {value:g}], got {start}; use the "
                         "detector's map_floor with its map_scale (set together by calibrate or set_map_scale)")
    return value, start


def colorize(heat: Tensor, scale: float | Tensor, floor: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Fixed-scale colours of map values: ``t = clip((heat - floor) / (scale - floor), 0, 1)``.

    Args:
        heat: ``(...)`` float map values (any shape), >= 0 (negative values count as 0).
        scale: the value drawn at full colour (``map_scale``); values above it are clipped to it.
        floor: the value up to which nothing is drawn (``map_floor``, the normal level), in ``[0, scale]``; 0
            colours every value above 0. With ``floor == scale`` a value is drawn at full colour or not at all.

    Returns:
        ``(rgb, alpha)``: ``rgb`` ``(..., 3)`` float32 in [0, 255] from ``COLORMAP``, ``alpha`` ``(...)`` float32 in
        ``[0, OVERLAY_ALPHA]``, exactly 0 where ``heat <= floor``. Both depend on each value alone, never on the
        rest of the map.
    """
    value, start = _check_levels(scale, floor)
    heat = torch.as_tensor(heat).detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(heat).all()):
        raise ValueError("the anomaly map holds NaN/Inf values; check the input image and the model")
    # With floor 0 this is exactly the former heat / scale; a value <= floor gives t = 0 (alpha 0) exactly.
    t = ((heat - start) / (value - start)).clamp(0.0, 1.0) if value > start else (heat > start).float()
    index = (t * (_LUT_SIZE - 1)).round().long()
    return COLORMAP[index], OVERLAY_ALPHA * t


def mask_outline(mask: Tensor, thickness: int = 1) -> Tensor:
    """The boundary of a mask: mask pixels within ``thickness`` pixels (chessboard distance) of a non-mask pixel or
    of the image border.

    Args:
        mask: ``(H, W)`` bool, True = anomalous.
        thickness: outline width in pixels, >= 1.

    Returns:
        ``(H, W)`` bool, a subset of ``mask`` (the outline is drawn inside the region, so it never hides what
        surrounds it).
    """
    mask = torch.as_tensor(mask).to("cpu", torch.bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {tuple(mask.shape)}")
    outline = torch.zeros_like(mask)
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    if not len(rows):
        return outline
    # Only the mask's bounding box can hold outline pixels. Around the box lie non-mask pixels or the image border,
    # both "outside", so padding the box with "outside" gives the whole image's result at the box's cost (defects
    # are small; the max-pool over a whole 384 x 384 image cost 5 ms).
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = mask[r0:r1, c0:c1]
    outside = F.pad((~box).float()[None, None], (thickness,) * 4, value=1.0)
    near_outside = F.max_pool2d(outside, 2 * thickness + 1, stride=1)[0, 0] > 0
    outline[r0:r1, c0:c1] = box & near_outside
    return outline


def _as_image(image: Any) -> Tensor:
    """uint8 ``(H, W, 3)`` tensor or ndarray -> uint8 ``(H, W, 3)`` CPU tensor (checked, not copied if possible)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        what = f"{image.dtype} {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image must be uint8 (H, W, 3), got {what}; permute a (3, H, W) tensor with "
                         ".permute(1, 2, 0)")
    return image.detach().cpu()


def render_panel(image: Tensor | np.ndarray, heat: Tensor, scale: float | Tensor, mask: Tensor | None = None, *,
                 panels: int = 3, floor: float | Tensor = 0.0) -> Image.Image:
    """One RGB picture of ``panels`` side-by-side panels, each ``W x H``.

    Args:
        image: uint8 ``(H, W, 3)`` (tensor or ndarray), the image at the size it is shown.
        heat: ``(H, W)`` float map at the same size (``upsample_maps`` brings grid maps there).
        scale: the map value shown at full colour (the detector's ``map_scale``), never derived from this image.
        mask: ``(H, W)`` bool ground truth (all False for a normal image), or None when it is unknown: the third
            panel is then labelled "no mask".
        panels: 3 (image, overlay, ground truth) or 2 (image, overlay; ``mask`` must be None).
        floor: the map value up to which the overlay is the image itself (the detector's ``map_floor``).

    Returns:
        A ``PIL.Image`` of size ``(panels * W, H)`` (PIL's (width, height)), mode RGB.
    """
    img = _as_image(image)
    h, w, _ = img.shape
    heat = torch.as_tensor(heat)
    if tuple(heat.shape) != (h, w):
        raise ValueError(f"heat map is {tuple(heat.shape)} but the image is {(h, w)}; upsample it with "
                         "fre_torch.detection.detector.upsample_maps(maps, (H, W))")
    if panels not in (2, 3):
        raise ValueError(f"panels must be 2 (image, overlay) or 3 (image, overlay, ground truth), got {panels}")
    if panels == 2 and mask is not None:
        raise ValueError("a mask needs the ground-truth panel: use panels=3")
    rgb, alpha = colorize(heat, scale, floor)
    alpha = alpha[..., None]
    # Blend in float32; pixels with alpha 0 round back to exactly their input value.
    overlay = (img.float() * (1.0 - alpha) + rgb * alpha).round().clamp(0, 255).to(torch.uint8)
    strips = [img, overlay]
    label = None
    if panels == 3:
        truth = img.clone()
        if mask is None:
            label = "no mask"
        else:
            mask = torch.as_tensor(mask).to("cpu", torch.bool)
            if tuple(mask.shape) != (h, w):
                raise ValueError(f"mask is {tuple(mask.shape)} but the image is {(h, w)}; load it at the image's "
                                 "own size (fre_torch.features.images.load_mask(path))")
            # About 1 px per 256 px of the shorter side, so the outline stays visible on large images.
            edge = mask_outline(mask, max(1, round(min(h, w) / 256)))
            truth[edge] = torch.tensor(OUTLINE_COLOUR, dtype=torch.uint8)
        strips.append(truth)
    picture = Image.fromarray(torch.cat(strips, dim=1).numpy())
    if label is not None:
        draw = ImageDraw.Draw(picture)
        x0, y0, x1, y1 = draw.textbbox((2 * w + 4, 4), label)
        draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
        draw.text((2 * w + 4, 4), label, fill=(255, 255, 255))
    return picture


def render_file(path: str | os.PathLike, grid_map: Tensor, scale: float | Tensor, *,
                mask: str | os.PathLike | None = None, normal: bool = False, panels: int = 3,
                max_side: int | None = None, floor: float | Tensor = 0.0) -> Image.Image:
    """``render_panel`` of an image file at its own size (or shrunk to ``max_side``).

    Args:
        path: the image file (read as RGB, as the detector reads it, but not resized).
        grid_map: ``(g, g)`` anomaly map on the feature grid; upsampled to the shown size (bilinear, antialiased).
        scale: the value shown at full colour (``map_scale``).
        mask: its ground-truth mask file, or None.
        normal: with ``mask=None``, the image is known to be normal: no outline and no "no mask" label.
        panels: 3 or 2 (see ``render_panel``).
        max_side: shrink so the longer side is at most this (for thumbnails; LANCZOS image, nearest-neighbour mask).
        floor: the value up to which nothing is coloured (``map_floor``).
    """
    pixels, (h, w) = _decode(path, _to_rgb)
    truth: Tensor | None = None
    if panels == 3 and mask is not None:
        truth = load_mask(mask)
        if tuple(truth.shape) != (h, w):
            raise ValueError(f"mask {mask} is {tuple(truth.shape)}, its image {path} is {(h, w)}; masks must have "
                             "their image's size")
    elif panels == 3 and normal:
        truth = torch.zeros(h, w, dtype=torch.bool)
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))  # PIL's (width, height)
        shown = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.LANCZOS)
        image = torch.from_numpy(np.asarray(shown).copy())
        if truth is not None:
            small = Image.fromarray(truth.numpy()).resize(size, Image.Resampling.NEAREST)
            truth = torch.from_numpy(np.asarray(small).copy())
        h, w = size[1], size[0]
    else:
        image = pixels.permute(1, 2, 0)
    grid_map = torch.as_tensor(grid_map).detach().to("cpu", torch.float32)
    if grid_map.ndim != 2:
        raise ValueError(f"grid_map must be (g, g), got {tuple(grid_map.shape)}")
    heat = upsample_maps(grid_map[None], (h, w))[0]
    return render_panel(image, heat, scale, truth, panels=panels, floor=floor)


def heatmap_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output file names ``<parent folder>_<stem>.png``, made unique.

    ``test/good/000.png`` and ``test/scratch/000.png`` give ``good_000.png`` and ``scratch_000.png``. Names that
    still clash (compared case-insensitively, for case-insensitive file systems) take more parent folders, then the
    original extension (``a.png`` / ``a.jpg``), then their position in ``paths``. Characters other than letters,
    digits (Unicode included), ``.``, ``_`` and ``-`` become ``_``.
    """
    items = [Path(p) for p in paths]
    depth = [1] * len(items)
    with_ext = [False] * len(items)
    with_index = [False] * len(items)

    def name(i: int) -> str:
        p = items[i]
        folders = [part for part in p.parent.parts if part not in (p.anchor, "", ".")]
        parts = folders[len(folders) - min(depth[i], len(folders)):] + [p.stem]
        if with_ext[i] and p.suffix:
            parts.append(p.suffix[1:])
        if with_index[i]:
            parts.append(str(i))
        return _NAME_CHARS.sub("_", "_".join(parts)) + ".png"

    for _ in range(len(items) + 64):  # each round lengthens every clashing name; the index ends all clashes
        names = [name(i) for i in range(len(items))]
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n.lower(), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return names
        for group in clashes:
            for i in group:
                n_folders = len([part for part in items[i].parent.parts if part not in (items[i].anchor, "", ".")])
                if depth[i] < n_folders:
                    depth[i] += 1
                elif not with_ext[i]:
                    with_ext[i] = True
                else:
                    with_index[i] = True
    raise ValueError("could not derive unique heatmap file names")  # unreachable: indices are unique


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(picture: Image.Image | np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """An 8-bit RGB PNG file's bytes, lossless, about twice as fast as PIL's encoder at the same zlib level.

    PIL tries all five PNG row filters on every row and keeps the best; photos and heatmaps compress almost as well
    with the "up" filter alone (row minus the row above, 3 % larger files), which is one vectorised subtraction. The
    rest is zlib, which releases the GIL, so ``save_heatmaps``' threads encode in parallel.

    Args:
        picture: an RGB ``PIL.Image`` or a uint8 ``(H, W, 3)`` array.
        level: zlib level, 0-9.

    Returns:
        The PNG file's bytes (signature, IHDR, one IDAT, IEND).
    """
    rgb = np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) and picture.mode != "RGB"
                     else picture)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"encode_png needs uint8 (H, W, 3) pixels, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, 3 * w)
    scanlines = np.empty((h, 3 * w + 1), dtype=np.uint8)
    scanlines[:, 0] = 2  # filter type "up" on every row (the first row's "above" is zeros: the row itself)
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB), deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), level)) + _png_chunk(b"IEND", b""))


def write_png(picture: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """``encode_png(picture)`` written atomically (a temporary name, then a rename, so an interrupted run leaves no
    half-written PNG); returns the path."""
    data = encode_png(picture)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_heatmaps(out_dir: str | os.PathLike, paths: Sequence[str | os.PathLike], grid_maps: Tensor,
                  scale: float | Tensor, *, masks: Sequence[str | os.PathLike | None] | None = None,
                  labels: Sequence[int] | Tensor | None = None, names: Sequence[str] | None = None,
                  floor: float | Tensor = 0.0) -> list[Path]:
    """Write one heatmap PNG per image into ``out_dir`` (created), each ``panels * W x H`` at the image's own size.

    Args:
        out_dir: the folder for the PNGs.
        paths: ``N`` image files.
        grid_maps: ``(N, g, g)`` anomaly maps on the feature grid (any device; moved to the CPU once).
        scale: the value drawn at full colour: the detector's ``map_scale`` (see ``heatmap_scale``).
        masks: ``None`` for 2-panel files (image, overlay); else ``N`` mask files or None, for 3-panel files.
        labels: ``N`` labels (0 = normal): with them, an image of label 0 and no mask shows no outline rather than
            "no mask" (there is nothing to outline).
        names: ``N`` output file names; default ``heatmap_names(paths)``.
        floor: the value up to which nothing is coloured: the detector's ``map_floor`` (see ``heatmap_floor``).

    Returns:
        The written files, in ``paths`` order.
    """
    scale, floor = _check_levels(scale, floor)
    maps = torch.as_tensor(grid_maps).detach().to("cpu", torch.float32)
    n = len(paths)
    if maps.ndim != 3 or maps.shape[0] != n:
        raise ValueError(f"grid_maps must be (N, g, g) with N = {n} images, got {tuple(maps.shape)}")
    for what, seq in (("masks", masks), ("labels", labels), ("names", names)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"got {len(seq)} {what} for {n} images; pass one per image")
    names = list(names) if names is not None else heatmap_names(paths)
    label_list = None if labels is None else [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> Path:
        picture = render_file(paths[i], maps[i], scale, mask=None if masks is None else masks[i],
                              normal=label_list is not None and label_list[i] == 0,
                              panels=2 if masks is None else 3, floor=floor)
        return write_png(picture, out / names[i])

    # Decoding, blending (torch) and PNG encoding (zlib) release the GIL: one thread per core.
    with ThreadPoolExecutor(max_workers=max(1, min(n, cpu_count()))) as pool:
        return list(pool.map(write, range(n)))
