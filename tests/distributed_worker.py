"""One rank of the multi-process tests in ``test_distributed.py`` (not collected by pytest: no ``test_`` prefix).

    python tests/distributed_worker.py suite OUT_DIR RUNS_JSON   # under torchrun: library checks, then cli.main runs
    python tests/distributed_worker.py die OUT_DIR               # rank 1 exits abruptly; rank 0 must get an error
    python tests/distributed_worker.py stall OUT_DIR             # rank 1 stalls; rank 0 must time out, not hang

Each rank writes ``OUT_DIR/rank<R>.json``; the test process asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fre_torch.core import distributed as fd  # noqa: E402
from fre_torch.core.sketch import fit_sketch  # noqa: E402
from fre_torch.core.subspace import SKETCH_RANK, CovarianceAccumulator, GramAccumulator, new_accumulator  # noqa: E402


def _data(n: int, d: int, offset: float) -> torch.Tensor:
    """The same (n, d) float64 rows on every rank: a large common mean over a unit spread (cancellation-prone)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) \
        / d ** 0.5 + offset


def _stream(acc, rows: torch.Tensor, batch: int = 4):
    for start in range(0, rows.shape[0], batch):
        acc.update(rows[start:start + batch])
    return acc


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def library_checks() -> dict:
    """Exactness of the reductions and ordered gathers against one process fed all rows."""
    r, w = fd.rank(), fd.world_size()
    out: dict = {}

    # Covariance path: uneven shards (23 rows, unit 4) of rows with mean 1e4 and spread ~1.
    x = _data(23, 40, 1e4)
    idx = fd.shard_indices(23, r, w, unit=4)
    local = _stream(CovarianceAccumulator(40), x[idx.start:idx.stop])
    before = (local._count, local.mean.clone(), local.scatter.clone())
    merged = fd.reduce_accumulator(local)
    ref = _stream(CovarianceAccumulator(40), x)
    out["cov_type"] = type(merged).__name__
    out["cov_n"] = merged._count
    out["cov_mean_rel"] = _rel(merged.mean, ref.mean)
    out["cov_scatter_rel"] = _rel(merged.scatter, ref.scatter)
    out["cov_input_untouched"] = (local._count == before[0] and torch.equal(local.mean, before[1])
                                  and torch.equal(local.scatter, before[2]) and merged is not local)

    # Gram path: rows gathered in the original order, float32 as the detector's.
    xg = _data(11, 40, 3.0).float()
    idx = fd.shard_indices(11, r, w, unit=4)
    local_g = _stream(GramAccumulator(40), xg[idx.start:idx.stop])
    merged_g = fd.reduce_accumulator(local_g)
    ref_g = _stream(GramAccumulator(40), xg)
    out["gram_type"] = type(merged_g).__name__
    out["gram_rows_equal"] = bool(torch.equal(merged_g.rows, xg))
    out["gram_rel"] = _rel(merged_g.gram, ref_g.gram)
    out["gram_input_rows"] = local_g.n_samples

    # solver='auto': every rank's N (11 or 12) is below D = 16, the global N = 23 is not -> covariance, as one
    # process would have chosen; with solver='gram' the rows stay rows.
    xs = _data(23, 16, 5.0).float()
    idx = fd.shard_indices(23, r, w, unit=4)
    local_s = _stream(GramAccumulator(16), xs[idx.start:idx.stop])
    auto = fd.reduce_accumulator(local_s, "auto")
    ref_s = _stream(CovarianceAccumulator(16), xs)
    out["auto_type"] = type(auto).__name__
    out["auto_scatter_rel"] = _rel(auto.scatter, ref_s.scatter) if isinstance(auto, CovarianceAccumulator) else None
    out["forced_gram_type"] = type(fd.reduce_accumulator(local_s, "gram")).__name__

    # n_components='auto': each rank's N (300) is within the summary's rank, the global N (600) is not, and D >
    # SKETCH_RANK -> the ranks' rows become summaries merged in rank order, as one process streams them; the two
    # agree on the kept subspace (float32 rows of a rank-20 signal, scored on new rows; 4e-4 relative seen).
    d = SKETCH_RANK + 88
    g = torch.Generator().manual_seed(7)
    basis = torch.randn(20, d, generator=g, dtype=torch.float64) / d ** 0.5
    xk = ((torch.randn(620, 20, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 20, dtype=torch.float64))
          @ basis + 0.01 * torch.randn(620, d, generator=g, dtype=torch.float64) + 2.0).float()
    idx = fd.shard_indices(600, r, w, unit=4)
    local_k = _stream(new_accumulator(d, 300, "auto", "auto"), xk[idx.start:idx.stop], batch=100)
    merged_k = fd.reduce_accumulator(local_k, "auto", "auto")
    single = _stream(new_accumulator(d, 600, "auto", "auto"), xk[:600], batch=100)
    a, b = fit_sketch(merged_k, 20), fit_sketch(single, 20)
    out["sketch_types"] = [type(local_k).__name__, type(merged_k).__name__]
    out["sketch_n"] = merged_k._count
    out["sketch_fre_rel"] = float(((a.fre(xk[600:]) - b.fre(xk[600:])).abs() / b.fre(xk[600:])).max())
    out["sketch_mean_rel"] = _rel(merged_k.mean, single.mean)

    # gather_rows: uneven counts, trailing dimensions, original order.
    full = torch.arange(7 * 6, dtype=torch.float32).view(7, 2, 3)
    idx = fd.shard_indices(7, r, w)
    out["gather_ok"] = bool(torch.equal(fd.gather_rows(full[idx.start:idx.stop]), full))

    # Settings: equal -> passes; different -> ConfigMismatchError on every rank (the group stays usable).
    fd.config_hash_check({"model": "same"})
    try:
        fd.config_hash_check({"model": "same", "pca": 0.9 + 0.01 * r})
        out["mismatch"] = "not raised"
    except fd.ConfigMismatchError as err:
        out["mismatch"] = str(err)
    fd.barrier()
    return out


