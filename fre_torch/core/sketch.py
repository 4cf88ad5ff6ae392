"""A fixed-size streaming summary of rows: the top directions of their centred scatter (incremental PCA), in torch.

``SketchAccumulator`` keeps, for D-dim rows streamed in batches, the exact count, mean and total scatter
``sum ||x - mean||^2`` and a factor ``F = diag(s) V`` (``V``: at most ``rank`` orthonormal rows) of the centred
scatter: ``F^T F`` equals ``sum (x - mean)(x - mean)^T`` restricted to its top ``rank`` directions. Rows wait in a
buffer; when ``rank`` of them are waiting they are absorbed: the stacked factor

    [ diag(s_a) V_a ;  P - mean_P ;  sqrt(n_a n_P / n) (mean_P - mean_a) ]

has exactly the scatter of all rows seen (Chan et al.'s update), and its top ``rank`` right singular directions,
found from its small float64 Gram matrix (at most ``2 rank + 1`` square), become the new ``V``. Nothing is discarded
while the rows' centred span has at most ``rank`` dimensions (N <= rank + 1): the summary is then exact; beyond, the
directions below the ``rank``-th are dropped at each absorption, which is what bounds memory (``3 rank x D`` values
at most) and makes the cost linear in N (about ``4 rank D`` multiply-adds per row). Two summaries merge the same way
(data-parallel ranks, ``fit --update``).

Precision: accumulation, Gram matrices and eigendecompositions in float64 (``fre_torch.core.precision``); ``V`` and
the waiting rows are stored in the data's dtype (float32), each product formed in float64 over column chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .precision import FIT_DTYPE
from .subspace import _COLUMN_CHUNK, _column_mean  # the engine's column chunking, shared
from .subspace import (
    AUTO_MAX_COMPONENTS,
    SKETCH_RANK,
    AdoptsBufferShapes,
    NComponents,
    Subspace,
    check_features,
    select_n_components,
    symmetric_eigh,
)

__all__ = ["SketchAccumulator", "fit_sketch"]

# A block of factor rows: (rows (r, D) in their storage dtype, a per-row scale (r,) float64 or None, a centre (D,)
# float64 subtracted from every row, or None). Its float64 rows are ``(rows - centre) * scale[:, None]``.
_Block = tuple[Tensor, Tensor | None, Tensor | None]


class SketchAccumulator(AdoptsBufferShapes):
    """Streaming rank-``rank`` summary of rows ``x: (B, D)`` (see the module docstring); memory O(rank x D).

    Buffers (``state_dict``): ``n_samples`` () int64, ``mean`` (D,) float64, ``scatter_trace`` () float64 (the exact
    total scatter), ``singular_values`` (r,) float64 descending and ``directions`` (r, D) in the rows' dtype, r <=
    ``rank``. Rows still waiting are not buffers: ``flush`` (``fit_sketch``, ``merge``) absorbs them first.
    """

    adopt_dtypes = True
    n_samples: Tensor
    mean: Tensor
    scatter_trace: Tensor
    singular_values: Tensor
    directions: Tensor

    def __init__(self, n_features: int, *, rank: int = SKETCH_RANK, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        self.n_features, self.rank = n_features, rank
        self.register_buffer("n_samples", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("mean", torch.zeros(n_features, dtype=FIT_DTYPE, device=device))
        self.register_buffer("scatter_trace", torch.zeros((), dtype=FIT_DTYPE, device=device))
        self.register_buffer("singular_values", torch.zeros(0, dtype=FIT_DTYPE, device=device))
        self.register_buffer("directions", torch.zeros(0, n_features, dtype=dtype, device=device))
        self._count = 0  # host copy of n_samples (shapes are host information: no sync)
        # Rows waiting to be absorbed: one preallocated (rank, D) buffer, absorbed whenever it is full, so the
        # absorptions fall every ``rank`` rows whatever the batches are.
        self._buffer: Tensor | None = None
        self._waiting = 0

    @classmethod
    def from_subspace(cls, subspace: Subspace, *, rank: int | None = None) -> SketchAccumulator:
        """The summary a ``Subspace`` was solved from (``fit_sketch`` keeps it: ``Subspace.summary_rank`` > 0), to
        add rows to. ``ValueError`` for a subspace without one (fitted with another rule, or an older model file)."""
        if not subspace.has_summary:
            raise ValueError("this subspace keeps no summary of its training rows (it was fitted with a fixed "
                             "n_components or by an older version); fit it again with n_components='auto'")
        acc = cls(subspace.n_features, rank=rank or int(subspace.summary_rank), device=subspace.mean.device,
                  dtype=subspace.components.dtype)
        n = int(subspace.n_samples)
        acc.n_samples = subspace.n_samples.clone()
        acc.mean = subspace.mean.clone()
        acc.scatter_trace = subspace.total_variance * (n - 1)
        acc.singular_values = torch.cat([subspace.singular_values, subspace.tail_singular_values])
        acc.directions = torch.cat([subspace.components, subspace.tail_components])
        acc._count = n
        return acc

    @property
    def is_exact(self) -> bool:
        """Whether nothing was dropped: every direction of the rows' centred span is kept."""
        self.flush()
        return self._count <= self.rank + 1

    def update(self, x: Tensor, *, check_finite: bool = True) -> SketchAccumulator:
        """Add a batch ``x: (B, D)``; absorbed once ``rank`` rows wait. A bad batch leaves the state unchanged."""
        check_features(x, self.n_features, finite=check_finite)
        if x.shape[0] == 0:
            return self
        if self._buffer is None:
            self._buffer = torch.empty(self.rank, self.n_features, dtype=self.directions.dtype,
                                       device=self.mean.device)
        start = 0
        while start < x.shape[0]:
            take = min(self.rank - self._waiting, x.shape[0] - start)
            self._buffer[self._waiting:self._waiting + take] = x[start:start + take]
            self._waiting += take
            start += take
            if self._waiting == self.rank:
                self.flush()
        return self

    def flush(self) -> SketchAccumulator:
        """Absorb the waiting rows into the summary."""
        if not self._waiting:
            return self
        rows = self._buffer[:self._waiting]
        self._waiting = 0
        n_b = rows.shape[0]
        mean_b = _column_mean(rows)
        trace_b = _centred_square_sum(rows, mean_b)
        self._combine(n_b, mean_b, trace_b, (rows, None, mean_b))
        return self

    def merge(self, other: SketchAccumulator) -> SketchAccumulator:
        """Add the summary of ``other`` (its waiting rows absorbed first; ``other`` keeps its statistics)."""
        if other.n_features != self.n_features:
            raise ValueError(f"cannot merge summaries of {other.n_features} and {self.n_features} features")
        other.flush()
        if other._count:
            self.flush()
            dev = self.mean.device
            self._combine(other._count, other.mean.to(dev), other.scatter_trace.to(dev),
                          (other.directions.to(dev), other.singular_values.to(dev), None))
        return self

    def _combine(self, n_b: int, mean_b: Tensor, trace_b: Tensor, block: _Block) -> None:
        """Chan's update of count, mean and trace, and the truncated SVD of the stacked factor (module docstring)."""
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self.mean
        blocks: list[_Block] = [block]
        if n_a:
            blocks.insert(0, (self.directions, self.singular_values, None))
            weight = torch.tensor([(n_a * n_b / n) ** 0.5], dtype=FIT_DTYPE, device=delta.device)
            blocks.append((delta[None], weight, None))
        size = sum(b[0].shape[0] for b in blocks)
        gram = torch.zeros(size, size, dtype=FIT_DTYPE, device=delta.device)
        # Our own summary's block of the Gram matrix is diag(s^2) (its directions are orthonormal): only the rows
        # below it are formed, a quarter to a half of the products.
        own = self.singular_values.numel() if n_a else 0
        for start in range(0, self.n_features, _COLUMN_CHUNK):
            f = _factor_chunk(blocks, slice(start, start + _COLUMN_CHUNK))
            gram[own:].addmm_(f[own:], f.T)
        gram[:own, :own] = torch.diag(self.singular_values.square())
        gram[:own, own:] = gram[own:, :own].T
        if not bool(torch.isfinite(gram).all()):  # one sync per absorption (every ``rank`` rows), never per batch
            raise ValueError("NaN or Inf values in the rows; check the features (for a detector: the training "
                             "images and the backbone's weights)")
        evals, evecs = symmetric_eigh(gram)
        sq = evals.flip(0).clamp_min(0.0)
        u = evecs.flip(1)
        # Keep at most ``rank`` directions, and only those the data determine (above the Gram matrix's rounding).
        keep = int((sq > sq[0] * gram.shape[0] * torch.finfo(FIT_DTYPE).eps * 10).sum()) if sq.numel() else 0
        keep = min(self.rank, keep)
        s = torch.sqrt(sq[:keep])
        v = torch.empty(keep, self.n_features, dtype=self.directions.dtype, device=delta.device)
        for start in range(0, self.n_features, _COLUMN_CHUNK):
            cols = slice(start, start + _COLUMN_CHUNK)
            v[:, cols] = (u[:, :keep].T @ _factor_chunk(blocks, cols)) / s[:, None]
        # The new state is built out of place, then assigned: nothing is half-updated if an op raises.
        self.mean = self.mean + delta * (n_b / n)
        self.scatter_trace = self.scatter_trace + trace_b + delta.square().sum() * (n_a * n_b / n)
        self.singular_values, self.directions = s, v
        self.n_samples = self.n_samples + n_b
        self._count = n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.n_samples)
        self._buffer, self._waiting = None, 0


