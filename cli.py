#!/usr/bin/env python3
"""fre_torch command line: ``evaluate`` (the reference run_mvtec.py, and better), ``fit`` / ``predict`` on your
own images, ``export`` (a saved model as one ONNX / TorchScript graph), and ``demo``.

    python cli.py demo
    python cli.py evaluate --dataset_directory ../shared/data/mvtec_bottle --object_category bottle \\
        --model efficientnet_lite0 --device cpu --json out/bottle.json

Bad input ends with exit code 2 and one readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time: --help stays fast
    from fre_torch.features.images import FeatureCache

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise (logs stay clean)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() and _is_main()
        self.t0 = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.enabled:
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.label:<20} [{bar:<30}] {self.done}/{self.total} {rate:.0f} img/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py", description="Anomaly detection by feature reconstruction error.")
    sub = p.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="fit on train/good and evaluate on test/* of an MVTec-layout folder")
    ev.add_argument("--dataset_directory", default="./mvtec", help="root holding <category>/train, test, ...")
    ev.add_argument("--object_category", nargs="+", default=["all"],
                    help="one or more categories, or 'all' (every category folder present)")
    ev.add_argument("--model", default="efficientnet_b5", help="backbone (see --list_models)")
    ev.add_argument("--layers", nargs="+", default=None, help="backbone layers (default: per backbone)")
    ev.add_argument("--input_size", type=int, default=0, help="square input side (default: per backbone)")
    ev.add_argument("--pool", type=int, default=2, help="average-pool kernel of the first layer (default 2)")
    ev.add_argument("--fusion", choices=["sum", "concat"], default="sum",
                    help="several layers: one subspace each, normalised scores summed (default), or one subspace "
                         "on the concatenated vectors")
    ev.add_argument("--kernel", choices=["rbf", "laplacian"], default=None,
                    help="kernel FRE (nonlinear, image scores only) instead of linear FRE")
    ev.add_argument("--kernel_features", type=int, default=4096, help="explicit kernel features M (default 4096)")
    ev.add_argument("--kernel_method", choices=["rff", "nystroem"], default="rff",
                    help="random Fourier features (default) or Nystroem landmarks")
    ev.add_argument("--pca", type=float, default=0.97,
                    help="explained-variance fraction in (0, 1), or an integer number of components")
    ev.add_argument("--modes", nargs="+", choices=["pca", "tae", "ae"], default=["pca"],
                    help="one or more fits to compare, each at the k of --pca: pca (closed form, default), tae / ae "
                         "(tied / untied linear autoencoder trained with Adam on the device); one table per mode, "
                         "JSON keyed by mode when several")
    ev.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ev.add_argument("--gpu", action="store_true", help="same as --device cuda")
    ev.add_argument("--batch_size", type=int, default=32)
    ev.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: up to 4)")
    ev.add_argument("--weights", default=None, help="local backbone weights file (state dict)")
    ev.add_argument("--reference", action="store_true",
                    help="run the reference configuration exactly (one layer, pool 2, ImageNet normalisation, "
                         "plain FRE)")
    ev.add_argument("--pixel_metrics", choices=["auto", "off"], default="auto",
                    help="auto: maps and pixel AUROC / PRO / pixel F1-max where masks exist; off: image metrics only")
    ev.add_argument("--json", default=None, help="write the results as JSON to this path")
    ev.add_argument("--save_heatmaps", default=None, metavar="DIR",
                    help="write one PNG per test image to DIR/<category>/<defect>_<stem>.png: image | anomaly map "
                         "overlay (fixed colour scale from cross-fitted training images) | ground-truth outline")
    ev.add_argument("--report", default=None, metavar="DIR",
                    help="write a static HTML report to DIR/index.html: curves, score histograms with the "
                         "threshold, metrics, worst images (needs matplotlib: pip install -e .[report])")
    ev.add_argument("--list_models", action="store_true", help="print the available backbones and exit")
    ev.add_argument("--scores_csv", default=None, metavar="PATH",
                    help="write every test image's score to PATH (category,path,label,score; test order)")
    _add_solver_and_distributed(ev)
    _add_speed_flags(ev, cache=True)
    ev.add_argument("--cache_images_only", action="store_true",
                    help="with --cache: keep preprocessed images only, not features")
    ev.add_argument("--resize", choices=["auto", "cpu", "device"], default="auto",
                    help="where images are resized: cpu (LANCZOS in the loader workers, the reference), device "
                         "(after transfer; bilinear, antialiased; images of one size) or auto (device on CUDA when "
                         "a category's images share one size)")

    fit = sub.add_parser("fit", help="fit on a folder of normal images and save a model file with a threshold")
    fit.add_argument("--train_dir", required=True, help="folder of normal images (searched recursively)")
    fit.add_argument("--out", required=True, help="model file to write")
    fit.add_argument("--model", default="efficientnet_lite0", help="backbone (default efficientnet_lite0)")
    fit.add_argument("--layers", nargs="+", default=None)
    fit.add_argument("--input_size", type=int, default=0)
    fit.add_argument("--pca", type=float, default=0.97)
    fit.add_argument("--holdout", type=float, default=0.2,
                     help="fraction of the normal images held out to set the threshold (default 0.2)")
    fit.add_argument("--quantile", type=float, default=0.99,
                     help="threshold = this quantile of the held-out scores (default 0.99: ~1%% flagged)")
    fit.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    fit.add_argument("--batch_size", type=int, default=32)
    fit.add_argument("--workers", type=int, default=None)
    fit.add_argument("--weights", default=None, help="local backbone weights file (state dict)")
    fit.add_argument("--strict", action="store_true",
                     help="stop at the first unreadable image (default: skip unreadable images and list them)")
    _add_solver_and_distributed(fit)
    _add_speed_flags(fit, cache=True)

    pr = sub.add_parser("predict", help="score images with a saved model; writes predictions.csv")
    pr.add_argument("--model_file", required=True)
    pr.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--out", default=".", help="folder for predictions.csv (default: current folder)")
    pr.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pr.add_argument("--batch_size", type=int, default=32)
    pr.add_argument("--workers", type=int, default=None)
    pr.add_argument("--weights", default=None, help="the local backbone weights file the model was fitted with")
    _add_speed_flags(pr, cache=False)
    pr.add_argument("--save_heatmaps", action="store_true",
                    help="also write OUT/heatmaps/<folder>_<stem>.png per readable image: image | anomaly map "
                         "overlay, coloured on the model's fixed scale")

    ex = sub.add_parser("export", help="export a saved model as one ONNX or TorchScript graph (uint8 images -> "
                                       "score, map), checked against torch before it is written")
    ex.add_argument("--model_file", required=True)
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    ex.add_argument("--out", required=True, help="the file to write")
    ex.add_argument("--batch_size", type=int, default=8,
                    help="batch of the trace example and the self-check (default 8); the graph takes any batch")
    ex.add_argument("--weights", default=None, help="the local backbone weights file the model was fitted with")
    ex.add_argument("--check_images", nargs="+", default=None,
                    help="real image files, folders or globs to add to the self-check (a sample is enough)")

    demo = sub.add_parser("demo", help="generate a small synthetic MVTec-layout dataset and evaluate it")
    demo.add_argument("--out", default=None, help="folder for the dataset (default: a temporary folder)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", default=None)
    return p


def _add_solver_and_distributed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=["auto", "gram", "covariance"], default="auto",
                   help="subspace solver: Gram (N x N, when N < D), covariance (D x D, streaming) or auto (by shape)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of torchrun (automatic when torchrun's environment is set): "
                        "each rank reads a shard of the images, statistics are reduced exactly, rank 0 writes")
    p.add_argument("--dist_timeout", type=float, default=None, metavar="SECONDS",
                   help="distributed: how long a rank waits for the others before failing (default 600)")


def _add_speed_flags(p: argparse.ArgumentParser, cache: bool) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone (static shapes, warmed up first); pays on CUDA, ~30 s to "
                        "compile on a CPU")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="backbone precision (default auto: bf16 autocast on CUDA, fp32 on the CPU)")
    if cache:
        p.add_argument("--cache", default=None, metavar="DIR",
                       help="keep decoded, resized images in DIR (keyed by file content and settings, never stale) "
                            "so later runs skip decoding; evaluate and fit also keep the backbone's features there "
                            "(keyed by the input pixels, weights and feature settings) and skip the backbone too")


def _is_main() -> bool:
    """Rank 0, or not distributed: the process that prints and writes files."""
    if "fre_torch.core.distributed" not in sys.modules:  # not imported yet: no process group can exist
        return True
    return sys.modules["fre_torch.core.distributed"].is_main_process()


def _start_distributed(args: argparse.Namespace, device: str) -> str:
    """Join torchrun's process group when asked (--distributed) or launched by torchrun; this rank's device."""
    from fre_torch.core import distributed

    if not (args.distributed or distributed.env_requests_distributed()):
        return device
    timeout = distributed.DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    if timeout <= 0:
        raise CliError(f"--dist_timeout must be > 0 seconds, got {args.dist_timeout}")
    return str(distributed.init_from_env(device, timeout=timeout))


def _check_outputs(files: dict[str, str | None] | None = None, dirs: dict[str, str | None] | None = None) -> None:
    """Every output path given, checked before any image is read (``fre_torch.features.files``): the wrong kind, a missing
    parent folder or an unwritable place ends the run now, with one line naming the fix."""
    from fre_torch.features.files import check_output_dir, check_output_file

    for flag, path in (files or {}).items():
        if path is not None:
            check_output_file(path, f"{flag} {path}")
    for flag, path in (dirs or {}).items():
        if path is not None:
            check_output_dir(path, f"{flag} {path}")


def _n_components(value: float) -> int | float:
    if value >= 1:
        if value != int(value):
            raise CliError(f"--pca {value}: use a fraction in (0, 1) or a whole number of components")
        return int(value)
    if value <= 0:
        raise CliError(f"--pca {value}: must be a fraction in (0, 1) or a whole number of components >= 1")
    return float(value)


def _run_evaluate(root: Path, categories: list[str], config, device: str, batch_size: int,
                  workers: int | None, weights: str | None, json_path: str | None, extra: dict,
                  pixel_metrics: bool = True, heatmap_dir: str | None = None, report_dir: str | None = None,
                  scores_csv: str | None = None, speed: dict | None = None, modes: tuple[str, ...] = ()) -> int:
    """Evaluate ``config`` once per mode of ``modes`` (empty = ``config.mode`` alone): one table per mode; the JSON
    document is ``summarize``'s for one mode, ``{"modes": {mode: summarize(...)}}`` for several."""
    from fre_torch.features.images import list_categories
    from fre_torch.core.distributed import is_distributed, world_size
    from fre_torch.jobs.evaluate import format_table, summarize, write_json

    if not root.is_dir():
        raise CliError(f"dataset directory not found: {root} (expected <root>/<category>/train/good, test/...)")
    present = list_categories(root)
    if categories == ["all"]:
        categories = present
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise CliError(f"unknown category {', '.join(unknown)} in {root}; present: {', '.join(present) or 'none'}")
    if batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {batch_size}")
    speed = speed or {}
    modes = tuple(dict.fromkeys(modes or (config.mode,)))  # in order, without repeats
    if len(modes) > 1 and (heatmap_dir or report_dir or scores_csv):
        raise CliError("--save_heatmaps, --report and --scores_csv take one mode; run once per mode with --modes M")
    configs = {mode: dataclasses.replace(config, mode=mode) for mode in modes}  # ValueError: e.g. kernel + 'tae'
    # Every mode fits the same features: the first mode's pass keeps them in memory for the others (N x D float32
    # per image; --cache keeps them on disk instead), so the backbone runs once per image, not once per mode.
    shared = None
    if len(modes) > 1:
        from fre_torch.features.images import FeatureCache

        shared = FeatureCache(None)
    by_mode = {mode: _evaluate_categories(root, categories, cfg, device, batch_size, workers, weights, pixel_metrics,
                                          heatmap_dir, report_dir, speed, shared)
               for mode, cfg in configs.items()}
    if not _is_main():
        return 0  # data-parallel: rank 0 prints and writes
    if is_distributed():
        extra = {**extra, "world_size": world_size()}
    for mode, (results, _) in by_mode.items():
        if len(modes) > 1:
            print(f"mode: {mode}")
        print(format_table(results))
    results, score_rows = by_mode[modes[0]]  # the outputs below take one mode
    config = configs[modes[0]]
    if scores_csv:
        print(f"wrote {_write_scores_csv(scores_csv, score_rows)}")
    if heatmap_dir:
        print(f"wrote {sum(r['n_test'] for r in results.values())} heatmaps to {heatmap_dir}")
    if report_dir:
        from fre_torch.jobs.report import write_report

        index = write_report(report_dir, results, title=f"fre_torch evaluate: {root}",
                             config={**config.to_dict(), **extra, "device": device})
        print(f"wrote {index}")
    if json_path:
        run = {**extra, "device": device, "batch_size": batch_size}
        document = (summarize(results, config, run) if len(modes) == 1 else
                    {"modes": {mode: summarize(by_mode[mode][0], configs[mode], run) for mode in modes}})
        print(f"wrote {write_json(json_path, document)}")
    return 0


