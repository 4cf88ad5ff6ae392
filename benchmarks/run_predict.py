"""Predict throughput on your own images: fit + save on 200, predict on 1,000, end to end (PNG decoding included).

    python -m benchmarks.run_predict [--onnx] [--json benchmarks/results/predict.json]

Target (issue 7): with efficientnet_lite0 on the 2-core CPU, ``predict`` scores >= 25 images/s and the model file
is under 50 MB. The images are the synthetic 'object' category of ``fre_torch.features.synthetic`` (RGB PNG, 256 x 256,
normal and defective), written to a temporary folder; generating them is not timed. ``fit`` is ``fit_folder``
(20 % held out for the threshold) + ``save``; ``predict`` is ``predict_paths`` on a freshly loaded model file with
the CLI's defaults (batch 32, decoding in DataLoader workers), timed from the file list to the result rows.

``--onnx`` adds the model-only speed of the same 1,000 images, already decoded: torch (``FREDetector.score``) vs
the exported ONNX graph in ONNX Runtime (``fre_torch.jobs.export``), both batch 32 on the same threads.
The machine may be shared: the load average before and after is printed with the figures, and so is the rate the
predict run's CPU time allows (images / (CPU seconds of the process, its threads and its loader workers / cores)),
which other users' load does not lower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGET_IMAGES_PER_S = 25.0
TARGET_MODEL_MB = 50.0


def make_images(root: Path, n_fit: int = 200, n_predict: int = 1000, size: int = 256,
                seed: int = 0) -> tuple[Path, list[Path]]:
    """Write ``n_fit`` normal training PNGs and ``n_predict`` test PNGs (60 % normal, 40 % defective) under root.

    Returns:
        (training folder, test image paths in sorted order).
    """
    from fre_torch.features.images import list_images
    from fre_torch.features.synthetic import write_synthetic_mvtec

    n_defect = (n_predict * 2 // 5) // 2  # per defect type; the object category has two
    ds = write_synthetic_mvtec(root, categories=("object",), n_train=n_fit, n_test_good=n_predict - 2 * n_defect,
                               n_test_defect=n_defect, size=size, seed=seed)
    return ds / "object" / "train" / "good", list_images(ds / "object" / "test")


def fit_and_save(train_dir: Path, model_path: Path, *, batch_size: int = 32) -> dict[str, float]:
    """``fit_folder`` with the CLI's defaults + ``save``; seconds and the file size."""
    from fre_torch.detection.detector import DetectorConfig
    from fre_torch.jobs.predict import fit_folder

    t0 = time.perf_counter()
    det = fit_folder(train_dir, DetectorConfig("efficientnet_lite0"), device="cpu", batch_size=batch_size).detector
    det.save(model_path)
    return {"fit_save_s": time.perf_counter() - t0, "model_mb": model_path.stat().st_size / 2**20}


