"""Fold fits: closed-form PCA fits of subsets of the training rows, and the score head's cross-fitted cell statistics.

A test image's cell errors come from a model that never saw it; a training image's own errors are far smaller (17x
on MVTec bottle). So each score-head cell's normal mean and standard deviation (``image_score='top'``) are taken on
out-of-fold images: the training images are cut into ``CELL_FOLDS`` seeded folds, and each fold is scored by models
fitted on the others. Where the Gram solver applies, the fold models are fitted in dual form from blocks of one Gram
matrix of all the rows (``fit_row_span``), so ``k`` folds cost one Gram matrix instead of ``k``. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.precision import FIT_DTYPE
from ..core.subspace import (SKETCH_RANK, RowSpanSubspace, Subspace, fit_row_span, fit_rows, gram_matrix,
                              resolve_solver)
from .heads import Head, score_scales

__all__ = ["CELL_FOLDS", "CELL_SAMPLE_IMAGES", "ROW_SPAN_MAX_BYTES", "CellSample", "cell_statistics",
           "sample_keys", "subset_models", "top_cells_score"]

CELL_SAMPLE_IMAGES = SKETCH_RANK
"""Training images whose score-head rows are kept for the cell statistics (``CellSample``): all of them up to this
many, else a seeded sample of this size. The cell statistics are means and standard deviations; from 512 images a
standard deviation is known to about 3 %, and keeping more would make the fit's memory grow with N."""

# Folds of the cross-fitting that gives the score head's per-cell normal statistics (``image_score='top'``).
CELL_FOLDS = 5
ROW_SPAN_MAX_BYTES = 1 << 30
"""The most memory the dual-form fold fits (``FREDetector.fit_subset``, the cell statistics) hold in float64 copies of
the training rows and their Gram matrices; subspaces beyond it are fitted per fold (slower, from the float32 rows).
1 GiB covers all five subspaces of the default layers up to about 2,000 training images."""
_FIT_BYTES = torch.finfo(FIT_DTYPE).bits // 8

Shared = list[tuple[Tensor, Tensor | None] | None]


def subset_models(rows: Sequence[Tensor], keep: Tensor, shared: Shared, dims: Sequence[int],
                  n_components: int | float | None, solver: str) -> list[RowSpanSubspace | Subspace]:
    """Closed-form PCA fits (float64, ``n_components``) of the images ``keep`` selects, one per entry of ``rows``.

    Args:
        rows: ``(N, D_s)`` rows per model, as ``FREDetector.features`` gives them (each image's tiles consecutive).
        keep: ``(N,)`` bool, the images to fit on.
        shared: one slot per entry of ``rows`` for ``(gram, rows64)``: the Gram matrix of all ``N`` images' rows
            (or ``(gram, None)`` where the caller has it) and one float64 copy of the rows, formed on first use and
            kept by the caller for the next fold. Changed in place (it is the caller's cache).
        dims: D of the vectors each model is fitted on (one tile's).
        n_components, solver: as in ``DetectorConfig``.

    Where the Gram solver applies, in dual form (``fit_row_span``) from a block of the Gram matrix; else (the
    covariance solver, or float64 copies beyond ``ROW_SPAN_MAX_BYTES``) ``fit_rows`` on the kept rows.
    """
    models: list[RowSpanSubspace | Subspace] = []
    n_keep = int(keep.sum())
    for i, (r, d) in enumerate(zip(rows, dims)):
        flat = r.reshape(-1, d)
        tiles = flat.shape[0] // r.shape[0]
        kept = keep.repeat_interleave(tiles)  # each image's tiles are consecutive rows
        gram, rows64 = shared[i] if shared[i] is not None else (None, None)
        if rows64 is None and resolve_solver(solver, n_keep * tiles, d) == "gram":
            held = sum(t.numel() * t.element_size() for entry in shared if entry is not None
                       for t in entry if t is not None)
            need = flat.shape[0] * (d + (flat.shape[0] if gram is None else 0)) * _FIT_BYTES
            if held + need <= ROW_SPAN_MAX_BYTES:
                rows64 = flat.to(FIT_DTYPE)
                if gram is None:
                    gram = gram_matrix(rows64)
                    if not bool(torch.isfinite(gram).all()):
                        raise ValueError("NaN or Inf features on the training images; check the weights file "
                                         "and the input images")
                shared[i] = (gram, rows64)
        if rows64 is None:
            # The covariance solver, or float64 copies beyond the budget (thousands of images): a fit per fold.
            models.append(fit_rows(flat[kept], n_components, solver=solver))
            continue
        models.append(fit_row_span(rows64, n_components, gram=gram, keep=kept))
    return models


