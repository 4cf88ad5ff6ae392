"""Data-parallel fitting and scoring (``fre_torch.core.distributed``): sharding, exact reductions, failure modes, and
``torchrun`` end to end (2 processes, gloo on the CPU) against one process.

The multi-process parts run real processes: ``python -m torch.distributed.run --nproc_per_node=2`` for the CLI and
the library checks, plain process pairs with torchrun's environment for the failure modes. Single-process
references run in this process with ONE thread, as torchrun's workers do: the backbone's float32 kernels depend on
the thread count as well as the batch size, and equal batches on equal threads give bit-identical features.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from conftest import REPO, require_category
from fre_torch.core import distributed as fd
from fre_torch.features.images import load_image
from fre_torch.detection.detector import FREDetector
from fre_torch.jobs.evaluate import METRICS, PIXEL_METRICS
from fre_torch.core.subspace import CovarianceAccumulator, GramAccumulator
from fre_torch.features.synthetic import _one_thread, write_synthetic_mvtec

WORKER = REPO / "tests" / "distributed_worker.py"
# The full suite only (conftest.py, --full): process groups of several processes, a minute on a 2-core CPU.
pytestmark = pytest.mark.full
CLI = REPO / "cli.py"
REL = 1e-6  # the equality asked of distributed vs single-process results (they are far closer: float64 rounding)
LAUNCH_TIMEOUT = 300  # a hung launch fails the test instead of the CI job


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in fd.ENV_KEYS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
    return env


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def _rank_pair(make_argv, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Two processes with torchrun's environment (no torchrun agent to tear the pair down): argv per rank."""
    port = str(_free_port())
    procs = [subprocess.Popen(make_argv(r), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    done = []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {r} hung past {LAUNCH_TIMEOUT} s")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _single(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with _one_thread():
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _read_scores(path: Path) -> list[tuple[str, str, int, float]]:
    with open(path, newline="") as f:
        return [(r["category"], r["path"], int(r["label"]), float(r["score"])) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------ sharding (no processes)
@pytest.mark.parametrize("unit", [1, 2, 4, 32])
def test_shard_indices_cover_every_index_once(unit: int) -> None:
    for world in range(1, 9):
        for n in range(world, 80):
            shards = [fd.shard_indices(n, r, world, unit=unit) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n)), (n, world, unit)  # no dup, no drop, in order
            assert all(len(s) >= 1 for s in shards)
            units = -(-n // unit)
            if units >= world:  # whole batches: boundaries on multiples of unit, at most one batch apart
                assert all(s.start % unit == 0 for s in shards)
                counts = [-(-len(s) // unit) for s in shards]
            else:  # too few batches: single images, balanced
                counts = [len(s) for s in shards]
            assert max(counts) - min(counts) <= 1, (n, world, unit, counts)


def test_shard_indices_refuses_a_world_larger_than_the_data() -> None:
    with pytest.raises(ValueError, match=r"world size 5 is larger than the 4 held-out images"):
        fd.shard_indices(4, 0, 5, what="held-out images")
    with pytest.raises(ValueError, match="outside a world"):
        fd.shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="unit"):
        fd.shard_indices(10, 0, 2, unit=0)


def test_everything_is_the_identity_without_a_process_group() -> None:
    assert not fd.is_distributed() and fd.rank() == 0 and fd.world_size() == 1 and fd.is_main_process()
    cov = CovarianceAccumulator(3).update(torch.randn(4, 3))
    gram = GramAccumulator(3).update(torch.randn(2, 3))
    assert fd.reduce_accumulator(cov) is cov and fd.reduce_accumulator(gram) is gram
    t = torch.randn(5, 2)
    assert fd.gather_rows(t) is t
    assert fd.shard(("a", "b", "c"), unit=2) == ["a", "b", "c"]
    assert fd.config_hash_check({"a": 1}) == fd.config_hash({"a": 1})
    fd.barrier()


def test_config_hash_is_canonical_and_sensitive() -> None:
    assert fd.config_hash({"a": 1, "b": [1, 2]}) == fd.config_hash({"b": [1, 2], "a": 1})
    assert fd.config_hash({"a": 1}) != fd.config_hash({"a": 2})
    assert fd.config_hash({"p": Path("x")}) == fd.config_hash({"p": "x"})


def test_init_without_torchrun_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in fd.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert not fd.env_requests_distributed()
    with pytest.raises(fd.DistributedError, match="torchrun"):
        fd.init_from_env("cpu")
    assert not fd.is_distributed()


def test_cli_distributed_flag_without_torchrun_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for key in fd.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    code = cli.main(["fit", "--train_dir", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--distributed"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "torchrun" in err, err


# ------------------------------------------------------------------------------------------------ torchrun: data
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic MVTec layout (texture, object: 14 training, 10 test images each, masks), plus a 1-image set."""
    root = tmp_path_factory.mktemp("dist")
    syn = write_synthetic_mvtec(root / "syn", n_train=14, n_test_good=4, n_test_defect=3, size=64)
    tiny = root / "tiny" / "object"
    for sub in ("train/good", "test/good", "test/scratch"):
        (tiny / sub).mkdir(parents=True)
        shutil.copy(syn / "object" / sub / "000.png", tiny / sub / "000.png")
    return root


def _fit_argv(data: Path, out: Path, solver: str) -> list[str]:
    # Batch 2: the 10 fitted and 4 held-out images make 5 and 2 whole batches, so both splits shard on batches.
    size = "128" if solver == "gram" else "64"  # covariance: D = 448 / 768, a quick D x D eigh
    return ["fit", "--train_dir", str(data / "syn" / "object" / "train"), "--out", str(out), "--input_size", size,
            "--batch_size", "2", "--workers", "0", "--holdout", "0.3", "--solver", solver]


def _evaluate_argv(data: Path, out: Path, solver: str) -> list[str]:
    common = ["evaluate", "--dataset_directory", str(data / "syn"), "--model", "efficientnet_lite0",
              "--batch_size", "4", "--workers", "0", "--json", str(out / "result.json"),
              "--scores_csv", str(out / "scores.csv"), "--solver", solver]
    if solver == "gram":  # both categories (the per-category loop), 14 train = 4 batches, 10 test = 3
        return common + ["--input_size", "128"]
    return common + ["--object_category", "object", "--input_size", "64"]


SOLVERS = ("gram", "covariance")


def _update_argv(data: Path, model: Path, out: Path) -> list[str]:
    return ["fit", "--update", str(model), "--train_dir", str(data / "syn" / "texture" / "train"), "--out", str(out),
            "--batch_size", "2", "--workers", "0", "--holdout", "0.3"]


@pytest.fixture(scope="module")
def suite(data: Path) -> dict:
    """ONE torchrun launch (startup dominates on 2 cores): library checks, then cli.main fit / evaluate with both
    solvers and an evaluate whose training set is smaller than the world."""
    out = data / "suite"
    out.mkdir()
    runs = []
    for solver in SOLVERS:
        runs.append({"name": f"fit_{solver}", "argv": _fit_argv(data, out / f"fit_{solver}.pt", solver)})
        (out / f"evaluate_{solver}").mkdir()
        runs.append({"name": f"evaluate_{solver}", "argv": _evaluate_argv(data, out / f"evaluate_{solver}", solver)})
    # fit --update of the Gram fit with the other category's training images (rank 0 carries the old summary)
    runs.append({"name": "update", "argv": _update_argv(data, out / "fit_gram.pt", out / "update.pt")})
    runs.append({"name": "tiny", "argv": ["evaluate", "--dataset_directory", str(data / "tiny"), "--model",
                                          "efficientnet_lite0", "--input_size", "64", "--workers", "0"]})
    (out / "runs.json").write_text(json.dumps(runs))
    proc = _torchrun(str(WORKER), "suite", str(out), str(out / "runs.json"), cwd=out)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    logs = {p.name: p.read_text() for p in out.glob("*.log")}
    return {"ranks": ranks, "out": out, "logs": logs}


def test_reductions_are_exact_and_gathers_ordered(suite: dict) -> None:
    for r, rank in enumerate(suite["ranks"]):
        lib = rank["library"]
        assert lib["cov_type"] == "CovarianceAccumulator" and lib["cov_n"] == 23
        # float64 rounding; raw sums (sum x x^T - N mu mu^T at mean 1e4) would be off by ~1e-8 relative
        assert lib["cov_mean_rel"] < 1e-14 and lib["cov_scatter_rel"] < 1e-11, lib
        assert lib["cov_input_untouched"]
        assert lib["gram_type"] == "GramAccumulator" and lib["gram_rows_equal"] and lib["gram_rel"] < 1e-12
        assert lib["gram_input_rows"] == (4 if r == 0 else 7)  # this rank's shard only: the input kept its rows
        assert lib["auto_type"] == "CovarianceAccumulator" and lib["auto_scatter_rel"] < 1e-12
        assert lib["forced_gram_type"] == "GramAccumulator"
        assert lib["sketch_types"] == ["GramAccumulator", "SketchAccumulator"] and lib["sketch_n"] == 600
        # past the summary's rank the two truncate at other rows: the same subspace, not the same rounding
        assert lib["sketch_fre_rel"] < 1e-3 and lib["sketch_mean_rel"] < 1e-12, lib
        assert lib["gather_ok"]
        assert "different settings" in lib["mismatch"], lib["mismatch"]


def _sign_aligned_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a_i - s_i b_i| over component rows, s_i = sign(a_i . b_i): components are defined up to sign."""
    signs = torch.sign((a.double() * b.double()).sum(dim=1, keepdim=True))
    return float((a.double() - signs * b.double()).abs().max())


@pytest.mark.parametrize("solver", SOLVERS)
def test_fit_distributed_equals_single_process(suite: dict, data: Path, solver: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert [rank["runs"][f"fit_{solver}"] for rank in suite["ranks"]] == [0, 0], suite["logs"]
    assert "wrote" in suite["logs"][f"fit_{solver}.rank0.log"]
    assert suite["logs"][f"fit_{solver}.rank1.log"] == ""  # rank 0 alone prints and writes
    dist_file = suite["out"] / f"fit_{solver}.pt"
    single_file = tmp_path / "single.pt"
    _single(_fit_argv(data, single_file, solver), capsys)

    a = torch.load(single_file, weights_only=True)
    b = torch.load(dist_file, weights_only=True)
    assert a["config"] == b["config"] and a["config"]["solver"] == solver
    for sa, sb in zip(a["subspaces"], b["subspaces"], strict=True):
        assert sa["components"].shape == sb["components"].shape
        assert int(sa["n_samples"]) == int(sb["n_samples"]) == 10
        assert _sign_aligned_diff(sa["components"], sb["components"]) < REL
        assert _rel(sb["mean"], sa["mean"]) < REL
        assert _rel(sb["explained_variance"], sa["explained_variance"]) < REL
        assert _rel(sb["total_variance"], sa["total_variance"]) < REL
    assert _rel(b["scales"], a["scales"]) < REL
    assert _rel(b["calibration_scores"], a["calibration_scores"]) < REL
    assert _rel(b["threshold"], a["threshold"]) < REL and _rel(b["map_scale"], a["map_scale"]) < REL

    test_dir = data / "syn" / "object" / "test"
    size = a["config"]["input_size"]
    images = torch.stack([load_image(p, size) for p in sorted(test_dir.rglob("*.png"))])
    with _one_thread():
        s_single = FREDetector.load(single_file).score(images)
        s_dist = FREDetector.load(dist_file).score(images)
    assert _rel(s_dist, s_single) < REL


def test_update_distributed_equals_single_process(suite: dict, data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert [rank["runs"]["update"] for rank in suite["ranks"]] == [0, 0], suite["logs"]
    single_fit, single_update = tmp_path / "fit.pt", tmp_path / "update.pt"
    _single(_fit_argv(data, single_fit, "gram"), capsys)
    _single(_update_argv(data, single_fit, single_update), capsys)
    a = torch.load(single_update, weights_only=True)
    b = torch.load(suite["out"] / "update.pt", weights_only=True)
    for sa, sb in zip(a["subspaces"] + a["map_subspaces"], b["subspaces"] + b["map_subspaces"], strict=True):
        assert int(sa["n_samples"]) == int(sb["n_samples"]) == 20  # 10 fitted + 10 of the 14 new (4 held out)
        assert _sign_aligned_diff(sa["components"], sb["components"]) < REL
        assert _rel(sb["explained_variance"], sa["explained_variance"]) < REL
    assert torch.equal(a["cell_index"], b["cell_index"]) and _rel(b["cell_rows"], a["cell_rows"]) < REL
    assert _rel(b["calibration_scores"], a["calibration_scores"]) < REL
    assert b["calibration_scores"].numel() == 4 + 4  # the fit's held-out scores and the update's


@pytest.mark.parametrize("solver", SOLVERS)
def test_evaluate_distributed_equals_single_process(suite: dict, data: Path, solver: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert [rank["runs"][f"evaluate_{solver}"] for rank in suite["ranks"]] == [0, 0], suite["logs"]
    assert suite["logs"][f"evaluate_{solver}.rank1.log"] == ""
    _single(_evaluate_argv(data, tmp_path, solver), capsys)
    _compare_evaluations(tmp_path, suite["out"] / f"evaluate_{solver}", pixel=True)


def _compare_evaluations(single: Path, distributed: Path, *, pixel: bool) -> None:
    """Same metrics (to float rounding of equal scores), same scores in the same order."""
    a = json.loads((single / "result.json").read_text())
    b = json.loads((distributed / "result.json").read_text())
    assert list(a["categories"]) == list(b["categories"])
    assert b["config"].pop("world_size") == 2
    assert a["config"] == b["config"]
    metrics = METRICS + (PIXEL_METRICS if pixel else ())
    for name in a["categories"]:
        ra, rb = a["categories"][name], b["categories"][name]
        assert (ra["n_train"], ra["n_test"]) == (rb["n_train"], rb["n_test"])
        for m in metrics:
            assert rb[m] == pytest.approx(ra[m], abs=1e-9), (name, m)
    sa, sb = _read_scores(single / "scores.csv"), _read_scores(distributed / "scores.csv")
    assert [r[:3] for r in sa] == [r[:3] for r in sb]  # category, path, label: the same images in the same order
    assert _rel(torch.tensor([r[3] for r in sb]), torch.tensor([r[3] for r in sa])) < REL


def test_world_larger_than_the_data_fails_fast_on_every_rank(suite: dict) -> None:
    assert [rank["runs"]["tiny"] for rank in suite["ranks"]] == [2, 2]
    for r in range(2):
        log = suite["logs"][f"tiny.rank{r}.log"].strip().splitlines()
        assert len(log) == 1, log
        assert f"(rank {r} of 2)" in log[0] and "world size 2 is larger than the 1 object training images" in log[0]


# ------------------------------------------------------------------------------------------------ failure modes
def test_mismatched_settings_fail_on_every_rank(data: Path) -> None:
    def argv(r: int) -> list[str]:
        return [sys.executable, str(CLI), "evaluate", "--dataset_directory", str(data / "syn"), "--object_category",
                "object", "--model", "efficientnet_lite0", "--input_size", "64", "--workers", "0",
                "--pca", f"0.9{r}", "--dist_timeout", "60"]

    procs = _rank_pair(argv, data)
    for r, p in enumerate(procs):
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and f"error (rank {r} of 2)" in lines[0] and "different settings" in lines[0], lines
        assert p.stdout == ""


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_a_dead_or_stalled_rank_is_an_error_not_a_hang(mode: str, tmp_path: Path) -> None:
    procs = _rank_pair(lambda r: [sys.executable, str(WORKER), mode, str(tmp_path)], tmp_path)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert procs[0].returncode == 0, procs[0].stderr
    assert rank0["error"] is not None and "reducing the fit statistics failed" in rank0["error"], rank0
    if mode == "die":
        assert procs[1].returncode == 17
        assert rank0["seconds"] < 3  # a closed connection is noticed at once, long before the timeout
    else:
        assert 2.5 < rank0["seconds"] < 7.5, rank0  # the 3 s timeout, while rank 1 sleeps 8 s
        assert "3 s" in rank0["error"]


# ------------------------------------------------------------------------------------------------ real data
def test_bottle_two_processes_equal_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun cli.py evaluate on MVTec bottle, default lite0 config: the same scores, in order, and metrics."""
    root = require_category("bottle")
    argv = ["evaluate", "--dataset_directory", str(root), "--object_category", "bottle", "--model",
            "efficientnet_lite0", "--device", "cpu", "--pixel_metrics", "off"]
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    dist_dir.mkdir()
    single_dir.mkdir()
    proc = _torchrun(str(CLI), *argv, "--json", str(dist_dir / "result.json"), "--scores_csv",
                     str(dist_dir / "scores.csv"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bottle ") == 1  # one table, from rank 0
    _single([*argv, "--json", str(single_dir / "result.json"), "--scores_csv", str(single_dir / "scores.csv")],
            capsys)
    _compare_evaluations(single_dir, dist_dir, pixel=False)
