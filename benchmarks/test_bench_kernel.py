"""pytest-benchmark suite for kernel FRE: fitting and scoring through random Fourier / Nystroem features.

    python -m pytest benchmarks/test_bench_kernel.py -s

Target (issue 5): fitting with M = 4,096 random features on 1,000 vectors of D = 5,000 in under 10 s on the 2-core
CPU. Each case prints its time, the work done (the feature map's FLOPs, and GFLOP/s) and the ratio to the
baseline measured in the same run: the linear FRE fit (``fit_rows``, PCA(0.97)) of the same rows.
Nystroem with m = 1,024 landmarks needs N >= m training rows, so its fit uses N = 2,000 rows of the same kind.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import best_of, low_rank_features
from fre_torch.core.kernel import KernelFRE
from fre_torch.core.subspace import fit_rows

D = 5000
N_RFF = 1000
N_NYSTROEM = 2000
N_SCORE = 1000
M_RFF = 4096
M_NYSTROEM = 1024


@pytest.fixture(scope="module")
def rows() -> dict[str, torch.Tensor]:
    return {
        "train": torch.from_numpy(low_rank_features(N_NYSTROEM, D)),
        "test": torch.from_numpy(low_rank_features(N_SCORE, D, seed=1)),
    }


@pytest.fixture(scope="module")
def baseline(rows) -> dict[str, float]:
    """The linear FRE fit and scoring of the same rows, timed in this run (best of 2 after a warm-up)."""
    x = rows["train"][:N_RFF]
    sub = fit_rows(x, 0.97)
    fit_s = best_of(lambda: fit_rows(x, 0.97), 2)
    score_s = best_of(lambda: sub.fre(rows["test"]), 2)
    print(f"\nbaseline linear FRE, N={N_RFF} D={D}: fit {fit_s:.3f} s, score {N_SCORE} rows {score_s * 1e3:.1f} ms")
    return {"fit": fit_s, "score": score_s}


def _report(benchmark, name: str, flops: float, base: float, **info) -> None:
    t = benchmark.stats.stats.mean
    benchmark.extra_info.update(map_gflop=flops / 1e9, gflops_per_s=flops / t / 1e9, x_linear_baseline=t / base,
                                **info)
    print(f"\n{name}: {t:.3f} s, feature map {flops / 1e9:.1f} GFLOP ({flops / t / 1e9:.1f} GFLOP/s overall), "
          f"{t / base:.1f}x the linear baseline ({base:.3f} s)")


@pytest.mark.parametrize("orthogonal", [False, True], ids=["plain", "orthogonal"])
def test_fit_rff(benchmark, rows, baseline, orthogonal: bool) -> None:
    x = rows["train"][:N_RFF]
    model = benchmark.pedantic(lambda: KernelFRE(0.97, kernel_features=M_RFF, orthogonal=orthogonal).fit(x),
                               rounds=2, iterations=1)
    _report(benchmark, f"fit RFF M={M_RFF} ({'orthogonal' if orthogonal else 'plain'}) N={N_RFF} D={D}",
            2.0 * N_RFF * D * M_RFF, baseline["fit"], n=N_RFF, d=D, m=M_RFF, k=model.n_components_)


def test_score_rff(benchmark, rows, baseline) -> None:
    model = KernelFRE(0.97, kernel_features=M_RFF).fit(rows["train"][:N_RFF])
    benchmark.pedantic(model.score, args=(rows["test"],), rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, f"score RFF M={M_RFF}, {N_SCORE} rows", 2.0 * N_SCORE * D * M_RFF, baseline["score"],
            n=N_SCORE, d=D, m=M_RFF, k=model.n_components_)


def test_fit_nystroem(benchmark, rows, baseline) -> None:
    x = rows["train"]
    model = benchmark.pedantic(lambda: KernelFRE(0.97, method="nystroem", kernel_features=M_NYSTROEM).fit(x),
                               rounds=2, iterations=1)
    flops = 2.0 * N_NYSTROEM * D * M_NYSTROEM + 2.0 * N_NYSTROEM * M_NYSTROEM ** 2
    _report(benchmark, f"fit Nystroem m={M_NYSTROEM} (k-center) N={N_NYSTROEM} D={D}", flops, baseline["fit"],
            n=N_NYSTROEM, d=D, m=M_NYSTROEM, k=model.n_components_)


def test_score_nystroem(benchmark, rows, baseline) -> None:
    model = KernelFRE(0.97, method="nystroem", kernel_features=M_NYSTROEM).fit(rows["train"])
    benchmark.pedantic(model.score, args=(rows["test"],), rounds=3, iterations=1, warmup_rounds=1)
    flops = 2.0 * N_SCORE * D * M_NYSTROEM + 2.0 * N_SCORE * M_NYSTROEM ** 2
    _report(benchmark, f"score Nystroem m={M_NYSTROEM}, {N_SCORE} rows", flops, baseline["score"],
            n=N_SCORE, d=D, m=M_NYSTROEM, k=model.n_components_)
