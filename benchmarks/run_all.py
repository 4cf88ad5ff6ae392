"""Every side-by-side comparison in one command, written into BENCHMARKS.md (machine, versions, figures, ratios,
AUROC of each side):

    python -m benchmarks.run_all [--quick]

1. the head against scikit-learn (``benchmarks.run_head``: fit and FRE scoring times, ratios, peak memory);
2. the whole pipeline against the reference pipeline (``benchmarks.run_pipeline``: wall time, images/s, image
   AUROC of each side, with and without the preprocessed-image cache) on $FRE_TORCH_DATA/magnetic_tile, or the
   dataset given.

Each step runs in its own process, one after the other; run it on a quiet machine (2 cores: any other load skews
the ratios). GPU figures come from ``benchmarks/gpu_check.sh`` on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.common import REPO, data_root


def main() -> int:
    ap = argparse.ArgumentParser(description="run every side-by-side benchmark and update BENCHMARKS.md")
    ap.add_argument("--quick", action="store_true", help="head: only N=400, D=65,536 and the streaming case")
    ap.add_argument("--root", default=str(data_root() / "magnetic_tile"))
    ap.add_argument("--category", default="magnetic_tile")
    args = ap.parse_args()
    steps = [[sys.executable, "-m", "benchmarks.run_head", "--write"] + (["--quick"] if args.quick else []),
             [sys.executable, "-m", "benchmarks.run_pipeline", "--root", args.root, "--category", args.category,
              "--write"]]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=REPO)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
