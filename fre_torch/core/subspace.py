"""Linear subspace fitting and feature reconstruction error (FRE), in torch only.

The pieces:

- ``CovarianceAccumulator``: streaming mean and centred scatter ``sum (x - mean)(x - mean)^T`` of D-dim rows, in
  float64 (Chan et al.'s pairwise update, so two accumulators merge exactly). Memory O(D^2), independent of N.
- ``GramAccumulator``: keeps the rows and their float64 Gram matrix ``X X^T``, for N << D (whole-image feature
  vectors: N = 60..400, D = 5,000..65,536). Never forms a D x D matrix.
- ``fit_covariance`` / ``fit_gram`` / ``fit_rows``: exact float64 eigendecompositions giving a fitted ``Subspace``.
- ``fit_row_span``: the same fit in dual form (``RowSpanSubspace``): it keeps the rows instead of forming components,
  for models that score a few rows once (cross-fitting's fold models, from blocks of one shared Gram matrix).
- ``Subspace``: the fitted state as buffers (mean, orthonormal components, spectrum) with batched projection,
  reconstruction and FRE. ``.to()``, ``state_dict()`` and ``load_state_dict()`` work as for any module.

Precision (``fre_torch.core.precision``): accumulation and decomposition in float64; fitted components are cast back to
the dtype of the data (``type_as``), so float32 features give a float32 subspace that scores in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .precision import FIT_DTYPE

__all__ = [
    "AUTO",
    "AUTO_MAX_COMPONENTS",
    "AUTO_MIN_SHARE",
    "AUTO_VARIANCE",
    "SKETCH_RANK",
    "AdoptsBufferShapes",
    "CovarianceAccumulator",
    "GramAccumulator",
    "RowSpanSubspace",
    "Subspace",
    "check_features",
    "fit_covariance",
    "fit_accumulator",
    "make_room",
    "new_accumulator",
    "summarises",
    "fit_gram",
    "fit_row_span",
    "fit_rows",
    "gram_matrix",
    "resolve_solver",
    "select_n_components",
    "symmetric_eigh",
    "Solver",
]

Solver = Literal["auto", "covariance", "gram"]
NComponents = int | float | str | None

AUTO = "auto"
"""``n_components=AUTO``, the default rule of ``fre_torch`` (``select_n_components``): the smallest k reaching
``AUTO_VARIANCE`` of the variance, without components that carry less than ``AUTO_MIN_SHARE`` of it, and at most
``AUTO_MAX_COMPONENTS``."""
AUTO_VARIANCE = 0.97
AUTO_MIN_SHARE = 1.0 / 4096
"""Below this share of the total variance a direction is the noise floor, not normal variation. At N < D a sample
spectrum's tail is the features' remaining variance spread over the N - 1 dimensions the rows span (each about
``T_tail / N``): PCA(0.97) keeps ~0.85 N of those. A share floor stops there; it keeps at most ``1 / share``
components whatever N is, and its count converges as N grows (the population's components above it)."""
SKETCH_RANK = 512
"""Rows of the fixed-size summary (``SketchAccumulator``) that the default fit streams into once N exceeds it."""
AUTO_MAX_COMPONENTS = SKETCH_RANK * 3 // 4
"""The most the rule keeps: three quarters of the summary's rank. Every absorption of a summary truncates below its
rank, and the error of that cut lands on the directions just above it; the last quarter is a guard band (measured
on 1,600 magnetic tiles: the summary's top 256, 384, 448 and 512 directions score within 0.0004 AUROC of the exact
ones, BENCHMARKS.md "Scale")."""

# Column chunk for the float64 passes over an (N, D) matrix: bounds the float64 temporary to N * 4096 * 8 bytes.
_COLUMN_CHUNK = 4096
# Symmetric eigenproblems up to this size are solved on one thread (see ``symmetric_eigh``).
_EIGH_ONE_THREAD_MAX = 2048
# Column chunk for scoring: a (400, 4096) float32 block is 6.5 MB, well inside this class of CPU's L3 cache.
_SCORE_CHUNK = 4096


def check_features(x: Tensor, n_features: int | None = None, *, name: str = "X", finite: bool = True) -> Tensor:
    """Validate a feature matrix ``x: (N, D)``; raise ``ValueError`` naming the problem and the fix.

    ``finite=True`` checks for NaN/Inf, which synchronises with the device: callers in per-batch loops pass
    ``finite=False`` and check once at the end.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}; "
                         "flatten each sample to one row, e.g. x.reshape(len(x), -1)")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; convert with .float()")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"{name} has {x.shape[1]} features but the model was fitted with {n_features}; "
                         "use features from the same backbone layer and input size")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values; check the feature extractor or drop those rows")
    return x


def _auto_components(explained_variance: Tensor, limit: int, total: Tensor | float | None) -> int:
    """``n_components=AUTO`` (see ``AUTO``): ``min(k(AUTO_VARIANCE), #{share >= AUTO_MIN_SHARE}, AUTO_MAX)``, >= 1."""
    ev = explained_variance.to(FIT_DTYPE)
    total = ev.sum() if total is None else torch.as_tensor(total, dtype=FIT_DTYPE, device=ev.device)
    if not total > 0:
        return 1
    share = ev / total
    k_variance = int(torch.searchsorted(torch.cumsum(share, dim=0),
                                        torch.tensor([AUTO_VARIANCE], dtype=FIT_DTYPE, device=ev.device),
                                        right=True).item()) + 1
    k_floor = int((share >= AUTO_MIN_SHARE).sum())
    return max(1, min(k_variance, k_floor, AUTO_MAX_COMPONENTS, limit, ev.numel()))


def select_n_components(explained_variance: Tensor, n_components: NComponents, n_samples: int,
                        n_features: int, *, total: Tensor | float | None = None) -> int:
    """Number of components to keep: scikit-learn's exact rule for ints, fractions and None; ``AUTO`` for ours.

    Args:
        explained_variance: (R,) the full spectrum in descending order (R = all components available).
        n_components: an int in [1, min(N, D)]; a float in (0, 1) = the smallest k whose cumulative
            explained-variance ratio reaches it, ``searchsorted(cumsum(ratio), f, side='right') + 1``; None = all.
        n_samples, n_features: N and D of the data fitted.
        total: the total variance when ``explained_variance`` is not the whole spectrum (a sketch's); default its
            sum.
    """
    limit = min(n_samples, n_features)
    if n_components is None:
        return limit
    if isinstance(n_components, str):
        if n_components != AUTO:
            raise ValueError(f"n_components={n_components!r}: the one rule by name is {AUTO!r}; or pass an int or a "
                             "float in (0, 1)")
        return _auto_components(explained_variance, limit, total)
    if isinstance(n_components, bool):
        raise ValueError(f"n_components must be an int, a float in (0, 1), {AUTO!r} or None, got {n_components!r}")
    if isinstance(n_components, int):
        if not 1 <= n_components <= limit:
            raise ValueError(f"n_components={n_components} must be between 1 and min(n_samples, n_features)="
                             f"{limit}; use a float in (0, 1) to keep a fraction of the variance")
        return n_components
    if isinstance(n_components, float):
        if not 0.0 < n_components < 1.0:
            raise ValueError(f"n_components={n_components} as a float must lie in (0, 1) (fraction of explained "
                             "variance); pass an int for a fixed number of components")
        ev = explained_variance.to(FIT_DTYPE)
        total = ev.sum() if total is None else torch.as_tensor(total, dtype=FIT_DTYPE, device=ev.device)
        if total <= 0:
            return 1  # no variance at all: every point is the mean; one (arbitrary) component as scikit-learn
        cumsum = torch.cumsum(ev / total, dim=0)
        k = int(torch.searchsorted(cumsum, torch.tensor([n_components], dtype=FIT_DTYPE, device=ev.device),
                                   right=True).item()) + 1
        return min(k, limit, ev.numel())
    raise ValueError(f"n_components must be an int, a float in (0, 1) or None, got {n_components!r}")


def _flip_signs(components: Tensor) -> Tensor:
    """Deterministic signs as scikit-learn (>= 1.5): the largest-magnitude entry of each component is positive."""
    idx = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, idx))
    signs[signs == 0] = 1
    return components * signs


