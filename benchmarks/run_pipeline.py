"""End-to-end `evaluate` against the reference pipeline, same backbone, same run: times and AUROC.

    python -m benchmarks.run_pipeline --root ../shared/data/magnetic_tile --category magnetic_tile

Each side runs in its own process, one after the other, from a cold start (backbone build included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import REPO, machine


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/magnetic_tile")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    ref = _child(
        "import json; from benchmarks.reference_pipeline import run_reference; "
        f"r = run_reference({args.root!r}, {args.category!r}, {args.backbone!r}); r.pop('scores'); print(json.dumps(r))")
    ours = {}
    # Like for like: the reference computes image scores only, so the first two runs do too (--pixel_metrics
    # off); the last adds maps and pixel AUROC / PRO / pixel F1-max, which the reference does not compute.
    modes = {"default": ["--pixel_metrics", "off"], "reference": ["--reference", "--pixel_metrics", "off"],
             "default + pixel metrics": []}
    for mode, flags in modes.items():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "cli.py", "evaluate", "--dataset_directory", args.root,
                              "--object_category", args.category, "--model", args.backbone, "--json",
                              "/tmp/fre_pipeline.json", *flags], cwd=REPO, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        doc = json.loads(open("/tmp/fre_pipeline.json").read())["categories"][args.category]
        ours[mode] = {"total_s": wall, "auroc": doc["image_auroc"], "fit_s": doc["fit_seconds"],
                      "test_images_per_second": doc["test_images_per_second"]}
    doc = {"machine": machine(), "dataset": f"{args.root}/{args.category}", "backbone": args.backbone,
           "reference_pipeline": ref, "fre_torch": ours}
    print(json.dumps(doc, indent=2))
    print(f"\n| run | wall s | image AUROC | speed-up vs reference |\n|---|---|---|---|\n"
          f"| reference pipeline (PIL, batch 64, sklearn PCA) | {ref['total_s']:.1f} | {ref['auroc']:.4f} | 1.0x |")
    for mode, r in ours.items():
        print(f"| fre_torch evaluate ({mode}) | {r['total_s']:.1f} | {r['auroc']:.4f} | "
              f"{ref['total_s'] / r['total_s']:.2f}x |")


if __name__ == "__main__":
    main()
