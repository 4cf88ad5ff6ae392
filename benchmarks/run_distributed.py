"""Data-parallel scaling of the streaming fit: images/s with 1 and 2 processes (torchrun, gloo on the CPU).

    python -m benchmarks.run_distributed [--layouts 1x2 1x1 2x1] [--out benchmarks/results/distributed.json]

Each layout PxT is one ``torchrun --nproc_per_node=P`` launch of this file in worker mode with OMP_NUM_THREADS=T:
1 x cores and P x cores/P use the whole machine; 1 x 1 is the per-core baseline. A worker decodes
its contiguous shard of the training images (MVTec bottle from $FRE_TORCH_DATA/mvtec_bottle, else a synthetic set), runs the
detector's streaming fit step by step so each stage is timed on its own, and rank 0 reports:

- ``stream``: decode + backbone + accumulation of this rank's shard (the part that scales with processes);
- ``reduce``: the exact cross-rank reduction (all_reduce of float64 sums, or all_gather of Gram rows);
- ``solve``: the eigendecomposition, the same on every rank (it does not scale);
- images/s = all images / (stream + reduce + solve), and / (stream + reduce) as the streaming throughput.

Timings are wall clock between barriers: the slowest rank sets them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also run as a torchrun worker script
    sys.path.insert(0, str(REPO))

from benchmarks.common import data_root  # noqa: E402

BOTTLE = data_root() / "mvtec_bottle"

# (name, input_size, solver): Gram on the default lite0 config, covariance at 128 px (D = 1,792 / 3,072, whose
# D x D eigh stays seconds, not minutes).
CASES = (("gram_224", 224, "gram"), ("covariance_128", 128, "covariance"))


def _worker(args: argparse.Namespace) -> None:
    import torch

    from fre_torch.core import distributed as fd
    from fre_torch.features.images import ImageDataset, MVTecCategory, make_loader
    from fre_torch.detection.detector import DetectorConfig, FREDetector
    from fre_torch.core.subspace import CovarianceAccumulator, GramAccumulator, fit_accumulator

    fd.init_from_env("cpu")
    root, category = Path(args.root), args.category
    paths = list(MVTecCategory.load(root, category).train)
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=args.input_size, solver=args.solver))
    mine = fd.shard(paths, unit=args.batch_size)
    loader = make_loader(ImageDataset(mine, args.input_size), args.batch_size, "cpu", num_workers=0)
    det.features(torch.zeros(2, 3, args.input_size, args.input_size, dtype=torch.uint8))  # warm-up, untimed

    def stage() -> float:
        fd.barrier()
        return time.perf_counter()

    t0 = stage()
    accs = [GramAccumulator(d) if args.solver == "gram" else CovarianceAccumulator(d)
            for d in det.config.layer_features]
    for batch in loader:
        for acc, rows in zip(accs, det.features(batch["image"])):
            acc.update(rows, check_finite=False)
    t1 = stage()
    accs = [fd.reduce_accumulator(a, args.solver) for a in accs]
    t2 = stage()
    for acc in accs:
        fit_accumulator(acc, det.config.n_components)
    t3 = stage()
    if fd.is_main_process():
        n = len(paths)
        doc = {"processes": fd.world_size(), "threads_per_process": torch.get_num_threads(), "images": n,
               "input_size": args.input_size, "solver": args.solver, "layer_features": det.config.layer_features,
               "stream_s": t1 - t0, "reduce_s": t2 - t1, "solve_s": t3 - t2,
               "streaming_images_per_s": n / (t2 - t0), "fit_images_per_s": n / (t3 - t0)}
        Path(args.result).write_text(json.dumps(doc))
    fd.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[Path, str]:
    if (BOTTLE / "bottle" / "train" / "good").is_dir():
        return BOTTLE, "bottle"
    from fre_torch.features.synthetic import write_synthetic_mvtec

    root = REPO / "benchmarks" / "results" / "_synthetic"
    if not root.is_dir():
        write_synthetic_mvtec(root, categories=("object",), n_train=200, n_test_good=1, n_test_defect=1, size=256)
    return root, "object"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=None,
                    help="processes x threads each, e.g. 1x2 2x1 (default: 1 x cores, 1 x 1, 2 x cores/2)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/distributed.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--category", help=argparse.SUPPRESS)
    ap.add_argument("--input_size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--solver", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    sys.path.insert(0, str(REPO))
    root, category = _data()
    cores = len(os.sched_getaffinity(0))
    layouts = [tuple(int(v) for v in spec.split("x")) for spec in args.layouts] if args.layouts else \
        [(1, cores), (1, 1), (2, max(1, cores // 2))]
    rows = []
    for name, size, solver in CASES:
        for procs, threads in layouts:
            result = Path(args.out).with_suffix(f".{name}.{procs}x{threads}.tmp.json")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
                   "--worker", "--root", str(root), "--category", category, "--input_size", str(size),
                   "--solver", solver, "--batch_size", str(args.batch_size), "--result", str(result)]
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            row = {"case": name, **json.loads(result.read_text())}
            result.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"machine": _machine(cores), "data": f"{root.name}/{category} train/good", "batch_size": args.batch_size,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))


def _machine(cores: int) -> str:
    import platform

    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return (f"{cpu}, {cores} cores, torch {torch.__version__}, Python {platform.python_version()}, "
            f"1-min load average {load:.1f} at the end (a machine shared with other jobs)")


def markdown(doc: dict) -> str:
    # Speed-up against the first layout of each case (1 process using every core, by default).
    base: dict[str, dict] = {}
    for r in doc["rows"]:
        base.setdefault(r["case"], r)
    lines = ["| case | processes x threads | stream s | reduce s | solve s | streaming img/s | fit img/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        speedup = r["streaming_images_per_s"] / base[r["case"]]["streaming_images_per_s"]
        lines.append(f"| {r['case']} ({r['images']} images) | {r['processes']} x {r['threads_per_process']} | "
                     f"{r['stream_s']:.1f} | {r['reduce_s']:.2f} | {r['solve_s']:.2f} | "
                     f"{r['streaming_images_per_s']:.1f} | {r['fit_images_per_s']:.1f} | {speedup:.2f}x |")
    return f"{doc['machine']}; {doc['data']}, batch {doc['batch_size']}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
