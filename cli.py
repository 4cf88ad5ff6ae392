#!/usr/bin/env python3
"""fre_torch command line: ``evaluate`` (the reference run_mvtec.py, and better), ``fit`` / ``predict`` on your
own images, and ``demo``.

    python cli.py demo
    python cli.py evaluate --dataset_directory ../shared/data/mvtec_bottle --object_category bottle \\
        --model efficientnet_lite0 --device cpu --json out/bottle.json

Bad input ends with exit code 2 and one readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise (logs stay clean)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty()
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
    ev.add_argument("--list_models", action="store_true", help="print the available backbones and exit")

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

    pr = sub.add_parser("predict", help="score images with a saved model; writes predictions.csv")
    pr.add_argument("--model_file", required=True)
    pr.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--out", default=".", help="folder for predictions.csv (default: current folder)")
    pr.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pr.add_argument("--batch_size", type=int, default=32)
    pr.add_argument("--workers", type=int, default=None)
    pr.add_argument("--weights", default=None, help="the local backbone weights file the model was fitted with")

    demo = sub.add_parser("demo", help="generate a small synthetic MVTec-layout dataset and evaluate it")
    demo.add_argument("--out", default=None, help="folder for the dataset (default: a temporary folder)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", default=None)
    return p


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
                  pixel_metrics: bool = True) -> int:
    from fre_torch.data import MVTecCategory, list_categories
    from fre_torch.detector import FREDetector
    from fre_torch.evaluate import evaluate_category, format_table, summarize, write_json

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
    detector = FREDetector(config, device=device, weights=weights)
    results = {}
    for name in categories:
        cat = MVTecCategory.load(root, name)
        bar = _Progress(len(cat.train) + len(cat.test), name)
        try:
            results[name] = evaluate_category(detector, root, name, batch_size=batch_size, num_workers=workers,
                                              progress=bar, pixel_metrics=pixel_metrics)
        finally:
            bar.close()
    print(format_table(results))
    if json_path:
        path = write_json(json_path, summarize(results, config, {**extra, "device": device,
                                                                  "batch_size": batch_size}))
        print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fre_torch.backbones import list_backbones
    from fre_torch.detector import DetectorConfig

    if args.list_models:
        print("\n".join(list_backbones()))
        return 0
    device = "cuda" if args.gpu else (args.device or "cpu")
    if args.model not in list_backbones():
        raise CliError(f"unknown model {args.model!r}; available: {', '.join(list_backbones())}")
    if args.reference:
        config = DetectorConfig.reference(args.model)
    else:
        config = DetectorConfig(backbone=args.model, layers=tuple(args.layers or ()), input_size=args.input_size,
                                pool=args.pool, n_components=_n_components(args.pca), fusion=args.fusion,
                                kernel=args.kernel, kernel_features=args.kernel_features,
                                kernel_method=args.kernel_method)
    if args.kernel is not None and args.pixel_metrics == "auto":
        print("note: pixel metrics need the linear mode (kernel FRE scores whole images); reporting image metrics",
              file=sys.stderr)
    return _run_evaluate(Path(args.dataset_directory), list(args.object_category), config, device,
                         args.batch_size, args.workers, args.weights, args.json, {"reference": args.reference},
                         pixel_metrics=args.pixel_metrics == "auto")


def cmd_fit(args: argparse.Namespace) -> int:
    from fre_torch.backbones import list_backbones
    from fre_torch.detector import DetectorConfig
    from fre_torch.predict import fit_folder

    if args.model not in list_backbones():
        raise CliError(f"unknown model {args.model!r}; available: {', '.join(list_backbones())}")
    if not Path(args.train_dir).is_dir():
        raise CliError(f"training folder not found: {args.train_dir}")
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {args.batch_size}")
    config = DetectorConfig(backbone=args.model, layers=tuple(args.layers or ()), input_size=args.input_size,
                            n_components=_n_components(args.pca))
    det = fit_folder(args.train_dir, config, device=args.device, holdout=args.holdout, quantile=args.quantile,
                     batch_size=args.batch_size, num_workers=args.workers, weights=args.weights)
    path = det.save(args.out)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MB): {args.model} {list(config.layers)}, threshold {float(det.threshold):.4g} "
          f"= the {args.quantile:g} quantile of {det.calibration_scores.numel()} held-out normal images")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fre_torch.detector import FREDetector
    from fre_torch.predict import predict_paths, resolve_inputs, write_predictions_csv

    det = FREDetector.load(args.model_file, device=args.device, weights=args.weights)
    paths = resolve_inputs(args.paths)
    bar = _Progress(len(paths), "predict")
    try:
        rows = predict_paths(det, paths, batch_size=args.batch_size, num_workers=args.workers, progress=bar)
    finally:
        bar.close()
    out = write_predictions_csv(rows, args.out)
    flagged = sum(1 for r in rows if r["is_anomalous"])
    failed = sum(1 for r in rows if r["error"])
    print(f"wrote {out}: {len(rows)} images, {flagged} anomalous, {failed} unreadable")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fre_torch.detector import DetectorConfig
    from fre_torch.synthetic import write_synthetic_mvtec

    with tempfile.TemporaryDirectory(prefix="fre_torch_demo_") as tmp:
        root = Path(args.out) if args.out else Path(tmp) / "synthetic_mvtec"
        write_synthetic_mvtec(root, seed=args.seed)
        print(f"synthetic MVTec-layout dataset in {root}")
        return _run_evaluate(root, ["all"], DetectorConfig("efficientnet_lite0"), "cpu", 32, None, None,
                             args.json, {"demo": True})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"evaluate": cmd_evaluate, "fit": cmd_fit, "predict": cmd_predict, "demo": cmd_demo}
        return commands[args.command](args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Library errors carry the fix in their message; one line, no traceback.
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


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
