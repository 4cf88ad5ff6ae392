"""How far a threshold set on held-out normal images can be trusted: the statistics behind ``fit``'s promise.

A threshold at the ``q`` quantile of ``n`` held-out normal scores promises that about ``1 - q`` of new normal images
score above it. With few held-out images that promise is loose: at ``n = 42`` and ``q = 0.99`` the quantile lies
between the two largest scores, and the fraction of new normal images above it can be anywhere from a fraction of
a percent to about ten percent.

The interval is exact and needs no assumption about the score distribution (only that it is continuous and the
held-out images are a random sample of normal ones): if ``k`` of the ``n`` held-out scores lie above the
threshold, the threshold sits between the order statistics ``X_(n-k)`` and ``X_(n-k+1)``, and the probability mass
above an order statistic ``X_(r)`` follows ``Beta(n - r + 1, r)``. So the rate of new normal images flagged lies,
with 95 % probability, between the 2.5 % quantile of ``Beta(k, n - k + 1)`` and the 97.5 % quantile of
``Beta(k + 1, n - k)``. Beta quantiles come from the identity ``P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a)``
(integer ``a, b``), evaluated in log space with torch and inverted by bisection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MIN_RELIABLE_HELD_OUT", "ThresholdStats", "beta_quantile", "held_out_needed", "threshold_stats"]

# Below this many held-out images (or fewer than 1 / (1 - q)), fit warns that the false-positive rate is uncertain.
MIN_RELIABLE_HELD_OUT = 100
_LEVEL = 0.95
_TARGET_FACTOR = 2.0  # "reliable": the interval's upper end at most twice the promised rate 1 - q


def _beta_cdf(x: float, a: int, b: int) -> float:
    """``P(Beta(a, b) <= x)`` for integers ``a, b >= 1`` (the binomial tail identity), float64. The shorter of the
    two binomial tails is summed: O(min(a, b)) terms, so large held-out sets stay cheap."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    m = a + b - 1
    upper = a - 1 >= m - a  # P(Bin >= a) has fewer terms than its complement P(Bin <= a - 1)
    j = torch.arange(a, m + 1, dtype=torch.float64) if upper else torch.arange(0, a, dtype=torch.float64)
    log_pmf = (math.lgamma(m + 1) - torch.lgamma(j + 1) - torch.lgamma(m - j + 1)
               + j * math.log(x) + (m - j) * math.log1p(-x))
    tail = float(torch.logsumexp(log_pmf, dim=0).exp())
    return min(max(tail if upper else 1.0 - tail, 0.0), 1.0)


def beta_quantile(p: float, a: int, b: int) -> float:
    """The ``p`` quantile of ``Beta(a, b)`` for integers ``a, b >= 1``, to about 1e-12 (bisection)."""
    if not (a >= 1 and b >= 1):
        raise ValueError(f"beta_quantile needs integer a, b >= 1, got a={a}, b={b}")
    lo, hi = 0.0, 1.0
    for _ in range(45):
        mid = 0.5 * (lo + hi)
        if _beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _rate_interval(n: int, k: int) -> tuple[float, float]:
    """95 % interval of the flagged rate on new normal images when ``k`` of ``n`` held-out scores are above."""
    tail = (1.0 - _LEVEL) / 2
    low = 0.0 if k == 0 else beta_quantile(tail, k, n - k + 1)
    high = 1.0 if k >= n else beta_quantile(1.0 - tail, k + 1, n - k)
    return low, high


def _above(n: int, quantile: float) -> int:
    """How many of ``n`` held-out scores lie strictly above their linear-interpolation ``quantile`` (ties aside):
    the quantile sits at 0-based position ``quantile * (n - 1)``."""
    return n - 1 - math.floor(quantile * (n - 1))