def suite(out_dir: Path, runs_json: Path) -> None:
    import cli

    fd.init_from_env("cpu", timeout=120)
    r = fd.rank()
    result = {"library": library_checks(), "runs": {}}
    for run in json.loads(runs_json.read_text()):
        log = out_dir / f"{run['name']}.rank{r}.log"
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            # cli.main adopts the group this driver created and leaves it alive for the next run.
            result["runs"][run["name"]] = cli.main(run["argv"])
        fd.enable(timeout=120)  # cli.main left data-parallel mode on return; the group itself is still up
        fd.barrier()
    (out_dir / f"rank{r}.json").write_text(json.dumps(result))
    fd.cleanup()
    torch.distributed.destroy_process_group()


def failure(out_dir: Path, mode: str) -> None:
    fd.init_from_env("cpu", timeout=3)
    r = fd.rank()
    if r == 1:
        if mode == "die":
            os._exit(17)  # no clean-up at all, as a crashed or killed process
        time.sleep(8)  # 'stall': alive but never reaching the collective in time
    t0 = time.perf_counter()
    try:
        fd.reduce_accumulator(CovarianceAccumulator(8).update(torch.ones(2, 8)))
        outcome = {"error": None}
    except fd.DistributedError as err:
        outcome = {"error": str(err)}
    outcome["seconds"] = time.perf_counter() - t0
    (out_dir / f"rank{r}.json").write_text(json.dumps(outcome))
    sys.stdout.flush()
    os._exit(0)  # the group is broken: skip the backend's teardown


if __name__ == "__main__":
    command, out = sys.argv[1], Path(sys.argv[2])
    if command == "suite":
        suite(out, Path(sys.argv[3]))
    else:
        failure(out, command)
