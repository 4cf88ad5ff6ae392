"""Kernel feature reconstruction error: the nonlinear extension of FRE (REFERENCE.md step 8), in torch only.

Features from intermediate layers do not lie near a linear subspace, so the reconstruction error is taken in the
feature space ``phi`` of a kernel ``k(x, y) = phi(x) . phi(y)``:

    FRE(x) = || (phi(x) - mu) - P (phi(x) - mu) ||^2,   mu = mean of phi over the training set,

with ``P`` the projection on the top principal directions of the training ``phi``.

Two ways to compute it:

- ``KernelFRE``: an explicit finite map ``phi: R^D -> R^M`` (``RandomFourierFeatures`` or ``NystroemFeatures``)
  followed by the SAME streaming linear engine as the linear case (``fre_torch.core.subspace``): fitting is linear in N
  with memory O(min(N, M) * M), scoring is one map and one ``Subspace.fre``.
- ``ExactKernelFRE``: kernel PCA by the kernel trick in float64 (N x N Gram matrix), for small N. The reference.

Kernels and the bandwidth ``s`` (a length, in the units of the features):

- ``'rbf'``:       ``k(x, y) = exp(-||x - y||_2^2 / (2 s^2))``   (scikit-learn's ``gamma = 1 / (2 s^2)``)
- ``'laplacian'``: ``k(x, y) = exp(-||x - y||_1 / s)``           (scikit-learn's ``gamma = 1 / s``)

Both have ``k(x, x) = 1``. The default bandwidth is the median heuristic (``median_heuristic``): ``s`` = the median
pairwise distance (Euclidean for rbf, L1 for laplacian) over a seeded subsample of at most 1,000 TRAINING rows; for
rbf that is ``gamma = 1 / (2 median^2)``. Every model takes ``bandwidth=`` to override it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .precision import FIT_DTYPE, check_device, score_dtype_for
from .subspace import (
    AUTO,
    AdoptsBufferShapes,
    CovarianceAccumulator,
    GramAccumulator,
    NComponents,
    Subspace,
    check_features,
    fit_accumulator,
    make_room,
    resolve_solver,
    select_n_components,
    symmetric_eigh,
)

__all__ = [
    "ExactKernelFRE",
    "Kernel",
    "KernelFRE",
    "NystroemFeatures",
    "RandomFourierFeatures",
    "kernel_matrix",
    "median_heuristic",
    "select_landmarks",
]

Kernel = Literal["rbf", "laplacian"]
KERNELS = ("rbf", "laplacian")
METHODS = ("rff", "nystroem")
LANDMARK_METHODS = ("uniform", "kcenter")

# Rows per chunk when mapping or scoring: bounds the (B, M) / (B, N) temporaries to about 4M elements.
_CHUNK_ELEMENTS = 1 << 22
# Subsample size of the median heuristic: 1,000 rows give 499,500 pairs, plenty for a median, in O(1000^2 D).
MEDIAN_MAX_SAMPLES = 1000
# k-center keeps an (N, N) Gram matrix up to this many elements (64 MiB in float32, N <= 4,096).
_KCENTER_GRAM_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------- validation
def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _check_bandwidth(bandwidth: float | Tensor) -> float:
    """A positive finite length; ``ValueError`` naming the fix otherwise."""
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, Tensor)):
        raise ValueError(f"bandwidth must be a positive number (a length scale), got {bandwidth!r}")
    b = float(bandwidth)
    if not (b > 0.0 and b != float("inf")):  # also rejects NaN, for which every comparison is False
        raise ValueError(f"bandwidth must be a positive finite number (a length scale), got {b}; pass a value > 0 "
                         "or bandwidth=None to estimate it from the training data (median heuristic)")
    return b


def _check_count(value: int, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; {fix}")
    return value


def _check_n_components(n_components: NComponents) -> NComponents:
    """The linear engine's rule, checked before any data arrives (the upper bound needs N)."""
    if n_components is None:
        return None
    if n_components == AUTO:
        return n_components
    if isinstance(n_components, bool) or not isinstance(n_components, (int, float)):
        raise ValueError(f"n_components must be an int, a float in (0, 1), {AUTO!r} or None, got {n_components!r}")
    if isinstance(n_components, float) and not 0.0 < n_components < 1.0:
        raise ValueError(f"n_components={n_components} as a float must lie in (0, 1) (fraction of explained "
                         "variance); pass an int for a fixed number of components")
    if isinstance(n_components, int) and n_components < 1:
        raise ValueError(f"n_components={n_components} must be >= 1")
    return n_components


def _row_chunk(width: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(width, 1))