def _factor_chunk(blocks: list[_Block], cols: slice) -> Tensor:
    """Columns ``cols`` of the stacked float64 factor rows of ``blocks``, ``(R, |cols|)``."""
    parts = []
    for rows, scale, centre in blocks:
        part = rows[:, cols].to(FIT_DTYPE)
        if centre is not None:
            part = part - centre[cols]
        if scale is not None:
            part = part * scale[:, None]
        parts.append(part)
    return torch.cat(parts)


def _centred_square_sum(rows: Tensor, mean: Tensor) -> Tensor:
    """``sum ||row - mean||^2`` in float64, over column chunks."""
    total = torch.zeros((), dtype=FIT_DTYPE, device=rows.device)
    for start in range(0, rows.shape[1], _COLUMN_CHUNK):
        cols = slice(start, start + _COLUMN_CHUNK)
        total = total + (rows[:, cols].to(FIT_DTYPE) - mean[cols]).square().sum()
    return total


def fit_sketch(acc: SketchAccumulator, n_components: NComponents = "auto") -> Subspace:
    """Solve a summary: a ``Subspace`` of its top k directions (``select_n_components`` on the summary's spectrum
    against the exact total variance), signs as scikit-learn's, keeping the rest of the summary
    (``tail_components``) so that ``SketchAccumulator.from_subspace`` can take rows again.

    ``n_components``: as in ``select_n_components``; an int beyond the summary's directions is refused.
    """
    acc.flush()
    n = acc._count
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {n}")
    variance = acc.singular_values.square() / (n - 1)
    total = acc.scatter_trace / (n - 1)
    if isinstance(n_components, int) and not isinstance(n_components, bool) and n_components > variance.numel():
        raise ValueError(f"n_components={n_components} exceeds the {variance.numel()} directions the summary keeps; "
                         f"use n_components='auto' (at most {AUTO_MAX_COMPONENTS})")
    k = select_n_components(variance, n_components, n, acc.n_features, total=total)
    k = max(1, min(k, variance.numel()))
    v = acc.directions
    idx = v[:k].abs().argmax(dim=1, keepdim=True)
    signs = torch.where(v[:k].gather(1, idx) < 0, -1.0, 1.0).to(v.dtype)
    return Subspace(mean=acc.mean.clone(), components=v[:k] * signs, explained_variance=variance[:k],
                    singular_values=acc.singular_values[:k].clone(), total_variance=total, n_samples=n,
                    tail_components=v[k:].clone(), tail_singular_values=acc.singular_values[k:].clone(),
                    summary_rank=acc.rank)
