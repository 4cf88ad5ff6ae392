"""The statistics behind the held-out threshold: Beta quantiles against scipy, counts and interval on constructed
scores, the warning rule, and what fit stores in the model file."""

from __future__ import annotations

import math

import pytest
import torch

from fre_torch.detection.threshold import MIN_RELIABLE_HELD_OUT, beta_quantile, held_out_needed, threshold_stats

beta = pytest.importorskip("scipy.stats", reason="scipy (installed with scikit-learn by requirements.txt) is the "
                                                 "reference for Beta quantiles; pip install scipy").beta


@pytest.mark.parametrize("a,b", [(1, 42), (2, 41), (11, 990), (5, 3), (990, 11), (40, 40), (1, 1)])
@pytest.mark.parametrize("p", [0.025, 0.5, 0.975])
def test_beta_quantile_matches_scipy(a: int, b: int, p: float) -> None:
    assert beta_quantile(p, a, b) == pytest.approx(float(beta.ppf(p, a, b)), abs=1e-9)


def test_stats_on_constructed_scores() -> None:
    # 42 held-out scores 1..42; the 0.99 quantile (linear) is 41.59: one score above it.
    scores = torch.arange(1, 43, dtype=torch.float32)
    t = float(torch.quantile(scores, 0.99))
    s = threshold_stats(scores, t, 0.99)
    assert (s.n_held_out, s.rank, s.held_out_flagged) == (42, 41, 1)
    assert s.held_out_rate == pytest.approx(1 / 42)
    # the rate above an order statistic X_(r) of n is Beta(n - r + 1, r): X_(42) and X_(41) bracket the threshold
    assert s.rate_low == pytest.approx(float(beta.ppf(0.025, 1, 42)), abs=1e-9)
    assert s.rate_high == pytest.approx(float(beta.ppf(0.975, 2, 41)), abs=1e-9)
    assert not s.reliable and "only 42 held-out images" in s.warning(0.2)
    assert "between the 41st and 42nd of 42 held-out scores" in s.summary()
    # ties at the threshold are not above it
    tied = threshold_stats(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2.0, 0.5)
    assert (tied.rank, tied.held_out_flagged) == (4, 0) and tied.rate_low == 0.0


def test_reliable_and_needed() -> None:
    n = held_out_needed(0.99)
    scores = torch.sort(torch.randn(n, generator=torch.Generator().manual_seed(0))).values
    s = threshold_stats(scores, float(torch.quantile(scores, 0.99)), 0.99)
    assert s.reliable and s.warning() is None and s.rate_high <= 2 * 0.01 + 1e-12
    assert 500 < n < 2000  # about 10 held-out images above the 0.99 quantile
    small = threshold_stats(scores[:MIN_RELIABLE_HELD_OUT - 1], 0.0, 0.99)
    assert not small.reliable
    assert held_out_needed(0.95) < n and held_out_needed(0.5) == 2
    assert threshold_stats(scores[:MIN_RELIABLE_HELD_OUT], 0.0, 0.9).reliable  # 100 >= 1 / (1 - 0.9)
    assert not threshold_stats(scores[:MIN_RELIABLE_HELD_OUT], 0.0, 0.999).reliable  # 100 < 1,000
    assert math.isclose(small.held_out_rate, small.held_out_flagged / small.n_held_out)
