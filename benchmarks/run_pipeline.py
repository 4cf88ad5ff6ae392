"""End-to-end `evaluate` against the reference pipeline, same backbone, same run: times and AUROC.

    python -m benchmarks.run_pipeline --root $FRE_TORCH_DATA/magnetic_tile --category magnetic_tile --write

Each side runs in its own process, one after the other, from a cold start, and is timed from outside, process start
to exit (interpreter start, imports and the backbone build included on both sides). Besides the reference as users
run it, the table shows the reference with glibc told to keep freed memory (what ``cli.py`` sets, see
``fre_torch.jobs.allocator``) and fre_torch with that setting off, so the share of the speed-up that is the allocator
setting is visible. The cache runs use ``--cache`` on a fresh folder: the first fills it (images and features), the
second reads both (no decoding, no backbone), the third reads the images only (``--cache_images_only``: no
decoding, the backbone runs). ``--write`` stores the figures in benchmarks/results/pipeline.json and the table in
BENCHMARKS.md between the ``<!-- pipeline:begin -->`` / ``<!-- pipeline:end -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, data_root, machine, write_section
from fre_torch.jobs.allocator import DEFAULT_RETAIN_BYTES, ENV_OPT_OUT


# glibc's own switch for what cli.py sets with mallopt (fre_torch.jobs.allocator): the reference run with it shows how much
# of the speed-up is the allocator setting alone.
RETAIN_ENV = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={DEFAULT_RETAIN_BYTES}:"
                                f"glibc.malloc.trim_threshold={DEFAULT_RETAIN_BYTES}"}


def _child(code: str, env: dict[str, str] | None = None) -> dict:
    """Run the reference in a fresh process; ``total_s`` is that process's wall time, start to exit, as for the
    fre_torch runs (interpreter start and imports included); its own timings stay under ``inner``."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {"total_s": wall, "auroc": inner.pop("auroc"), "inner": inner}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(data_root() / "magnetic_tile"))
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--write", action="store_true", help="update benchmarks/results/pipeline.json and BENCHMARKS.md")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="fre_pipeline_cache_"))
    code = ("import json; from benchmarks.reference_pipeline import run_reference; "
            f"r = run_reference({args.root!r}, {args.category!r}, {args.backbone!r}); r.pop('scores'); "
            "print(json.dumps(r))")
    ref = _child(code)
    ref_retain = _child(code, RETAIN_ENV)
    ours = {}
    # Like for like: the reference computes image scores only, so the first two runs do too (--pixel_metrics
    # off); the last adds maps and pixel AUROC / PRO / pixel F1-max, which the reference does not compute.
    modes = {"default": ["--pixel_metrics", "off"],
             "default, allocator untouched": ["--pixel_metrics", "off"],
             "reference": ["--reference", "--pixel_metrics", "off"],
             "default + pixel metrics": [],
             "default, --cache first run": ["--pixel_metrics", "off", "--cache", str(cache)],
             "default, --cache second run": ["--pixel_metrics", "off", "--cache", str(cache)],
             "default, --cache --cache_images_only second run": ["--pixel_metrics", "off", "--cache", str(cache),
                                                                 "--cache_images_only"]}
    for mode, flags in modes.items():
        env = {**os.environ, ENV_OPT_OUT: "0"} if "untouched" in mode else None
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "cli.py", "evaluate", "--dataset_directory", args.root,
                        "--object_category", args.category, "--model", args.backbone, "--json",
                        "/tmp/fre_pipeline.json", *flags],
                       cwd=REPO, capture_output=True, text=True, check=True, env=env)
        wall = time.perf_counter() - t0
        doc = json.loads(open("/tmp/fre_pipeline.json").read())["categories"][args.category]
        ours[mode] = {"total_s": wall, "auroc": doc["image_auroc"], "fit_s": doc["fit_seconds"],
                      "test_images_per_second": doc["test_images_per_second"]}
    shutil.rmtree(cache, ignore_errors=True)
    from fre_torch.features.images import MVTecCategory

    c = MVTecCategory.load(args.root, args.category)
    n_images = len(c.train) + len(c.test)  # every image is read once per run: fit on train, score test
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "dataset": f"{args.root}/{args.category}",
           "backbone": args.backbone, "n_images": n_images, "reference_pipeline": ref,
           "reference_pipeline_retain": ref_retain, "fre_torch": ours}
    print(json.dumps(doc, indent=2))
    table = markdown(doc)
    print("\n" + table)
    if args.write:
        out = REPO / "benchmarks" / "results" / "pipeline.json"
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out} and {write_section('pipeline', table)}")

def markdown(doc: dict) -> str:
    """The side-by-side table (machine and date in its caption)."""
    ref, ours = doc["reference_pipeline"], doc["fre_torch"]
    lines = [f"`{doc['dataset']}`, backbone {doc['backbone']}, {doc['date']}; {doc['machine']} "
             "(generated by `python -m benchmarks.run_pipeline --write`)", "",
             "| run | wall s | images/s | image AUROC | speed-up vs reference |", "|---|---|---|---|---|",
             f"| reference pipeline (PIL, batch 64, sklearn PCA) | {ref['total_s']:.1f} | "
             f"{doc['n_images'] / ref['total_s']:.1f} | {ref['auroc']:.4f} | 1.0x |"]
    retain = doc.get("reference_pipeline_retain")
    if retain is not None:
        lines.append(f"| reference pipeline, glibc keeping freed memory (`GLIBC_TUNABLES`, as cli.py does) | "
                     f"{retain['total_s']:.1f} | {doc['n_images'] / retain['total_s']:.1f} | {retain['auroc']:.4f} | "
                     f"{ref['total_s'] / retain['total_s']:.2f}x |")
    for mode, r in ours.items():
        lines.append(f"| fre_torch evaluate ({mode}) | {r['total_s']:.1f} | {doc['n_images'] / r['total_s']:.1f} | "
                     f"{r['auroc']:.4f} | {ref['total_s'] / r['total_s']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