def held_out_needed(quantile: float) -> int:
    """The fewest held-out images for which the 95 % interval's upper end is at most twice ``1 - quantile``."""
    target = _TARGET_FACTOR * (1.0 - quantile)
    lo, hi = 2, 2
    while _rate_interval(hi, _above(hi, quantile))[1] > target:
        lo, hi = hi, hi * 2
        if hi > 10_000_000:
            return hi
    while lo < hi:  # the upper end shrinks with n up to the small steps of the floor: bisection is close enough
        mid = (lo + hi) // 2
        if _rate_interval(mid, _above(mid, quantile))[1] > target:
            lo = mid + 1
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class ThresholdStats:
    """What a held-out threshold promises, and how firmly.

    Attributes:
        n_held_out: held-out normal images the threshold was set on.
        quantile: the quantile asked for (``--quantile``).
        rank: 1-based rank (ascending) of the held-out score just below or at the threshold; the threshold lies
            between the ``rank``-th and the next held-out score (``rank == n_held_out``: at or above the largest).
        held_out_flagged: held-out images scoring above the threshold.
        held_out_rate: ``held_out_flagged / n_held_out``, the false-positive rate on the held-out images.
        rate_low / rate_high: 95 % interval of the rate at which new normal images will be flagged.
        reliable: ``n_held_out`` is at least ``MIN_RELIABLE_HELD_OUT`` and ``1 / (1 - quantile)``.
        held_out_needed: held-out images for which ``rate_high <= 2 * (1 - quantile)``.
    """

    n_held_out: int
    quantile: float
    rank: int
    held_out_flagged: int
    held_out_rate: float
    rate_low: float
    rate_high: float
    reliable: bool
    held_out_needed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the threshold's place among the held-out scores and the rate it implies."""
        n = self.n_held_out
        place = (f"above all {n}" if self.rank >= n else
                 f"between the {_ordinal(self.rank)} and {_ordinal(self.rank + 1)} of {n} held-out scores")
        return (f"{place}; it flags {self.held_out_flagged} of the {n} held-out images "
                f"({100 * self.held_out_rate:.1f} %); on new normal images expect "
                f"{_percent(self.rate_low)}-{_percent(self.rate_high)} flagged (95 % interval)")

    def warning(self, holdout: float | None = None) -> str | None:
        """A warning when the held-out set is too small for the rate to be trusted, else None."""
        if self.reliable:
            return None
        need = self.held_out_needed
        total = "" if not holdout else f", about {math.ceil(need / holdout):,} normal images at --holdout {holdout:g}"
        return (f"only {self.n_held_out} held-out images: the false-positive rate of this threshold is uncertain "
                f"({_percent(self.rate_low)}-{_percent(self.rate_high)} instead of the {_percent(1 - self.quantile)} "
                f"asked for). About {need:,} held-out images{total}, would bound it within "
                f"{_TARGET_FACTOR:g}x of {_percent(1 - self.quantile)}")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _percent(rate: float) -> str:
    value = 100 * rate
    return f"{value:.2g} %" if value < 1 else f"{value:.1f} %"


def threshold_stats(sorted_scores: Tensor, threshold: float, quantile: float) -> ThresholdStats:
    """The statistics of a threshold set at ``quantile`` of held-out scores.

    Args:
        sorted_scores: ``(n,)`` held-out normal scores, ascending (``FREDetector.calibration_scores``).
        threshold: the threshold set from them.
        quantile: the quantile it was set at, in (0, 1).

    Returns:
        ``ThresholdStats``; the counts are taken from the scores themselves, so ties are handled exactly.
    """
    n = int(sorted_scores.numel())
    if n < 1:
        raise ValueError("no held-out scores: this detector has no calibration")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    scores = sorted_scores.detach().double().cpu()
    flagged = int((scores > threshold).sum())
    rank = n - flagged
    low, high = _rate_interval(n, flagged)
    reliable = n >= max(MIN_RELIABLE_HELD_OUT, math.ceil(1.0 / (1.0 - quantile)))
    return ThresholdStats(n_held_out=n, quantile=float(quantile), rank=rank, held_out_flagged=flagged,
                          held_out_rate=flagged / n, rate_low=low, rate_high=high, reliable=reliable,
                          held_out_needed=held_out_needed(quantile))