def _evaluate_categories(root: Path, categories: list[str], config, device: str, batch_size: int,
                         workers: int | None, weights: str | None, pixel_metrics: bool, heatmap_dir: str | None,
                         report_dir: str | None, speed: dict,
                         feature_cache: FeatureCache | None = None) -> tuple[dict, list[tuple[str, str, int, float]]]:
    """Fit and evaluate one configuration on every category: (results per category, score rows for the CSV)."""
    from fre_torch.features.images import MVTecCategory
    from fre_torch.detection.detector import FREDetector
    from fre_torch.core.distributed import shard
    from fre_torch.jobs.evaluate import evaluate_category

    detector = FREDetector(config, device=device, weights=weights, compile=speed.get("compile", False),
                           precision=speed.get("precision", "auto"), feature_cache=feature_cache)
    if detector.compiled:
        detector.warmup(batch_size)  # compile once, before the timed fit and test passes
    results = {}
    # Heatmaps and the report take one more pass over the training images (map scale and threshold).
    passes = 2 if heatmap_dir or report_dir else 1
    score_rows: list[tuple[str, str, int, float]] = []
    for name in categories:
        cat = MVTecCategory.load(root, name)
        # Data-parallel: this rank reads its shard only (all images otherwise).
        n_train = len(shard(cat.train, unit=batch_size, what=f"{name} training images"))
        bar = _Progress(passes * n_train + len(shard(cat.test, unit=batch_size, what=f"{name} test images")), name)
        try:
            results[name] = evaluate_category(detector, root, name, batch_size=batch_size, num_workers=workers,
                                              progress=bar, pixel_metrics=pixel_metrics,
                                              heatmap_dir=Path(heatmap_dir) / name if heatmap_dir else None,
                                              keep_maps=report_dir is not None, cache=speed.get("cache"),
                                              cache_features=not speed.get("cache_images_only", False),
                                              resize=speed.get("resize", "auto"))
        finally:
            bar.close()
        score_rows += [(name, str(p.relative_to(root)), int(label), score)
                       for p, label, score in zip(cat.test_paths, cat.test_labels, results[name].get("scores", []))]
    return results, score_rows


