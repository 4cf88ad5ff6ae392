"""Drivers for your own images: fit on a folder of normal images with a calibrated threshold, predict on new ones.

The threshold never sees an anomalous image or a test label: a seeded fraction of the normal images is held out,
the subspaces are fitted on the rest, and the threshold is a quantile of the held-out scores (``calibrate``).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..features.images import IMAGE_EXTENSIONS, FeatureCache, ImageDataset, list_images, make_loader
from ..detection.detector import DetectorConfig, FREDetector
from ..core.distributed import config_hash_check, gather_rows, shard
from ..features.files import atomic_write, check_output_dir, check_output_file

__all__ = ["FitResult", "check_predict_outputs", "fit_folder", "predict_paths", "resolve_inputs", "split_holdout",
           "write_predictions_csv"]

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


@dataclass
class FitResult:
    """What ``fit_folder`` (and ``fre_torch.jobs.run.fit``) did.

    Attributes:
        detector: the fitted, calibrated detector (without the feature cache).
        n_images: images found under the training folder.
        n_fit / n_held_out: readable images the subspaces were fitted on / the threshold was set on.
        holdout: the fraction held out.
        skipped: ``(path, reason)`` of every unreadable image that was left out, in folder order (data-parallel:
            every rank's; the reason is empty for another rank's file).
        path: the model file written, if any.
        is_main: False on ranks other than 0 of a data-parallel run (they write and print nothing).
    """

    detector: FREDetector
    n_images: int
    n_fit: int
    n_held_out: int
    holdout: float = 0.2
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    path: Path | None = None
    is_main: bool = True
    updated: Path | None = None

    def lines(self) -> list[str]:
        """What ``cli.py fit`` prints: the model file and the threshold with its statistics."""
        det, c = self.detector, self.detector.config
        stats = det.threshold_stats()
        out = []
        if self.path is not None:
            size_mb = self.path.stat().st_size / 2**20
            heads = f"score {list(c.layers)}" + (f", map {list(c.map_layers)}" if c.map_layers is not None else "") \
                + (f", detail {list(c.detail_layers)}" if c.detail_layers is not None else "")
            fitted = f"fitted on {self.n_fit} images" if self.updated is None else (
                f"{self.updated} updated with {self.n_fit} images ({det.n_images} in all)")
            out.append(f"wrote {self.path} ({size_mb:.1f} MB): {c.backbone} {heads}, {fitted}")
        out.append(f"threshold {float(det.threshold):.4g} = the {det.threshold_quantile:g} quantile of the held-out "
                   f"normal images' scores: {stats.summary()}")
        return out

    @property
    def warnings(self) -> list[str]:
        """Skipped images, and a threshold set on too few held-out images."""
        out = []
        if self.skipped:
            shown = "; ".join(f"{p}" + (f" ({why.split(': ', 1)[-1]})" if why else "") for p, why in self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            out.append(f"warning: skipped {len(self.skipped)} unreadable image(s) of {self.n_images}: {shown}{more} "
                       "(--strict to stop instead)")
        warning = self.detector.threshold_stats().warning(self.holdout)
        return out + ([f"warning: {warning}"] if warning else [])


class _Readable:
    """Batches of the readable images of an ``ImageDataset(skip_unreadable=True)`` loader, ``(B', 3, S, S)``.

    Unreadable files are noted as they pass (dataset index, reason); when the loader is exhausted, fewer than
    ``minimum`` readable images in all (every rank's, in data-parallel mode) is an error naming the skipped files.
    ``dataset`` is the loader's, so the detector sizes its buffers by it (an upper bound: ``fit`` trims).
    """

    def __init__(self, loader: Any, minimum: int, what: str) -> None:
        self.loader, self.dataset, self.minimum, self.what = loader, loader.dataset, minimum, what
        self.failed: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        readable = 0
        for batch in self.loader:
            ok = batch["ok"]  # a CPU bool tensor from the collate: no device sync
            if not bool(ok.all()):
                self.failed += [(i, e) for i, good, e in zip(batch["index"].tolist(), ok.tolist(), batch["error"])
                                if not good]
                batch["image"] = batch["image"][ok]
            readable += int(batch["image"].shape[0])
            if batch["image"].shape[0]:
                yield batch["image"]
        total = int(gather_rows(torch.tensor([readable])).sum())  # data-parallel: all ranks' (identity otherwise)
        if total < self.minimum:
            first = "; ".join(e for _, e in self.failed[:3])
            raise ValueError(f"only {total} {self.what} could be read, at least {self.minimum} are needed"
                             f"{f' ({first})' if first else ''}; replace or remove the unreadable files")


def fit_folder(train_dir: str | os.PathLike, config: DetectorConfig, *, device: str = "cpu", holdout: float = 0.2,
               quantile: float = 0.99, batch_size: int = 32, num_workers: int | None = None,
               weights: str | None = None, seed: int = 0, cache: str | os.PathLike | None = None,
               compile: bool = False, precision: str = "auto", strict: bool = False,
               update: str | os.PathLike | None = None) -> FitResult:
    """Fit a detector on every image under ``train_dir`` (recursive), holding out ``holdout`` for the threshold.
    ``cache``: an optional folder for decoded images (``fre_torch.features.images.PreprocessCache``) and, in ``<cache>/features``,
    their feature vectors (``FeatureCache``), reused by later fits on the same images (e.g. another ``n_components``).
    The returned detector does not keep the feature cache.

    Unreadable images (corrupt, truncated, not an image) are skipped and listed in ``FitResult.skipped``; with
    ``strict=True`` the first one raises ``ImageReadError`` instead. Fewer than 2 readable images in either split
    is a ``ValueError``. The split is made over the files found, before reading, so it does not depend on which
    files turn out unreadable.

    ``update``: a model file to add the images to instead (``FREDetector.update``): its subspaces take the
    non-held-out images, and the threshold is recalibrated on its own held-out scores together with those of the
    held-out new images under the updated model. ``config`` must then be None or name the model's backbone and
    input size; ``weights`` as the model was fitted with.

    Data-parallel (``fre_torch.core.distributed``): every rank checks that all see the same settings and files, reads
    its contiguous shard of whole batches of each split, and ends with the same fitted, calibrated detector.
    """
    train_dir = Path(train_dir)
    paths = list_images(train_dir, recursive=True)
    fit_paths, held_paths = split_holdout(paths, holdout, seed)
    features = None if cache is None else Path(cache) / "features"
    if update is not None:
        det = FREDetector.load(update, device=device, weights=weights, compile=compile, precision=precision)
        if config is not None and (config.backbone, config.input_size) != (det.config.backbone,
                                                                           det.config.input_size):
            raise ValueError(f"{update} was fitted with {det.config.backbone} at {det.config.input_size} px; an update "
                             f"keeps its settings, so drop --model / --input_size (asked: {config.backbone} at "
                             f"{config.input_size} px) or fit a new model")
        config = det.config
        det.feature_cache = None if features is None else FeatureCache(features)
    else:
        det = FREDetector(config, device=device, weights=weights, compile=compile, precision=precision,
                          feature_cache=features)
    if det.compiled:
        det.warmup(batch_size)
    config_hash_check({"config": config.to_dict(), "weights": det.weights_id, "batch_size": batch_size,
                       "holdout": holdout, "quantile": quantile, "seed": seed, "strict": strict,
                       "images": [str(p.relative_to(train_dir)) for p in paths]})
    fit_paths = shard(fit_paths, unit=batch_size, what="training images (after the hold-out)")
    held_paths = shard(held_paths, unit=batch_size, what="held-out images")

    def images(split: list[Path], what: str) -> Any:
        loader = make_loader(ImageDataset(split, config.load_size, cache=cache, skip_unreadable=not strict),
                             batch_size, device, num_workers=num_workers)
        return loader if strict else _Readable(loader, 2, what)

    fit_data = images(fit_paths, "training images (after the hold-out)")
    held_data = images(held_paths, "held-out images")
    n_calibrated = int(det.calibration_scores.numel())
    if update is not None:
        det.update(fit_data)
    else:
        det.fit(fit_data)
    det.calibrate(held_data, quantile=quantile, keep=update is not None)
    det.feature_cache = None  # a run-time choice of this fit, not part of the model handed back
    failed = [] if strict else [(split[i], e) for data, split in ((fit_data, fit_paths), (held_data, held_paths))
                                for i, e in data.failed]
    # Data-parallel: every rank's skipped files, by their position in the folder (identity otherwise).
    position = {p: i for i, p in enumerate(paths)}
    reasons = {p: e for p, e in failed}
    every = gather_rows(torch.tensor([position[p] for p, _ in failed], dtype=torch.int64))
    skipped = [(paths[i], reasons.get(paths[i], "")) for i in sorted(every.tolist())]
    n_held = int(det.calibration_scores.numel())  # every rank's readable held-out images
    n_held = n_held - (n_calibrated if update is not None else 0)  # the new held-out images only
    return FitResult(det, n_images=len(paths), n_fit=len(paths) - len(skipped) - n_held, n_held_out=n_held,
                     holdout=holdout, skipped=skipped, updated=None if update is None else Path(update))


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


def predict_paths(detector: FREDetector, paths: Sequence[Path], *, batch_size: int = 32,
                  num_workers: int | None = None, progress: Progress | None = None,
                  maps: bool = False) -> list[dict[str, Any]]:
    """Score images; one row per path: ``path, score, calibrated_score, is_anomalous, error``.

    Unreadable images get an empty score and their error; the others are scored in batches on the device, and
    results come back to the host once, at the end. With ``maps=True`` (linear mode) each row also has ``"map"``:
    the image's ``(g, g)`` float32 CPU anomaly map on the feature grid, None for an unreadable image.
    """
    loader = make_loader(ImageDataset(paths, detector.config.load_size, skip_unreadable=True), batch_size,
                         detector.device,
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
    calibrated = detector.calibrated_score(scores) if detector.is_calibrated else None
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


def check_predict_outputs(out_dir: str | os.PathLike, *, heatmaps: bool = False) -> Path:
    """Check, before any image is read, that ``out_dir`` can take ``predictions.csv`` (and ``heatmaps/``).

    Raises:
        OutputPathError: ``out_dir`` is a file or cannot be created or written, or ``predictions.csv`` /
            ``heatmaps`` inside it exist with the wrong kind.
    """
    out = check_output_dir(out_dir, f"--out {out_dir}")
    if out.is_dir():
        check_output_file(out / "predictions.csv", f"--out {out_dir}")
        if heatmaps:
            check_output_dir(out / "heatmaps", f"--out {out_dir} --save_heatmaps")
    return out


def write_predictions_csv(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> Path:
    """``out_dir/predictions.csv`` with columns ``path,score,calibrated_score,is_anomalous,error``, written
    atomically (temporary file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "calibrated_score", "is_anomalous", "error"])
        for r in rows:
            w.writerow([r["path"], "" if r["score"] is None else f"{r['score']:.6g}",
                        "" if r["calibrated_score"] is None else f"{r['calibrated_score']:.4f}",
                        "" if r["is_anomalous"] is None else int(r["is_anomalous"]), r["error"]])
    return path
