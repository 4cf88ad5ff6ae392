"""pytest-benchmark suite for the head: fre_torch and scikit-learn on the same arrays, side by side.

    python -m pytest benchmarks/test_bench_head.py --benchmark-group-by=param:shape

Groups pair the two implementations per shape; the ratio is the `Mean` column of one over the other. The full grid
with peak memory and the streaming case is `python -m benchmarks.run_head` (see BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import low_rank_features

sklearn = pytest.importorskip("sklearn.decomposition")

SHAPES = [(400, 4096), (400, 16384), (100, 65536), (400, 65536)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def shape(request):
    n, d = request.param
    return n, d, low_rank_features(n, d), low_rank_features(400, d, seed=1)


def test_fit_fre_torch(benchmark, shape):
    from fre_torch import PCA

    n, d, x, _ = shape
    xt = torch.from_numpy(x)
    model = benchmark.pedantic(lambda: PCA(0.97).fit(xt), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(n=n, d=d, k=model.n_components_)


def test_fit_sklearn(benchmark, shape):
    n, d, x, _ = shape
    model = benchmark.pedantic(lambda: sklearn.PCA(0.97).fit(x), rounds=1, iterations=1)
    benchmark.extra_info.update(n=n, d=d, k=int(model.n_components_))


def test_score_fre_torch(benchmark, shape):
    from fre_torch import PCA

    _, _, x, x_test = shape
    sub = PCA(0.97).fit(torch.from_numpy(x)).subspace_
    xt = torch.from_numpy(x_test)
    benchmark(sub.fre, xt)


def test_score_sklearn(benchmark, shape):
    _, _, x, x_test = shape
    m = sklearn.PCA(0.97, svd_solver="full" if x.shape[0] * x.shape[1] < 3e7 else "auto").fit(x)
    benchmark(lambda: ((x_test - m.inverse_transform(m.transform(x_test))) ** 2).sum(axis=1))