def predict(model_path: Path, paths: list[Path], *, batch_size: int = 32) -> dict[str, Any]:
    """Load the model file and ``predict_paths`` on ``paths``; images/s end to end (decoding included)."""
    from fre_torch.detection.detector import FREDetector
    from fre_torch.jobs.predict import predict_paths

    t0 = time.perf_counter()
    det = FREDetector.load(model_path)
    load_s = time.perf_counter() - t0
    cpu0 = _cpu_seconds()
    t1 = time.perf_counter()
    rows = predict_paths(det, paths, batch_size=batch_size)
    predict_s = time.perf_counter() - t1
    cpu_s = _cpu_seconds() - cpu0  # the loader's workers are joined when predict_paths returns
    if any(r["error"] for r in rows):
        raise RuntimeError("some benchmark images were not scored")
    cores = len(os.sched_getaffinity(0))
    return {"load_s": load_s, "predict_s": predict_s, "n_predict": len(rows),
            "predict_images_per_s": len(rows) / predict_s, "predict_cpu_s": cpu_s,
            # What the CPU time allows when the cores are ours alone (a shared machine lowers the wall-clock rate).
            "predict_images_per_s_cpu_bound": len(rows) / (cpu_s / cores)}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def onnx_vs_torch(model_path: Path, paths: list[Path], out_dir: Path, *, batch_size: int = 32) -> dict[str, float]:
    """Model-only speed on pre-decoded images: torch ``score`` vs the exported graph in ONNX Runtime."""
    import onnxruntime as ort

    from fre_torch.features.images import load_image
    from fre_torch.detection.detector import FREDetector
    from fre_torch.jobs.export import export_detector

    det = FREDetector.load(model_path)
    images = torch.stack([load_image(p, det.config.input_size) for p in paths])
    t0 = time.perf_counter()
    result = export_detector(det, out_dir / "model.onnx", "onnx", batch_size=8)
    export_s = time.perf_counter() - t0
    det.score(images[:batch_size], batch_size=batch_size)  # warm-up, both sides
    t0 = time.perf_counter()
    want = det.score(images, batch_size=batch_size)
    torch_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # same threads as torch
    session = ort.InferenceSession(str(result.path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"images": images[:batch_size].numpy()})
    t0 = time.perf_counter()
    got = torch.cat([torch.from_numpy(session.run(["score"], {"images": images[i:i + batch_size].numpy()})[0])
                     for i in range(0, len(images), batch_size)])
    ort_s = time.perf_counter() - t0
    rel = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    return {"export_s": export_s, "onnx_mb": result.path.stat().st_size / 2**20,
            "torch_score_images_per_s": len(images) / torch_s, "ort_score_images_per_s": len(images) / ort_s,
            "ort_vs_torch_max_rel_diff": rel, "export_self_check_rel_diff": result.score_rel_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_fit", type=int, default=200)
    ap.add_argument("--n_predict", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256, help="side of the generated PNGs")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--onnx", action="store_true", help="also time ONNX Runtime vs torch on decoded images")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()

    from benchmarks.common import machine
    from fre_torch.jobs.allocator import retain_if_requested

    retain_if_requested()  # as cli.py does: the figures are the CLI's
    with tempfile.TemporaryDirectory(prefix="fre_bench_predict_") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        train_dir, paths = make_images(tmp_path / "ds", args.n_fit, args.n_predict, args.size)
        gen_s = time.perf_counter() - t0
        load_before = os.getloadavg()[0]
        figures: dict[str, Any] = {"n_fit": args.n_fit, "size": args.size, "generate_s": gen_s}
        figures.update(fit_and_save(train_dir, tmp_path / "model.pt", batch_size=args.batch_size))
        figures.update(predict(tmp_path / "model.pt", paths, batch_size=args.batch_size))
        if args.onnx:
            figures.update(onnx_vs_torch(tmp_path / "model.pt", paths, tmp_path, batch_size=args.batch_size))
        figures["load_average_1min"] = [load_before, os.getloadavg()[0]]
    figures["machine"] = machine()
    ok_speed = figures["predict_images_per_s"] >= TARGET_IMAGES_PER_S
    ok_size = figures["model_mb"] < TARGET_MODEL_MB
    print(f"machine: {figures['machine']}; 1-min load average {load_before:.1f} before, "
          f"{figures['load_average_1min'][1]:.1f} after")
    print(f"fit + save on {args.n_fit} PNGs ({args.size} px): {figures['fit_save_s']:.1f} s; model file "
          f"{figures['model_mb']:.1f} MB (target < {TARGET_MODEL_MB:g} MB: {'met' if ok_size else 'NOT met'})")
    print(f"predict {figures['n_predict']} PNGs end to end: {figures['predict_s']:.1f} s = "
          f"{figures['predict_images_per_s']:.1f} images/s (target >= {TARGET_IMAGES_PER_S:g}: "
          f"{'met' if ok_speed else 'NOT met'}); model load {figures['load_s']:.2f} s; CPU "
          f"{figures['predict_cpu_s']:.0f} s = {figures['predict_images_per_s_cpu_bound']:.1f} images/s if the "
          "cores were ours alone")
    if args.onnx:
        print(f"decoded images, batch {args.batch_size}: torch {figures['torch_score_images_per_s']:.1f} images/s, "
              f"ONNX Runtime {figures['ort_score_images_per_s']:.1f} images/s (max rel score diff "
              f"{figures['ort_vs_torch_max_rel_diff']:.1e}); export {figures['export_s']:.1f} s, "
              f"{figures['onnx_mb']:.1f} MB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
