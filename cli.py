#!/usr/bin/env python3
"""fre_torch command line: ``evaluate`` (the reference run_mvtec.py, and better), ``fit`` / ``predict`` on your
own images, ``export`` (a saved model as one ONNX / TorchScript graph), and ``demo``.

    python cli.py demo
    python cli.py evaluate --dataset_directory ./mvtec --object_category bottle --device cpu --json results.json

Each command parses its flags into the settings of one library call (``fre_torch.jobs.run``), makes the call and
prints what it returns. Bad input ends with exit code 2 and one readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
SIZE = "H [W]"  # the metavar of a size flag: one number (a square side) or two (height, width)


class _Help(argparse.HelpFormatter):
    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:  # sizes: one or two numbers
        return SIZE if action.metavar == SIZE else super()._format_args(action, default_metavar)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py", description="Anomaly detection by feature reconstruction error.")
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=lambda **kw: argparse.ArgumentParser(formatter_class=_Help, **kw))
    p.commands = sub.choices  # main() answers a command's unknown flag with that command's usage
    ev = sub.add_parser("evaluate", help="fit on train/good and evaluate on test/* of an MVTec-layout folder")
    add = ev.add_argument
    add("--dataset_directory", default=None, help="root holding <category>/train, test, ... (default ./mvtec)")
    add("--object_category", nargs="+", default=["all"], help="one or more categories, or 'all' (default: every one present)")
    add("--train_dir", default=None, help="your own folders instead of the MVTec layout: normal training images")
    add("--normal_dir", default=None, help="with --train_dir: normal test images")
    add("--abnormal_dir", default=None, help="with --train_dir: defective test images (subfolders = defect types)")
    add("--mask_dir", default=None, help="with --train_dir, optional: masks, matched to defective images by stem")
    _add_model(ev, default="efficientnet_lite0; efficientnet_b5 with --reference")
    add("--pool", type=int, default=2, help="average-pool kernel of the first layer (default 2)")
    add("--fusion", choices=["sum", "concat"], default="sum",
        help="several layers: one subspace each, normalised scores summed (default), or one on the concatenation")
    add("--kernel", choices=["rbf", "laplacian"], default=None, help="kernel FRE (image scores only), not linear")
    add("--kernel_features", type=int, default=4096, help="explicit kernel features M (default 4096)")
    add("--kernel_method", choices=["rff", "nystroem"], default="rff",
        help="random Fourier features (default) or Nystroem landmarks")
    add("--modes", nargs="+", choices=["pca", "tae", "ae"], default=["pca"], help="fits to compare at the k of --pca: "
        "pca (closed form, the default), tae / ae (tied / untied linear autoencoder, Adam); a table per mode")
    add("--gpu", action="store_true", help="same as --device cuda")
    add("--reference", action="store_true", help="the reference configuration (efficientnet_b5 unless --model says "
        "otherwise)")
    add("--pixel_metrics", choices=["auto", "off"], default="auto", help="auto (default): maps and pixel AUROC / "
        "PRO / pixel F1-max where masks exist; off: image metrics only")
    add("--json", default=None, help="write the results as JSON to this path")
    add("--save_heatmaps", default=None, metavar="DIR", help="one PNG per test image, "
        "DIR/<category>/<defect>_<stem>.png: image | map overlay | mask outline")
    add("--report", default=None, metavar="DIR", help="a static HTML report, DIR/index.html")
    add("--list_models", action="store_true", help="print the backbones (offline or downloaded weights) and exit")
    add("--skip_unreadable", action="store_true", help="leave out images that cannot be decoded "
        "(default: stop, as test images count in the metrics; fit skips them unless --strict)")
    add("--scores_csv", default=None, metavar="PATH", help="every test image's score (category,path,label,score)")
    add("--cache_images_only", action="store_true", help="with --cache: keep preprocessed images only")
    add("--resize", choices=["auto", "cpu", "device"], default="auto", help="where images are resized, with LANCZOS "
        "either way: cpu (the loader), device (after transfer; JPEGs also decoded there on CUDA) or auto (default: "
        "device on CUDA when a category's images share one size or are all JPEGs)")
    _add_run_options(ev, device=None, cache=True, distributed=True)

    fit = sub.add_parser("fit", help="fit on a folder of normal images and save a model file with a threshold")
    fit.add_argument("--train_dir", required=True, help="folder of normal images (searched recursively)")
    fit.add_argument("--out", required=True, help="model file to write")
    fit.add_argument("--update", default=None, metavar="MODEL", help="add --train_dir's images to this model file "
                     "(fitted with --pca auto) instead of fitting anew; the threshold is recalibrated; MODEL is kept")
    fit.add_argument("--compact", action="store_true", help="a smaller model file without what --update needs")
    _add_model(fit, default="efficientnet_lite0")
    fit.add_argument("--holdout", type=float, default=0.2, help="fraction held out to set the threshold (0.2)")
    fit.add_argument("--quantile", type=float, default=0.99,
                     help="threshold = this quantile of the held-out scores (default 0.99: ~1%% flagged)")
    fit.add_argument("--strict", action="store_true", help="stop at the first unreadable image "
                     "(default: skip and list it; evaluate stops unless --skip_unreadable)")
    _add_run_options(fit, device="cpu", cache=True, distributed=True)

    pr = sub.add_parser("predict", help="score images with a saved model; writes predictions.csv")
    pr.add_argument("--model_file", required=True, help="a model file written by fit")
    pr.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("--out", default=".", help="folder for predictions.csv (default: current folder)")
    pr.add_argument("--save_heatmaps", action="store_true",
                    help="also write OUT/heatmaps/<folder>_<stem>.png per readable image (image | map overlay)")
    _add_run_options(pr, device="cpu", cache=False, distributed=False)

    ex = sub.add_parser("export", help="a saved model as one ONNX or TorchScript graph (uint8 images -> score, "
                                       "map), checked against torch before it is written")
    ex.add_argument("--model_file", required=True, help="a model file written by fit")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript"],
                    help="onnx (opset 18, needs torch >= 2.6) or torchscript")
    ex.add_argument("--out", required=True, help="the file to write")
    ex.add_argument("--batch_size", type=int, default=8, help="batch of the trace and the self-check (default 8)")
    ex.add_argument("--weights", default=None, help="the local backbone weights file the model was fitted with")
    ex.add_argument("--check_images", nargs="+", default=None, help="real images, folders or globs for the check")

    demo = sub.add_parser("demo", help="generate a small synthetic MVTec-layout dataset and evaluate it")
    demo.add_argument("--out", default=None, help="folder to keep the dataset in (default: a temporary folder)")
    demo.add_argument("--seed", type=int, default=0, help="the data set's seed: one seed, identical files (default 0)")
    demo.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to this path")
    return p


def _add_model(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", default=None, help=f"backbone (default {default}; see evaluate --list_models)")
    p.add_argument("--layers", nargs="+", default=None, help="score head's layers (default: per backbone)")
    p.add_argument("--input_size", type=int, nargs="+", default=[0], metavar=SIZE,
                   help="image size: a square side, or height and width for long parts (default: per backbone)")
    p.add_argument("--map_layers", nargs="+", default=None,
                   help="map head's layers (default: per backbone); 'none': maps from the score layers")
    p.add_argument("--map_pool", type=int, default=2, help="pool of the first map layer: the map grid (default 2)")
    p.add_argument("--map_input_size", type=int, nargs="+", default=[0], metavar=SIZE,
                   help="map head's image size, a second backbone pass (default: the input size, one pass)")
    p.add_argument("--map_detail", choices=["auto", "on", "off"], default="auto", help="a finer map combined with "
                   "the map head's (default auto: when the training images' short side is >= 1.5x the input size)")
    p.add_argument("--tile_size", type=int, nargs="+", default=[0], metavar=SIZE,
                   help="cut the image into overlapping tiles of this size, each through the backbone (default: off)")
    p.add_argument("--tile_stride", type=int, nargs="+", default=[0], metavar=SIZE, help="tile step (default: half)")
    p.add_argument("--image_score", choices=["top", "fre"], default="top",
                   help="top: mean of the top 10%% cells, each standardised by its normal spread (default); fre: "
                        "the sum over cells, the image's FRE")
    p.add_argument("--pca", default="auto", help="components kept: auto = 97%% of the variance, none under 1/4096 of "
                   "it, at most 384 (bounded in N, updatable), a variance fraction in (0, 1) "
                   "(0.97: the reference's rule) or a number (default auto)")
    p.add_argument("--solver", choices=["auto", "gram", "covariance"], default="auto",
                   help="subspace solver: Gram (N x N), covariance (D x D, streaming) or auto (default: Gram when N < D)")


def _add_run_options(p: argparse.ArgumentParser, device: str | None, cache: bool, distributed: bool) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=device, help="(default cpu)")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: up to 4; 0 on a <= 4-core CPU)")
    p.add_argument("--weights", default=None, help="local backbone weights file (state dict)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (pays on CUDA)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="backbone precision (default auto: bf16 autocast on CUDA, fp32 on the CPU)")
    if cache:
        p.add_argument("--cache", default=None, metavar="DIR",
                       help="keep decoded images and features in DIR (keyed by content and settings, never stale)")
    if distributed:
        p.add_argument("--distributed", action="store_true", help="data-parallel over torchrun's ranks (automatic "
                                                                  "when torchrun's environment is set)")
        p.add_argument("--dist_timeout", type=float, default=None, metavar="SECONDS",
                       help="how long a rank waits for the others before failing (default 600)")


def _config(args: argparse.Namespace, run, **fields):
    return run.detector_config(args.model, layers=args.layers, input_size=args.input_size, pca=args.pca,
                               solver=args.solver, map_layers=args.map_layers, map_pool=args.map_pool,
                               map_input_size=args.map_input_size, tile_size=args.tile_size,
                               tile_stride=args.tile_stride, image_score=args.image_score, map_detail=args.map_detail,
                               **fields)


def cmd_evaluate(args: argparse.Namespace, run) -> object:
    if args.list_models:
        return run.list_models()
    config = _config(args, run, reference=args.reference, pool=args.pool, fusion=args.fusion, kernel=args.kernel,
                     kernel_features=args.kernel_features, kernel_method=args.kernel_method)
    return run.evaluate(run.EvaluateSettings(
        root=args.dataset_directory, categories=args.object_category, train_dir=args.train_dir,
        normal_dir=args.normal_dir, abnormal_dir=args.abnormal_dir, mask_dir=args.mask_dir, config=config,
        modes=args.modes, skip_unreadable=args.skip_unreadable, map_detail=args.map_detail,
        device="cuda" if args.gpu else (args.device or "cpu"), batch_size=args.batch_size, workers=args.workers,
        weights=args.weights, pixel_metrics=args.pixel_metrics == "auto", compile=args.compile,
        precision=args.precision, cache=args.cache, cache_images_only=args.cache_images_only, resize=args.resize,
        json=args.json, scores_csv=args.scores_csv, report=args.report, heatmaps=args.save_heatmaps,
        distributed=args.distributed or None, dist_timeout=args.dist_timeout, tags={"reference": args.reference}),
        progress=run.TerminalProgress)


def cmd_fit(args: argparse.Namespace, run) -> object:
    return run.fit(run.FitSettings(
        train_dir=args.train_dir, out=args.out, update=args.update, compact=args.compact, holdout=args.holdout,
        quantile=args.quantile,
        config=None if args.update and args.model is None and args.input_size == [0] else _config(args, run),
        strict=args.strict, map_detail=args.map_detail, device=args.device, batch_size=args.batch_size,
        workers=args.workers, weights=args.weights, cache=args.cache, compile=args.compile, precision=args.precision,
        distributed=args.distributed or None, dist_timeout=args.dist_timeout))


def cmd_predict(args: argparse.Namespace, run) -> object:
    return run.predict(run.PredictSettings(
        model_file=args.model_file, inputs=args.paths, out=args.out, heatmaps=args.save_heatmaps, device=args.device,
        batch_size=args.batch_size, workers=args.workers, weights=args.weights, compile=args.compile,
        precision=args.precision), progress=run.TerminalProgress)


def cmd_export(args: argparse.Namespace, run) -> object:
    return run.export(run.ExportSettings(model_file=args.model_file, format=args.format, out=args.out,
                                         batch_size=args.batch_size, weights=args.weights,
                                         check_images=args.check_images))


def cmd_demo(args: argparse.Namespace, run) -> object:
    return run.demo(run.DemoSettings(out=args.out, seed=args.seed, json=args.json), progress=run.TerminalProgress)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with this command's usage (e.g. fit --gpu: fit's, which shows --device), not the top-level one
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from fre_torch.jobs import run
    from fre_torch.jobs.allocator import retain_if_requested

    # Before any tensor exists: large activations then reuse freed pages (about 2x on the CPU backbone).
    retain_if_requested()
    commands = {"evaluate": cmd_evaluate, "fit": cmd_fit, "predict": cmd_predict, "export": cmd_export,
                "demo": cmd_demo}
    try:
        with run.recording_writes() as written:
            result = commands[args.command](args, run)
    except KeyboardInterrupt:  # what was written, each file whole, and what was not
        print(run.interrupted_message(written, vars(args)), file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        # Library errors carry the fix in their message; one line, no traceback.
        print(run.error_message(err), file=sys.stderr)
        return EXIT_USAGE
    if isinstance(result, list):  # --list_models
        print("\n".join(result))
        return 0
    if result.is_main:  # data-parallel: rank 0 prints
        for line in result.warnings:
            print(line, file=sys.stderr)
        try:
            print("\n".join(result.lines()), flush=True)
        except BrokenPipeError:  # e.g. `| head`: the reader has gone, the outputs are written
            sys.stdout = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
