"""Drivers for your own images: fit on a folder of normal images with a calibrated threshold, predict on new ones.

The threshold never sees an anomalous image or a test label: a seeded fraction of the normal images is held out,
the subspaces are fitted on the rest, and the threshold is a quantile of the held-out scores (``calibrate``).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .data import IMAGE_EXTENSIONS, ImageDataset, ImageReadError, _read_image, list_images, make_loader
from .detector import DetectorConfig, FREDetector
from .distributed import config_hash_check, shard

__all__ = ["split_holdout", "fit_folder", "resolve_inputs", "predict_paths", "write_predictions_csv"]

Progress = Callable[[int], None]


def split_holdout(paths: Sequence[Path], fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A seeded random split into (fit, held-out); the held-out part has at least 2 images."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    n = len(paths)
    n_held = max(2, round(n * fraction))
    if n - n_held < 2:
        raise ValueError(f"{n} normal images are too few to hold out {n_held} for the threshold and fit on the "
                         "rest; add images (at least 4) or lower --holdout")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:n_held])
    fit = sorted(order[n_held:])
    return [paths[i] for i in fit], [paths[i] for i in held]


def fit_folder(train_dir: str | os.PathLike, config: DetectorConfig, *, device: str = "cpu", holdout: float = 0.2,
               quantile: float = 0.99, batch_size: int = 32, num_workers: int | None = None,
               weights: str | None = None, seed: int = 0, cache: str | os.PathLike | None = None,
               compile: bool = False, precision: str = "auto") -> FREDetector:
    """Fit a detector on every image under ``train_dir`` (recursive), holding out ``holdout`` for the threshold.
    ``cache``: an optional folder for decoded images (``fre_torch.data.PreprocessCache``) and, in ``<cache>/features``,
    their feature vectors (``FeatureCache``), reused by later fits on the same images (e.g. another ``n_components``).
    The returned detector does not keep the feature cache.

    Data-parallel (``fre_torch.distributed``): every rank checks that all see the same settings and files, reads
    its contiguous shard of whole batches of each split, and ends with the same fitted, calibrated detector.
    """
    paths = list_images(train_dir, recursive=True)
    fit_paths, held_paths = split_holdout(paths, holdout, seed)
    det = FREDetector(config, device=device, weights=weights, compile=compile, precision=precision,
                      feature_cache=None if cache is None else Path(cache) / "features")
    if det.compiled:
        det.warmup(batch_size)
    config_hash_check({"config": config.to_dict(), "weights": det._weights_id, "batch_size": batch_size,
                       "holdout": holdout, "quantile": quantile, "seed": seed,
                       "images": [str(p.relative_to(train_dir)) for p in paths]})
    fit_paths = shard(fit_paths, unit=batch_size, what="training images (after the hold-out)")
    held_paths = shard(held_paths, unit=batch_size, what="held-out images")
    size = config.input_size
    det.fit(make_loader(ImageDataset(fit_paths, size, cache=cache), batch_size, device, num_workers=num_workers))
    det.calibrate(make_loader(ImageDataset(held_paths, size, cache=cache), batch_size, device, num_workers=num_workers),
                  quantile=quantile)
    det.feature_cache = None  # a run-time choice of this fit, not part of the model handed back
    return det


def resolve_inputs(items: Sequence[str]) -> list[Path]:
    """Files, folders (recursive) and glob patterns -> image paths, in the order given (folders sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += list_images(p, recursive=True)
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or matching glob: {item}")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    out += list_images(mp, recursive=True)
                elif mp.suffix.lower() in IMAGE_EXTENSIONS:
                    out.append(mp)
    if not out:
        raise ValueError(f"no images found in {', '.join(items)}")
    return list(dict.fromkeys(out))  # a file named twice (a folder and a glob) is scored once


class _TolerantDataset(Dataset):
    """Like ``ImageDataset`` but an unreadable file gives ``ok=False`` and its error instead of stopping the run."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, _ = _read_image(self.paths[index], self.size)
            return {"image": image, "index": index, "ok": True, "error": ""}
        except ImageReadError as err:
            return {"image": torch.zeros(3, self.size, self.size, dtype=torch.uint8), "index": index, "ok": False,
                    "error": str(err)}


def predict_paths(detector: FREDetector, paths: Sequence[Path], *, batch_size: int = 32,
                  num_workers: int | None = None, progress: Progress | None = None,
                  maps: bool = False) -> list[dict[str, Any]]:
    """Score images; one row per path: ``path, score, calibrated_score, is_anomalous, error``.

    Unreadable images get an empty score and their error; the others are scored in batches on the device, and
    results come back to the host once, at the end. With ``maps=True`` (linear mode) each row also has ``"map"``:
    the image's ``(g, g)`` float32 CPU anomaly map on the feature grid, None for an unreadable image.
    """
    loader = make_loader(_TolerantDataset(paths, detector.config.input_size), batch_size, detector.device,
                         num_workers=num_workers)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    map_parts: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    for batch in loader:
        ok = batch["ok"]  # a CPU bool tensor from the collate: no device sync
        for i, good, err in zip(batch["index"].tolist(), ok.tolist(), batch["error"]):
            if not good:
                errors[i] = err
        if bool(ok.any()):
            if maps:
                batch_scores, batch_maps = detector.anomaly_maps(batch["image"][ok])
                map_parts.append(batch_maps)
            else:
                batch_scores = detector.score(batch["image"][ok])
            parts.append((batch["index"][ok], batch_scores))
        if progress is not None:
            progress(len(ok))
    index = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
    scores = torch.cat([p[1] for p in parts]).float() if parts else torch.empty(0)
    calibrated = detector.calibrated_score(scores) if detector.calibration_scores.numel() else None
    threshold = float(detector.threshold)
    scores_cpu = scores.cpu().tolist()
    calibrated_cpu = calibrated.cpu().tolist() if calibrated is not None else [None] * len(scores_cpu)
    by_index = {i: (s, c) for i, s, c in zip(index.tolist(), scores_cpu, calibrated_cpu)}
    grid_maps = dict(zip(index.tolist(), torch.cat(map_parts).float().cpu())) if map_parts else {}
    rows = []
    for i, path in enumerate(paths):
        if i in by_index:
            s, c = by_index[i]
            flag = None if threshold != threshold else s > threshold  # NaN threshold: not calibrated
            rows.append({"path": str(path), "score": s, "calibrated_score": c, "is_anomalous": flag, "error": ""})
        else:
            rows.append({"path": str(path), "score": None, "calibrated_score": None, "is_anomalous": None,
                         "error": errors.get(i, "not scored")})
        if maps:
            rows[-1]["map"] = grid_maps.get(i)
    return rows


def write_predictions_csv(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """``out_dir/predictions.csv`` with columns ``path,score,calibrated_score,is_anomalous,error``, written
    atomically (temporary file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    tmp = out / "predictions.csv.partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "calibrated_score", "is_anomalous", "error"])
        for r in rows:
            w.writerow([r["path"], "" if r["score"] is None else f"{r['score']:.6g}",
                        "" if r["calibrated_score"] is None else f"{r['calibrated_score']:.4f}",
                        "" if r["is_anomalous"] is None else int(r["is_anomalous"]), r["error"]])
    os.replace(tmp, path)
    return path
