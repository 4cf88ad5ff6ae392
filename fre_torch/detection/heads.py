"""A head of the detector, and how the heads' maps make one anomaly map.

A ``Head`` is "some layers of one backbone pass, on one grid, with one fitted model per layer and its scale": it
turns its feature rows into cell maps (each model's squared reconstruction error summed over channels, divided by
the model's scale, summed over the head's models), into a map on the image's grid (tiles stitched), and into the
FRE of the image. ``FREDetector`` holds its heads by role (``HEAD_ROLES``) and composes them: the image score from
the score head's cells, the anomaly map from the map heads by ``fuse_maps``. Torch only: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.autoencoder import LinearAutoencoder
from ..core.subspace import RowSpanSubspace, Subspace
from .config import HeadConfig
from .geometry import HeadGeometry, stitch

__all__ = ["Head", "fuse_maps", "own_rows", "score_scales"]

_MIN_RESIDUAL_FRACTION = 1e-6  # floor of a layer's score scale, as a fraction of its total variance


class Head(nn.Module):
    """One head: its settings (``config``), layout (``geometry``), fitted models and their scales.

    Args:
        config: the head's ``HeadConfig`` (role, layers, pool, image size).
        geometry: its ``HeadGeometry`` (``DetectorConfig.geometry(config)``).
        fusion: 'sum' (one model per layer) or 'concat' (one model on the layers' rows side by side).
        device: where the scales live (the models carry their own).

    Fitted state: ``models`` (one ``Subspace`` per layer, or a ``LinearAutoencoder``, ``KernelFRE`` or dual-form
    ``RowSpanSubspace``) and ``scales`` ``(M,)`` float64, the divisor of each model's FRE.
    """

    scales: Tensor

    def __init__(self, config: HeadConfig, geometry: HeadGeometry, *, fusion: str = "sum",
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.fusion = fusion
        self.models = nn.ModuleList()
        self.register_buffer("scales", torch.ones(0, dtype=torch.float64, device=device))

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def row_dims(self) -> tuple[int, ...]:
        """D of each model's row per image (all tiles)."""
        return (sum(self.geometry.dims),) if self.fusion == "concat" else self.geometry.dims

    @property
    def model_dims(self) -> tuple[int, ...]:
        """D of the vectors each model is fitted on: one tile's (a whole image's when untiled)."""
        return (sum(self.geometry.tile_dims),) if self.fusion == "concat" else self.geometry.tile_dims

    @property
    def n_models(self) -> int:
        return len(self.row_dims)

    @property
    def is_fitted(self) -> bool:
        return len(self.models) == self.n_models

    def set_models(self, models: Sequence[nn.Module], scales: Tensor) -> None:
        """Install fitted models and their scales ``(M,)`` float64."""
        if len(models) != self.n_models or scales.shape != (self.n_models,):
            raise ValueError(f"the {self.role} head takes {self.n_models} models and scales, got {len(models)} and "
                             f"{tuple(scales.shape)}")
        self.models = nn.ModuleList(models)
        self.scales = scales

    def join(self, layer_rows: Sequence[Tensor]) -> list[Tensor]:
        """Per-layer rows ``[(B, D_l)]`` -> per-model rows: the same, or one concatenated row with 'concat'."""
        if self.fusion != "concat":
            return list(layer_rows)
        return [torch.cat(list(layer_rows), dim=1) if len(layer_rows) > 1 else layer_rows[0]]

    def cell_maps(self, rows: Sequence[Tensor], *, index: Tensor | None = None,
                  models: Sequence[nn.Module] | None = None, scales: Tensor | None = None) -> Tensor:
        """The head's unstitched maps ``(B, T, gh, gw)`` from its rows ``[(B, D_m)]``: each model's squared residual
        summed over channels, divided by its scale, summed over the models.

        Args:
            index: where ``rows`` are the models' own training rows (images held out of a fold fit), their ``(B,)``
                positions: a dual-form model scores them from its Gram matrix (``RowSpanSubspace.residual_of_rows``,
                half the products).
            models, scales: other fitted models of this head's layout (a fold fit's); default its own.
        """
        models = self.models if models is None else models
        scales = self.scales if scales is None else scales
        gh, gw = self.geometry.grid
        t = self.geometry.n_tiles
        total = None
        for model, r, scale in zip(models, rows, scales):
            b = r.shape[0]
            if index is not None and isinstance(model, RowSpanSubspace):
                err = model.residual_of_rows(own_rows(index, t)).square_().to(r.dtype).view(b, t, -1, gh, gw)
            else:
                err = model.error_map(r.reshape(b * t, -1)).view(b, t, -1, gh, gw)
            err = err.sum(dim=2) / scale.to(err.dtype)
            total = err if total is None else total + err
        return total

    def map(self, rows: Sequence[Tensor], *, stitched: bool = True, index: Tensor | None = None) -> Tensor:
        """``cell_maps`` on the image's grid ``(B, GH, GW)`` (tiles stitched), or apart ``(B, T, gh, gw)``."""
        cells = self.cell_maps(rows, index=index)
        return stitch(cells, self.geometry) if stitched else cells

    def fre(self, rows: Sequence[Tensor], *, index: Tensor | None = None, kernel: bool = False) -> Tensor:
        """The head's FRE of each image ``(B,)``: ``sum_m sum_tiles FRE_m / scale_m`` (kernel models: their score)."""
        total = None
        t = self.geometry.n_tiles
        for model, r, scale in zip(self.models, rows, self.scales):
            flat = r.view(r.shape[0] * t, -1)
            if index is not None and isinstance(model, RowSpanSubspace):
                fre = model.residual_of_rows(own_rows(index, t)).square_().sum(dim=1).to(flat.dtype)
            else:
                fre = model.score(flat) if kernel else model.fre(flat)
            fre = fre.view(r.shape[0], -1).sum(dim=1)
            fre = fre / scale.to(fre.dtype)
            total = fre if total is None else total + fre
        return total


def fuse_maps(maps: Sequence[Tensor]) -> Tensor:
    """The anomaly map from the map heads' maps, coarse to fine -> ``(B, GH, GW)`` on the finest (last) grid: one
    map as it is; several, their geometric mean, each upsampled bilinear to that grid.

    Each map is ``(B, GH_i, GW_i)``, or an untiled head's cells ``(B, 1, GH_i, GW_i)`` (taken apart only when used,
    so the exported graphs keep the order of operations they have always had). All are sums of squared residuals
    (>= 0), so the mean is >= 0 and high only where every head agrees (the coarse map's whole-part context, the fine
    map's outline); the clamp only guards rounding of the bilinear weights.
    """
    if len(maps) == 1:
        return _plain(maps[0])
    size = maps[-1].shape[-2:]
    up = [m if m.shape[-2:] == size else
          F.interpolate(_plain(m)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps]
    product = _plain(up[0]).clamp_min(0)
    for m in up[1:]:
        product = product * _plain(m).clamp_min(0)
    return product.sqrt() if len(up) == 2 else product.pow(1.0 / len(up))


def _plain(m: Tensor) -> Tensor:
    """``(B, 1, H, W)`` cells of an untiled head -> ``(B, H, W)``; a ``(B, H, W)`` map as it is."""
    return m[:, 0] if m.ndim == 4 else m


def score_scales(models: Sequence[Any], normalize: bool) -> Tensor:
    """Each fitted model's score scale ``(M,)`` float64: its training residual variance (the expected FRE of a
    normal image), floored at ``_MIN_RESIDUAL_FRACTION`` of its total variance; ones when not ``normalize``.

    With few training images a subspace can keep every direction they span (k = N - 1): the residual is then 0 up
    to rounding and FRE / residual is inf for every test image. The floor (a millionth of the layer's total variance)
    is scale-free, far above float64 rounding and far below any residual a 0.97 cut leaves; the smallest float64
    covers a constant training set.
    """
    total = torch.stack([m.total_variance for m in models])
    residual = torch.stack([_residual_variance(m) for m in models])
    if not normalize:
        return torch.ones_like(residual)
    floor = (total * _MIN_RESIDUAL_FRACTION).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.maximum(residual, floor)


def _residual_variance(model: Subspace | LinearAutoencoder) -> Tensor:
    """The training variance a fitted layer model leaves out, 0-dim float64: a subspace's left-out spectrum, an
    autoencoder's measured training residual (both sums of squares over N - 1, so they agree at convergence)."""
    if isinstance(model, LinearAutoencoder):
        return model.residual_variance
    return model.total_variance - model.explained_variance.sum()


def own_rows(index: Tensor, tiles: int) -> Tensor:
    """Image positions ``(B,)`` -> their rows in a model's ``(N * T, D)`` training rows (image i: i*T .. i*T+T-1)."""
    return (index[:, None] * tiles + torch.arange(tiles, device=index.device)).flatten()