# --------------------------------------------------------------------------------------------------- kernels
def _sq_distances(x: Tensor, y: Tensor) -> Tensor:
    """``||x_i - y_j||^2``: (N, D), (M, D) -> (N, M), by ``|x|^2 + |y|^2 - 2 x.y`` (one matrix product).

    The caller centres both on a common point first: the cancellation error of this form is
    ``eps * |x|^2``, so features with a large offset would otherwise lose most of their digits.
    """
    xn = x.square().sum(dim=1)
    yn = y.square().sum(dim=1)
    d2 = torch.addmm(yn[None, :], x, y.T, alpha=-2.0).add_(xn[:, None])
    return d2.clamp_min_(0.0)


def kernel_matrix(x: Tensor, y: Tensor, kernel: Kernel = "rbf", bandwidth: float | Tensor = 1.0, *,
                  center: Tensor | None = None) -> Tensor:
    """Kernel values ``k(x_i, y_j)``: x (N, D), y (M, D) -> (N, M), in the dtype of ``x``.

    Args:
        kernel: 'rbf' ``exp(-|x - y|_2^2 / (2 s^2))`` or 'laplacian' ``exp(-|x - y|_1 / s)``.
        bandwidth: ``s`` > 0, a float or a 0-dim tensor (a tensor avoids a host sync on the device).
        center: (D,) a point subtracted from both before the rbf distances (they are translation invariant; a
            point near the data keeps float32 accurate). None = the mean of ``y``.
    """
    _check_kernel(kernel)
    y = y.to(x.dtype)
    if kernel == "laplacian":
        # L1 distances have no matrix-product form; cdist's direct loop has no cancellation, so no centring.
        return torch.cdist(x, y, p=1.0).div_(bandwidth).neg_().exp_()
    c = (y.mean(dim=0) if center is None else center).to(x.dtype)
    d2 = _sq_distances(x - c, y - c)
    return d2.mul_(-0.5 / (bandwidth * bandwidth)).exp_()


