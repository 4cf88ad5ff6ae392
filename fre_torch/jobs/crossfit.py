"""Out-of-fold scores of the training images: an honest threshold and heatmap scale when no held-out split exists.

``cli.py evaluate`` fits on every ``train/good`` image, so it has no normal image the model has not seen. Scoring
the training images themselves is useless for a threshold: the subspace is fitted to them and typically keeps
nearly as many components as there are images, so their residuals are far smaller than those of new normal images
(MVTec bottle, EfficientNet-Lite0: median training score 1.9 against 26 on normal test images; a threshold at their
0.99 quantile flagged every normal test image). Cross-fitting fixes this at almost the cost of one pass: the
training features are extracted once, then each of ``k`` folds is scored by a detector fitted, on those cached
features, to the other ``k - 1`` folds. Every training image thus gets a score (and a map) from a model that never
saw it. The fold models see ``(k - 1) / k`` of the images, so their scores of unseen images run a little higher
than the full model's would: a threshold from them errs on the side of fewer false positives.

Data-parallel mode (``fre_torch.core.distributed``): each rank passes its shard and cuts it into the same number of folds;
fold ``f`` of the whole set is the union of the ranks' folds ``f``, which the fold fits merge as any fit does, and the
out-of-fold scores and maps are gathered (in rank order) before the quantiles.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.subspace import AUTO
from ..detection.detector import FREDetector, _length
from ..detection.folds import CELL_SAMPLE_IMAGES, CellSample
from ..detection.levels import map_levels
from ..core.distributed import gather_rows, is_distributed, rank

__all__ = ["CROSS_FIT_FOLDS", "CROSS_FIT_IMAGES", "CrossFit", "TrainingRows", "cross_fit", "fit_keeping_rows", "fit_on_rows"]

CROSS_FIT_FOLDS = 5
"""Folds of ``cross_fit``: each fold model sees 80 % of the training images."""
CROSS_FIT_IMAGES = 2 * CELL_SAMPLE_IMAGES
"""Past this many training images (``n_components='auto'``) ``fit_keeping_rows`` keeps the rows of a bottom-k sample
of this many for the cross-fit, so its memory stays bounded (1,024 x D float32: 0.5 GB with the detail head). Fold
models fitted on fewer images score unseen normal images higher, which lifts the threshold: magnetic_tile's 666
images cut to 512 raised it from 5.59 to 6.84 (recall on its defective test images 0.52 -> 0.45), so the bound is
twice the cell statistics' and the three dev sets keep every image."""
_HELD_BATCH = 256


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold results on ``N`` training images.

    Attributes:
        scores: ``(N,)`` float32, each image scored by the fold model that did not see it (input order; all ranks'
            images in rank order in data-parallel mode).
        maps: ``(N, GH, GW)`` float32 anomaly maps likewise, or None in kernel mode.
        threshold: the ``quantile`` of ``scores`` (``torch.quantile``, linear interpolation).
        quantile: that quantile.
        map_scale: ``MAP_SCALE_QUANTILE`` of all values of ``maps`` (as ``FREDetector.set_map_scale``), or None.
        folds: the number of folds used.
        map_floor: ``MAP_FLOOR_QUANTILE`` of all values of ``maps`` (``torch.quantile``'s, in float64), where
            heatmap colour starts, or None.
    """

    scores: Tensor
    maps: Tensor | None
    threshold: float
    quantile: float
    map_scale: float | None
    folds: int
    map_floor: float | None = None


class _IndexBatches:
    """Batches of row indices, shaped ``(B, 1, 1, 1)`` like image batches, standing in for the images of a fold.

    ``FREDetector.fit`` / ``score`` take any iterable of 4-d batches and size it from ``.dataset``; a fold detector
    whose ``features`` looks rows up in the cache then runs its own, unchanged fitting and scoring on them.
    """

    def __init__(self, index: Tensor, batch_size: int) -> None:
        self.index, self.batch_size = index, batch_size
        self.dataset = range(index.numel())

    def __iter__(self) -> Iterator[Tensor]:
        for start in range(0, self.index.numel(), self.batch_size):
            yield self.index[start:start + self.batch_size].view(-1, 1, 1, 1)


def _extract(detector: FREDetector, data: Any, batch_size: int) -> list[Tensor]:
    """Per-layer feature rows ``[(N, D_l)]`` of every image in ``data`` (anything ``FREDetector.fit`` takes), on
    the detector's device. One small list of per-batch rows, joined once: ``data`` may be unsized."""
    parts = [detector.features(images) for images in detector._image_batches(data, batch_size)]  # no host sync
    if not parts:
        raise ValueError("no training images to cross-fit")
    return [torch.cat(layer) for layer in zip(*parts)]


def _fold_detector(detector: FREDetector, cache: Sequence[Tensor]) -> FREDetector:
    """A copy of ``detector`` (backbone shared, not copied; the original untouched) that reads cached rows."""
    # The memo shares the backbone and the already fitted subspaces with the original instead of copying them; the
    # fold's fit then replaces its own ``subspaces`` and buffers, never the original's.
    memo = {id(detector.extractor): detector.extractor,
            **{id(head.models): head.models for head in detector.heads.values()}}
    fold = copy.deepcopy(detector, memo)
    fold.features = _row_lookup(cache)  # type: ignore[method-assign]  # instance attribute: this copy only
    return fold


def _row_lookup(cache: Sequence[Tensor]) -> Callable[[Tensor], list[Tensor]]:
    """A stand-in for ``FREDetector.features`` that returns the cached rows of an ``_IndexBatches`` batch."""
    def cached_features(index: Tensor) -> list[Tensor]:
        rows = index.reshape(-1).to(cache[0].device)
        return [layer[rows] for layer in cache]

    return cached_features


class TrainingRows(list):
    """The training feature rows ``[(N, D_s)]`` a detector was fitted on (a list), with ``grams``: the fit's Gram
    matrix of each subspace's rows (None where there is none), which ``cross_fit`` takes its fold fits from instead
    of forming them again."""

    grams: list[Tensor | None]


def fit_keeping_rows(detector: FREDetector, data: Any, *, batch_size: int = 32) -> TrainingRows:
    """``detector.fit(data)``, returning the training feature rows it was fitted on (``[(N, D_s)]``, as
    ``detector.features`` gives them) and the fit's Gram matrices, so that ``cross_fit(..., rows=...)`` needs neither
    the images again (decoding, hashing) nor the backbone, nor a second Gram matrix. The rows are extracted once and
    the fit reads them: the same fit as ``detector.fit(data)``, with every mode and solver.

    More than ``CROSS_FIT_IMAGES`` training images (or an unsized loader) with ``n_components='auto'``: the fit
    streams as ``fit`` does, and only the rows of a bottom-k sample of ``CROSS_FIT_IMAGES`` images are kept
    (``folds.CellSample``, all subspaces; in data-parallel runs each rank's own sample), so memory stays bounded in
    N: the cross-fit then runs on those images."""
    detector.decide_for(data)  # the automatic choices fit makes, before the rows are extracted with its heads
    n = _length(data)
    if detector.config.n_components == AUTO and detector.config.mode == "pca" and (
            n is None or n > CROSS_FIT_IMAGES):
        return _fit_keeping_a_sample(detector, data, batch_size)
    rows = TrainingRows(_extract(detector, data, batch_size))
    rows.grams = []
    fit_on_rows(detector, rows, batch_size=batch_size, grams=rows.grams)
    return rows


def _fit_keeping_a_sample(detector: FREDetector, data: Any, batch_size: int) -> TrainingRows:
    """``detector.fit(data)`` keeping the rows of the sampled images (see ``fit_keeping_rows``), in image order."""
    features = detector.features
    kept: list[CellSample] = []
    seen = 0

    def tee(images: Tensor) -> list[Tensor]:
        nonlocal seen
        rows = features(images)
        if not kept:
            kept.append(CellSample([r.shape[1] for r in rows], device=rows[0].device, limit=CROSS_FIT_IMAGES))
        kept[0].add(rows, seen)
        seen += rows[0].shape[0]
        return rows

    detector.features = tee  # type: ignore[method-assign]  # this call only: removed below
    try:
        detector.fit(data, batch_size=batch_size)
    finally:
        del detector.features
    if not kept:
        raise ValueError("no training images to cross-fit")
    rows = TrainingRows(kept[0].ordered()[0])
    rows.grams = [None] * len(rows)
    return rows


def fit_on_rows(detector: FREDetector, rows: Sequence[Tensor], *, batch_size: int = 32,
                grams: list[Tensor | None] | None = None) -> FREDetector:
    """``detector.fit`` on feature rows already extracted (``[(N, D_s)]`` as ``detector.features`` gives them), with
    its own unchanged fitting code: every mode and solver, the cell statistics, data-parallel reductions. ``grams``:
    as ``FREDetector.fit``'s."""
    detector.features = _row_lookup(rows)  # type: ignore[method-assign]  # this call only: removed below
    try:
        return detector.fit(_IndexBatches(torch.arange(rows[0].shape[0]), batch_size), grams=grams)
    finally:
        del detector.features


def cross_fit(detector: FREDetector, data: Any = None, *, rows: Sequence[Tensor] | None = None,
              folds: int = CROSS_FIT_FOLDS, quantile: float = 0.99, seed: int = 0, batch_size: int = 32) -> CrossFit:
    """Out-of-fold scores, maps, threshold and heatmap scale of the training images, ``detector`` unchanged.

    Args:
        detector: its configuration, backbone and device are used; it need not be fitted and is not modified.
        data: the training images: uint8 ``(N, 3, H, W)`` or an iterable (e.g. ``make_loader``) of such batches or
            of dicts with ``"image"``; read once. Not needed with ``rows``.
        rows: the training images' feature rows instead of ``data`` (``fit_keeping_rows`` returns them).
        folds: ``k``; a seeded random permutation is cut into ``min(k, N)`` folds of near-equal size.
        quantile: the threshold's quantile of the out-of-fold scores, in (0, 1).
        seed: seeds the fold assignment.
        batch_size: rows per batch in the fold fits and scoring.

    Raises:
        ValueError: fewer than 4 images, a bad ``folds`` or ``quantile``, or NaN/Inf out-of-fold scores.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}; e.g. 0.99 flags about 1 % of normal images")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if (data is None) == (rows is None):
        raise ValueError("cross_fit takes the training images (data) or their feature rows (rows=), one of the two")
    cache = list(rows) if rows is not None else _extract(detector, data, batch_size)
    n = cache[0].shape[0]
    counts = gather_rows(torch.tensor([n]))  # data-parallel: every rank's count in rank order (identity otherwise)
    n_total = int(counts.sum())
    if n_total < 4:
        raise ValueError(f"cross-fitting needs at least 4 training images (each fold model fits on the others), "
                         f"got {n_total}; add training images")
    k = min(folds, n_total)  # the same on every rank: each fold fit is a collective in data-parallel mode
    # Folds are drawn over the GLOBAL image order, so a data-parallel run holds out exactly the images one process
    # would: global position p of the seeded permutation goes to fold p mod k; this rank owns a contiguous slice.
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(n_total, dtype=torch.int64)
    fold_of[order] = torch.arange(n_total) % k
    offset = int(counts[:rank()].sum()) if is_distributed() else 0
    fold_of = fold_of[offset:offset + n]
    linear = detector.config.kernel is None
    scores = torch.empty(n, dtype=torch.float32, device=cache[0].device)
    gh, gw = detector.config.map_grid
    maps = torch.empty(n, gh, gw, dtype=torch.float32, device=cache[0].device) if linear else None
    # The fold models keep the detector's cell statistics (image_score='top'), themselves out-of-fold estimates,
    # rather than cross-fit again inside each fold; a detector without them gets its folds' own.
    own_cells = detector.config.image_score == "top" and detector.cell_mean.numel() == 0
    # Closed-form PCA in one process: the folds are fitted from blocks of one Gram matrix per subspace, in dual form
    # (``FREDetector.fit_subset``); otherwise (autoencoders, data-parallel shards, own cell statistics) each fold
    # runs the detector's own fit.
    subset = detector.config.mode == "pca" and linear and not is_distributed() and not own_cells
    # The fit's own Gram matrices of these rows where ``fit_keeping_rows`` kept them; formed on first use otherwise.
    kept = getattr(rows, "grams", None) or [None] * len(cache)
    shared: list[tuple[Tensor, Tensor | None] | None] = [None if g is None else (g, None) for g in kept]
    for f in range(k):
        held = torch.nonzero(fold_of == f).flatten()
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        if subset:
            fold = _fold_detector(detector, cache).fit_subset(cache, keep, shared=shared)
        else:
            fold = _fold_detector(detector, cache).fit(_IndexBatches(torch.arange(n)[keep], batch_size),
                                                       cell_statistics=own_cells)
        if held.numel() == 0:  # a data-parallel shard smaller than k: nothing of it held out in this fold
            continue
        # Held-out rows in batches of up to _HELD_BATCH: each batch reads all of the fold models' rows or components.
        if subset:  # the fold's dual-form models score the held-out rows from their Gram matrix (``index``)
            with torch.inference_mode():
                for batch in held.split(max(batch_size, _HELD_BATCH)):
                    feats = [layer[batch] for layer in cache]
                    scores[batch.to(scores.device)] = fold.score_features(feats, index=batch).float()
                    maps[batch.to(maps.device)] = fold.head_maps(feats, "map", index=batch).float()
            continue
        rows = _IndexBatches(held, max(batch_size, _HELD_BATCH))
        if linear:
            fold_scores, fold_maps = fold.score_and_maps(rows)
            maps[held.to(maps.device)] = fold_maps.float()
        else:
            fold_scores = fold.score(rows)
        scores[held.to(scores.device)] = fold_scores.float()
    scores_cpu = gather_rows(scores).cpu()  # data-parallel: all ranks' rows in order (identity otherwise)
    if not bool(torch.isfinite(scores_cpu).all()):
        raise ValueError("cross-fitting gave NaN/Inf scores on the training images; check the images and weights")
    maps_cpu = gather_rows(maps).cpu() if maps is not None else None
    map_scale, map_floor = (float(v) for v in map_levels(maps_cpu)) if maps_cpu is not None else (None, None)
    return CrossFit(scores=scores_cpu, maps=maps_cpu, threshold=float(torch.quantile(scores_cpu, quantile)),
                    quantile=float(quantile), map_scale=map_scale, folds=k, map_floor=map_floor)
