"""A scikit-learn-compatible PCA on torch: the drop-in "fast backend" for FRE code.

    from fre_torch import PCA
    pca = PCA(n_components=0.97, device="cuda").fit(train_features)      # numpy array or torch tensor
    scores = pca.reconstruction_error(test_features)                     # (N,), same kind as given

Inputs may be numpy arrays or torch tensors; outputs are of the kind given (numpy on the CPU, or a tensor on the
input's device). Fitted attributes are numpy arrays when the model was fitted on numpy, tensors otherwise.
The fitted state lives in ``self.subspace_`` (an ``nn.Module``): ``state_dict()``/``load_state_dict()`` round-trip.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .precision import check_device
from .subspace import (
    AUTO,
    CovarianceAccumulator,
    GramAccumulator,
    NComponents,
    Subspace,
    check_features,
    fit_accumulator,
    make_room,
    fit_rows,
    resolve_solver,
    select_n_components,
)

__all__ = ["PCA"]


def _is_numpy(x: Any) -> bool:
    # Detected without importing numpy: the library itself depends only on torch.
    return type(x).__module__ == "numpy" and hasattr(x, "__array__")


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    return None if device is None else check_device(device)


class PCA:
    """Principal component analysis with exact float64 solvers, on any torch device.

    Args:
        n_components: int (number kept), float in (0, 1) (smallest number whose explained-variance ratio reaches
            it, scikit-learn's rule), None (all, ``min(N, D)``) or ``'auto'`` (fre_torch's bounded rule,
            ``fre_torch.core.subspace.AUTO``; with ``partial_fit`` and solver 'auto' the statistics become a
            fixed-size summary once N passes ``SKETCH_RANK`` + 1, so memory stays bounded).
        device: where fitting and scoring run; None = the device of the data (CPU for numpy).
        solver: 'covariance' (D x D second moments, memory independent of N), 'gram' (N x N Gram matrix, for
            N < D) or 'auto' (gram when N < D). ``partial_fit`` with 'auto' keeps rows while N < D and switches to
            the covariance statistics once N reaches D.
    """

    def __init__(self, n_components: NComponents = None, *, device: torch.device | str | None = None,
                 solver: str = "auto") -> None:
        resolve_solver(solver, 1, 1)  # validates the name
        if n_components is not None and n_components != AUTO and (isinstance(n_components, bool)
                                                                  or not isinstance(n_components, (int, float))):
            raise ValueError(f"n_components must be an int, a float in (0, 1), {AUTO!r} or None, got "
                             f"{n_components!r}")
        if isinstance(n_components, float) and not 0.0 < n_components < 1.0:
            raise ValueError(f"n_components={n_components} as a float must lie in (0, 1)")
        if isinstance(n_components, int) and n_components < 1:
            raise ValueError(f"n_components={n_components} must be >= 1")
        self.n_components = n_components
        self.device = _resolve_device(device)
        self.solver = solver
        self._acc: CovarianceAccumulator | GramAccumulator | None = None
        self._subspace: Subspace | None = None
        self._numpy = False
        self._dtype: torch.dtype | None = None

    # ----------------------------------------------------------------------------------------------- conversions
    def _to_tensor(self, x: Any, name: str = "X") -> Tensor:
        numpy = _is_numpy(x)
        if not numpy and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        t = torch.as_tensor(x) if numpy else x
        if not t.is_floating_point():
            t = t.to(torch.float64)  # as scikit-learn: integers are promoted to float64
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t

    def _target_device(self, t: Tensor) -> torch.device:
        return self.device if self.device is not None else t.device

    def _out(self, t: Tensor, like: Any) -> Any:
        if _is_numpy(like):
            return t.detach().cpu().numpy()
        return t.to(like.device)

    def _attr(self, t: Tensor) -> Any:
        return t.detach().cpu().numpy() if self._numpy else t

    # ----------------------------------------------------------------------------------------------- fitting
    def fit(self, X: Any, y: Any = None) -> PCA:
        """Fit on ``X: (N, D)`` in one shot (exact float64 decomposition)."""
        t = check_features(self._to_tensor(X))
        if t.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to fit, got {t.shape[0]}")
        if self.n_components is not None:
            select_n_components(torch.ones(1), self.n_components, t.shape[0], t.shape[1])  # range check
        t = t.to(self._target_device(t))
        self._subspace = fit_rows(t, self.n_components, solver=self.solver, check_finite=False)  # checked above
        self._acc = None
        self._numpy = _is_numpy(X)
        self._dtype = t.dtype
        return self

    def partial_fit(self, X: Any, y: Any = None) -> PCA:
        """Add a batch ``X: (B, D)`` to the streaming statistics (float64). A bad batch changes nothing."""
        t = self._to_tensor(X)
        n_features = self._acc.n_features if self._acc is not None else None
        check_features(t, n_features)
        if self._acc is not None and self._dtype is not None and t.dtype != self._dtype:
            t = t.to(self._dtype)
        dev = self._target_device(t) if self._acc is None else self._acc_device()
        if self._acc is None:
            self._acc = self._new_accumulator(t.shape[1], dev, t.dtype)
            self._numpy = _is_numpy(X)
            self._dtype = t.dtype
        acc = make_room(self._acc, t.shape[0], self.solver, self.n_components)
        acc.update(t.to(dev), check_finite=False)  # already checked above
        self._acc = acc
        self._subspace = None  # solved lazily on first use
        return self

    def _acc_device(self) -> torch.device:
        acc = self._acc
        return acc.rows.device if isinstance(acc, GramAccumulator) else acc.mean.device

    def _new_accumulator(self, d: int, device: torch.device, dtype: torch.dtype):
        if self.solver == "covariance":
            return CovarianceAccumulator(d, device=device)
        return GramAccumulator(d, device=device, dtype=dtype)

    @property
    def subspace_(self) -> Subspace:
        """The fitted ``Subspace`` module (solving the streaming statistics on first access)."""
        if self._subspace is None:
            if self._acc is None:
                raise ValueError("this PCA is not fitted yet; call fit(X) or partial_fit(X) first")
            self._subspace = fit_accumulator(self._acc, self.n_components, dtype=self._dtype or torch.float32)
        return self._subspace

    # ----------------------------------------------------------------------------------------------- scoring
    def _scoring_input(self, X: Any, name: str = "X") -> Tensor:
        sub = self.subspace_
        t = check_features(self._to_tensor(X, name), sub.n_features, name=name)
        return t.to(sub.components.device)

    def transform(self, X: Any) -> Any:
        """Subspace coordinates, (N, D) -> (N, k)."""
        return self._out(self.subspace_.project(self._scoring_input(X)), X)

    def inverse_transform(self, Z: Any) -> Any:
        """Back to feature space, (N, k) -> (N, D)."""
        sub = self.subspace_
        t = self._to_tensor(Z, "Z")
        if t.ndim != 2 or t.shape[1] != sub.n_components:
            raise ValueError(f"Z must have shape (N, {sub.n_components}), got {tuple(t.shape)}")
        return self._out(sub.inverse(t.to(sub.components.device)), Z)

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    def reconstruction_error(self, X: Any) -> Any:
        """Feature reconstruction error per row, ``||(x - mean) - P(x - mean)||^2``: (N, D) -> (N,)."""
        return self._out(self.subspace_.fre(self._scoring_input(X)), X)

    def error_map(self, X: Any) -> Any:
        """Per-element squared reconstruction error, (N, D) -> (N, D)."""
        return self._out(self.subspace_.error_map(self._scoring_input(X)), X)

    # ----------------------------------------------------------------------------------------------- attributes
    @property
    def components_(self) -> Any:
        return self._attr(self.subspace_.components)

    @property
    def mean_(self) -> Any:
        sub = self.subspace_
        return self._attr(sub.mean.to(sub.components.dtype))

    @property
    def explained_variance_(self) -> Any:
        return self._attr(self.subspace_.explained_variance)

    @property
    def explained_variance_ratio_(self) -> Any:
        return self._attr(self.subspace_.explained_variance_ratio)

    @property
    def singular_values_(self) -> Any:
        return self._attr(self.subspace_.singular_values)

    @property
    def n_components_(self) -> int:
        return self.subspace_.n_components

    @property
    def n_samples_seen_(self) -> int:
        return int(self.subspace_.n_samples)

    @property
    def n_features_in_(self) -> int:
        return self.subspace_.n_features

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor]:
        """The fitted ``Subspace`` buffers (save with ``torch.save``; load with ``weights_only=True``)."""
        return self.subspace_.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> PCA:
        """Restore a fitted model from ``state_dict()``; the result scores exactly as the saved one."""
        sub = Subspace()
        sub.load_state_dict(state)
        if self.device is not None:
            sub = sub.to(self.device)
        self._subspace, self._acc = sub, None
        self._dtype = sub.components.dtype
        return self

    def to(self, device: torch.device | str) -> PCA:
        """Move the fitted model (and any streaming statistics) to ``device``."""
        self.device = _resolve_device(device)
        if self._subspace is not None:
            self._subspace = self._subspace.to(self.device)
        if self._acc is not None:
            if hasattr(self._acc, "flush"):  # a summary's waiting rows are not buffers: absorb them first
                self._acc.flush()
            self._acc = self._acc.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"PCA(n_components={self.n_components!r}, device={self.device}, solver={self.solver!r})"
