"""The default rule (``n_components='auto'``) and the fixed-size summary it is fitted from (``SketchAccumulator``),
against float64 SVDs: exact while N <= rank + 1, the same top subspace beyond, mergeable, and updatable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fre_torch.core.sketch import SketchAccumulator, fit_sketch
from fre_torch.core.subspace import (AUTO_MAX_COMPONENTS, AUTO_MIN_SHARE, AUTO_VARIANCE, SKETCH_RANK, Subspace,
                                     fit_gram, make_room, new_accumulator, select_n_components)


def _rows(n: int, d: int, *, rank: int = 12, noise: float = 0.05, seed: int = 0,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -0.5, rank, dtype=torch.float64)
    signal = (torch.randn(n, rank, generator=g, dtype=torch.float64) * scales) @ torch.randn(
        rank, d, generator=g, dtype=torch.float64) / d ** 0.5
    return (signal + noise * torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0).to(dtype)


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 reference: mean, singular values and right singular vectors of the centred rows."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, s, vh


def _reference_auto(variance: np.ndarray, total: float) -> int:
    """The rule written out in numpy from its definition."""
    share = variance / total
    k_variance = int(np.searchsorted(np.cumsum(share), AUTO_VARIANCE, side="right")) + 1
    k_floor = int((share >= AUTO_MIN_SHARE).sum())
    return max(1, min(k_variance, k_floor, AUTO_MAX_COMPONENTS, len(variance)))


@pytest.mark.parametrize("case", ["variance", "floor", "cap"])
def test_auto_rule_each_term_binds_where_it_should(case: str) -> None:
    if case == "variance":  # a steep spectrum: 97 % is reached after a few components
        ev = np.geomspace(1.0, 1e-6, 300)
    elif case == "floor":  # a flat tail of 1000 components each under 1/4096 of the total
        ev = np.concatenate([np.geomspace(10.0, 1.0, 40), np.full(1000, 0.01)])
    else:  # 400 components of equal share, each above the floor: only the cap stops them
        ev = np.full(400, 1.0)
    k = select_n_components(torch.tensor(ev), "auto", 10_000, 50_000)
    assert k == _reference_auto(ev, ev.sum())
    share = ev / ev.sum()
    expected = {"variance": int(np.searchsorted(np.cumsum(share), AUTO_VARIANCE, side="right")) + 1,
                "floor": int((share >= AUTO_MIN_SHARE).sum()), "cap": AUTO_MAX_COMPONENTS}[case]
    assert k == expected
    # a sketch's partial spectrum is judged against the whole variance it was given
    assert select_n_components(torch.tensor(ev[:50]), "auto", 10_000, 50_000, total=ev.sum()) == \
        _reference_auto(ev[:50], ev.sum())


def test_auto_rule_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="'auto'"):
        select_n_components(torch.ones(3), "mle", 10, 10)


@pytest.mark.parametrize("batch", [7, 64, 200])
def test_sketch_is_exact_while_rows_fit(batch: int) -> None:
    x = _rows(150, 300)
    acc = SketchAccumulator(300, rank=160, dtype=torch.float64)
    for b in x.split(batch):
        acc.update(b)
    acc.flush()
    mean, s, vh = _svd(x)
    r = acc.singular_values.numel()
    assert acc.is_exact and r == 149  # the centred span of 150 rows
    torch.testing.assert_close(acc.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(acc.singular_values, s[:r], rtol=1e-10, atol=1e-10 * float(s[0]))
    torch.testing.assert_close(acc.scatter_trace, (x - mean).square().sum(), rtol=1e-12, atol=0)
    # the same directions (up to sign) wherever the singular values are distinct
    cos = (acc.directions[:20] * vh[:20]).sum(1).abs()
    assert float((cos - 1).abs().max()) < 1e-8


def test_sketch_beyond_its_rank_keeps_the_top_subspace() -> None:
    x = _rows(900, 400, rank=12, noise=0.02, seed=1)
    acc = SketchAccumulator(400, rank=64, dtype=torch.float64)
    for b in x.split(50):
        acc.update(b)
    assert not acc.is_exact and acc.directions.shape[0] == 64
    mean, s, vh = _svd(x)
    # the exact mean and total variance are kept whatever was truncated
    torch.testing.assert_close(acc.mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(acc.scatter_trace, s.square().sum(), rtol=1e-10, atol=0)
    # the top 12 directions span the exact ones: every principal angle below 5e-4 rad
    angles = torch.linalg.svdvals(acc.directions[:12] @ vh[:12].T)
    assert float(angles.min()) > 1 - 1e-7
    sub, exact = fit_sketch(acc, 12), fit_gram(x, 12)
    test = _rows(40, 400, rank=12, noise=0.02, seed=2)
    rel = (sub.fre(test, exact=True) - exact.fre(test, exact=True)).abs() / exact.fre(test, exact=True)
    assert float(rel.max()) < 1e-4


def test_merged_summaries_equal_one_stream() -> None:
    x = _rows(120, 250)
    one = SketchAccumulator(250, rank=128, dtype=torch.float64)
    one.update(x)
    a, b = (SketchAccumulator(250, rank=128, dtype=torch.float64) for _ in range(2))
    a.update(x[:70])
    b.update(x[70:])
    merged = a.merge(b).flush()
    one.flush()
    assert merged._count == 120 and int(merged.n_samples) == 120
    torch.testing.assert_close(merged.mean, one.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.singular_values, one.singular_values, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(merged.directions.abs(), one.directions.abs(), rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_the_same_stream() -> None:
    x = _rows(200, 300, dtype=torch.float32)
    first = SketchAccumulator(300, rank=64)
    first.update(x[:130])
    state = first.flush().state_dict()
    restored = SketchAccumulator(300, rank=64)
    restored.load_state_dict(state)
    for acc in (first, restored):
        acc.update(x[130:]).flush()
    assert restored._count == 200
    assert torch.equal(restored.directions, first.directions)
    assert torch.equal(restored.singular_values, first.singular_values)


def test_a_fitted_subspace_takes_new_rows_as_a_fit_on_all() -> None:
    x = _rows(300, 700, rank=30, noise=0.1, seed=3, dtype=torch.float32)
    old = fit_gram(x[:180], "auto")
    assert old.has_summary and old.n_components + old.tail_components.shape[0] == 179
    acc = SketchAccumulator.from_subspace(old)
    acc.update(x[180:])
    updated, full = fit_sketch(acc, "auto"), fit_gram(x, "auto")
    assert updated.n_components == full.n_components
    test = _rows(30, 700, rank=30, noise=0.1, seed=4, dtype=torch.float32)
    rel = (updated.fre(test) - full.fre(test)).abs() / full.fre(test)
    assert float(rel.max()) < 1e-4
    torch.testing.assert_close(updated.total_variance, full.total_variance, rtol=1e-9, atol=0)


def test_fixed_rules_keep_no_summary_and_older_states_load_without_one() -> None:
    x = _rows(60, 100, dtype=torch.float32)
    plain = fit_gram(x, 0.97)
    assert not plain.has_summary and plain.tail_components.shape == (0, 100)
    with pytest.raises(ValueError, match="n_components='auto'"):
        SketchAccumulator.from_subspace(plain)
    state = {k: v for k, v in fit_gram(x, "auto").state_dict().items()
             if k not in ("tail_components", "tail_singular_values", "summary_rank")}  # as version 3 wrote it
    old = Subspace()
    old.load_state_dict(state)
    assert not old.has_summary
    torch.testing.assert_close(old.fre(x), fit_gram(x, "auto").fre(x))


def test_the_default_fit_switches_to_the_summary_past_its_rank() -> None:
    d = SKETCH_RANK + 88
    acc = new_accumulator(d, None, "auto", "auto")
    x = _rows(SKETCH_RANK + 40, d, dtype=torch.float32)
    for b in x.split(100):
        acc = make_room(acc, b.shape[0], "auto", "auto").update(b)
    assert type(acc).__name__ == "SketchAccumulator"
    sub = fit_sketch(acc, "auto")
    assert sub.n_components <= AUTO_MAX_COMPONENTS and sub.has_summary
    assert sub.n_components + sub.tail_components.shape[0] <= SKETCH_RANK
    # known in advance: straight to the summary; the reference's rule never summarises
    assert type(new_accumulator(d, 10_000, "auto", "auto")).__name__ == "SketchAccumulator"
    assert type(new_accumulator(d, 10_000, "auto", 0.97)).__name__ == "CovarianceAccumulator"


def test_nan_rows_are_named() -> None:
    acc = SketchAccumulator(20, rank=4)
    bad = torch.ones(6, 20)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(bad, check_finite=False)


def test_pca_streams_auto_into_a_bounded_summary() -> None:
    from fre_torch import PCA

    d = SKETCH_RANK + 88
    x = _rows(SKETCH_RANK + 150, d, rank=20, noise=0.01, seed=5, dtype=torch.float32)
    stream = PCA(n_components="auto")
    for b in x.split(64):
        stream.partial_fit(b)
    exact = PCA(n_components="auto").fit(x)
    assert type(stream._acc).__name__ == "SketchAccumulator"
    assert stream.n_components_ == exact.n_components_ <= AUTO_MAX_COMPONENTS
    test = _rows(20, d, rank=20, noise=0.01, seed=6, dtype=torch.float32)
    rel = (stream.reconstruction_error(test) - exact.reconstruction_error(test)).abs() / \
        exact.reconstruction_error(test)
    assert float(rel.max()) < 1e-3


def test_cross_fitting_many_images_keeps_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """``evaluate``'s cross-fit (heatmaps, report) past CROSS_FIT_IMAGES images keeps only the sampled images'
    rows: exactly the features of the bottom-k images, in image order; the fit itself is the fit on all images."""
    import fre_torch.jobs.crossfit as crossfit
    from fre_torch import DetectorConfig, FREDetector
    from fre_torch.detection.folds import sample_keys

    assert crossfit.CROSS_FIT_IMAGES == 1024  # the dev sets (666 images at most) keep every image
    monkeypatch.setattr(crossfit, "CROSS_FIT_IMAGES", 12)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (30, 3, 64, 64), dtype=torch.uint8, generator=g)
    det = FREDetector(DetectorConfig(input_size=64))
    rows = crossfit.fit_keeping_rows(det, images, batch_size=8)
    chosen = sample_keys(torch.arange(30)).topk(12, largest=False).indices.sort().values
    assert all(torch.equal(a, b) for a, b in zip(rows, det.features(images[chosen]), strict=True))
    assert rows.grams == [None] * len(rows)
    full = FREDetector(DetectorConfig(input_size=64)).fit(images, batch_size=8)
    assert torch.equal(full.score(images[:4]), det.score(images[:4]))
    result = crossfit.cross_fit(det, rows=rows)
    assert result.scores.shape == (12,) and result.folds == 5 and result.map_scale > 0