def cell_statistics(head: Head, rows: Sequence[Tensor], *, n_components: int | float | None, solver: str,
                    normalize: bool, shared: Shared | None = None) -> tuple[Tensor, Tensor]:
    """Each of ``head``'s cells' mean and standard deviation on out-of-fold normal images.

    Args:
        head: the score head (its layout; its own models are not used).
        rows: its ``(N, D_s)`` rows of every training image (all ranks').
        n_components, solver, normalize: as in ``DetectorConfig`` (``normalize``: ``normalize_scores``).
        shared: the Gram matrices and float64 rows of ``rows`` where the caller has them (``subset_models``).

    Returns:
        ``(mean, std)``, each ``(T * gh * gw,)`` float32 on the rows' device. Each fold's cell maps come from models
        fitted on the other folds, divided by those models' own scales. Fewer than 4 images: mean 0, standard
        deviation 1 (the raw cells).
    """
    device = rows[0].device
    geometry = head.geometry
    n = rows[0].shape[0]
    cells = geometry.n_tiles * geometry.grid[0] * geometry.grid[1]
    if n < 4:
        return torch.zeros(cells, device=device), torch.ones(cells, device=device)
    k = min(CELL_FOLDS, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    fold_of = torch.empty(n, dtype=torch.int64, device=device)
    fold_of[order] = torch.arange(n, device=device) % k
    oof = torch.empty(n, cells, device=device)
    shared = list(shared) if shared is not None else [None] * len(rows)
    for f in range(k):
        held = fold_of == f
        models = subset_models(rows, ~held, shared, head.model_dims, n_components, solver)
        maps = head.cell_maps([r[held] for r in rows], index=torch.nonzero(held).flatten(), models=models,
                              scales=score_scales(models, normalize))
        oof[held] = maps.flatten(1)
    mean = oof.mean(dim=0)
    std = oof.std(dim=0)
    # A cell that is constant on normal images (padding, a fixed background) would divide by ~0: floor the
    # deviation at a millionth of the largest one.
    return mean, std.clamp_min(float(std.max()) * 1e-6 + torch.finfo(torch.float32).tiny)


def sample_keys(index: Tensor, seed: int = 0) -> Tensor:
    """A uniform key in [0, 1) per image position ``index: (B,)`` int64 (splitmix64 of ``seed`` and the position):
    a fixed function of the position, so the images with the smallest keys are the same whatever the batches, the
    order of arrival or the number of updates. ``(B,)`` float64 on ``index``'s device."""
    mask = (1 << 64) - 1
    keys = []
    for i in index.tolist():  # a few thousand Python ints per fit: negligible beside the backbone
        z = (i + (seed + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        keys.append(((z ^ (z >> 31)) >> 11) / float(1 << 53))
    return torch.tensor(keys, dtype=FIT_DTYPE, device=index.device)


class CellSample:
    """The score head's rows of the training images with the ``limit`` smallest ``sample_keys`` (a bottom-k sample:
    every image while there are at most ``limit``), for the cell statistics. Merging batches, ranks or later
    updates gives the same sample as one pass over all the images.

    Args:
        dims: the score head's row sizes ``D_s``.
        rows, index: an existing sample (``(m, sum D_s)`` rows and their ``(m,)`` image positions), or None.

    The positions and keys stay on the host (they are host information: no device sync); the rows on their device.
    Once full, an image enters by overwriting the row of the one it displaces, so a batch copies only its own rows.
    """

    def __init__(self, dims: Sequence[int], *, rows: Tensor | None = None, index: Tensor | None = None,
                 limit: int = CELL_SAMPLE_IMAGES, device: torch.device | str = "cpu") -> None:
        self.dims, self.limit = list(dims), limit
        # A copy of the given rows (entering images overwrite rows in place, never the caller's), in a store that
        # grows by doubling, so appending N rows copies O(N) of them.
        self._store = rows.clone() if rows is not None else torch.empty(0, sum(self.dims), device=device)
        self.index = index.cpu().clone() if index is not None else torch.empty(0, dtype=torch.int64)
        self.keys = sample_keys(self.index)

    @property
    def rows(self) -> Tensor:
        """The sampled images' joined rows ``(m, sum D_s)``, in the order they entered (a view)."""
        return self._store[:self.index.numel()]

    def add(self, rows: Sequence[Tensor], start: int) -> None:
        """Add the images at positions ``start, start + 1, ...`` with their score-head rows ``[(B, D_s)]``."""
        batch = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
        self.extend(batch, torch.arange(start, start + batch.shape[0]))

    def extend(self, rows: Tensor, index: Tensor) -> None:
        """Add images' joined rows ``(B, sum D_s)`` at positions ``index: (B,)``."""
        index = index.cpu()
        keys = sample_keys(index)
        room = max(0, min(self.limit - self.index.numel(), index.numel()))
        if room:  # not full yet: append
            m = self.index.numel()
            if m + room > self._store.shape[0]:
                grown = self._store.new_empty(min(self.limit, max(2 * self._store.shape[0], m + room, 64)),
                                              self._store.shape[1])
                grown[:m] = self._store[:m]
                self._store = grown
            self._store[m:m + room] = rows[:room].to(self._store.device, self._store.dtype)
            self.index, self.keys = torch.cat([self.index, index[:room]]), torch.cat([self.keys, keys[:room]])
            rows, index, keys = rows[room:], index[room:], keys[room:]
        if not index.numel():
            return
        # Full: the limit smallest keys of the sample and the newcomers; each newcomer kept takes the slot of one
        # member that is not.
        kept = torch.cat([self.keys, keys]).topk(self.limit, largest=False).indices
        old = torch.ones(self.limit, dtype=torch.bool)
        old[kept[kept < self.limit]] = False  # slots whose member is displaced
        slots, entering = torch.nonzero(old).flatten(), kept[kept >= self.limit] - self.limit
        if slots.numel():
            self._store[slots.to(self._store.device)] = rows[entering.to(rows.device)].to(self._store.dtype)
            self.index[slots], self.keys[slots] = index[entering], keys[entering]

    def ordered(self) -> tuple[list[Tensor], Tensor]:
        """The sample's rows per score subspace ``[(m, D_s)]`` and their positions ``(m,)``, in image order."""
        order = self.index.argsort()
        rows = self.rows[order.to(self.rows.device)]
        return [r.contiguous() for r in rows.split(self.dims, dim=1)], self.index[order]


def top_cells_score(cells: Tensor, mean: Tensor, std: Tensor, top_fraction: float) -> Tensor:
    """``image_score='top'``: cells ``(B, C)`` standardised by their normal ``mean`` and ``std`` ``(C,)``, then the
    mean of the ``ceil(top_fraction * C)`` largest -> ``(B,)``."""
    z = (cells - mean.to(cells.dtype)) / std.to(cells.dtype)
    k = max(1, math.ceil(top_fraction * cells.shape[1]))
    return z.topk(k, dim=1).values.mean(dim=1)
