"""Linear autoencoders trained by gradient descent: the reference's trained alternative to PCA (REFERENCE.md step 7).

Two maps of centred features ``xc = x - mean``, ``x: (B, D)``:

- tied (``tied=True``, mode ``'tae'``): ``x_hat = mean + (xc W) W^T`` with ``W: (D, k)``.
- untied (``tied=False``, mode ``'ae'``): ``x_hat = mean + (xc W_enc) W_dec`` with ``W_enc: (D, k)``,
  ``W_dec: (k, D)``.

The loss is the feature reconstruction error. Its global minimisers span the top-k principal subspace (Baldi and
Hornik, 1989): a tied AE's ``W W^T`` converges to the PCA projector and the untied decoder's rows span the same
subspace (the encoder is only determined up to an invertible k x k map). So at convergence the training FRE equals
PCA's; these models exist for comparison and completeness, PCA (a closed-form float64 solve) stays the default.
One difference remains on new rows: with N < D the data say nothing about the untied encoder off the span of the
training rows, and Adam's per-coordinate steps leave it non-zero there, so an untied AE's held-out FRE runs a
little above PCA's (measured on bottle features: +1 to 2 %); the tied AE's constraint removes that freedom.

Training (``LinearAutoencoder.fit``):

- Adam (the reference's optimiser), full batch by default: N is 60..700 images per category, so one step over all
  rows is a few (N, D) x (D, k) products, and full-batch steps make the loss curve smooth and the stop test reliable.
  ``batch_size`` switches to mini-batches (a seeded permutation per epoch).
- Loss = sum of squared residuals / sum of squared centred inputs of the batch's share of the data, i.e. the
  fraction of variance left unexplained (the PCA optimum at 0.97 is ~0.03). Dividing by the data's energy makes the
  loss, the learning rate and the stop tolerance independent of the features' scale.
- Learning rate ``0.2 / sqrt(D)`` by default (``default_lr``): Adam moves every weight by about ``lr`` a step, and
  a unit column's entries are ~``1 / sqrt(D)``, so this is one fixed fraction of them whatever D (3e-3 at
  D = 5,488).
- Cosine learning-rate decay from ``lr`` to ``lr / 100`` over ``steps``: a constant-rate Adam keeps jittering about
  the optimum (measured on bottle features: the loss hovered ~1 % above PCA's); the decay lets it settle.
- Stop: every ``check_every`` steps the mean loss of that window is compared with the previous window's; the run
  ends when it changed by less than ``tol`` (relative), else after ``steps``. This is the only host sync of the loop
  (one per window, documented); the per-step losses stay on the device.
- Initialisation: seeded small random weights, ``N(0, init_scale^2 / D)`` per entry -- never from the PCA solution.
- Precision: training and scoring in float32 (float64 when the rows are float64); mean, spectrum, total and residual
  variance in float64.

The number of components ``k`` is chosen as PCA chooses it for the same rows (scikit-learn's rule on the float64
spectrum, from the N x N Gram matrix when N <= D, else the D x D scatter; eigenvalues only), so the three detector
modes compare at equal k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .precision import FIT_DTYPE, score_dtype_for
from .subspace import AdoptsBufferShapes, check_features, select_n_components

__all__ = ["LinearAutoencoder", "principal_angles", "DEFAULT_STEPS", "DEFAULT_LR_SCALE", "default_lr"]

NComponents = int | float | None

DEFAULT_STEPS = 2000  # bottle features stop on DEFAULT_TOL after 800..1,800 full-batch steps
# Adam moves each weight by about lr per step, and the entries of a unit-norm column of D entries are ~1/sqrt(D):
# the default lr is a fixed fraction of that, so it suits any D (3e-3 at D = 5,488, where 1e-2 overshoots;
# 0.025 at D = 64, where 3e-3 leaves the untied encoder far from converged after 2,000 steps).
DEFAULT_LR_SCALE = 0.2
DEFAULT_TOL = 1e-5  # relative change of the windowed mean loss
DEFAULT_CHECK_EVERY = 100
DEFAULT_INIT_SCALE = 0.1
_FINAL_LR_FRACTION = 0.01  # cosine decay floor, as a fraction of lr
_ROW_CHUNK = 1024  # rows per float64 residual pass after training


class LinearAutoencoder(AdoptsBufferShapes):
    """A linear autoencoder on feature vectors, with the same scoring API as ``Subspace``.

    Args:
        n_components: an int k in [1, min(N - 1, D)], a float in (0, 1) (PCA's explained-variance rule on the same
            rows, see ``fre_torch.core.subspace.select_n_components``) or None (min(N - 1, D)).
        tied: True = one weight matrix ``W`` (decoder ``W^T``); False = separate encoder and decoder.
        device: where the (empty) buffers start; ``fit`` trains on the rows' device and moves the model there.

    Buffers (in ``state_dict``, fitted by ``fit``):
        mean: (D,) float64, the training mean.
        encoder: (D, k) ``W`` (tied) or ``W_enc`` (untied), in the scoring dtype.
        decoder: (k, D) ``W_dec`` (untied only; a tied model has no such buffer: its decoder is ``encoder.T``).
        total_variance: () float64, ``||Xc||_F^2 / (N - 1)``, the sum of the training variances.
        residual_variance: () float64, ``||Xc - Xc_hat||_F^2 / (N - 1)``: the mean training FRE times
            ``N / (N - 1)``, in the units of PCA's left-out variance, so a converged AE gets PCA's score scale.
        train_loss: () float64, the final fraction of variance left unexplained (``residual / total``).
        n_steps: () int64, the optimiser steps taken.
        n_samples: () int64, N.

    ``load_state_dict`` adopts the incoming shapes, so ``LinearAutoencoder(tied=...).load_state_dict(sd)`` works.
    """

    mean: Tensor
    encoder: Tensor
    decoder: Tensor | None
    total_variance: Tensor
    residual_variance: Tensor
    train_loss: Tensor
    n_steps: Tensor
    n_samples: Tensor

    def __init__(self, n_components: NComponents = 0.97, *, tied: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(tied, bool):
            raise ValueError(f"tied must be True or False, got {tied!r}")
        # Range check of the request now (a bad value fails before any training), the data-dependent cap in fit.
        select_n_components(torch.ones(1), n_components, 2 ** 31 - 1, 2 ** 31 - 1)
        self.n_components = n_components
        self.tied = tied
        self.register_buffer("mean", torch.empty(0, dtype=FIT_DTYPE, device=device))
        self.register_buffer("encoder", torch.empty(0, 0, device=device))
        self.register_buffer("decoder", None if tied else torch.empty(0, 0, device=device))
        for name in ("total_variance", "residual_variance", "train_loss"):
            self.register_buffer(name, torch.zeros((), dtype=FIT_DTYPE, device=device))
        self.register_buffer("n_steps", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("n_samples", torch.zeros((), dtype=torch.int64, device=device))

    # ------------------------------------------------------------------------------------------------ shape
    @property
    def is_fitted(self) -> bool:
        return self.encoder.numel() > 0

    @property
    def n_features(self) -> int:
        return self.encoder.shape[0]

    @property
    def n_components_(self) -> int:
        """k, the fitted number of components."""
        return self.encoder.shape[1]

    def _decoder(self) -> Tensor:
        """(k, D) decoder: ``W^T`` for a tied model (a view, no copy)."""
        return self.encoder.T if self.tied else self.decoder

    def basis(self) -> Tensor:
        """(D, k) columns spanning the centred reconstructions (``W`` tied, ``W_dec^T`` untied); not orthonormal.

        Compare with PCA's ``components.T`` via ``principal_angles``.
        """
        self._check_fitted()
        return self._decoder().T

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("this LinearAutoencoder is not fitted yet; call fit(rows) or load_state_dict(...)")

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, rows: Tensor, *, steps: int = DEFAULT_STEPS, lr: float | None = None, batch_size: int | None = None,
            seed: int = 0, tol: float = DEFAULT_TOL, check_every: int = DEFAULT_CHECK_EVERY,
            init_scale: float = DEFAULT_INIT_SCALE) -> LinearAutoencoder:
        """Train on ``rows: (N, D)`` (not modified) on their device; deterministic for a given ``seed`` and device.

        Args:
            steps: the most optimiser steps (the cosine schedule's length).
            lr: Adam's initial learning rate (decays to ``lr / 100``); None = ``default_lr(D)``.
            batch_size: None = full batch; else rows per step, a seeded permutation per epoch.
            seed: seeds the initial weights and the mini-batch order.
            tol: stop when a window's mean loss changed by less than this fraction from the previous window's;
                0 = always run ``steps``.
            check_every: the window, in steps (one host sync per window).
            init_scale: initial weights are ``N(0, init_scale^2 / D)``.

        Returns:
            self, with the buffers set (on the rows' device).
        """
        _check_settings(steps, lr, batch_size, tol, check_every, init_scale)
        check_features(rows, name="training rows")  # one sync: NaN/Inf would poison every step
        n, d = rows.shape
        if n < 2:
            raise ValueError(f"need at least 2 training rows to fit an autoencoder, got {n}; add training images")
        lr = default_lr(d) if lr is None else lr
        dtype = score_dtype_for(rows.dtype)
        # Gradients are needed even when the caller runs under torch.inference_mode() (the detector's feature pass
        # does): leave it for the whole fit, so every tensor made here is an ordinary autograd-capable one.
        with torch.inference_mode(False), torch.enable_grad():
            rows64 = rows.to(FIT_DTYPE)
            mean = rows64.mean(dim=0)
            centred64 = rows64 - mean  # a new tensor: rows is untouched
            k = self._select_k(_spectrum(centred64), n, d)
            # Clamped: a constant training set has no energy; the loss is then 0 (not 0/0) and the weights stay put.
            total = centred64.square().sum().clamp_min(torch.finfo(FIT_DTYPE).tiny)
            xc = centred64.to(dtype)
            del rows64, centred64
            energy = total.to(dtype).clamp_min(torch.finfo(dtype).tiny)  # float64's tiny is 0 in float32
            weights, taken = self._train(xc, k, energy, steps=steps, lr=lr, batch_size=batch_size,
                                         seed=seed, tol=tol, check_every=check_every, init_scale=init_scale)
        self.encoder = weights[0]
        if not self.tied:
            self.decoder = weights[1]
        self.mean = mean
        self.total_variance = total / (n - 1)
        self.residual_variance = self._residual_energy(xc) / (n - 1)
        self.train_loss = self.residual_variance / self.total_variance
        self.n_steps = torch.tensor(taken, dtype=torch.int64, device=rows.device)
        self.n_samples = torch.tensor(n, dtype=torch.int64, device=rows.device)
        return self

    def _train(self, xc: Tensor, k: int, energy: Tensor, *, steps: int, lr: float, batch_size: int | None,
               seed: int, tol: float, check_every: int, init_scale: float) -> tuple[list[Tensor], int]:
        """Adam on centred rows ``xc: (N, D)`` whose total energy ``||xc||_F^2`` is ``energy`` (0-dim, xc's dtype).

        Returns the trained weights (``[W]`` or ``[W_enc, W_dec]``, detached) and the number of steps taken.
        """
        n, d = xc.shape
        device, dtype = xc.device, xc.dtype
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        # Initial weights drawn on the CPU from one generator: the same seed gives the same start on every device.
        std = init_scale / math.sqrt(d)
        params = [(torch.randn(d, k, generator=gen, dtype=FIT_DTYPE) * std).to(device, dtype).requires_grad_()]
        if not self.tied:
            params.append((torch.randn(k, d, generator=gen, dtype=FIT_DTYPE) * std).to(device, dtype).requires_grad_())
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * _FINAL_LR_FRACTION)

        window = torch.zeros((), dtype=FIT_DTYPE, device=device)  # sum of this window's losses, kept on the device
        previous = math.inf
        taken = 0
        for batch in _batches(n, batch_size, steps, gen, device):
            x = xc if batch is None else xc.index_select(0, batch)
            share = 1.0 if batch is None else batch.shape[0] / n  # the loss divides by the batch's share of energy
            z = x @ params[0]  # (B, k)
            recon = z @ (params[0].T if self.tied else params[1])  # (B, D)
            loss = (x - recon).square().sum() / (energy * share)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            taken += 1
            window += loss.detach()
            if taken % check_every == 0:
                current = float(window) / check_every  # the one host sync per window
                window.zero_()
                if tol > 0 and abs(previous - current) <= tol * current:
                    break
                previous = current
        return [p.detach() for p in params], taken

    def _select_k(self, spectrum: Tensor, n: int, d: int) -> int:
        """k as PCA picks it for the same rows; at most N - 1 (a centred set of N rows spans N - 1 directions)."""
        limit = min(n - 1, d)
        req = self.n_components
        if isinstance(req, int) and not isinstance(req, bool) and req > limit:
            raise ValueError(f"n_components={req} exceeds min(N - 1, D) = {limit} for {n} rows of {d} features "
                             "(N centred rows span at most N - 1 directions); use a smaller int, a fraction such as "
                             "0.97, or more training images")
        return min(select_n_components(spectrum, req, n, d), limit)

    def _residual_energy(self, xc: Tensor) -> Tensor:
        """``||xc - xc_hat||_F^2`` of the centred training rows ``xc: (N, D)``, float64 sums over row chunks."""
        out = torch.zeros((), dtype=FIT_DTYPE, device=xc.device)
        enc, dec = self.encoder, self._decoder()
        for start in range(0, xc.shape[0], _ROW_CHUNK):
            x = xc[start:start + _ROW_CHUNK]
            out += (x - (x @ enc) @ dec).square().sum(dim=1, dtype=FIT_DTYPE).sum()
        return out

    # ------------------------------------------------------------------------------------------------ scoring
    def _centred(self, x: Tensor) -> Tensor:
        """(B, D) -> a fresh centred copy in the scoring dtype (never a view of the input)."""
        self._check_fitted()
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (N, {self.n_features}), got {tuple(x.shape)}")
        return x.to(self.encoder.dtype) - self.mean.to(self.encoder.dtype)

    def project(self, x: Tensor) -> Tensor:
        """Codes ``(x - mean) W_enc``, (B, D) -> (B, k)."""
        return self._centred(x) @ self.encoder

    def reconstruct(self, x: Tensor) -> Tensor:
        """``mean + ((x - mean) W_enc) W_dec``, (B, D) -> (B, D)."""
        z = self.project(x)
        return torch.addmm(self.mean.to(z.dtype), z, self._decoder())

    def residual(self, x: Tensor) -> Tensor:
        """``(x - mean) - ((x - mean) W_enc) W_dec``, (B, D) -> (B, D)."""
        r = self._centred(x)
        z = r @ self.encoder
        return r.addmm_(z, self._decoder(), alpha=-1)  # in place on our own temporary, not on x

    def error_map(self, x: Tensor) -> Tensor:
        """Per-element squared reconstruction error, (B, D) -> (B, D) (reshape to (B, C, H, W) for maps)."""
        return self.residual(x).square_()

    def fre(self, x: Tensor) -> Tensor:
        """Feature reconstruction error per row, (B, D) -> (B,), from the explicit residual.

        No ``||x||^2 - ||z||^2`` shortcut as in ``Subspace.fre``: that needs orthonormal weights, which a trained
        model only approaches.
        """
        return self.error_map(x).sum(dim=1)

    forward = fre

    def extra_repr(self) -> str:
        k = self.n_components_ if self.is_fitted else None
        return f"n_components={self.n_components!r}, tied={self.tied}, k={k}"


def default_lr(n_features: int) -> float:
    """Adam's default initial learning rate for D features: ``DEFAULT_LR_SCALE / sqrt(D)``."""
    return DEFAULT_LR_SCALE / math.sqrt(n_features)


def _check_settings(steps: int, lr: float | None, batch_size: int | None, tol: float, check_every: int,
                    init_scale: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be None (the default, 0.2 / sqrt(D)) or a positive number, got {lr!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (full batch) or an int >= 1, got {batch_size!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0 (0 = run all steps), got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")


def _batches(n: int, batch_size: int | None, steps: int, gen: torch.Generator,
             device: torch.device) -> Iterator[Tensor | None]:
    """``steps`` batches of row indices: None (all rows) for full batch, else seeded permutations chunked."""
    if batch_size is None or batch_size >= n:
        for _ in range(steps):
            yield None
        return
    taken = 0
    while True:
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]
            taken += 1
            if taken == steps:
                return


def _spectrum(centred: Tensor) -> Tensor:
    """Descending variances of centred float64 rows ``(N, D)`` -> (min(N, D),): eigenvalues of the smaller of the
    N x N Gram and the D x D scatter (the same non-zero spectrum), divided by N - 1."""
    n, d = centred.shape
    m = centred @ centred.T if n <= d else centred.T @ centred
    return torch.linalg.eigvalsh(m).flip(0).clamp_min(0.0) / (n - 1)


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles between the column spaces of ``a: (D, p)`` and ``b: (D, q)``, ascending radians, float64,
    shape ``(min(p, q),)``.

    Orthonormal bases by QR in float64; cosines from the singular values of ``Qa^T Qb`` and sines from those of
    ``Qb - Qa (Qa^T Qb)`` (for p >= q). The sine is used for angles below 45 degrees, where ``arccos`` of a
    cosine near 1 would lose half the digits (Knyazev and Argentati, 2002).
    """
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[1] == 0:
            raise ValueError(f"{name} must be a 2-D tensor (D, k) with k >= 1 columns, got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows D, got {a.shape[0]} and {b.shape[0]}")
    if max(a.shape[1], b.shape[1]) > a.shape[0]:
        raise ValueError(f"more columns than rows ({a.shape[1]} and {b.shape[1]} columns, D = {a.shape[0]}): the "
                         "columns cannot be independent; pass bases of at most D columns")
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    qa, qb = _orthonormal(a.to(FIT_DTYPE), "a"), _orthonormal(b.to(FIT_DTYPE), "b")
    cross = qa.T @ qb  # (p, q)
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending -> ascending angles
    sin = torch.linalg.svdvals(qb - qa @ cross).clamp(0.0, 1.0).flip(0)  # ascending
    small = sin < math.sqrt(0.5)
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def _orthonormal(m: Tensor, name: str) -> Tensor:
    """Q of a reduced QR, ``ValueError`` when the columns are (numerically) linearly dependent."""
    q, r = torch.linalg.qr(m)
    diag = r.diagonal().abs()
    if not bool(torch.isfinite(diag).all()) or bool(diag.min() <= diag.max() * max(m.shape) * torch.finfo(m.dtype).eps):
        raise ValueError(f"the columns of {name} are linearly dependent (or not finite); pass a full-rank basis")
    return q
