"""PatchCore (``benchmarks/patchcore.py``, a baseline) against fre_torch's default ``evaluate``, on the same backbone.

    python -m benchmarks.run_patchcore [--data DIR] [--sets bottle screw magnetic_tile] [--threads N]
        [--json benchmarks/results/patchcore.json] [--write]

Per data set, in one process, one after the other with the same torch thread count: the default (``fre_torch.jobs.run
.evaluate`` with default settings, CPU: what ``cli.py evaluate --device cpu`` runs) and PatchCore on
EfficientNet-Lite0 at 224 px. Both read the images with the same loader (``ImageDataset`` + ``make_loader``: PIL
decoding and LANCZOS resizing in DataLoader worker processes, batch 32) and have their pixel metrics computed the same
way: maps resized bilinear to the test images' own size (256 x 256 for a set of mixed sizes, masks nearest) by
``fre_torch.jobs.evaluate.evaluation_maps``, then ``fre_torch.detection.metrics``. Reported: image AUROC, pixel AUROC,
PRO (FPR <= 0.3), fit seconds (reading the training images, backbone and fit: for PatchCore the patch features and
the coreset) and test images per second (reading, backbone, scoring and maps; for PatchCore the maps' upsampling and
blur too). Published figures of PatchCore on Lite0 are listed beside ours.

``--json`` writes the document there; ``--write`` writes it to benchmarks/results/patchcore.json (unless ``--json``
names another file) and the table into BENCHMARKS.md between ``<!-- patchcore:begin -->`` / ``<!-- patchcore:end -->``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, data_root, machine, write_section
from benchmarks.patchcore import PatchCore, PatchCoreConfig
from fre_torch.detection.metrics import auroc, pixel_auroc, pro
from fre_torch.features.images import ImageDataset, MVTecCategory, make_loader
from fre_torch.jobs.allocator import retain_if_requested
from fre_torch.jobs.evaluate import evaluation_maps
from fre_torch.jobs.run import EvaluateSettings, evaluate

# Data set -> its folder under the data root (MVTec layout inside: <folder>/<category>/train/good, ...).
SETS = {"bottle": "mvtec_bottle", "screw": "mvtec_screw", "magnetic_tile": "magnetic_tile"}
# PatchCore on EfficientNet-Lite0, published figures: image AUROC, pixel AUROC, PRO.
PUBLISHED = {"bottle": (1.000, 0.981, 0.922), "screw": (0.909, 0.964, 0.860), "magnetic_tile": (0.943, 0.836, 0.725)}
BATCH = 32  # evaluate's default
OUT = REPO / "benchmarks" / "results" / "patchcore.json"


def _batches(paths: list[Path], size: int):
    """uint8 image batches, read as ``evaluate`` reads them on the CPU (same dataset, loader and workers)."""
    return (b["image"] for b in make_loader(ImageDataset(paths, size), BATCH, "cpu"))


def run_patchcore(model: PatchCore, cat: MVTecCategory) -> dict[str, Any]:
    """Fit ``model`` on ``cat``'s training images, score its test images: metrics, times, memory bank size."""
    size = model.config.input_size
    t0 = time.perf_counter()
    patches = model.patches(_batches(cat.train, size), len(cat.train))
    t1 = time.perf_counter()
    model.build_bank(patches)
    fit_s, features_s = time.perf_counter() - t0, t1 - t0
    t0 = time.perf_counter()
    scores, maps = model.score_and_maps(_batches(cat.test_paths, size), len(cat.test_paths))
    test_s = time.perf_counter() - t0
    # As evaluate's pixel metrics: maps at the evaluation size, defective images without a mask left out.
    maps, masks = evaluation_maps(cat, maps)
    keep = torch.tensor([s.label == 0 or s.mask is not None for s in cat.test])
    return {"image_auroc": float(auroc(scores, cat.test_labels)),
            "pixel_auroc": float(pixel_auroc(maps[keep], masks[keep])), "pro": float(pro(maps[keep], masks[keep])),
            "fit_s": fit_s, "fit_features_s": features_s, "fit_coreset_s": fit_s - features_s,
            "test_images_per_second": len(cat.test) / test_s,
            "training_patches": patches.shape[0], "memory_bank": model.memory_bank.shape[0]}


