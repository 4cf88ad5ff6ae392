"""Cost against the number of training images N: ``cli.py fit`` / ``predict`` under today's rule and the default.

    python -m benchmarks.run_scale [--sizes 250 500 1000 2000 4000] [--rules auto 0.97] [--patchcore 250 500 1000]
        [--set magnetic_tile] [--data DIR] [--work DIR] [--json PATH] [--write] [--append] [--smoke]

Training sets of N images are built from a data set's real normal images (``train/good``) by mirrors and shifts
(``build_training_set``): copy 0 is the images themselves, copy c > 0 a mirror (horizontal, vertical or both) and a
shift of a few pixels (edge pixels repeated), so no two rows are equal. They are written once under ``--work`` (a
temporary folder by default, never the repository) and each N is the first N of them.

Per rule (``--pca``: ``auto`` the default, ``0.97`` the reference's) and N, each in a fresh process, one after the
other: ``cli.py fit`` (whole-process seconds, the process's peak RSS via ``wait4``, model file MB); ``cli.py predict``
of 64 test images (whole-process images/s, the figure a user sees); and the model's image AUROC, pixel AUROC and PRO
on the set's whole test split (maps as ``evaluate`` computes them). PatchCore on the same backbone
(``benchmarks/patchcore.py``) at the sizes of ``--patchcore``: fit seconds, peak RSS, memory bank MB. Its greedy
coreset costs O(N^2), so it runs only where that fits the session.

``--smoke``: a synthetic data set (``fre_torch.features.synthetic``), N = 12 and 24, PatchCore at 12, nothing written
to BENCHMARKS.md (the test of ``tests/test_scale.py``). ``--write`` puts the table in BENCHMARKS.md between
``<!-- scale:begin -->`` and ``<!-- scale:end -->`` and the document in ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import REPO, data_root, machine, write_section

SETS = {"bottle": "mvtec_bottle", "screw": "mvtec_screw", "magnetic_tile": "magnetic_tile"}
OUT = REPO / "benchmarks" / "results" / "scale.json"
SHIFT = 4  # pixels of each copy's shift
PREDICT_IMAGES = 64
_FLIPS = ((False, False), (True, False), (False, True), (True, True))
_SHIFTS = ((SHIFT, 0), (0, SHIFT), (SHIFT, SHIFT), (-SHIFT, 0), (0, -SHIFT), (-SHIFT, -SHIFT))


def variant(image: Image.Image, copy: int) -> Image.Image:
    """Copy ``copy`` of an image: 0 itself; else a mirror and a shift of ``SHIFT`` px (edge pixels repeated)."""
    if copy == 0:
        return image
    flip_h, flip_v = _FLIPS[copy % len(_FLIPS)]
    dx, dy = _SHIFTS[(copy // len(_FLIPS) + copy) % len(_SHIFTS)]
    a = np.asarray(image)
    a = a[:, ::-1] if flip_h else a
    a = a[::-1] if flip_v else a
    pad = [(abs(dy), abs(dy)), (abs(dx), abs(dx))] + [(0, 0)] * (a.ndim - 2)
    a = np.pad(a, pad, mode="edge")
    h, w = image.size[1], image.size[0]
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return Image.fromarray(np.ascontiguousarray(a[y0:y0 + h, x0:x0 + w]))


def build_training_set(source: Path, n: int, out: Path) -> Path:
    """``out`` with ``n`` images: the real ones of ``source`` first, then copies (``variant``) of each in turn.
    Files already there are kept (a larger N reuses a smaller one's)."""
    real = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not real:
        raise FileNotFoundError(f"no images in {source}")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        copy, path = divmod(i, len(real))
        target = out / f"{copy:03d}_{real[path].stem}.png"
        if not target.exists():
            with Image.open(real[path]) as im:
                variant(im.copy(), copy).save(target)
    return out


def _subset(pool: Path, n: int, out: Path) -> Path:
    """A folder of links to the first ``n`` images of ``pool`` (sorted: the real images first)."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(pool.iterdir())[:n]
    if len(files) < n:
        raise ValueError(f"{pool} has {len(files)} images, {n} asked")
    for f in files:
        link = out / f.name
        if not link.exists():
            link.symlink_to(f)
    return out


def _run_measured(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """Run a command in a fresh process: (wall seconds, its own peak RSS in bytes from ``wait4``, stdout)."""
    t0 = time.perf_counter()
    # stderr to a file, stdout through a pipe read to its end; then the child is reaped here to get its rusage.
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=errf, text=True)
        out = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[1:4])} ... failed ({proc.returncode}): {err.strip()[-400:]}")
    return seconds, usage.ru_maxrss * 1024, out


def _cli(*args: str, cwd: Path) -> tuple[float, int, str]:
    return _run_measured([sys.executable, str(REPO / "cli.py"), *args], cwd)


def _child(task: str, **kwargs: Any) -> tuple[float, int, dict]:
    """``python -m benchmarks.run_scale --child TASK JSON`` in a fresh process: its seconds, peak RSS and JSON."""
    seconds, rss, out = _run_measured([sys.executable, "-m", "benchmarks.run_scale", "--child", task,
                                       json.dumps(kwargs)], REPO)
    return seconds, rss, json.loads(out.strip().splitlines()[-1])


def child_metrics(model: str, root: str, category: str) -> dict:
    """Image AUROC, pixel AUROC and PRO of a model file on a category's whole test split (as ``evaluate``)."""
    import torch

    from fre_torch.detection.detector import FREDetector
    from fre_torch.detection.metrics import auroc, pixel_auroc, pro
    from fre_torch.features.images import ImageDataset, MVTecCategory, make_loader
    from fre_torch.jobs.evaluate import evaluation_maps

    det = FREDetector.load(model)
    cat = MVTecCategory.load(root, category)
    loader = make_loader(ImageDataset(cat.test_paths, det.config.load_size), 32, "cpu")
    scores, maps = det.score_and_maps(b["image"] for b in loader)
    maps, masks = evaluation_maps(cat, maps)
    keep = torch.tensor([s.label == 0 or s.mask is not None for s in cat.test])
    return {"image_auroc": float(auroc(scores, cat.test_labels)),
            "pixel_auroc": float(pixel_auroc(maps[keep], masks[keep])), "pro": float(pro(maps[keep], masks[keep])),
            "components": [[m.n_components for m in h.models] for h in det.heads.values()]}


def child_patchcore(train: str) -> dict:
    """PatchCore's fit on a folder: seconds and memory bank bytes (the process's peak RSS is measured outside)."""
    from benchmarks.patchcore import PatchCore
    from fre_torch.features.images import ImageDataset, list_images, make_loader

    paths = list_images(Path(train))
    model = PatchCore()
    t0 = time.perf_counter()
    loader = make_loader(ImageDataset(paths, model.config.input_size), 32, "cpu")
    model.fit((b["image"] for b in loader), len(paths))
    bank = model.memory_bank
    return {"fit_s": time.perf_counter() - t0, "bank_mb": bank.numel() * bank.element_size() / 1e6,
            "bank_patches": bank.shape[0]}


def measure(root: Path, category: str, sizes: list[int], rules: list[str], patchcore: list[int],
            work: Path) -> dict[str, Any]:
    """Every row of the table (see the module docstring)."""
    pool = build_training_set(root / category / "train" / "good", max(sizes + patchcore), work / "pool")
    test = sorted(p for d in (root / category / "test").iterdir() for p in d.iterdir())[:PREDICT_IMAGES]
    rows: list[dict[str, Any]] = []
    for n in sizes:
        train = _subset(pool, n, work / f"n{n}")
        for rule in rules:
            model = work / f"model_{rule}_{n}.pt"
            fit_s, fit_rss, _ = _cli("fit", "--train_dir", str(train), "--out", str(model), "--pca", rule, cwd=work)
            pred_s, _, _ = _cli("predict", "--model_file", str(model), *map(str, test), "--out",
                                str(work / "pred"), cwd=work)
            _, _, metrics = _child("metrics", model=str(model), root=str(root), category=category)
            rows.append({"method": f"fre_torch --pca {rule}", "n": n, "fit_s": fit_s, "fit_peak_rss_gb": fit_rss / 1e9,
                         "model_mb": model.stat().st_size / 1e6, "predict_images_per_s": len(test) / pred_s,
                         **metrics})
            model.unlink()
            print(json.dumps(rows[-1]), flush=True)
    for n in patchcore:
        train = _subset(pool, n, work / f"n{n}")
        seconds, rss, got = _child("patchcore", train=str(train))
        rows.append({"method": "PatchCore (Lite0)", "n": n, "fit_s": got["fit_s"], "fit_peak_rss_gb": rss / 1e9,
                     "model_mb": got["bank_mb"], "bank_patches": got["bank_patches"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"date": datetime.date.today().isoformat(), "machine": machine(), "set": category, "rows": rows,
            "predict_images": len(test)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"{doc['date']}, {doc['machine']}. Training sets of N images built from {doc['set']}'s real normal "
             f"images by mirrors and {SHIFT}-px shifts (`python -m benchmarks.run_scale --write`); each command a "
             f"fresh process, one after the other. fit: `cli.py fit` whole process (20 % held out for the "
             f"threshold); RSS: the fit process's peak; predict: `cli.py predict` of {doc['predict_images']} test "
             "images, whole process; AUROC / PRO on the whole test split. PatchCore: its fit (features and greedy "
             "coreset), peak RSS, memory bank MB.", "",
             "| method | N | fit s | fit peak RSS GB | model MB | predict img/s | image AUROC | pixel AUROC | PRO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        quality = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in ("image_auroc", "pixel_auroc", "pro"))
        predict = f"{r['predict_images_per_s']:.1f}" if "predict_images_per_s" in r else "-"
        lines.append(f"| {r['method']} | {r['n']:,} | {r['fit_s']:.1f} | {r['fit_peak_rss_gb']:.2f} | "
                     f"{r['model_mb']:.1f} | {predict} | {quality} |")
    return "\n".join(lines)


def _smoke_data(work: Path) -> tuple[Path, str]:
    from fre_torch.features.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(work / "data", categories=("object",), n_train=10, n_test_good=4, n_test_defect=4,
                                 size=96)
    return root, "object"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        task, kwargs = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps({"metrics": child_metrics, "patchcore": child_patchcore}[task](**kwargs)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    ap.add_argument("--rules", nargs="+", default=["auto", "0.97"])
    ap.add_argument("--patchcore", type=int, nargs="*", default=[250, 500, 1000])
    ap.add_argument("--set", default="magnetic_tile", choices=sorted(SETS))
    ap.add_argument("--data", type=Path, default=None, help="data root (default: $FRE_TORCH_DATA or ../shared/data)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the built sets and models (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--append", action="store_true", help="add the rows to those of the JSON document (--json, or "
                    "benchmarks/results/scale.json) instead of replacing them; the table shows all of them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fre_scale_") as tmp:
        work = args.work or Path(tmp)
        if args.smoke:
            root, category = _smoke_data(work)
            doc = measure(root, category, [12, 24], args.rules, [12], work)
        else:
            root = (args.data or data_root()) / SETS[args.set]
            doc = measure(root, args.set, args.sizes, args.rules, args.patchcore, work)
    out = args.json or (OUT if args.write else None)
    if args.append and out is not None and out.exists():
        earlier = json.loads(out.read_text())
        doc = {**doc, "rows": earlier["rows"] + doc["rows"]}
        doc["rows"].sort(key=lambda r: (r["method"].startswith("PatchCore"), r["n"],
                                        r["method"] != "fre_torch --pca auto"))
    table = markdown(doc)
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.write and not args.smoke:
        print(f"wrote {write_section('scale', table)}")


if __name__ == "__main__":
    main()