def _write_scores_csv(path: str, rows: list[tuple[str, str, int, float]]) -> Path:
    """``category,path,label,score`` per test image (path relative to the dataset root), written atomically."""
    import csv

    from fre_torch.features.files import atomic_write

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category", "path", "label", "score"])
        w.writerows([c, p, label, f"{score:.9g}"] for c, p, label, score in rows)  # 9 digits: float32 round trip
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fre_torch.features.backbones import list_backbones
    from fre_torch.detection.detector import DetectorConfig

    if args.list_models:
        print("\n".join(list_backbones()))
        return 0
    _check_outputs(files={"--json": args.json, "--scores_csv": args.scores_csv},
                   dirs={"--report": args.report, "--save_heatmaps": args.save_heatmaps, "--cache": args.cache})
    device = _start_distributed(args, "cuda" if args.gpu else (args.device or "cpu"))
    if args.model not in list_backbones():
        raise CliError(f"unknown model {args.model!r}; available: {', '.join(list_backbones())}")
    if args.reference:
        config = DetectorConfig.reference(args.model)
    else:
        config = DetectorConfig(backbone=args.model, layers=tuple(args.layers or ()), input_size=args.input_size,
                                pool=args.pool, n_components=_n_components(args.pca), fusion=args.fusion,
                                kernel=args.kernel, kernel_features=args.kernel_features,
                                kernel_method=args.kernel_method)
    if args.solver != config.solver:
        config = dataclasses.replace(config, solver=args.solver)
    if args.kernel is not None and args.save_heatmaps:
        raise CliError("--save_heatmaps needs anomaly maps, which kernel FRE does not give (it scores whole-image "
                       "vectors); drop --kernel")
    if args.report:
        from fre_torch.jobs.report import check_report_dependencies

        check_report_dependencies()  # before the long run, not after it
    if args.kernel is not None and args.pixel_metrics == "auto" and _is_main():
        print("note: pixel metrics need the linear mode (kernel FRE scores whole images); reporting image metrics",
              file=sys.stderr)
    return _run_evaluate(Path(args.dataset_directory), list(args.object_category), config, device,
                         args.batch_size, args.workers, args.weights, args.json, {"reference": args.reference},
                         pixel_metrics=args.pixel_metrics == "auto", heatmap_dir=args.save_heatmaps,
                         report_dir=args.report, scores_csv=args.scores_csv,
                         speed={"compile": args.compile, "precision": args.precision, "cache": args.cache,
                                "cache_images_only": args.cache_images_only, "resize": args.resize},
                         modes=tuple(args.modes))


