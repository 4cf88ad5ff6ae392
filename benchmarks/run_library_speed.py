"""Library scoring in a plain Python process against the CLI process and ONNX Runtime, on one model file.

    python -m benchmarks.run_library_speed [--root DATA] [--rounds 3] [--images 96] [--batch_size 32]

A model is fitted on MVTec bottle with ``cli.py fit`` and exported with ``cli.py export --format onnx``. Then child
processes alternate, each timing ``FREDetector.load(model).score`` on the same decoded images (best of 3 passes
after one warm-up pass, same threads):

- ``library``: a plain Python process that imports fre_torch and calls ``load(...).score``; nothing else.
- ``cli``: the same, started the way ``cli.py`` starts (``retain_if_requested()`` before any tensor exists).
- ``library_opted_out``: the plain process with ``FRE_TORCH_RETAIN_MEMORY=0``: the library before the detector made
  the allocator setting itself (what issue #29 measured at 0.49-0.54x ONNX Runtime).
- ``ort``: ONNX Runtime on the exported graph (in the ``library`` child, alternating with it).

Prints images/s per round and the ratios (BENCHMARKS.md, "Library speed", has the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import data_root, machine

_CHILD = r"""
import json, os, sys, time
mode, model, onnx_path, paths, batch, passes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
if mode == "cli":
    from fre_torch.jobs.allocator import retain_if_requested
    retain_if_requested()
import torch
from fre_torch import FREDetector
from fre_torch.features.images import load_image
det = FREDetector.load(model)
size = det.config.load_size
images = torch.stack([load_image(p, size) for p in paths])
def lib():
    det.score(images, batch_size=batch)
runs = {"lib": lib}
if mode == "library" and onnx_path:
    import numpy as np, onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    arr = images.numpy()
    def onnx():
        for s in range(0, arr.shape[0], batch):
            sess.run(None, {name: arr[s:s + batch]})
    runs["ort"] = onnx
best = {k: float("inf") for k in runs}
for k, f in runs.items():
    f()  # warm-up
for _ in range(passes):
    for k, f in runs.items():
        t0 = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - t0)
print(json.dumps({k: len(paths) / v for k, v in best.items()}))
"""


def _child(mode: str, model: Path, onnx: Path | None, paths: list[str], batch: int, passes: int) -> dict:
    env = dict(os.environ)
    env.pop("FRE_TORCH_RETAIN_MEMORY", None)
    if mode == "library_opted_out":
        env["FRE_TORCH_RETAIN_MEMORY"] = "0"
    out = subprocess.run([sys.executable, "-c", _CHILD, "cli" if mode == "cli" else mode, str(model),
                          str(onnx or ""), json.dumps(paths), str(batch), str(passes)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="data root (default: FRE_TORCH_DATA or ../shared/data)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args(argv)
    root = (args.root or data_root()) / "mvtec_bottle" / "bottle"
    paths = sorted(str(q) for q in (root / "test").rglob("*.png"))[:args.images]
    with tempfile.TemporaryDirectory(prefix="fre_library_speed_") as tmp:
        model, onnx = Path(tmp) / "m.pt", Path(tmp) / "m.onnx"
        repo = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, str(repo / "cli.py"), "fit", "--train_dir", str(root / "train" / "good"),
                        "--out", str(model)], check=True, capture_output=True)
        subprocess.run([sys.executable, str(repo / "cli.py"), "export", "--model_file", str(model), "--format",
                        "onnx", "--out", str(onnx)], check=True, capture_output=True)
        rounds = []
        for _ in range(args.rounds):  # alternating, whole processes
            row = {}
            for mode in ("library", "cli", "library_opted_out"):
                got = _child(mode, model, onnx if mode == "library" else None, paths, args.batch_size, args.passes)
                row[mode] = got["lib"]
                if "ort" in got:
                    row["ort"] = got["ort"]
            rounds.append(row)
            print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    ratios = {
        "library / cli": [r["library"] / r["cli"] for r in rounds],
        "library / ort": [r["library"] / r["ort"] for r in rounds],
        "library_opted_out / ort": [r["library_opted_out"] / r["ort"] for r in rounds],
    }
    for k, v in ratios.items():
        print(f"{k}: " + ", ".join(f"{x:.2f}" for x in v))
    doc = {"machine": machine(), "load": os.getloadavg(), "images": len(paths), "batch_size": args.batch_size,
           "rounds": rounds, "ratios": ratios, "date": time.strftime("%Y-%m-%d")}
    return doc


if __name__ == "__main__":
    main()
