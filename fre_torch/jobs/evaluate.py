"""The MVTec-layout evaluation driver: fit on ``train/good``, score ``test/*``, compute image metrics.

Thin on purpose: data comes from ``fre_torch.features.images``, the model from ``fre_torch.detection.detector``, the numbers from
``fre_torch.detection.metrics``. Test labels are used only to report metrics.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..features.images import (FeatureCache, ImageDataset, MVTecCategory, device_decodable, image_size, load_mask,
                               make_loader)
from ..detection.detector import DetectorConfig, FREDetector, upsample_maps
from ..core.distributed import config_hash_check, gather_rows, is_main_process, shard
from .crossfit import cross_fit, fit_keeping_rows
from ..detection.metrics import aupr, auroc, f1_max, segmentation_metrics
from ..features.files import atomic_write

__all__ = ["evaluate_category", "evaluation_maps", "format_table", "summarize", "write_json", "write_scores_csv",
           "METRICS",
           "PIXEL_METRICS", "THRESHOLD_QUANTILE"]

METRICS = ("image_auroc", "image_aupr", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pro", "pixel_f1_max")
# Pixel metrics are computed at the images' own size when a category's test images share one; a set of mixed sizes
# (e.g. Magnetic Tile) is compared at this common square size instead, maps bilinear and masks nearest.
MIXED_SIZE_EVAL = 256
# evaluate's decision threshold (heatmaps / report only): this quantile of the training images' OUT-OF-FOLD scores
# (fre_torch.jobs.crossfit: 5-fold cross-fitting on features extracted once). evaluate has no held-out split, and
# in-sample training scores are far too small to set it (see crossfit). It never sees a test image or label.
THRESHOLD_QUANTILE = 0.99

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


def evaluate_category(detector: FREDetector, root: str | os.PathLike, category: str | MVTecCategory, *,
                      batch_size: int = 32,
                      num_workers: int | None = None, progress: Progress | None = None,
                      pixel_metrics: bool = True, keep_maps: bool = False, cache: str | os.PathLike | None = None,
                      cache_features: bool = True, resize: str = "auto") -> dict[str, Any]:
    """Fit ``detector`` on ``<root>/<category>/train/good`` and evaluate it on ``test/*``.

    Args:
        category: a category name under ``root``, or an ``MVTecCategory`` (e.g. ``from_folders``; ``root`` unused).
        pixel_metrics: also compute maps and pixel AUROC / PRO / pixel F1-max when the category has masks (and
            the detector is linear).
        keep_maps: also return what heatmaps (``fre_torch.jobs.heatmaps``) and the report (``fre_torch.jobs.report``)
            need (see Returns).
        cache: a folder for ``fre_torch.features.images.PreprocessCache``: decoded, resized images are kept there (keyed by
            file content and settings) and reused by later runs; with ``cache_features`` (default) the detector's
            feature vectors too, in ``<cache>/features`` (``fre_torch.features.images.FeatureCache``, keyed by the exact input
            pixels, the backbone's weights and every feature setting), so a repeated run skips the backbone as well.
            The detector's own ``feature_cache`` is restored on return.
        resize: 'cpu' (LANCZOS in the DataLoader workers, the reference), 'device' (decode in the workers, resize
            on the device: the same LANCZOS, to the same pixels; needs images of one size) or 'auto' (device on CUDA
            when the category's images share one size, else cpu). On CUDA, 'auto' and 'device' decode on the device
            too when every image is a grey or RGB JPEG, whatever their sizes (``decode_images``: nvJPEG, batched):
            the workers only read files.

    With ``keep_maps``, the training images are cross-fitted after the fit (``fre_torch.jobs.crossfit``, 5 folds, on
    the feature rows the fit kept in memory: no second decoding or backbone pass): each
    gets a score and a map from a model that did not see it. The decision threshold is the ``THRESHOLD_QUANTILE``
    of those scores and the heatmap colour scale runs from the ``MAP_FLOOR_QUANTILE`` (no colour) to the
    ``MAP_SCALE_QUANTILE`` (full colour) of those maps' values; none of them uses a test image or label, and the
    detector's own calibration (``threshold``, ``map_scale``, ``map_floor``) is left as it was.

    Returns:
        ``{"image_auroc", "image_aupr", "image_f1_max", "n_train", "n_test", "fit_seconds",
        "test_images_per_second"}``, ``"pixel_auroc", "pro", "pixel_f1_max"`` when computed, plus ``"scores"``
        (list, test order), ``"labels"`` and ``"paths"`` (str, test order). With ``keep_maps`` also ``"threshold"``,
        ``"threshold_quantile"``, ``"cross_fit_folds"``, ``"map_scale"`` and ``"map_floor"`` (linear mode),
        ``"mask_paths"`` (str or None, test order) and ``"grid_maps"`` (``(N, GH, GW)`` float32 CPU tensor, None
        in kernel mode).
    """
    linear = detector.config.kernel is None
    store = None
    if cache is not None and cache_features:
        store = FeatureCache(Path(cache) / "features")
    with _feature_cache(detector, store):
        cat = category if isinstance(category, MVTecCategory) else MVTecCategory.load(root, category)
        category = cat.name
        size = detector.config.load_size
        device = detector.device
        # Data-parallel (fre_torch.core.distributed): every rank must see the same settings and files, then reads its
        # own contiguous shard of whole batches; the fit reduces across ranks and scores are gathered in the
        # original order.
        config_hash_check({"category": category, "config": detector.config.to_dict(),
                           "weights": detector.weights_id, "batch_size": batch_size,
                           "pixel_metrics": pixel_metrics, "calibrate": keep_maps,
                           "train": [p.name for p in cat.train],
                           "test": [str(p.relative_to(cat.root)) for p in cat.test_paths]})
        train_paths = shard(cat.train, unit=batch_size, what=f"{category} training images")
        test_paths = shard(cat.test_paths, unit=batch_size, what=f"{category} test images")
        all_paths = list(cat.train) + cat.test_paths
        encoded = _decode_on_device(resize, device, all_paths)
        on_device = encoded or _resize_on_device(resize, device, all_paths)
        train = make_loader(ImageDataset(train_paths, size, cache=cache, resize=not on_device, encoded=encoded),
                            batch_size, device, num_workers=num_workers)
        test = make_loader(ImageDataset(test_paths, size, cache=cache, resize=not on_device, encoded=encoded),
                           batch_size, device, num_workers=num_workers)

        t0 = time.perf_counter()
        if keep_maps:
            # The cross-fit below reads the training features again: keep the fit's rows in memory (N x D float32)
            # rather than decode the images and run the backbone a second time.
            train_rows = fit_keeping_rows(detector, _Counted(train, progress), batch_size=batch_size)
        else:
            detector.fit(_Counted(train, progress))
        _sync(device)
        fit_seconds = time.perf_counter() - t0

        segment = pixel_metrics and linear and any(m is not None for m in cat.mask_paths)
        t0 = time.perf_counter()
        if segment or (keep_maps and linear):
            scores, grid_maps = detector.score_and_maps(_Counted(test, progress))
            grid_maps = gather_rows(grid_maps)  # data-parallel: all ranks' maps in test order (identity otherwise)
        else:
            scores = detector.score(_Counted(test, progress))
        scores = gather_rows(scores)
        _sync(device)
        test_seconds = time.perf_counter() - t0

        scores_cpu = scores.float().cpu()
        if not bool(torch.isfinite(scores_cpu).all()):
            raise ValueError(f"{category}: the detector produced NaN/Inf scores; check the input images and weights")
        labels = cat.test_labels
        pixel = _pixel_metrics(cat, grid_maps) if segment and is_main_process() else {}
        extra: dict[str, Any] = {}
        unmasked = [str(s.path) for s in cat.test if s.label == 1 and s.mask is None]
        # Reported, and left out of the pixel metrics (_pixel_metrics).
        missing = ({"defective_without_mask": unmasked} if cat.masks_expected and pixel_metrics and linear and unmasked
                   else {})
        if keep_maps:
            # After the timings, so fit_seconds and the test throughput stay comparable with runs without it.
            oof = cross_fit(detector, rows=train_rows, quantile=THRESHOLD_QUANTILE, batch_size=batch_size)
            extra = {"threshold": oof.threshold, "threshold_quantile": THRESHOLD_QUANTILE, "cross_fit_folds": oof.folds}
            if linear:
                extra.update(map_scale=oof.map_scale, map_floor=oof.map_floor)
        if not is_main_process():
            # Data-parallel: metrics are computed, and files written, once, by rank 0.
            return {"n_train": len(cat.train), "n_test": len(cat.test), "fit_seconds": fit_seconds,
                    "test_images_per_second": len(cat.test) / test_seconds if test_seconds > 0 else math.inf,
                    "scores": scores_cpu.tolist(), "labels": labels.tolist()}
        if keep_maps:
            extra.update(mask_paths=[None if m is None else str(m) for m in cat.mask_paths],
                         grid_maps=grid_maps.float().cpu() if linear else None)
        return {**pixel, **missing, **extra,
            "image_auroc": float(auroc(scores_cpu, labels)),
            "image_aupr": float(aupr(scores_cpu, labels)),
            "image_f1_max": float(f1_max(scores_cpu, labels)),
            "n_train": len(cat.train),
            "n_test": len(cat.test),
            "fit_seconds": fit_seconds,
            "test_images_per_second": len(cat.test) / test_seconds if test_seconds > 0 else math.inf,
            "scores": scores_cpu.tolist(),
            "labels": labels.tolist(),
            "paths": [str(p) for p in cat.test_paths],
        }


@contextmanager
def _feature_cache(detector: FREDetector, store: FeatureCache | None) -> Iterator[None]:
    """Use ``store`` (when not None) as the detector's feature cache inside the block, its own one after."""
    previous = detector.feature_cache
    if store is not None:
        detector.feature_cache = store
    try:
        yield
    finally:
        detector.feature_cache = previous


def _resize_on_device(resize: str, device: torch.device, paths: Sequence[Path]) -> bool:
    """Whether images go to the device at their own size (see ``evaluate_category``'s ``resize``)."""
    if resize not in ("auto", "cpu", "device"):
        raise ValueError(f"resize must be 'auto', 'cpu' or 'device', got {resize!r}")
    if resize == "cpu" or (resize == "auto" and device.type != "cuda"):
        return False
    sizes = {image_size(p) for p in paths}  # reads headers only
    if len(sizes) > 1:
        if resize == "device":
            raise ValueError(f"resize='device' needs images of one size, found {len(sizes)} sizes; use 'cpu'")
        return False
    return True


def _decode_on_device(resize: str, device: torch.device, paths: Sequence[Path]) -> bool:
    """Whether the images are decoded on the device (see ``evaluate_category``'s ``resize``): on CUDA (nvJPEG; on
    the CPU the loader's workers decode in parallel, which one batched call in this process would not), for
    ``resize`` 'auto' or 'device', when every image is a grey or RGB JPEG, of any sizes (each is resized there)."""
    return resize in ("auto", "device") and device.type == "cuda" and device_decodable(paths)


def evaluation_maps(cat: MVTecCategory, grid_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps and masks the pixel metrics compare, at the evaluation size.

    Args:
        cat: the category (its test images, in ``cat.test`` order, and their masks).
        grid_maps: ``(N, GH, GW)`` anomaly maps of the test images, in the same order.

    Returns:
        ``(maps, masks)``: ``(N, H, W)`` float32 and bool CPU tensors, at the test images' own size when they
        share one, else at ``MIXED_SIZE_EVAL`` squared (maps bilinear, masks nearest). Images without a mask get
        an all-False mask.
    """
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
    return maps, masks


def _pixel_metrics(cat: MVTecCategory, grid_maps: torch.Tensor) -> dict[str, float]:
    """Pixel AUROC, PRO (FPR <= 0.3) and pixel F1-max of the upsampled maps against the ground-truth masks.
    A defective image without a mask is left out: its defect pixels would otherwise count as normal ones."""
    maps, masks = evaluation_maps(cat, grid_maps)
    keep = torch.tensor([s.label == 0 or s.mask is not None for s in cat.test])
    maps, masks = maps[keep], masks[keep]
    if not bool(masks.any()):
        return {}
    return {k: float(v) for k, v in segmentation_metrics(maps, masks).items()}


def summarize(results: dict[str, dict[str, Any]], config: DetectorConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: per-category metrics (without raw scores) and map grid, their mean, and the
    configuration (``detail_layers`` as asked; a category's ``map_grid`` says whether its detail head was kept)."""
    keep = METRICS + PIXEL_METRICS + ("n_train", "n_test", "n_unreadable_skipped", "fit_seconds",
                                      "test_images_per_second", "threshold", "map_grid")
    categories = {name: {k: r[k] for k in keep if k in r} for name, r in results.items()}
    for name, r in results.items():
        if r.get("defective_without_mask"):
            categories[name]["n_defective_without_mask"] = len(r["defective_without_mask"])
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
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def write_scores_csv(path: str | os.PathLike, rows: Sequence[tuple[str, str, int, float]]) -> Path:
    """``category,path,label,score`` per test image, written atomically; 9 significant digits (a float32 round
    trip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["category", "path", "label", "score"])
        w.writerows([c, p, label, f"{score:.9g}"] for c, p, label, score in rows)
    return path


def format_table(results: dict[str, dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table, one row per category and a mean row (pixel columns when every category has them; a
    ``skipped`` column, the unreadable files left out, when the results count them)."""
    if columns is None:
        pixel = bool(results) and all(all(k in r for k in PIXEL_METRICS) for r in results.values())
        columns = METRICS + (PIXEL_METRICS if pixel else ())
    skipped = bool(results) and all("n_unreadable_skipped" in r for r in results.values())
    counts = ["n_train", "n_test", *(["n_unreadable_skipped"] if skipped else [])]
    head = ["category", *[c.replace("image_", "") for c in columns],
            *[c.replace("n_unreadable_", "") for c in counts], "fit_s", "test_img/s"]
    rows = []
    for name, r in results.items():
        rows.append([name, *[f"{r[c]:.4f}" for c in columns], *[str(r[c]) for c in counts],
                     f"{r['fit_seconds']:.1f}", f"{r['test_images_per_second']:.1f}"])
    if results:
        rows.append(["mean", *[f"{sum(r[c] for r in results.values()) / len(results):.4f}" for c in columns],
                     *[""] * len(counts), "", ""])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "-" * len(line(head))
    out = [line(head), sep, *[line(r) for r in rows[:-1]]]
    if results:
        out += [sep, line(rows[-1])]
    return "\n".join(out)