def cmd_fit(args: argparse.Namespace) -> int:
    from fre_torch.features.backbones import list_backbones
    from fre_torch.detection.detector import DetectorConfig
    from fre_torch.jobs.predict import fit_folder

    _check_outputs(files={"--out": args.out}, dirs={"--cache": args.cache})
    if args.model not in list_backbones():
        raise CliError(f"unknown model {args.model!r}; available: {', '.join(list_backbones())}")
    if not Path(args.train_dir).is_dir():
        raise CliError(f"training folder not found: {args.train_dir}")
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {args.batch_size}")
    config = DetectorConfig(backbone=args.model, layers=tuple(args.layers or ()), input_size=args.input_size,
                            n_components=_n_components(args.pca), solver=args.solver)
    device = _start_distributed(args, args.device)
    result = fit_folder(args.train_dir, config, device=device, holdout=args.holdout, quantile=args.quantile,
                        batch_size=args.batch_size, num_workers=args.workers, weights=args.weights, cache=args.cache,
                        compile=args.compile, precision=args.precision, strict=args.strict)
    if not _is_main():
        return 0  # data-parallel: every rank holds the same model; rank 0 writes it
    det = result.detector
    if result.skipped:
        shown = "; ".join(f"{p}" + (f" ({why.split(': ', 1)[-1]})" if why else "") for p, why in result.skipped[:3])
        more = f" and {len(result.skipped) - 3} more" if len(result.skipped) > 3 else ""
        print(f"warning: skipped {len(result.skipped)} unreadable image(s) of {result.n_images}: {shown}{more} "
              "(--strict to stop instead)", file=sys.stderr)
    path = det.save(args.out)
    size_mb = path.stat().st_size / 2**20
    stats = det.threshold_stats()
    print(f"wrote {path} ({size_mb:.1f} MB): {args.model} {list(config.layers)}, fitted on {result.n_fit} images")
    print(f"threshold {float(det.threshold):.4g} = the {args.quantile:g} quantile of the held-out normal images' "
          f"scores: {stats.summary()}")
    warning = stats.warning(args.holdout)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fre_torch.detection.detector import FREDetector
    from fre_torch.jobs.predict import check_predict_outputs, predict_paths, resolve_inputs, write_predictions_csv

    check_predict_outputs(args.out, heatmaps=args.save_heatmaps)
    det = FREDetector.load(args.model_file, device=args.device, weights=args.weights, compile=args.compile,
                           precision=args.precision)
    if det.compiled:
        det.warmup(args.batch_size)
    scale = None
    if args.save_heatmaps:
        from fre_torch.jobs.heatmaps import heatmap_scale

        scale = heatmap_scale(det)  # a model without a map scale fails here, before any image is scored
    paths = resolve_inputs(args.paths)
    bar = _Progress(len(paths), "predict")
    try:
        rows = predict_paths(det, paths, batch_size=args.batch_size, num_workers=args.workers, progress=bar,
                             maps=args.save_heatmaps)
    finally:
        bar.close()
    failed = [r for r in rows if r["error"]]
    if len(failed) == len(rows):
        raise CliError(f"none of the {len(rows)} input image(s) could be read, e.g. {failed[0]['error']}; nothing "
                       "was written")
    out = write_predictions_csv(rows, args.out)
    flagged = sum(1 for r in rows if r["is_anomalous"])
    print(f"wrote {out}: {len(rows)} images, {flagged} anomalous, {len(failed)} unreadable")
    if scale is not None:
        import torch

        from fre_torch.jobs.heatmaps import save_heatmaps

        scored = [r for r in rows if r["map"] is not None]  # unreadable images: reported in the CSV, no heatmap
        heat_dir = Path(args.out) / "heatmaps"
        save_heatmaps(heat_dir, [r["path"] for r in scored], torch.stack([r["map"] for r in scored]), scale)
        print(f"wrote {len(scored)} heatmaps to {heat_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from fre_torch.features.images import load_image
    from fre_torch.detection.detector import FREDetector
    from fre_torch.jobs.export import MAP_TOLERANCE, SCORE_TOLERANCE, export_detector
    from fre_torch.jobs.predict import resolve_inputs

    _check_outputs(files={"--out": args.out})
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {args.batch_size}")
    det = FREDetector.load(args.model_file, device="cpu", weights=args.weights)  # exports trace on the CPU
    real = None
    if args.check_images:
        size = det.config.input_size
        real = torch.stack([load_image(p, size) for p in resolve_inputs(args.check_images)])
    r = export_detector(det, args.out, args.format, batch_size=args.batch_size, check_images=real)
    if r.warning:
        print(f"warning: {r.warning}", file=sys.stderr)
    opset = f" (opset {r.opset})" if r.opset is not None else ""
    shape = ", ".join(str(v) for v in r.input_shape)
    outputs = ", ".join(f"{n} ({', '.join(str(v) for v in s)}{',' if len(s) == 1 else ''})"
                        for n, s in zip(r.output_names, r.output_shapes))
    check = ("NOT checked" if r.score_rel_diff is None else
             f"max relative difference score {r.score_rel_diff:.2e}, map {r.map_rel_diff:.2e} (tolerance "
             f"{SCORE_TOLERANCE:g} / {MAP_TOLERANCE:g}) on {r.n_checked} images at batch sizes "
             f"{', '.join(map(str, r.batch_sizes))}")
    print(f"wrote {r.path}: {r.format}{opset}, input images uint8 ({shape}), outputs {outputs} float32; {check}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fre_torch.detection.detector import DetectorConfig
    from fre_torch.features.synthetic import write_synthetic_mvtec

    _check_outputs(files={"--json": args.json}, dirs={"--out": args.out})
    with tempfile.TemporaryDirectory(prefix="fre_torch_demo_") as tmp:
        root = Path(args.out) if args.out else Path(tmp) / "synthetic_mvtec"
        write_synthetic_mvtec(root, seed=args.seed)
        kept = "" if args.out else " (a temporary folder, deleted when the demo ends; --out DIR keeps it)"
        print(f"synthetic MVTec-layout dataset in {root}{kept}")
        return _run_evaluate(root, ["all"], DetectorConfig("efficientnet_lite0"), "cpu", 32, None, None,
                             args.json, {"demo": True})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fre_torch.jobs.allocator import retain_if_requested

    # Before any tensor exists: large activations then reuse freed pages (about 2x on the CPU backbone).
    retain_if_requested()
    try:
        commands = {"evaluate": cmd_evaluate, "fit": cmd_fit, "predict": cmd_predict, "export": cmd_export,
                    "demo": cmd_demo}
        return commands[args.command](args)
    except CliError as err:
        print(f"{_error_label()}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Library errors carry the fix in their message; one line, no traceback.
        print(f"{_error_label()}: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if "fre_torch.core.distributed" in sys.modules:
            sys.modules["fre_torch.core.distributed"].cleanup()  # leave the process group torchrun set up


def _error_label() -> str:
    """'error', or 'error (rank R of W)' in a data-parallel run, where every failing rank prints its own line."""
    dist = sys.modules.get("fre_torch.core.distributed")
    if dist is not None and dist.is_distributed():
        return f"error (rank {dist.rank()} of {dist.world_size()})"
    return "error"


def _one_line(err: BaseException) -> str:
    """The first line of an error's own message.

    An error raised in a DataLoader worker is re-raised by torch with the worker's whole traceback as its message
    ("Caught ImageReadError in DataLoader worker process 1.", "Original Traceback ...", ..., "mod.Type: message"):
    its first line would not say what went wrong, so take the original message after the last traceback frame.
    """
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        frames = [i for i, line in enumerate(lines) if line.startswith(" ")]
        if frames and frames[-1] + 1 < len(lines):
            head = lines[frames[-1] + 1].strip()
            _, sep, message = head.partition(": ")
            return message.strip() if sep and message.strip() else head
    return lines[0].strip()


if __name__ == "__main__":
    sys.exit(main())