class AdoptsBufferShapes(nn.Module):
    """Base of fitted modules whose buffers' shapes are data-driven: ``load_state_dict`` into a fresh (empty) module
    adopts the incoming buffers' shapes (and, with ``adopt_dtypes``, their dtypes) before torch's default copy."""

    adopt_dtypes: bool = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        for name, buf in self._buffers.items():
            src = state_dict.get(prefix + name)
            if src is not None and buf is not None and (
                    src.shape != buf.shape or (self.adopt_dtypes and src.dtype != buf.dtype)):
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CovarianceAccumulator(nn.Module):
    """Streaming float64 mean and centred scatter of rows ``x: (B, D)``; memory O(D^2), independent of N.

    Each batch is centred on its own mean before its scatter is formed and merged with Chan et al.'s update,
    which avoids the cancellation of ``E[x x^T] - mu mu^T`` when features have a large mean.

    Buffers: ``n_samples`` (), ``mean`` (D,), ``scatter`` (D, D), all float64 except the int64 count.
    """

    n_samples: Tensor
    mean: Tensor
    scatter: Tensor

    def __init__(self, n_features: int, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_features = n_features
        self.register_buffer("n_samples", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("mean", torch.zeros(n_features, dtype=FIT_DTYPE, device=device))
        self.register_buffer("scatter", torch.zeros(n_features, n_features, dtype=FIT_DTYPE, device=device))
        self._count = 0  # host copy of n_samples: shapes are host information, so no sync is needed

    def update(self, x: Tensor, *, check_finite: bool = True) -> CovarianceAccumulator:
        """Add a batch ``x: (B, D)``. Validation happens before any state changes, so a bad batch leaves it intact."""
        check_features(x, self.n_features, finite=check_finite)
        if x.shape[0] == 0:
            return self
        xb = x.to(device=self.mean.device, dtype=FIT_DTYPE)
        b_mean = xb.mean(dim=0)
        centred = xb - b_mean
        self._merge_moments(x.shape[0], b_mean, centred.T @ centred)
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add the statistics of ``other`` (exact: the result equals one accumulator fed both streams)."""
        if other.n_features != self.n_features:
            raise ValueError(f"cannot merge accumulators of {other.n_features} and {self.n_features} features")
        if other._count:
            self._merge_moments(other._count, other.mean.to(self.mean.device),
                                other.scatter.to(self.scatter.device))
        return self

    def _merge_moments(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self.mean
        # Build the new state out of place, then assign: nothing is half-updated if an op raises.
        new_mean = self.mean + delta * (n_b / n)
        new_scatter = self.scatter + scatter_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.mean, self.scatter = new_mean, new_scatter
        self.n_samples = self.n_samples + n_b
        self._count = n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.n_samples)

    def covariance(self) -> Tensor:
        """Unbiased covariance (D, D), float64."""
        if self._count < 2:
            raise ValueError(f"need at least 2 samples to estimate a covariance, got {self._count}")
        return self.scatter / (self._count - 1)


class GramAccumulator(nn.Module):
    """Rows ``X: (N, D)`` kept in their own dtype plus their float64 Gram matrix ``X X^T: (N, N)``.

    For N << D; no D x D matrix is ever formed. ``update`` only appends rows; the Gram matrix is completed when it is
    read (``gram``), for the rows appended since the last read. Completing it once, rather than one block row per
    batch, converts each row to float64 once instead of once per later batch (N / B times), and runs one large
    product instead of many thin ones. Centring is exact at solve time: ``Xc Xc^T = G - a 1^T - 1 a^T + c 1 1^T``
    with ``a = G 1 / N`` and ``c = 1^T G 1 / N^2`` (float64 keeps this cancellation harmless).
    """

    rows: Tensor
    _gram: Tensor

    def __init__(self, n_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_features = n_features
        self.register_buffer("rows", torch.empty(0, n_features, dtype=dtype, device=device))
        # The Gram matrix of the first ``_gram.shape[0]`` rows; ``gram`` completes it.
        self.register_buffer("_gram", torch.empty(0, 0, dtype=FIT_DTYPE, device=device))

    @property
    def n_samples(self) -> int:
        return self.rows.shape[0]

    @property
    def gram(self) -> Tensor:
        """``rows @ rows.T`` in float64, ``(N, N)``: the stored part, extended by the rows appended since."""
        done = self._gram.shape[0]
        if done < self.n_samples:
            new = self.rows[done:]
            cross = _gram_block(new, self.rows[:done])  # (B, done)
            own = _gram_block(new, new)  # (B, B)
            top = torch.cat([self._gram, cross.T], dim=1)
            bottom = torch.cat([cross, own], dim=1)
            self._gram = torch.cat([top, bottom], dim=0)
        return self._gram

    def update(self, x: Tensor, *, check_finite: bool = True) -> GramAccumulator:
        """Append a batch ``x: (B, D)`` (its Gram products are formed when ``gram`` is next read). A bad batch leaves
        the state unchanged."""
        check_features(x, self.n_features, finite=check_finite)
        if x.shape[0] == 0:
            return self
        self.rows = torch.cat([self.rows, x.to(device=self.rows.device, dtype=self.rows.dtype)], dim=0)
        return self

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Append all rows of ``other`` (exact; the Gram products across the two are formed when ``gram`` is read)."""
        if other.n_features != self.n_features:
            raise ValueError(f"cannot merge accumulators of {other.n_features} and {self.n_features} features")
        return self.update(other.rows, check_finite=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        # Buffers grow with the data: take the incoming shapes before the default copy.
        for name in ("rows", "_gram"):
            if prefix + name in state_dict:
                src = state_dict[prefix + name]
                setattr(self, name, torch.empty_like(src, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_covariance(self) -> CovarianceAccumulator:
        """The same statistics as a covariance accumulator (when N has outgrown D)."""
        acc = CovarianceAccumulator(self.n_features, device=self.rows.device)
        for start in range(0, self.n_samples, 4096):
            acc.update(self.rows[start:start + 4096], check_finite=False)
        return acc


def gram_matrix(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` in float64, ``(N, D) -> (N, N)``, over column chunks (the float64 copies stay small); a
    block ``[i][:, i]`` of it is the Gram matrix of the rows ``i`` (``fit_gram(..., gram=...)``)."""
    return _gram_block(rows, rows)


def _gram_block(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` in float64, (A, B), formed over column chunks so the float64 copies stay small."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=FIT_DTYPE, device=a.device)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return out
    for start in range(0, a.shape[1], _COLUMN_CHUNK):
        cols = slice(start, start + _COLUMN_CHUNK)
        ad = a[:, cols].to(FIT_DTYPE)
        bd = ad if b is a else b[:, cols].to(FIT_DTYPE)
        out.addmm_(ad, bd.T)
    return out


class Subspace(AdoptsBufferShapes):
    """A fitted linear subspace and its feature reconstruction error.

    Buffers (saved in ``state_dict``):
        mean: (D,) float64, the training mean.
        components: (k, D) orthonormal rows, in the dtype of the fitted data (scoring dtype).
        explained_variance: (k,) float64, variance along each component.
        singular_values: (k,) float64.
        total_variance: () float64, the sum of all variances (for the explained-variance ratio).
        n_samples: () int64, the number of rows fitted.
        tail_components: (m, D) the directions of the training rows' summary beyond the k scored ones, in the
            components' dtype (``n_components='auto'`` fits keep them; empty otherwise). Not used in scoring.
        tail_singular_values: (m,) float64, theirs.
        summary_rank: () int64, the rank of the summary (``fre_torch.core.sketch.SketchAccumulator``) that the
            components and the tail make together; 0 = none kept, the subspace cannot take new rows.

    ``load_state_dict`` adopts the shapes of the incoming buffers, so ``Subspace().load_state_dict(sd)`` works;
    a state without the summary's buffers (written before they existed) loads as a subspace without one.
    """

    mean: Tensor
    components: Tensor
    explained_variance: Tensor
    singular_values: Tensor
    total_variance: Tensor
    n_samples: Tensor

    def __init__(self, mean: Tensor | None = None, components: Tensor | None = None,
                 explained_variance: Tensor | None = None, singular_values: Tensor | None = None,
                 total_variance: Tensor | None = None, n_samples: int = 0, *,
                 tail_components: Tensor | None = None, tail_singular_values: Tensor | None = None,
                 summary_rank: int = 0) -> None:
        super().__init__()
        dev = mean.device if mean is not None else None
        self.register_buffer("mean", mean if mean is not None else torch.empty(0, dtype=FIT_DTYPE))
        self.register_buffer("components", components if components is not None else torch.empty(0, 0))
        self.register_buffer("explained_variance", explained_variance if explained_variance is not None
                             else torch.empty(0, dtype=FIT_DTYPE))
        self.register_buffer("singular_values", singular_values if singular_values is not None
                             else torch.empty(0, dtype=FIT_DTYPE))
        self.register_buffer("total_variance", total_variance if total_variance is not None
                             else torch.zeros((), dtype=FIT_DTYPE, device=dev))
        self.register_buffer("n_samples", torch.tensor(n_samples, dtype=torch.int64, device=dev))
        comps = self.components
        self.register_buffer("tail_components", tail_components if tail_components is not None
                             else comps.new_zeros(0, comps.shape[1] if comps.ndim == 2 else 0))
        self.register_buffer("tail_singular_values", tail_singular_values if tail_singular_values is not None
                             else torch.empty(0, dtype=FIT_DTYPE, device=dev))
        self.register_buffer("summary_rank", torch.tensor(summary_rank, dtype=torch.int64, device=dev))

    _SUMMARY_BUFFERS = ("tail_components", "tail_singular_values", "summary_rank")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        absent = [name for name in self._SUMMARY_BUFFERS if prefix + name not in state_dict]
        for name in absent:  # an older state: no summary (the caller's dict is not touched)
            missing_keys.remove(prefix + name)
        if absent:
            self.tail_components = self.components.new_zeros(0, self.components.shape[1])
            self.tail_singular_values = torch.empty(0, dtype=FIT_DTYPE, device=self.mean.device)
            self.summary_rank = torch.zeros((), dtype=torch.int64, device=self.mean.device)

    @property
    def has_summary(self) -> bool:
        """Whether it keeps the summary of its training rows that new rows can be added to (``fit --update``)."""
        return int(self.summary_rank) > 0

    @property
    def n_features(self) -> int:
        return self.components.shape[1]

    @property
    def n_components(self) -> int:
        return self.components.shape[0]

    @property
    def explained_variance_ratio(self) -> Tensor:
        """(k,) float64."""
        return self.explained_variance / self.total_variance

    def _centred(self, x: Tensor) -> Tensor:
        """(B, D) -> a fresh centred copy in the scoring dtype (never a view of the input)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (N, {self.n_features}), got {tuple(x.shape)}")
        return x.to(self.components.dtype) - self.mean.to(self.components.dtype)

    def project(self, x: Tensor) -> Tensor:
        """Coordinates in the subspace: ``(x - mean) W^T``, x: (B, D) -> (B, k)."""
        return self._centred(x) @ self.components.T

    def reconstruct(self, x: Tensor) -> Tensor:
        """Projection back to feature space: ``mean + (x - mean) W^T W``, (B, D) -> (B, D)."""
        z = self.project(x)
        return torch.addmm(self.mean.to(z.dtype), z, self.components)

    def inverse(self, z: Tensor) -> Tensor:
        """Feature vectors from subspace coordinates, (B, k) -> (B, D)."""
        z = z.to(self.components.dtype)
        return torch.addmm(self.mean.to(z.dtype), z, self.components)

    def residual(self, x: Tensor) -> Tensor:
        """``(x - mean) - (x - mean) W^T W``, (B, D) -> (B, D)."""
        r = self._centred(x)
        z = r @ self.components.T
        return r.addmm_(z, self.components, alpha=-1)  # in place on our own temporary, not on x

    def error_map(self, x: Tensor) -> Tensor:
        """Per-element squared reconstruction error, (B, D) -> (B, D) (reshape to (B, C, H, W) for maps)."""
        return self.residual(x).square_()

    def fre(self, x: Tensor, *, exact: bool = False) -> Tensor:
        """Feature reconstruction error ``||(x - mean) - (x - mean) W^T W||^2`` per row, (B, D) -> (B,).

        Default: one pass over column chunks (they stay in cache; no (B, D) temporary) and ONE matrix product,
        by Pythagoras on orthonormal rows, ``FRE = ||x - mean||^2 - ||z||^2`` with ``z = (x - mean) W^T``, the
        difference taken in float64. Its absolute error is about ``eps * sqrt(k) * ||x - mean||^2`` (float32:
        1e-5 relative for a row whose FRE is 3 % of its energy, the 0.97 cut-off) -- harmless for scoring.
        ``exact=True`` forms the residual explicitly (two products, error ~ eps * FRE), as ``error_map`` does.
        """
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (N, {self.n_features}), got {tuple(x.shape)}")
        w = self.components
        mean = self.mean.to(w.dtype)
        chunks = [slice(s, s + _SCORE_CHUNK) for s in range(0, x.shape[1], _SCORE_CHUNK)]
        z = torch.zeros(x.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
        energy = torch.zeros(x.shape[0], dtype=FIT_DTYPE, device=w.device)
        for cols in chunks:
            xc = x[:, cols].to(w.dtype) - mean[cols]
            z.addmm_(xc, w[:, cols].T)
            if not exact:
                energy += xc.square_().sum(dim=1).to(FIT_DTYPE)  # float32 pairwise sum; 1e-7 relative
        if not exact:
            return (energy - z.square().sum(dim=1, dtype=FIT_DTYPE)).clamp_min_(0.0).to(w.dtype)
        out = torch.zeros(x.shape[0], dtype=w.dtype, device=w.device)
        for cols in chunks:
            r = (x[:, cols].to(w.dtype) - mean[cols]).addmm_(z, w[:, cols], alpha=-1)
            out += r.square_().sum(dim=1)
        return out

    forward = fre


def _spectrum_from_eigh(evals: Tensor, n_samples: int) -> Tensor:
    """Descending, non-negative eigenvalues (eigh returns ascending ones with rounding below zero)."""
    return evals.flip(0).clamp_min(0.0) / max(n_samples - 1, 1)


def fit_covariance(acc: CovarianceAccumulator, n_components: NComponents = None, *,
                   dtype: torch.dtype = torch.float32) -> Subspace:
    """Fit from streaming second moments: float64 ``eigh`` of the D x D covariance.

    Args:
        acc: accumulated statistics of N >= 2 rows.
        n_components: see ``select_n_components``.
        dtype: dtype of the fitted components (the data's dtype; scoring runs in it).
    """
    n = acc._count
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {n}")
    evals, evecs = symmetric_eigh(acc.scatter)  # float64, ascending
    variance = _spectrum_from_eigh(evals, n)
    total = variance.sum()
    k = select_n_components(variance, n_components, n, acc.n_features)
    if n_components == AUTO:
        # Keep the summary (as ``fit_gram``): the determined directions up to ``SKETCH_RANK``; with D at most
        # that, the whole eigenbasis, so new rows update it exactly.
        sq = variance * (n - 1)
        r = min(SKETCH_RANK, max(k, int(_determined(torch.sqrt(sq[:min(n - 1, acc.n_features)]),
                                                    (n, acc.n_features)).sum())))
        v = _flip_signs(evecs[:, -r:].flip(1).T).to(dtype)
        s = torch.sqrt(sq[:r])
        return Subspace(mean=acc.mean.clone(), components=v[:k].clone(), explained_variance=variance[:k],
                        singular_values=s[:k].clone(), total_variance=total, n_samples=n,
                        tail_components=v[k:].clone(), tail_singular_values=s[k:].clone(), summary_rank=SKETCH_RANK)
    components = _flip_signs(evecs[:, -k:].flip(1).T)
    ev = variance[:k]
    return Subspace(
        mean=acc.mean.clone(),
        components=components.to(dtype),
        explained_variance=ev,
        singular_values=torch.sqrt(ev * (n - 1)),
        total_variance=total,
        n_samples=n,
    )


def symmetric_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric ``(n, n)`` matrix: eigenvalues ascending ``(n,)``, eigenvectors ``(n, n)``.

    On the CPU, up to ``n = 2048`` (every Gram solve, small covariances) it runs on one thread: LAPACK's divide and
    conquer gains nothing from a second thread at these sizes, and when another process holds a core its threads wait
    on each other (measured on 2 cores under load: n = 209 took 38 ms on 2 threads against 5 ms on one, n = 533
    286 ms against 45 ms). The thread count is restored afterwards.
    """
    if a.device.type != "cpu" or a.shape[-1] > _EIGH_ONE_THREAD_MAX or torch.get_num_threads() == 1:
        return torch.linalg.eigh(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(a)
    finally:
        torch.set_num_threads(threads)


def _gram_spectrum(gram: Tensor, n_components: NComponents, d: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """The centred spectrum of an uncentred float64 Gram matrix ``X X^T`` of N rows of D features.

    Returns ``(u, sq, variance, k)``: the eigenvectors ``(N, N)`` of the centred Gram matrix, descending; its
    eigenvalues (squared singular values of the centred rows), descending and non-negative; the variances
    ``sq / (N - 1)``; and the number of components ``select_n_components`` keeps.
    """
    n = gram.shape[0]
    # Exact centring of the uncentred Gram matrix, in float64.
    a = gram.mean(dim=1)
    c = a.mean()
    gc = gram - a[:, None] - a[None, :] + c
    gc = (gc + gc.T) * 0.5  # exact symmetry for eigh
    evals, evecs = symmetric_eigh(gc)
    sq = evals.flip(0).clamp_min(0.0)  # squared singular values of the centred rows, descending, length N
    variance = sq / (n - 1)
    return evecs.flip(1), sq, variance, select_n_components(variance, n_components, n, d)


def _determined(s: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Which singular values ``s`` (descending) of an ``shape`` matrix lie above the rounding of its Gram matrix's
    eigenvalues (about ``N * eps * lambda_max``): below it a direction is noise, not determined by the data."""
    eps = torch.finfo(FIT_DTYPE).eps
    return s.square() > s[0].square() * max(shape) * eps * 10 if s.numel() else s > 0


def fit_gram(rows: Tensor, n_components: NComponents = None, *, gram: Tensor | None = None) -> Subspace:
    """Fit from the N x N Gram matrix of ``rows: (N, D)`` (N < D). No D x D matrix is formed.

    Args:
        rows: (N, D) the training vectors (not modified).
        n_components: see ``select_n_components``.
        gram: optional precomputed float64 ``rows @ rows.T`` (from a ``GramAccumulator``).

    Returns:
        A ``Subspace`` whose components have the dtype of ``rows``.
    """
    n, d = rows.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {n}")
    mean = _column_mean(rows)
    if gram is None:
        gram = _gram_block(rows, rows)
    u, sq, variance, k = _gram_spectrum(gram, n_components, d)
    if n_components == AUTO:
        # Keep the summary (``fre_torch.core.sketch``): every determined direction up to ``SKETCH_RANK`` (all of
        # them while N <= SKETCH_RANK + 1), so the subspace can take new rows and is then what a fit on all of
        # them gives.
        r = min(SKETCH_RANK, max(k, int(_determined(torch.sqrt(sq[:n - 1]), (n, d)).sum())))
        s = torch.sqrt(sq[:r])
        v = _components_from_u(rows, mean, u[:, :r], s)
        return Subspace(mean=mean, components=v[:k].clone(), explained_variance=variance[:k],
                        singular_values=s[:k].clone(), total_variance=variance.sum(), n_samples=n,
                        tail_components=v[k:].clone(), tail_singular_values=s[k:].clone(), summary_rank=SKETCH_RANK)
    s = torch.sqrt(sq[:k])
    return Subspace(
        mean=mean,
        components=_components_from_u(rows, mean, u[:, :k], s),
        explained_variance=variance[:k],
        singular_values=s,
        total_variance=variance.sum(),
        n_samples=n,
    )


class RowSpanSubspace(nn.Module):
    """A subspace fitted in dual form: it keeps its training rows, never its ``(k, D)`` components.

    For N < D rows the fitted directions are ``W = S^-1 U^T Xc`` (``U, S`` from the centred Gram matrix), so a
    projection is ``W^T W x = Xc^T (U S^-2 U^T) Xc x``: two products with the rows, in float64, equal to
    ``Subspace``'s up to rounding. Forming ``W`` costs as much as a Gram matrix; models that score a few rows once
    (the fold models of cross-fitting, each fitted on a subset of one set of rows, from blocks of its Gram matrix)
    are several times cheaper this way, and share one float64 copy of the rows. It has ``Subspace``'s scoring
    interface (``residual``, ``error_map``, ``fre``) and spectrum buffers; it is not saved in model files.

    Buffers: ``rows`` (N, D) float64, uncentred (possibly shared with other models: never written to), ``mean``
    (D,) float64, ``coef`` (N, N) float64 ``U_k S_k^-2 U_k^T`` (zero for rows outside the fit),
    ``explained_variance`` (k,), ``total_variance`` (); ``gram`` (N, N) float64 ``rows @ rows.T`` (shared, never
    written to) and ``weights`` (N,) float64, the mean as weights of the rows (``mean = weights @ rows``), for
    ``residual_of_rows``.
    """

    def __init__(self, rows: Tensor, mean: Tensor, coef: Tensor, explained_variance: Tensor,
                 total_variance: Tensor, gram: Tensor | None = None, weights: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("mean", mean)
        self.register_buffer("coef", coef)
        self.register_buffer("explained_variance", explained_variance)
        self.register_buffer("total_variance", total_variance)
        self.register_buffer("gram", gram)
        self.register_buffer("weights", weights)

    @property
    def n_features(self) -> int:
        return self.rows.shape[1]

    @property
    def n_components(self) -> int:
        return self.explained_variance.shape[0]

    def residual(self, x: Tensor) -> Tensor:
        """``(x - mean) - P (x - mean)``, ``P`` the projection onto the subspace: (B, D) -> (B, D) in x's dtype."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (N, {self.n_features}), got {tuple(x.shape)}")
        xc = x.to(FIT_DTYPE) - self.mean
        # Centred rows without a centred copy: Xc xc = X xc - 1 (mean . xc).
        inner = (self.rows @ xc.T).sub_(self.mean @ xc.T)  # (N, B)
        return self._subtract_projection(xc, inner).type_as(x)

    def residual_of_rows(self, index: Tensor) -> Tensor:
        """``residual(rows[index])`` for rows of its own ``rows`` (those a fold held out), ``(B,)`` int -> (B, D)
        float64, with one product with the rows instead of two: their inner products with the centred rows,
        ``Xc (x - mean)``, are entries of ``gram`` (``G[:, i] - G w - (G w)_i + w.G w``, ``w`` = ``weights``)."""
        if self.gram is None or self.weights is None:
            raise ValueError("this model has no Gram matrix; fit it with fit_row_span")
        index = index.to(self.rows.device)
        gw = self.gram @ self.weights  # rows . mean, (N,)
        inner = self.gram[:, index] - gw[:, None] - gw[index][None, :] + self.weights @ gw  # (N, B)
        return self._subtract_projection(self.rows[index] - self.mean, inner)

    def _subtract_projection(self, xc: Tensor, inner: Tensor) -> Tensor:
        """``xc - P xc`` in place, float64, from ``inner = Xc xc^T`` (N, B): the projection is ``Xc^T c`` with
        ``c = coef @ inner``, formed as ``X^T c - mean (1^T c)`` without a centred copy of the rows."""
        c = self.coef @ inner  # (N, B): the projection, as weights of the training rows
        xc.addmm_(c.T, self.rows, alpha=-1)
        return xc.addr_(c.sum(dim=0), self.mean)

    def error_map(self, x: Tensor) -> Tensor:
        """Per-element squared reconstruction error, (B, D) -> (B, D) in x's dtype."""
        return self.residual(x).square_()

    def fre(self, x: Tensor) -> Tensor:
        """Feature reconstruction error per row, (B, D) -> (B,)."""
        return self.error_map(x).sum(dim=1)


def fit_row_span(rows: Tensor, n_components: NComponents = None, *, gram: Tensor | None = None,
                 keep: Tensor | None = None) -> RowSpanSubspace | Subspace:
    """``fit_gram`` in dual form (``RowSpanSubspace``): the same subspace, scored without forming its components.

    Args:
        rows: (N, D) the training vectors (not modified), N < D. Float64 rows are kept by reference, not copied:
            pass one float64 copy to every fold of a cross-fit.
        n_components: see ``select_n_components``.
        gram: optional precomputed float64 ``rows @ rows.T`` (``gram_matrix``).
        keep: optional ``(N,)`` bool: fit on these rows only (``gram`` stays the Gram matrix of all of them).

    Returns:
        A ``RowSpanSubspace``; a ``Subspace`` (``fit_gram``) when ``n_components`` keeps directions the data do not
        determine (they are completed to an orthonormal basis there, which has no dual form).
    """
    rows = rows.to(FIT_DTYPE)
    if gram is None:
        gram = gram_matrix(rows)
    if keep is None:
        keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    index = torch.nonzero(keep).flatten()
    n, d = index.numel(), rows.shape[1]
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {n}")
    block = gram[index][:, index]
    u, sq, variance, k = _gram_spectrum(block, n_components, d)
    if not bool(_determined(torch.sqrt(sq[:k]), (n, d)).all()):
        return fit_gram(rows[index], n_components, gram=block)
    weights = keep.to(FIT_DTYPE) / n
    mean = weights @ rows  # the kept rows' mean without gathering them
    uk = u[:, :k]
    coef = torch.zeros(rows.shape[0], rows.shape[0], dtype=FIT_DTYPE, device=rows.device)
    coef[index[:, None], index[None, :]] = (uk / sq[:k]) @ uk.T
    return RowSpanSubspace(rows, mean, coef, variance[:k], variance.sum(), gram=gram, weights=weights)


def _column_mean(rows: Tensor) -> Tensor:
    """(N, D) -> (D,) float64 mean, over column chunks."""
    out = torch.empty(rows.shape[1], dtype=FIT_DTYPE, device=rows.device)
    for start in range(0, rows.shape[1], _COLUMN_CHUNK):
        out[start:start + _COLUMN_CHUNK] = rows[:, start:start + _COLUMN_CHUNK].to(FIT_DTYPE).mean(dim=0)
    return out


def _components_from_u(rows: Tensor, mean: Tensor, u: Tensor, s: Tensor) -> Tensor:
    """Right singular vectors ``V = U^T Xc / s`` (k, D), signs flipped as scikit-learn, in the dtype of ``rows``.

    Each column chunk is formed in float64 and cast straight into the output, so the only full-size allocation is
    the (k, D) result in the data's dtype (at most the size of the data). Directions with (numerically) zero
    singular value are not determined by the data; they are completed to an orthonormal set so that a full basis
    still reconstructs exactly.
    """
    k = u.shape[1]
    d = rows.shape[1]
    good = _determined(s, tuple(rows.shape))
    safe_s = torch.where(good, s, torch.ones_like(s))
    v = torch.empty(k, d, dtype=rows.dtype, device=rows.device)
    best = torch.zeros(k, dtype=FIT_DTYPE, device=rows.device)  # signed entry of largest magnitude so far
    for start in range(0, d, _COLUMN_CHUNK):
        cols = slice(start, start + _COLUMN_CHUNK)
        chunk = (u.T @ (rows[:, cols].to(FIT_DTYPE) - mean[cols])) / safe_s[:, None]
        idx = chunk.abs().argmax(dim=1, keepdim=True)
        cand = chunk.gather(1, idx).squeeze(1)
        best = torch.where(cand.abs() > best.abs(), cand, best)
        v[:, cols] = chunk
    n_good = int(good.sum())
    if n_good < k:
        # Rare (n_components beyond the data's rank): redo those rows in float64 against the good ones.
        basis = v[:n_good].to(FIT_DTYPE)
        extra = _complete_basis(basis, k - n_good)
        v[n_good:] = extra.to(v.dtype)
        best[n_good:] = extra.gather(1, extra.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    signs = torch.where(best < 0, -1.0, 1.0).to(v.dtype)
    return v.mul_(signs[:, None])


def _complete_basis(basis: Tensor, m: int) -> Tensor:
    """m unit vectors orthogonal to the rows of ``basis: (r, D)`` and to each other, deterministically."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cand = torch.randn(m, basis.shape[1], generator=gen, dtype=FIT_DTYPE).to(basis.device)
    for _ in range(2):  # classical Gram-Schmidt twice is orthogonal to working precision
        cand = cand - (cand @ basis.T) @ basis
    q, _ = torch.linalg.qr(cand.T)
    return q.T


def make_room(acc: GramAccumulator | CovarianceAccumulator, n_new: int, solver: str,
              n_components: NComponents = None) -> GramAccumulator | CovarianceAccumulator:
    """The accumulator to take ``n_new`` more rows. With ``solver='auto'`` a Gram accumulator whose N would reach
    D becomes the equivalent covariance one (the D x D statistics are then the smaller); with ``n_components=AUTO``
    too, one whose N would pass ``SKETCH_RANK`` + 1 becomes the fixed-size summary (``new_accumulator``)."""
    if solver != "auto" or not isinstance(acc, GramAccumulator):
        return acc
    n = acc.n_samples + n_new
    if summarises(n, acc.n_features, solver, n_components):
        from .sketch import SketchAccumulator  # sketch builds on this module

        return SketchAccumulator(acc.n_features, device=acc.rows.device, dtype=acc.rows.dtype).update(
            acc.rows, check_finite=False)
    if n >= acc.n_features:
        return acc.to_covariance()
    return acc


def summarises(n_rows: int, n_features: int, solver: str, n_components: NComponents) -> bool:
    """Whether a fit of ``n_rows`` rows keeps a fixed-size summary (``fre_torch.core.sketch``) rather than exact
    statistics: with ``solver='auto'`` and ``n_components=AUTO``, once N passes ``SKETCH_RANK`` + 1 (the summary is
    exact up to there) and D exceeds ``SKETCH_RANK`` (else the D x D covariance is the smaller exact statistic)."""
    return solver == "auto" and n_components == AUTO and n_features > SKETCH_RANK and n_rows > SKETCH_RANK + 1


def new_accumulator(n_features: int, n_rows: int | None, solver: str, n_components: NComponents = None, *,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """The accumulator a fit of ``n_rows`` rows (None = unknown) of ``n_features`` starts with: Gram while N < D,
    else covariance (``resolve_solver``); with ``solver='auto'`` and ``n_components=AUTO`` the fixed-size summary
    (``fre_torch.core.sketch``) where N would pass ``SKETCH_RANK`` + 1 and D exceeds ``SKETCH_RANK`` (rows of
    unknown count start as Gram; ``make_room`` switches)."""
    if summarises(n_rows or 0, n_features, solver, n_components):
        from .sketch import SketchAccumulator  # sketch builds on this module

        return SketchAccumulator(n_features, device=device, dtype=dtype)
    if resolve_solver(solver, n_rows if n_rows is not None else n_features - 1, n_features) == "gram":
        return GramAccumulator(n_features, device=device, dtype=dtype)
    return CovarianceAccumulator(n_features, device=device)


def fit_accumulator(acc: GramAccumulator | CovarianceAccumulator, n_components: NComponents = None, *,
                    dtype: torch.dtype = torch.float32, what: str = "samples") -> Subspace:
    """Solve streaming statistics of any kind (the Gram rows keep their own dtype; ``dtype`` is for the
    covariance path). ``ValueError`` below 2 samples, naming ``what`` was counted."""
    if isinstance(acc, GramAccumulator):
        n = acc.n_samples
    elif isinstance(acc, CovarianceAccumulator):
        n = acc._count
    else:
        n = acc.flush()._count  # a summary: the rows still waiting in its buffer count too
    if n < 2:
        raise ValueError(f"need at least 2 {what} to fit, got {n}")
    if isinstance(acc, GramAccumulator):
        return fit_gram(acc.rows, n_components, gram=acc.gram)
    if isinstance(acc, CovarianceAccumulator):
        return fit_covariance(acc, n_components, dtype=dtype)
    from .sketch import fit_sketch  # sketch builds on this module

    return fit_sketch(acc, n_components)


def fit_rows(x: Tensor, n_components: NComponents = None, *, solver: Solver = "auto",
             check_finite: bool = True) -> Subspace:
    """One-shot fit of ``x: (N, D)`` with the solver chosen by shape: Gram when N < D, else covariance."""
    check_features(x, finite=check_finite)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit a subspace, got {x.shape[0]}")
    solver = resolve_solver(solver, x.shape[0], x.shape[1])
    if solver == "gram":
        return fit_gram(x, n_components)
    acc = CovarianceAccumulator(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], 4096):
        acc.update(x[start:start + 4096], check_finite=False)
    return fit_covariance(acc, n_components, dtype=x.dtype)


def resolve_solver(solver: str, n_samples: int, n_features: int) -> str:
    """'auto' -> 'gram' when N < D (the N x N problem is smaller), else 'covariance'."""
    if solver not in ("auto", "covariance", "gram"):
        raise ValueError(f"solver must be 'auto', 'covariance' or 'gram', got {solver!r}")
    if solver == "auto":
        return "gram" if n_samples < n_features else "covariance"
    return solver
