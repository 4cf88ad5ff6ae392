"""The MVTec-layout evaluation driver: fit on ``train/good``, score ``test/*``, compute image metrics.

Thin on purpose: data comes from ``fre_torch.data``, the model from ``fre_torch.detector``, the numbers from
``fre_torch.metrics``. Test labels are used only to report metrics.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import ImageDataset, MVTecCategory, image_size, load_mask, make_loader
from .detector import DetectorConfig, FREDetector, upsample_maps
from .metrics import aupr, auroc, f1_max, pixel_auroc, pixel_f1_max, pro

__all__ = ["evaluate_category", "format_table", "summarize", "write_json", "METRICS", "PIXEL_METRICS"]

METRICS = ("image_auroc", "image_aupr", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pro", "pixel_f1_max")
# Pixel metrics are computed at the images' own size when a category's test images share one; a set of mixed sizes
# (e.g. Magnetic Tile) is compared at this common square size instead, maps bilinear and masks nearest.
MIXED_SIZE_EVAL = 256

Progress = Callable[[int], None]


class _Counted:
    """Wraps a loader so each batch reports its size to a progress callback (no host sync: sizes are shapes)."""

    def __init__(self, loader: Any, progress: Progress | None) -> None:
        self.loader, self.progress = loader, progress
        self.dataset = loader.dataset

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.progress is not None:
                self.progress(len(batch["image"]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_category(detector: FREDetector, root: str | os.PathLike, category: str, *, batch_size: int = 32,
                      num_workers: int | None = None, progress: Progress | None = None,
                      pixel_metrics: bool = True) -> dict[str, Any]:
    """Fit ``detector`` on ``<root>/<category>/train/good`` and evaluate it on ``test/*``.

    Args:
        pixel_metrics: also compute maps and pixel AUROC / PRO / pixel F1-max when the category has masks (and
            the detector is linear).

    Returns:
        ``{"image_auroc", "image_aupr", "image_f1_max", "n_train", "n_test", "fit_seconds",
        "test_images_per_second"}``, ``"pixel_auroc", "pro", "pixel_f1_max"`` when computed, plus ``"scores"``
        (list, test order) and ``"labels"``.
    """
    cat = MVTecCategory.load(root, category)
    size = detector.config.input_size
    device = detector.device
    train = make_loader(ImageDataset(list(cat.train), size), batch_size, device, num_workers=num_workers)
    test = make_loader(ImageDataset(cat.test_paths, size), batch_size, device, num_workers=num_workers)

    t0 = time.perf_counter()
    detector.fit(_Counted(train, progress))
    _sync(device)
    fit_seconds = time.perf_counter() - t0

    segment = pixel_metrics and detector.config.kernel is None and any(m is not None for m in cat.mask_paths)
    t0 = time.perf_counter()
    if segment:
        scores, grid_maps = detector.score_and_maps(_Counted(test, progress))
    else:
        scores = detector.score(_Counted(test, progress))
    _sync(device)
    test_seconds = time.perf_counter() - t0

    scores_cpu = scores.float().cpu()
    if not bool(torch.isfinite(scores_cpu).all()):
        raise ValueError(f"{category}: the detector produced NaN/Inf scores; check the input images and weights")
    labels = cat.test_labels
    pixel = _pixel_metrics(cat, grid_maps) if segment else {}
    return {**pixel,
        "image_auroc": float(auroc(scores_cpu, labels)),
        "image_aupr": float(aupr(scores_cpu, labels)),
        "image_f1_max": float(f1_max(scores_cpu, labels)),
        "n_train": len(cat.train),
        "n_test": len(cat.test),
        "fit_seconds": fit_seconds,
        "test_images_per_second": len(cat.test) / test_seconds if test_seconds > 0 else math.inf,
        "scores": scores_cpu.tolist(),
        "labels": labels.tolist(),
    }


def _pixel_metrics(cat: MVTecCategory, grid_maps: torch.Tensor) -> dict[str, float]:
    """Pixel AUROC, PRO (FPR <= 0.3) and pixel F1-max of the upsampled maps against the ground-truth masks."""
    sizes = {image_size(p) for p in cat.test_paths}
    if len(sizes) == 1:
        (h, w), square = next(iter(sizes)), None
    else:
        (h, w), square = (MIXED_SIZE_EVAL, MIXED_SIZE_EVAL), MIXED_SIZE_EVAL
    maps = upsample_maps(grid_maps.float(), (h, w)).cpu()
    masks = torch.zeros(len(cat.test), h, w, dtype=torch.bool)
    for i, path in enumerate(cat.mask_paths):
        if path is not None:
            mask = load_mask(path, square)
            if mask.shape != (h, w):
                raise ValueError(f"mask {path} is {tuple(mask.shape)}, its image is {(h, w)}")
            masks[i] = mask
    if not bool(masks.any()):
        return {}
    return {"pixel_auroc": float(pixel_auroc(maps, masks)), "pro": float(pro(maps, masks)),
            "pixel_f1_max": float(pixel_f1_max(maps, masks))}


def summarize(results: dict[str, dict[str, Any]], config: DetectorConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: per-category metrics (without raw scores), their mean, and the configuration."""
    keep = METRICS + PIXEL_METRICS + ("n_train", "n_test", "fit_seconds", "test_images_per_second")
    categories = {name: {k: r[k] for k in keep if k in r} for name, r in results.items()}
    mean = {k: sum(r[k] for r in categories.values()) / len(categories) for k in METRICS} if categories else {}
    for k in PIXEL_METRICS:  # averaged over the categories that have masks
        have = [r[k] for r in categories.values() if k in r]
        if have:
            mean[k] = sum(have) / len(have)
    return {"categories": categories, "mean": mean, "config": {**config.to_dict(), **extra}}


def write_json(path: str | os.PathLike, document: dict[str, Any]) -> Path:
    """Write atomically (temporary file + rename): an interrupted run leaves no half-written JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(results: dict[str, dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table, one row per category and a mean row (pixel columns when every category has them)."""
    if columns is None:
        pixel = bool(results) and all(all(k in r for k in PIXEL_METRICS) for r in results.values())
        columns = METRICS + (PIXEL_METRICS if pixel else ())
    head = ["category", *[c.replace("image_", "") for c in columns], "n_train", "n_test", "fit_s", "test_img/s"]
    rows = []
    for name, r in results.items():
        rows.append([name, *[f"{r[c]:.4f}" for c in columns], str(r["n_train"]), str(r["n_test"]),
                     f"{r['fit_seconds']:.1f}", f"{r['test_images_per_second']:.1f}"])
    if results:
        rows.append(["mean", *[f"{sum(r[c] for r in results.values()) / len(results):.4f}" for c in columns],
                     "", "", "", ""])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "-" * len(line(head))
    out = [line(head), sep, *[line(r) for r in rows[:-1]]]
    if results:
        out += [sep, line(rows[-1])]
    return "\n".join(out)
