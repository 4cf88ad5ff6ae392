"""Each stage's rate on real data, before and after the speed work of issue #20, side by side in one process.

    python -m benchmarks.run_stages [--sets bottle magnetic_tile] [--json benchmarks/results/stages.json]

Stages of ``cli.py evaluate`` (EfficientNet-Lite0 at 224 px, its real weights, batch 32, ``cli.py``'s allocator
setting), on every training and test image of each set:

- decode: PIL decoding alone, one thread (images per core-second);
- resize: the reference's LANCZOS resize to 224 px and RGB, one thread: before = RGB first, then resize; after =
  grey images resized first (``fre_torch.features.images._resized_rgb``);
- backbone: normalise + backbone to the deepest layer + the heads' embeddings, both threads: before = the plain
  modules (``extractor.fused = False``), after = the fused CPU kernels;
- fit: the subspaces of both heads and the cell statistics from the training rows: before = eigenproblems on both
  threads and each of the 5 cell-statistics folds a fit with its own Gram matrix and components; after = one
  thread (``fre_torch.core.subspace.symmetric_eigh``) and the folds in dual form from blocks of the fit's Gram
  matrices (``fit_row_span``);
- heads: scores and maps of the test rows (unchanged);
- cross-fit: ``--report`` / ``--save_heatmaps``' 5-fold threshold and map scale from the kept training rows: before
  = a full ``fit`` per fold and held-out rows in batches of 32, after = ``FREDetector.fit_subset`` (dual form, one
  Gram matrix per subspace for all folds);
- metrics: image AUROC, pixel AUROC, PRO and pixel F1-max over the test maps: before = each pixel metric sorting
  the pixels itself, after = ``segmentation_metrics`` (one sort);
- writes: one 3-panel heatmap PNG per test image, one thread: before = zlib level 6, after = level 1.

Before and after run alternately, best of ``--repeat``; the machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import data_root, machine, write_section

SETS = {"bottle": "mvtec_bottle", "magnetic_tile": "magnetic_tile", "screw": "mvtec_screw"}


def _best(fns: dict[str, Callable[[], Any]], repeat: int, clock: Callable[[], float]) -> dict[str, float]:
    """Seconds of each function, alternating, best of ``repeat`` (after one warm-up each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


def _one_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def measure(name: str, repeat: int) -> dict[str, Any]:
    from fre_torch.core import subspace
    from fre_torch.detection.detector import DetectorConfig, FREDetector
    from fre_torch.features.images import MVTecCategory, _resized_rgb, _to_rgb
    from fre_torch.jobs import heatmaps
    from fre_torch.detection import folds as detector_module  # where the fold fits call fit_row_span
    from fre_torch.jobs import crossfit as crossfit_module
    from fre_torch.jobs.crossfit import cross_fit, fit_on_rows
    from fre_torch.jobs.evaluate import _pixel_metrics, evaluation_maps
    from fre_torch.detection.metrics import auroc, pixel_auroc, pixel_f1_max, pro

    cat = MVTecCategory.load(data_root() / SETS[name], name)
    paths = list(cat.train) + list(cat.test_paths)
    blobs = [Path(p).read_bytes() for p in paths]
    n_train, n_test = len(cat.train), len(cat.test_paths)
    row: dict[str, Any] = {"n_train": n_train, "n_test": n_test}

    def decode() -> list[Image.Image]:
        out = []
        for b in blobs:
            im = Image.open(io.BytesIO(b))
            im.load()
            out.append(im)
        return out

    decoded = decode()
    t = _best({"decode": decode}, 1, time.process_time)
    row["decode"] = {"after": len(paths) / t["decode"]}
    t = _best({"before": lambda: [_to_rgb(im).resize((224, 224), Image.Resampling.LANCZOS) for im in decoded],
               "after": lambda: [_resized_rgb(im, 224, 224) for im in decoded]}, repeat, time.process_time)
    row["resize"] = {k: len(paths) / v for k, v in t.items()}
    images = torch.stack([torch.from_numpy(np.asarray(_resized_rgb(im, 224, 224)).copy()).permute(2, 0, 1)
                          for im in decoded])
    train, test = images[:n_train], images[n_train:]

    det = FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu")

    def rows(data: torch.Tensor) -> list[torch.Tensor]:
        parts = [det.features(data[i:i + 32]) for i in range(0, len(data), 32)]
        return [torch.cat(p) for p in zip(*parts)]

    def backbone(fused: bool) -> Callable[[], Any]:
        def run() -> Any:
            det.extractor.fused = fused
            return rows(test)
        return run

    t = _best({"before": backbone(False), "after": backbone(True)}, repeat, time.perf_counter)
    row["backbone"] = {k: n_test / v for k, v in t.items()}
    train_rows, test_rows = rows(train), rows(test)

    def fold_fits_with_components(rows: torch.Tensor, n_components: Any, *, gram: torch.Tensor,
                                  keep: torch.Tensor) -> Any:
        return subspace.fit_gram(rows[keep].float(), n_components)  # before: a Gram matrix and components per fold

    def before_issue_20(fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` on the code paths before issue #20: eigenproblems on both threads, every fold fit (cell statistics
        and cross-fit) a full fit with its own Gram matrix and components, held-out rows in batches of 32."""
        def run() -> Any:
            saved = (subspace._EIGH_ONE_THREAD_MAX, detector_module.fit_row_span, crossfit_module.is_distributed,
                     crossfit_module._HELD_BATCH)
            subspace._EIGH_ONE_THREAD_MAX = 0
            detector_module.fit_row_span = fold_fits_with_components
            crossfit_module.is_distributed = lambda: True  # one process as rank 0 of 1: fold fits through ``fit``
            crossfit_module._HELD_BATCH = 0
            try:
                return fn()
            finally:
                (subspace._EIGH_ONE_THREAD_MAX, detector_module.fit_row_span, crossfit_module.is_distributed,
                 crossfit_module._HELD_BATCH) = saved
        return run

    def fit() -> Any:
        return fit_on_rows(det, train_rows)

    t = _best({"before": before_issue_20(fit), "after": fit}, repeat, time.perf_counter)
    row["fit"] = {k: n_train / v for k, v in t.items()}
    t = _best({"heads": lambda: (det.score_features(test_rows), det.maps_from_features(test_rows))}, repeat,
              time.perf_counter)
    row["heads"] = {"after": n_test / t["heads"]}
    scores, maps = det.score_features(test_rows), det.maps_from_features(test_rows)

    def crossfit() -> Any:
        return cross_fit(det, rows=train_rows, quantile=0.99)

    t = _best({"before": before_issue_20(crossfit), "after": crossfit}, repeat, time.perf_counter)
    row["cross_fit"] = {k: n_train / v for k, v in t.items()}

    def metrics_apart() -> Any:  # before: each pixel metric sorts the pixels itself
        ev_maps, ev_masks = evaluation_maps(cat, maps)
        return auroc(scores, cat.test_labels), pixel_auroc(ev_maps, ev_masks), pro(ev_maps, ev_masks), \
            pixel_f1_max(ev_maps, ev_masks)

    t = _best({"before": metrics_apart, "after": lambda: (auroc(scores, cat.test_labels), _pixel_metrics(cat, maps))},
              repeat, time.perf_counter)
    row["metrics"] = {k: n_test / v for k, v in t.items()}
    scale = float(maps.quantile(0.999))
    sample = list(range(0, n_test, max(1, n_test // 40)))

    def write(level: int | None) -> Callable[[], Any]:
        def run() -> Any:  # level None: encode_png (the "up" filter, zlib level 1); else PIL at that zlib level
            for i in sample:
                picture = heatmaps.render_file(cat.test_paths[i], maps[i], scale, mask=cat.mask_paths[i],
                                               normal=cat.mask_paths[i] is None)
                if level is None:
                    heatmaps.encode_png(picture)
                else:
                    picture.save(io.BytesIO(), format="PNG", compress_level=level)
        return _one_thread(run)

    t = _best({"before": write(6), "after": write(None)}, repeat, time.process_time)
    row["writes"] = {k: len(sample) / v for k, v in t.items()}
    return row


STAGES = ("decode", "resize", "backbone", "fit", "heads", "cross_fit", "metrics", "writes")
UNITS = {"decode": "img/core-s", "resize": "img/core-s", "backbone": "img/s", "fit": "train img/s",
         "heads": "img/s", "cross_fit": "train img/s", "metrics": "img/s", "writes": "img/core-s"}


def table(results: dict[str, Any]) -> str:
    names = list(results["sets"])
    lines = [f"Machine: {results['machine']}; 1-min load average {results['load'][0]:.1f} before, "
             f"{results['load'][1]:.1f} after.", "",
             "| stage | unit | " + " | ".join(f"{n} before | {n} after | {n} x" for n in names) + " |",
             "|---|---|" + "---|---|---|" * len(names)]
    for stage in STAGES:
        cells = []
        for n in names:
            v = results["sets"][n][stage]
            after = v["after"]
            before = v.get("before", after)
            cells += [f"{before:,.0f}" if "before" in v else "=", f"{after:,.0f}", f"{after / before:.2f}"]
        lines.append(f"| {stage} | {UNITS[stage]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["bottle", "magnetic_tile"], choices=list(SETS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="replace the stages section of BENCHMARKS.md")
    args = ap.parse_args()
    from fre_torch.jobs.allocator import retain_if_requested

    retain_if_requested()  # as cli.py does
    load = [os.getloadavg()[0]]
    results: dict[str, Any] = {"sets": {n: measure(n, args.repeat) for n in args.sets}}
    load.append(os.getloadavg()[0])
    results.update(machine=machine(), load=load, date=time.strftime("%Y-%m-%d"))
    text = table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        write_section("stages", text)


if __name__ == "__main__":
    main()