def median_heuristic(x: Tensor, kernel: Kernel = "rbf", *, max_samples: int = MEDIAN_MAX_SAMPLES,
                     seed: int = 0) -> float:
    """The median heuristic bandwidth of training rows ``x: (N, D)``.

    Rule (exactly): take a uniform subsample without replacement of ``min(N, max_samples)`` rows (rows
    ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:max_samples]``; all rows when N <=
    max_samples), form the distances of all distinct pairs ``i < j`` in float64 -- Euclidean for 'rbf', L1 for
    'laplacian' -- and return their median (the mean of the two middle values for an even number of pairs).
    For 'rbf' this is ``s`` with ``gamma = 1 / (2 s^2)``; for 'laplacian' ``gamma = 1 / s``.

    Raises:
        ValueError: fewer than 2 rows, or a median of 0 (mostly duplicate rows) -- pass ``bandwidth`` explicitly.
    """
    _check_kernel(kernel)
    check_features(x, name="x")
    _check_count(max_samples, "max_samples", "use at least 2 rows")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the median heuristic needs at least 2 rows, got {n}; pass bandwidth explicitly")
    if n > max_samples:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:max_samples].to(x.device)
        x = x.index_select(0, idx)
    xs = x.to(FIT_DTYPE)
    i, j = torch.triu_indices(xs.shape[0], xs.shape[0], offset=1, device=xs.device)
    if kernel == "rbf":
        xs = xs - xs.mean(dim=0)
        d = _sq_distances(xs, xs)[i, j].sqrt_()
    else:
        d = torch.cdist(xs, xs, p=1.0)[i, j]
    v = d.sort().values
    m = v.numel()
    median = float(0.5 * (v[(m - 1) // 2] + v[m // 2]))
    if not median > 0.0:
        raise ValueError("the median pairwise distance of the training rows is 0 (mostly duplicate rows); "
                         "pass a positive bandwidth explicitly")
    return median


def select_landmarks(x: Tensor, m: int, method: Literal["uniform", "kcenter"] = "kcenter", *,
                     kernel: Kernel = "rbf", seed: int = 0) -> Tensor:
    """Choose ``m`` landmark rows of ``x: (N, D)`` for ``NystroemFeatures``; returns a copy, (m, D).

    Args:
        method: 'uniform' = a seeded sample without replacement; 'kcenter' = greedy farthest-point selection
            (Gonzalez): start from a seeded random row, then repeatedly add the row farthest from the rows chosen
            so far. k-center covers the data's extent, outliers included, so rare modes get landmarks too.
        kernel: picks the distance of k-center (Euclidean for 'rbf', L1 for 'laplacian').
        seed: seeds the CPU generator (the same landmarks on every device).
    """
    check_features(x, name="x")
    n = x.shape[0]
    _check_count(m, "m (number of landmarks)", f"use 1 <= m <= N = {n}")
    if m > n:
        raise ValueError(f"cannot choose m={m} landmarks from N={n} rows; use m <= N or give more training rows")
    if method not in LANDMARK_METHODS:
        raise ValueError(f"landmark method must be one of {LANDMARK_METHODS}, got {method!r}")
    _check_kernel(kernel)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "uniform":
        idx = torch.randperm(n, generator=gen)[:m].to(x.device)
        return x.index_select(0, idx)
    xc = x - x.mean(dim=0)  # centred copy: the rbf distances below are formed by a product (see _sq_distances)
    xn = xc.square().sum(dim=1)
    # Each greedy step needs the distances from one row to all N. For rbf with N^2 small, one (N, N) Gram matrix
    # (a single BLAS product) turns every step into reading a row, instead of a memory-bound pass over (N, D).
    gram = xc @ xc.T if kernel == "rbf" and n * n <= _KCENTER_GRAM_ELEMENTS else None

    def dist_to(i: Tensor) -> Tensor:  # (1,) row index -> (N,) distances (squared Euclidean, or L1)
        if gram is not None:
            return (xn + xn.index_select(0, i)).sub_(gram.index_select(0, i)[0], alpha=2.0)
        row = xc.index_select(0, i)
        if kernel == "laplacian":
            return (xc - row).abs_().sum(dim=1)
        return (xn + row.square().sum()).addmv_(xc, row[0], alpha=-2.0)

    idx = torch.empty(m, dtype=torch.int64, device=x.device)
    first = torch.randint(n, (1,), generator=gen).to(x.device)
    idx[:1] = first
    min_dist = dist_to(first)
    for i in range(1, m):
        nxt = min_dist.argmax().view(1)  # stays on the device: no host sync in the loop
        idx[i:i + 1] = nxt
        min_dist = torch.minimum(min_dist, dist_to(nxt))
    return x.index_select(0, idx)


# --------------------------------------------------------------------------------------------------- feature maps
class _AdoptShapes(AdoptsBufferShapes):
    """``load_state_dict`` adopts the shapes and dtypes of incoming buffers (fitted state's size is data-driven)."""

    adopt_dtypes = True


class RandomFourierFeatures(_AdoptShapes):
    """Random Fourier features (Rahimi & Recht 2007): ``phi(x) = sqrt(2 / M) cos(x W^T + b)``, (B, D) -> (B, M).

    ``phi(x) . phi(y)`` is an unbiased estimate of ``k(x, y)`` with error ``O(1 / sqrt(M))``:

    - 'rbf': rows of W ~ N(0, I / s^2) (the Fourier transform of the Gaussian kernel);
    - 'laplacian' (L1): entries of W i.i.d. Cauchy(0, 1 / s) (the product of 1-D Laplacian kernels);
    - ``orthogonal=True`` ('rbf' only; Yu et al. 2016, orthogonal random features): W is built from blocks of
      min(D, remaining) orthonormal rows (QR of a Gaussian matrix, Haar-distributed), each row scaled by an
      independent chi(D) norm / s, so every row is still N(0, I / s^2) but rows within a block are orthogonal,
      which lowers the variance of the estimate.

    b ~ U(0, 2 pi). All random numbers come from a CPU generator seeded by ``seed`` in float64, so a seed gives the
    same map on every device and dtype.

    Buffers: ``weight`` (M, D), ``offset`` (M,) in ``dtype``; ``bandwidth`` () float64 (a record: it is folded
    into ``weight``).
    """

    weight: Tensor
    offset: Tensor
    bandwidth: Tensor

    def __init__(self, n_features_in: int, n_components: int = 4096, *, bandwidth: float,
                 kernel: Kernel = "rbf", orthogonal: bool = False, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        d = _check_count(n_features_in, "n_features_in", "pass the dimension D of the input rows")
        m = _check_count(n_components, "n_components (number of random features M)",
                         "use e.g. 1024..8192: the kernel error falls as 1 / sqrt(M)")
        s = _check_bandwidth(bandwidth)
        self.kernel = _check_kernel(kernel)
        if orthogonal and kernel != "rbf":
            raise ValueError("orthogonal random features are defined for the 'rbf' kernel only; "
                             "use orthogonal=False with kernel='laplacian'")
        self.orthogonal = bool(orthogonal)
        dev = None if device is None else check_device(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if kernel == "laplacian":
            w = torch.empty(m, d, dtype=FIT_DTYPE).cauchy_(0.0, 1.0 / s, generator=gen)
        elif orthogonal:
            w = _orthogonal_gaussian(m, d, gen).div_(s)
        else:
            w = torch.randn(m, d, dtype=FIT_DTYPE, generator=gen).div_(s)
        b = torch.rand(m, dtype=FIT_DTYPE, generator=gen).mul_(2.0 * torch.pi)
        self.register_buffer("weight", w.to(device=dev, dtype=dtype))
        self.register_buffer("offset", b.to(device=dev, dtype=dtype))
        self.register_buffer("bandwidth", torch.tensor(s, dtype=FIT_DTYPE, device=dev))

    @property
    def n_features_in(self) -> int:
        return self.weight.shape[1]

    @property
    def n_components(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, D)`` -> ``phi(x): (B, M)`` in the dtype of the map."""
        if x.ndim != 2 or x.shape[1] != self.n_features_in:
            raise ValueError(f"expected rows of shape (B, {self.n_features_in}), got {tuple(x.shape)}")
        w = self.weight
        z = torch.addmm(self.offset, x.to(device=w.device, dtype=w.dtype), w.T)
        return z.cos_().mul_((2.0 / w.shape[0]) ** 0.5)

    def extra_repr(self) -> str:
        return (f"n_features_in={self.n_features_in}, n_components={self.n_components}, kernel={self.kernel!r}, "
                f"orthogonal={self.orthogonal}")


def _orthogonal_gaussian(m: int, d: int, gen: torch.Generator) -> Tensor:
    """(m, d) float64 rows, each N(0, I) in law, orthogonal within blocks of d rows (Yu et al. 2016).

    The Q of a Gaussian matrix's QR (signs fixed by diag(R)) is Haar and depends only on the directions of the
    columns, which are independent of their norms; so the column norms, chi(d)-distributed, serve as the row norms.
    """
    blocks = []
    for start in range(0, m, d):
        r = min(d, m - start)
        g = torch.randn(d, r, dtype=FIT_DTYPE, generator=gen)
        q, rr = torch.linalg.qr(g)  # reduced: q (d, r)
        q = q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0)  # sign fix: without it Q is not Haar
        blocks.append(q.T * g.norm(dim=0)[:, None])
    return torch.cat(blocks, dim=0)


class NystroemFeatures(_AdoptShapes):
    """Nystroem features: ``phi(x) = k(x, L) K_LL^{-1/2}``, (B, D) -> (B, m), from landmarks ``L: (m, D)``.

    ``phi(x) . phi(y) = k(x, L) K_LL^+ k(L, y)``: exact when x or y is a landmark, and the kernel restricted to
    the span of the landmarks' features otherwise. ``K_LL^{-1/2}`` comes from a float64 ``eigh``; eigenvalues
    below ``rcond * lambda_max`` are dropped (a pseudo-inverse) because their inverse square roots would amplify
    rounding in ``k(x, L)`` -- by up to 1 / sqrt(rcond * lambda_max) -- into noise features.

    Args:
        landmarks: (m, D) rows, usually ``select_landmarks(train, m)``.
        kernel, bandwidth: see ``kernel_matrix``.
        rcond: relative eigenvalue cut-off; None = ``m * eps`` of ``dtype`` (numpy's rank convention).
        dtype: dtype of the map (None = float64 for float64 landmarks, else float32).

    Buffers: ``landmarks`` (m, D), ``center`` (D,) (their mean, the origin of the rbf distances),
    ``normalization`` (m, m) in the map's dtype; ``bandwidth`` () float64; ``rank`` () int64 (directions kept).
    """

    landmarks: Tensor
    center: Tensor
    normalization: Tensor
    bandwidth: Tensor
    rank: Tensor

    def __init__(self, landmarks: Tensor, *, bandwidth: float, kernel: Kernel = "rbf",
                 rcond: float | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.kernel = _check_kernel(kernel)
        s = _check_bandwidth(bandwidth)
        if not isinstance(landmarks, Tensor) or landmarks.ndim != 2 or landmarks.shape[0] < 1:
            shape = tuple(landmarks.shape) if isinstance(landmarks, Tensor) else type(landmarks).__name__
            raise ValueError(f"landmarks must be a non-empty 2-D tensor (m, D), got {shape}; "
                             "choose them with select_landmarks(train, m)")
        check_features(landmarks, name="landmarks")
        dtype = score_dtype_for(landmarks.dtype) if dtype is None else dtype
        dev = landmarks.device if device is None else check_device(device)
        m = landmarks.shape[0]
        if rcond is None:
            rcond = m * torch.finfo(dtype).eps
        lm = landmarks.to(device=dev, dtype=FIT_DTYPE)
        center = lm.mean(dim=0)
        k_ll = kernel_matrix(lm, lm, kernel, s, center=center)
        evals, evecs = symmetric_eigh((k_ll + k_ll.T) * 0.5)  # float64, ascending
        keep = evals > rcond * evals[-1].clamp_min(0.0)
        inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(FIT_DTYPE).tiny).rsqrt(),
                               torch.zeros((), dtype=FIT_DTYPE, device=dev))
        norm = (evecs * inv_sqrt) @ evecs.T  # symmetric K_LL^{-1/2} (pseudo-inverse square root)
        self.register_buffer("landmarks", lm.to(dtype))
        self.register_buffer("center", center.to(dtype))
        self.register_buffer("normalization", norm.to(dtype))
        self.register_buffer("bandwidth", torch.tensor(s, dtype=FIT_DTYPE, device=dev))
        self.register_buffer("rank", keep.sum())

    @property
    def n_features_in(self) -> int:
        return self.landmarks.shape[1]

    @property
    def n_components(self) -> int:
        return self.landmarks.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, D)`` -> ``phi(x): (B, m)`` in the dtype of the map."""
        if x.ndim != 2 or x.shape[1] != self.n_features_in:
            raise ValueError(f"expected rows of shape (B, {self.n_features_in}), got {tuple(x.shape)}")
        lm = self.landmarks
        k = kernel_matrix(x.to(device=lm.device, dtype=lm.dtype), lm, self.kernel,
                          self.bandwidth.to(lm.dtype), center=self.center)
        return k @ self.normalization

    def out_of_span(self, phi: Tensor) -> Tensor:
        """Energy of ``phi(x)`` outside the landmarks' span, ``k(x, x) - |phi(x)|^2``: phi (B, m) -> (B,).

        The explicit features only see the projection on the span of the landmarks' features; this is the rest
        (``k(x, x) = 1`` for both kernels). It is large for a row far from every landmark.
        """
        return (1.0 - phi.square().sum(dim=1, dtype=FIT_DTYPE)).clamp_min_(0.0).to(phi.dtype)

    def extra_repr(self) -> str:
        return f"n_features_in={self.n_features_in}, n_components={self.n_components}, kernel={self.kernel!r}"


# --------------------------------------------------------------------------------------------------- KernelFRE
class KernelFRE(nn.Module):
    """Kernel FRE through an explicit feature map and the streaming linear engine.

    ``partial_fit`` maps each batch ``x: (B, D) -> phi: (B, M)`` and pushes it into the linear engine's
    accumulators: a ``GramAccumulator`` while N < M (the N x N problem is the smaller one), switching to a
    ``CovarianceAccumulator`` (M x M float64, memory independent of N) once N reaches M (``solver='auto'``).
    ``score`` is ``Subspace.fre`` of the mapped rows: ``||(phi(x) - mu) - P (phi(x) - mu)||^2``. For Nystroem
    maps it adds ``NystroemFeatures.out_of_span`` (``k(x, x) - |phi(x)|^2``), the part of the kernel feature that
    the landmarks cannot represent: without it a row far from every landmark maps to ``phi ~ 0`` and scores like
    the mean. The model is then "training features projected on the landmarks' span"; with every training row as
    a landmark (and full rank) the score IS the exact kernel FRE.

    Args:
        n_components: as the linear engine: an int, a float in (0, 1) (explained-variance rule, scikit-learn's
            ``searchsorted(cumsum(ratio), f, side='right') + 1``) or None (all).
        kernel: 'rbf' or 'laplacian' (see the module docstring for the exact forms).
        method: 'rff' (random Fourier features) or 'nystroem' (landmarks chosen from the first data seen).
        kernel_features: M, the number of random features or of Nystroem landmarks.
        bandwidth: the kernel length ``s``; None = ``median_heuristic`` of the first data seen (all of it for
            ``fit``; the first batch for ``partial_fit``). Pass it explicitly for streaming that equals one-shot.
        orthogonal: orthogonal random features (rbf with method 'rff' only).
        landmark_method: 'kcenter' or 'uniform' landmark selection (method 'nystroem').
        seed: seeds the random features, the landmark choice and the heuristic's subsample.
        solver: 'auto', 'gram' or 'covariance', as ``fre_torch.PCA``.
        device: where mapping, fitting and scoring run; None = the device of the first data.
        feature_map: a ready map (``RandomFourierFeatures`` / ``NystroemFeatures`` or any module (B, D) -> (B, M)
            with ``n_features_in`` / ``n_components``), moved to ``device`` if one is given; then kernel, method,
            kernel_features, bandwidth, orthogonal and landmark_method are not used.

    The map's dtype follows the precision policy: float64 for float64 data, else float32; scoring runs in it.
    ``state_dict()`` holds the map and the fitted ``Subspace``; ``KernelFRE(<same arguments>).load_state_dict(sd)``
    restores a model that scores identically.
    """

    feature_map: nn.Module | None
    subspace: Subspace | None

    def __init__(self, n_components: NComponents = 0.97, *, kernel: Kernel = "rbf",
                 method: Literal["rff", "nystroem"] = "rff", kernel_features: int = 4096,
                 bandwidth: float | None = None, orthogonal: bool = False,
                 landmark_method: Literal["uniform", "kcenter"] = "kcenter", seed: int = 0, solver: str = "auto",
                 device: torch.device | str | None = None, feature_map: nn.Module | None = None) -> None:
        super().__init__()
        self.n_components = _check_n_components(n_components)
        self.kernel = _check_kernel(kernel)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.kernel_features = _check_count(kernel_features, "kernel_features (M)",
                                            "use e.g. 1024..8192 random features or landmarks")
        self.bandwidth = None if bandwidth is None else _check_bandwidth(bandwidth)
        if orthogonal and (kernel != "rbf" or method != "rff"):
            raise ValueError("orthogonal=True needs kernel='rbf' and method='rff'")
        self.orthogonal = bool(orthogonal)
        if landmark_method not in LANDMARK_METHODS:
            raise ValueError(f"landmark_method must be one of {LANDMARK_METHODS}, got {landmark_method!r}")
        self.landmark_method = landmark_method
        self.seed = seed
        resolve_solver(solver, 1, 1)  # validates the name
        self.solver = solver
        self.device = None if device is None else check_device(device)
        self._given_map = feature_map is not None
        if feature_map is not None and self.device is not None:
            feature_map = feature_map.to(self.device)
        self.register_module("feature_map", feature_map)
        self.register_module("subspace", None)
        # The accumulator is working state, not part of the model: kept out of the module tree so state_dict()
        # holds only the map and the fitted subspace (an M x M float64 scatter would be 128 MiB at M = 4,096).
        object.__setattr__(self, "_acc", None)

    # ------------------------------------------------------------------------------------------- state
    def reset(self) -> KernelFRE:
        """Forget the fit (and a map built from data; a map given to the constructor is kept)."""
        if not self._given_map:
            self.feature_map = None
        self.subspace = None
        object.__setattr__(self, "_acc", None)
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - moves the working statistics with the model
        super()._apply(fn, recurse)
        if self._acc is not None:
            self._acc._apply(fn, recurse)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        # A fresh model has no map or subspace yet: create placeholders whose buffers adopt the saved shapes
        # (torch loads this module's own state first, then its children, including those created here).
        dev = self.device or torch.device("cpu")
        if self.feature_map is None and any(k.startswith(prefix + "feature_map.") for k in state_dict):
            self.feature_map = self._placeholder_map(dev)
        if self.subspace is None and any(k.startswith(prefix + "subspace.") for k in state_dict):
            self.subspace = Subspace().to(dev)
        object.__setattr__(self, "_acc", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _placeholder_map(self, dev: torch.device) -> nn.Module:
        if self.method == "rff":
            return RandomFourierFeatures(1, 1, bandwidth=1.0, kernel=self.kernel, device=dev)
        return NystroemFeatures(torch.zeros(1, 1, device=dev), bandwidth=1.0, kernel=self.kernel)

    def state_dict(self, *args, **kwargs):
        self._solve()  # the fitted subspace is what is saved, not the streaming statistics
        return super().state_dict(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- fitting
    def _device_for(self, x: Tensor) -> torch.device:
        if self.feature_map is not None:
            buf = next(self.feature_map.buffers(), None)
            if buf is not None:
                return buf.device
        return self.device if self.device is not None else x.device

    def _build_map(self, x: Tensor, dev: torch.device) -> nn.Module:
        """The map for training rows ``x: (B, D)`` (bandwidth and landmarks come from these rows only)."""
        dtype = score_dtype_for(x.dtype)
        m = self.kernel_features
        if self.method == "nystroem" and x.shape[0] < m:
            raise ValueError(f"method='nystroem' needs at least kernel_features={m} rows to choose landmarks from, "
                             f"got {x.shape[0]}; use kernel_features <= N, fit() on all rows, or pass feature_map")
        s = self.bandwidth if self.bandwidth is not None else median_heuristic(x, self.kernel, seed=self.seed)
        if self.method == "rff":
            return RandomFourierFeatures(x.shape[1], m, bandwidth=s, kernel=self.kernel,
                                         orthogonal=self.orthogonal, seed=self.seed, device=dev, dtype=dtype)
        lm = select_landmarks(x.to(dev), m, self.landmark_method, kernel=self.kernel, seed=self.seed)
        return NystroemFeatures(lm, bandwidth=s, kernel=self.kernel, dtype=dtype)

    def _map_dtype(self) -> torch.dtype:
        buf = next(self.feature_map.buffers(), None)
        return buf.dtype if buf is not None and buf.is_floating_point() else torch.float32

    def _new_accumulator(self, n_rows: int | None, dev: torch.device) -> GramAccumulator | CovarianceAccumulator:
        m = self.feature_map.n_components
        solver = self.solver
        if solver == "auto" and n_rows is not None:  # one-shot: the final N is known
            solver = resolve_solver("auto", n_rows, m)
        if solver == "covariance":
            return CovarianceAccumulator(m, device=dev)
        return GramAccumulator(m, device=dev, dtype=self._map_dtype())

    def _stream(self, x: Tensor, dev: torch.device) -> None:
        """Map ``x: (B, D)`` in row chunks into the accumulator (no host syncs in the loop)."""
        acc = self._acc
        m = self.feature_map.n_components
        step = _row_chunk(max(m, x.shape[1]))
        for start in range(0, x.shape[0], step):
            phi = self.feature_map(x[start:start + step].to(dev))
            acc = make_room(acc, phi.shape[0], self.solver)
            acc.update(phi, check_finite=False)
        object.__setattr__(self, "_acc", acc)
        self.subspace = None  # solved lazily on first use

    def partial_fit(self, x: Tensor, *, check_finite: bool = True) -> KernelFRE:
        """Add training rows ``x: (B, D)``. The first batch builds the map (bandwidth / landmarks from it) unless
        one was given. After ``fit`` or ``load_state_dict`` this starts new statistics with the current map."""
        d = self.feature_map.n_features_in if self.feature_map is not None else None
        check_features(x, d, finite=check_finite)
        if x.shape[0] == 0:
            return self
        dev = self._device_for(x)
        if self.feature_map is None:
            self.feature_map = self._build_map(x, dev)
        if self._acc is None:
            object.__setattr__(self, "_acc", self._new_accumulator(None, dev))
        self._stream(x, dev)
        return self

    def fit(self, x: Tensor) -> KernelFRE:
        """Fit on all training rows ``x: (N, D)``: build the map from them, stream them through it, solve."""
        check_features(x, self.feature_map.n_features_in if self._given_map else None)
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to fit, got {x.shape[0]}")
        self.reset()
        dev = self._device_for(x)
        if self.feature_map is None:
            self.feature_map = self._build_map(x, dev)
        object.__setattr__(self, "_acc", self._new_accumulator(x.shape[0], dev))
        self._stream(x, dev)
        self._solve()
        object.__setattr__(self, "_acc", None)  # one-shot, as PCA.fit: the statistics are not kept
        return self

    def _solve(self) -> None:
        acc = self._acc
        if self.subspace is not None or acc is None:
            return
        self.subspace = fit_accumulator(acc, self.n_components, dtype=self._map_dtype())

    def fitted_subspace(self) -> Subspace:
        """The ``Subspace`` of the mapped training rows (solving pending statistics first)."""
        self._solve()
        if self.subspace is None or self.feature_map is None:
            raise ValueError("this KernelFRE is not fitted yet; call fit(x) or partial_fit(x) first")
        return self.subspace

    # ------------------------------------------------------------------------------------------- scoring
    def transform(self, x: Tensor) -> Tensor:
        """The explicit kernel features ``phi(x)``, (N, D) -> (N, M), on the model's device."""
        if self.feature_map is None:
            raise ValueError("this KernelFRE has no feature map yet; call fit(x) or partial_fit(x) first")
        check_features(x, self.feature_map.n_features_in)
        dev = self._device_for(x)
        step = _row_chunk(max(self.feature_map.n_components, x.shape[1]))
        return torch.cat([self.feature_map(x[s:s + step].to(dev)) for s in range(0, x.shape[0], step)])

    def score(self, x: Tensor) -> Tensor:
        """Kernel FRE per row, ``x: (N, D)`` -> (N,), in the map's dtype on the model's device."""
        sub = self.fitted_subspace()
        check_features(x, self.feature_map.n_features_in)
        dev = self._device_for(x)
        out = torch.empty(x.shape[0], dtype=sub.components.dtype, device=dev)
        step = _row_chunk(max(self.feature_map.n_components, x.shape[1]))
        out_of_span = getattr(self.feature_map, "out_of_span", None)
        for start in range(0, x.shape[0], step):
            phi = self.feature_map(x[start:start + step].to(dev))
            fre = sub.fre(phi)
            out[start:start + step] = fre if out_of_span is None else fre + out_of_span(phi)
        return out

    forward = score

    @property
    def n_components_(self) -> int:
        return self.fitted_subspace().n_components

    @property
    def bandwidth_(self) -> float:
        """The bandwidth in use (given or estimated)."""
        if self.feature_map is None:
            raise ValueError("this KernelFRE has no feature map yet; call fit(x) or partial_fit(x) first")
        return float(self.feature_map.bandwidth)

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components!r}, kernel={self.kernel!r}, method={self.method!r}, "
                f"kernel_features={self.kernel_features}, bandwidth={self.bandwidth!r}")


# --------------------------------------------------------------------------------------------------- exact
class ExactKernelFRE(_AdoptShapes):
    """Kernel-PCA FRE by the kernel trick, in float64 (the reference; memory O(N^2 + N D), for small N).

    With ``K`` the (N, N) training Gram matrix, ``Kc = H K H`` its centring in feature space
    (``H = I - 1 1^T / N``) and ``Kc = U diag(lambda) U^T``, the principal directions are
    ``v_i = sum_j U_ji phi~(x_j) / sqrt(lambda_i)`` and, for a row x,

        FRE(x) = ||phi~(x)||^2 - sum_{i <= k} (U_i . k~(x))^2 / lambda_i

    where ``phi~(x) = phi(x) - mean_j phi(x_j)``, ``k~(x)_j = phi~(x_j) . phi~(x)`` (the centred kernel vector)
    and ``||phi~(x)||^2 = k(x, x) - 2 mean_j k(x, x_j) + mean(K)``. The variances are ``lambda / (N - 1)``;
    ``n_components`` follows the linear engine's rule (``select_n_components``), capped at the numerical rank of
    ``Kc`` (directions beyond it are zero vectors in feature space).

    Buffers: ``train_rows`` (N, D), ``center`` (D,), ``train_kernel_mean`` (N,), ``kernel_mean`` (), ``coef``
    (N, k) = ``U_k / sqrt(lambda_k)``, ``explained_variance`` (k,), ``total_variance`` (), ``bandwidth`` (),
    all float64.
    """

    train_rows: Tensor
    center: Tensor
    train_kernel_mean: Tensor
    kernel_mean: Tensor
    coef: Tensor
    explained_variance: Tensor
    total_variance: Tensor
    bandwidth: Tensor

    def __init__(self, n_components: NComponents = 0.97, *, kernel: Kernel = "rbf", bandwidth: float | None = None,
                 seed: int = 0, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_components = _check_n_components(n_components)
        self.kernel = _check_kernel(kernel)
        self.bandwidth_arg = None if bandwidth is None else _check_bandwidth(bandwidth)
        self.seed = seed
        self.device = None if device is None else check_device(device)
        dev = self.device
        for name, shape in (("train_rows", (0, 0)), ("center", (0,)), ("train_kernel_mean", (0,)), ("kernel_mean", ()),
                            ("coef", (0, 0)), ("explained_variance", (0,)), ("total_variance", ()),
                            ("bandwidth", ())):
            self.register_buffer(name, torch.zeros(shape, dtype=FIT_DTYPE, device=dev))

    @property
    def is_fitted(self) -> bool:
        return self.train_rows.shape[0] > 0

    @property
    def n_components_(self) -> int:
        return self.coef.shape[1]

    @property
    def bandwidth_(self) -> float:
        return float(self.bandwidth)

    def fit(self, x: Tensor) -> ExactKernelFRE:
        """Fit on training rows ``x: (N, D)``: centred Gram matrix, float64 ``eigh``, kept components."""
        check_features(x)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"need at least 2 samples to fit, got {n}")
        dev = self.device if self.device is not None else x.device
        xs = x.to(device=dev, dtype=FIT_DTYPE)
        s = self.bandwidth_arg if self.bandwidth_arg is not None else median_heuristic(xs, self.kernel,
                                                                                       seed=self.seed)
        center = xs.mean(dim=0)
        k = kernel_matrix(xs, xs, self.kernel, s, center=center)
        k = (k + k.T) * 0.5
        row_mean = k.mean(dim=1)
        grand = row_mean.mean()
        kc = k - row_mean[:, None] - row_mean[None, :] + grand
        evals, evecs = symmetric_eigh((kc + kc.T) * 0.5)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        variance = evals / (n - 1)
        n_keep = select_n_components(variance, self.n_components, n, n)
        # Eigenvalues carry rounding of about N * eps * lambda_max; below that a direction is not determined.
        tol = evals[0] * n * torch.finfo(FIT_DTYPE).eps * 10
        rank = max(int((evals > tol).sum()), 1)
        n_keep = min(n_keep, rank)
        self.train_rows = xs.clone()
        self.center = center
        self.train_kernel_mean = row_mean
        self.kernel_mean = grand
        # contiguous: eigh returns column-major vectors, and a loaded copy must score bit-identically
        self.coef = (evecs[:, :n_keep] / evals[:n_keep].clamp_min(torch.finfo(FIT_DTYPE).tiny).sqrt()).contiguous()
        self.explained_variance = variance[:n_keep].clone()
        self.total_variance = variance.sum()
        self.bandwidth = torch.tensor(s, dtype=FIT_DTYPE, device=dev)
        return self

    def score(self, x: Tensor) -> Tensor:
        """Kernel FRE per row, ``x: (N, D)`` -> (N,) float64 on the model's device."""
        if not self.is_fitted:
            raise ValueError("this ExactKernelFRE is not fitted yet; call fit(x) first")
        check_features(x, self.train_rows.shape[1])
        n_train = self.train_rows.shape[0]
        out = torch.empty(x.shape[0], dtype=FIT_DTYPE, device=self.train_rows.device)
        step = _row_chunk(max(n_train, x.shape[1]))
        for start in range(0, x.shape[0], step):
            xb = x[start:start + step].to(device=self.train_rows.device, dtype=FIT_DTYPE)
            kx = kernel_matrix(xb, self.train_rows, self.kernel, self.bandwidth, center=self.center)  # (B, N)
            kx_mean = kx.mean(dim=1)
            kt = kx - self.train_kernel_mean - kx_mean[:, None] + self.kernel_mean  # centred kernel vectors
            proj = kt @ self.coef  # (B, k): coordinates on the principal directions
            norm2 = 1.0 - 2.0 * kx_mean + self.kernel_mean  # k(x, x) = 1 for both kernels
            out[start:start + step] = (norm2 - proj.square().sum(dim=1)).clamp_min_(0.0)
        return out

    forward = score

    def extra_repr(self) -> str:
        return f"n_components={self.n_components!r}, kernel={self.kernel!r}, bandwidth={self.bandwidth_arg!r}"