def run_default(root: Path, name: str) -> dict[str, Any]:
    """``evaluate`` with its default settings on the CPU (the detector is built before its timings start)."""
    result = evaluate(EvaluateSettings(root=root, categories=(name,), device="cpu"))
    r = next(iter(result.results.values()))[name]
    return {"image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "pro": r["pro"],
            "fit_s": r["fit_seconds"], "test_images_per_second": r["test_images_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(data_root()), help="folder holding mvtec_bottle/, mvtec_screw/, "
                    "magnetic_tile/ (default: $FRE_TORCH_DATA, else ../shared/data)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for both methods (default: torch's, e.g. from OMP_NUM_THREADS)")
    ap.add_argument("--json", default=None, help=f"write the results there (with --write: default {OUT})")
    ap.add_argument("--write", action="store_true", help="also put the table into BENCHMARKS.md")
    args = ap.parse_args()
    retain_if_requested()  # as cli.py does, for both methods
    torch.set_num_threads(args.threads)
    model = PatchCore(PatchCoreConfig())
    model.embed(torch.zeros(BATCH, 3, 224, 224, dtype=torch.uint8))  # warm-up, untimed, before either method
    doc: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "batch_size": BATCH,
                           "patchcore_config": vars(PatchCoreConfig()), "sets": {}}
    for name in args.sets:
        root = Path(args.data) / SETS[name]
        cat = MVTecCategory.load(root, name)
        default = run_default(root, name)
        ours = run_patchcore(model, cat)
        doc["sets"][name] = {"n_train": len(cat.train), "n_test": len(cat.test), "fre_torch_default": default,
                             "patchcore": ours, "patchcore_published": dict(zip(("image_auroc", "pixel_auroc", "pro"),
                                                                               PUBLISHED[name]))}
        print(json.dumps({name: doc["sets"][name]}), flush=True)
    table = markdown(doc)
    print("\n" + table)
    out = Path(args.json) if args.json else (OUT if args.write else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
    if args.write:
        print(f"wrote {write_section('patchcore', table)}")


def _coreset_bytes(doc: dict[str, Any], result: dict[str, Any]) -> int:
    """Bytes the greedy coreset streams: the whole float32 projection (N x projection_dim) once per bank patch."""
    return result["training_patches"] * doc["patchcore_config"]["projection_dim"] * 4 * result["memory_bank"]


def markdown(doc: dict[str, Any]) -> str:
    """The side-by-side table, its caption naming machine, threads, date and torch version."""
    lines = [f"{doc['date']}, {doc['machine']}; both methods with {doc['threads']} torch thread(s), batch "
             f"{doc['batch_size']}, images decoded in DataLoader workers (generated by `python -m "
             "benchmarks.run_patchcore --write`)", "",
             "| set (train / test images) | method | image AUROC | pixel AUROC | PRO | fit s | test img/s | "
             "time / default's (fit, per test image) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in doc["sets"].items():
        d, p, ref = s["fre_torch_default"], s["patchcore"], s["patchcore_published"]
        lines += [f"| {name} ({s['n_train']} / {s['n_test']}) | fre_torch default | {d['image_auroc']:.3f} | "
                  f"{d['pixel_auroc']:.3f} | {d['pro']:.3f} | {d['fit_s']:.1f} | {d['test_images_per_second']:.1f} "
                  "| 1.0x, 1.0x |",
                  f"| | PatchCore, Lite0 (bank {p['memory_bank']} of {p['training_patches']} patches) | "
                  f"{p['image_auroc']:.3f} | {p['pixel_auroc']:.3f} | {p['pro']:.3f} | {p['fit_s']:.1f} "
                  f"({p['fit_features_s']:.1f} features + {p['fit_coreset_s']:.1f} coreset: "
                  f"{_coreset_bytes(doc, p) / 1e9:.0f} GB at {_coreset_bytes(doc, p) / 1e9 / p['fit_coreset_s']:.1f} "
                  "GB/s) | "
                  f"{p['test_images_per_second']:.1f} | {p['fit_s'] / d['fit_s']:.1f}x, "
                  f"{d['test_images_per_second'] / p['test_images_per_second']:.1f}x |",
                  f"| | PatchCore, Lite0, published | {ref['image_auroc']:.3f} | {ref['pixel_auroc']:.3f} | "
                  f"{ref['pro']:.3f} | | | |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
