"""The heatmap colour scale: levels of normal images' grid-map values, never of test images.

``map_scale`` (full colour) is their ``MAP_SCALE_QUANTILE``, ``map_floor`` (where colour starts) their
``MAP_FLOOR_QUANTILE``. Torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAP_FLOOR_QUANTILE", "MAP_SCALE_QUANTILE", "map_levels"]


MAP_SCALE_QUANTILE = 0.999
"""Heatmaps draw this quantile of normal images' grid-map values (``map_scale``) and above at full colour."""

MAP_FLOOR_QUANTILE = 0.99
"""Heatmaps leave values up to this quantile of normal images' grid-map values (``map_floor``) uncoloured: about 99 %
of a normal image's cells (more of its pixels, which interpolate between cells) stay plain, and colour means "above
what normal images reach"."""


def _map_quantile(maps: Tensor) -> Tensor:
    """The ``MAP_SCALE_QUANTILE`` of all values of grid maps ``(N, g, g)`` -> 0-dim float32 (exact, via kthvalue;
    torch.quantile refuses more than 16M elements)."""
    flat = maps.detach().float().flatten()
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot set the heatmap scale: no maps, or NaN/Inf in the normal images' maps")
    k = max(1, min(flat.numel(), int(round(MAP_SCALE_QUANTILE * flat.numel()))))
    return flat.kthvalue(k).values.clamp_min(torch.finfo(torch.float32).tiny)


def _map_level(maps: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of all values of grid maps ``(N, g, g)`` -> 0-dim float64: ``torch.quantile``'s (linear
    interpolation) in float64, computed with two ``kthvalue`` calls, since ``torch.quantile`` refuses inputs of more
    than 16M elements."""
    flat = maps.detach().double().flatten()
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot set the heatmap floor: no maps, or NaN/Inf in the normal images' maps")
    rank = torch.tensor(q * (flat.numel() - 1), dtype=torch.float64)  # as torch.quantile: q (N - 1), then lerp
    below = int(rank.floor())
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(min(below + 2, flat.numel())).values
    return torch.lerp(low, high, (rank - below).to(flat.device))


def map_levels(maps: Tensor) -> tuple[Tensor, Tensor]:
    """The heatmap colour scale of normal grid maps ``(N, g, g)``: ``(map_scale, map_floor)``, their
    ``MAP_SCALE_QUANTILE`` (float32) and ``MAP_FLOOR_QUANTILE`` (float64)."""
    return _map_quantile(maps), _map_level(maps, MAP_FLOOR_QUANTILE)
