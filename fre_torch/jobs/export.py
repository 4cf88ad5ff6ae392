"""Export a fitted ``FREDetector`` as ONE graph, uint8 images in, scores and maps out: ONNX or TorchScript.

The graph is ``ExportedPipeline``: the detector's own ``features`` (normalisation with ``config.spec``, the
BatchNorm-folded backbone, the per-layer ``embed`` of both heads) and its own ``head_maps`` (explicit squared
residual per layer, summed over channels, divided by the layer's scale), traced as they are -- there is no second
implementation of the math. The ``map`` output is the map head's; the ``score`` output is the image score made from
the score head's (unstitched) maps by ``score_from_cells``, as ``score_features`` makes it.

Why from maps and not ``score_features``' 'fre' path: ``Subspace.fre`` takes ``||x - mean||^2 - ||z||^2`` in float64
over Python column chunks, which some ONNX runtimes lack and which would cancel badly in float32. The maps' explicit
residual (``Subspace.error_map``) is accurate to float32 rounding of the FRE itself, and summed over the score head's
grid (and tiles) it is the same quantity.

Every export checks itself before the file appears: the written artefact is run (ONNX Runtime / ``torch.jit.load``)
on seeded random images and on real images when given, at two batch sizes, and compared with the torch detector;
the file is written as ``FILE.partial`` and renamed only when the check passes, otherwise it is deleted and
``ExportCheckError`` is raised.

Linear-mode detectors only: kernel FRE (``config.kernel`` set) is refused with a ``ValueError`` -- its scores
have no maps, and its feature maps (random Fourier features / Nystroem landmarks) were never checked for export.

Input of the exported graph: ``images`` uint8 ``(B, 3, H, W)`` RGB at the config's ``load_size`` (the input size;
resize with ``fre_torch.features.load_image``, LANCZOS as the reader of ``fit``/``predict``), any B >= 1. Outputs:
``score`` ``(B,)`` float32 and ``map`` ``(B, GH, GW)`` float32 (``config.map_grid``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Tuple

import torch
from torch import Tensor, nn

from ..detection.detector import FREDetector
from ..detection.geometry import as_hw

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "MAP_TOLERANCE",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "SCORE_TOLERANCE",
    "ExportCheckError",
    "ExportDependencyError",
    "ExportResult",
    "ExportedPipeline",
    "export_detector",
    "export_metadata",
    "max_relative_difference",
    "onnx_exporter_available",
]

EXPORT_FORMATS = ("onnx", "torchscript")
# Opset 18: supported by every onnxruntime since 1.14 and by the torch exporter without a version conversion.
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "map")
# Acceptance of the self-check: max |export - torch| / max |torch|, per group of check images.
SCORE_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-4
_N_RANDOM = 3  # seeded random check images added to 2 * batch_size (so the second batch size always differs)

# Runs a written artefact: uint8 images (B, 3, H, W) -> (score (B,), map (B, GH, GW)) as CPU float32 tensors.
_Runner = Callable[[Tensor], Tuple[Tensor, Tensor]]


class ExportDependencyError(RuntimeError):
    """An optional package needed for the requested export is not installed."""


class ExportCheckError(RuntimeError):
    """The exported artefact does not reproduce the torch detector; no file was left behind."""


@dataclass(frozen=True)
class ExportResult:
    """What was written and how well it matched the torch detector.

    Attributes:
        path: the artefact.
        format: 'onnx' or 'torchscript'.
        opset: ONNX opset (None for TorchScript).
        input_shape: ``("batch", 3, H, W)``: the batch dimension is dynamic.
        output_names / output_shapes: ``("score", "map")``, ``(("batch",), ("batch", GH, GW))``.
        score_rel_diff / map_rel_diff: max |export - torch| / max |torch| over the check images (the worst group);
            None when the check was skipped (ONNX Runtime missing).
        n_checked: check images run (random + real).
        batch_sizes: batch sizes the artefact was run at in the check.
        warning: why the check was skipped, else None.
    """

    path: Path
    format: str
    opset: int | None
    input_shape: tuple[str | int, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[str | int, ...], ...]
    score_rel_diff: float | None
    map_rel_diff: float | None
    n_checked: int
    batch_sizes: tuple[int, ...] = ()
    warning: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class ExportedPipeline(nn.Module):
    """The whole scoring pipeline of a fitted linear-mode detector as one module, for tracing.

    ``forward(images)``: uint8 ``(B, 3, H, W)`` -> (``score`` ``(B,)`` float32, ``map`` ``(B, GH, GW)`` float32),
    computed by the detector's own ``features``, ``head_maps`` and ``score_from_cells``: the map head's map, and the
    image score from the score head's cells. The detector is held, not copied; nothing of it is changed.
    """

    def __init__(self, detector: FREDetector) -> None:
        super().__init__()
        if detector.config.kernel is not None:
            raise ValueError(f"export supports linear-mode detectors only; this one uses kernel FRE "
                             f"(kernel={detector.config.kernel!r}), whose scores have no maps and are not exported. "
                             "Refit with kernel=None to export")
        if not detector.is_fitted:
            raise ValueError("this detector is not fitted; fit it or load a model file before exporting")
        if detector.device.type != "cpu":
            raise ValueError(f"export traces on the CPU; load the detector with device='cpu' (it is on "
                             f"{detector.device}). The artefact then runs wherever its runtime does")
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # The graph holds the plain modules, which every runtime has, never the CPU-only fused kernels (they also
        # stay out of traces by themselves; this makes it explicit for every tracer). Restored after the call.
        extractor = self.detector.extractor
        fused, extractor.fused = extractor.fused, False
        try:
            feats = self.detector.features(images)
            score = self.detector.score_from_cells(self.detector.head_maps(feats, "score", stitched=False))
            return score, self.detector.maps_from_features(feats)
        finally:
            extractor.fused = fused


class _CheckedInput(nn.Module):
    """Scripted guard around the traced pipeline: a trace cannot raise, and an image of the wrong size would run
    through its fixed pooling kernels silently, so the TorchScript artefact checks dtype and shape first."""

    def __init__(self, traced: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.pipeline = traced
        self.height, self.width = size

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.size(1) != 3 \
                or images.size(2) != self.height or images.size(3) != self.width:
            raise ValueError("expected uint8 RGB images of shape (B, 3, {}, {}), got shape {} (the dtype must be "
                             "uint8)".format(self.height, self.width, images.shape))
        return self.pipeline(images)


def export_metadata(detector: FREDetector, fmt: str) -> dict[str, str]:
    """String key/values stored in the artefact (ONNX ``metadata_props``, TorchScript extra file
    ``fre_torch.json``): what the graph expects and returns, and the detector's threshold."""
    c = detector.config
    (h, w), (gh, gw) = as_hw(c.load_size), c.map_grid
    meta = {
        "fre_torch.format": fmt,
        "fre_torch.backbone": c.backbone,
        "fre_torch.layers": ",".join(c.layers),
        "fre_torch.input": f"{INPUT_NAME}: uint8 RGB (batch, 3, {h}, {w}), pixel values 0..255",
        "fre_torch.outputs": f"score: float32 (batch,); map: float32 (batch, {gh}, {gw})",
        "fre_torch.input_size": str(h) if h == w else f"{h}x{w}",
        "fre_torch.grid": str(gh) if gh == gw else f"{gh}x{gw}",
        "fre_torch.threshold": repr(float(detector.threshold)),  # 'nan' when the detector was not calibrated
        "fre_torch.threshold_quantile": repr(detector.threshold_quantile),
        "fre_torch.config": json.dumps(c.to_dict(), sort_keys=True),
    }
    if fmt == "onnx":
        meta["fre_torch.opset"] = str(ONNX_OPSET)
    return meta


def max_relative_difference(got: Tensor, want: Tensor) -> float:
    """``max |got - want| / max |want|`` in float64 -> a Python float (inf when ``want`` is all zero but ``got``
    is not; NaN anywhere gives NaN, which fails every ``<=`` check)."""
    got64, want64 = got.detach().double(), want.detach().double()
    if got64.shape != want64.shape:
        raise ExportCheckError(f"exported output has shape {tuple(got64.shape)}, torch gives {tuple(want64.shape)}")
    num = (got64 - want64).abs().max()
    den = want64.abs().max()
    return float(num / den) if float(den) > 0 else (0.0 if float(num) == 0 else float("inf"))


def export_detector(detector: FREDetector, path: str | os.PathLike, fmt: str, *, batch_size: int = 8,
                    check_images: Tensor | None = None, seed: int = 0) -> ExportResult:
    """Export the whole pipeline of a fitted CPU detector to ``path``, then prove it matches.

    Args:
        detector: fitted, linear mode, on the CPU (not modified).
        path: the artefact to write (replaced atomically when the check passes).
        fmt: 'onnx' (needs ``onnx`` and ``onnxscript``; checked with ``onnxruntime`` when installed) or
            'torchscript'.
        batch_size: images per batch of the trace example and of the first check batch (>= 1; traced with at least
            2 so the batch dimension stays symbolic). The artefact takes any batch size.
        check_images: optional real uint8 images ``(N, 3, S, S)`` for the check, besides the random ones.
        seed: seed of the random check images.

    Returns:
        ``ExportResult`` with the measured max relative differences.

    Raises:
        ValueError: unknown format, bad batch size or check images, kernel-mode or unfitted detector.
        ExportDependencyError: ONNX export requested without ``onnx`` / ``onnxscript``.
        ExportCheckError: the artefact's score differs by more than ``SCORE_TOLERANCE`` (relative) or its map by
            more than ``MAP_TOLERANCE``; the file is not written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pipeline = ExportedPipeline(detector)
    size = as_hw(detector.config.load_size)
    if check_images is not None:
        if check_images.dtype != torch.uint8 or check_images.ndim != 4 or \
                tuple(check_images.shape[1:]) != (3, *size):
            raise ValueError(f"check images must be uint8 (N, 3, {size[0]}, {size[1]}), got {check_images.dtype} "
                             f"{tuple(check_images.shape)}")
    if fmt == "onnx":
        _require("onnx", "onnxscript")
        if not onnx_exporter_available():
            raise ExportDependencyError(
                f"ONNX export needs torch's torch.export-based exporter (torch >= 2.6), not in torch "
                f"{torch.__version__}: upgrade torch, or export --format torchscript")
    gen = torch.Generator().manual_seed(seed)
    random_images = torch.randint(0, 256, (2 * batch_size + _N_RANDOM, 3, *size), generator=gen,
                                  dtype=torch.uint8)
    example = random_images[:max(2, batch_size)]
    meta = export_metadata(detector, fmt)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if fmt == "onnx":
            _write_onnx(pipeline, example, partial, meta)
            runner = _onnx_runner(partial)
        else:
            _write_torchscript(pipeline, example, partial, meta, size)
            runner = _torchscript_runner(partial)
        if runner is None:
            os.replace(partial, path)
            return _result(path, fmt, detector, None, None, 0, (), meta,
                           warning="onnxruntime is not installed: the ONNX file was written but NOT checked; "
                                   "pip install onnxruntime to check it")
        groups = [random_images] + ([check_images] if check_images is not None and len(check_images) else [])
        score_diff, map_diff, sizes = _compare(detector, runner, groups, batch_size)
        if not (score_diff <= SCORE_TOLERANCE and map_diff <= MAP_TOLERANCE):
            raise ExportCheckError(
                f"the exported {fmt} graph does not reproduce the detector: max relative difference score "
                f"{score_diff:.3g} (tolerance {SCORE_TOLERANCE:g}), map {map_diff:.3g} (tolerance "
                f"{MAP_TOLERANCE:g}); no file was written")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    n = sum(len(g) for g in groups)
    return _result(path, fmt, detector, score_diff, map_diff, n, sizes, meta)


def _result(path: Path, fmt: str, detector: FREDetector, score_diff: float | None, map_diff: float | None,
            n: int, sizes: tuple[int, ...], meta: dict[str, str], warning: str | None = None) -> ExportResult:
    (h, w), (gh, gw) = as_hw(detector.config.load_size), detector.config.map_grid
    return ExportResult(path=path, format=fmt, opset=ONNX_OPSET if fmt == "onnx" else None,
                        input_shape=("batch", 3, h, w), output_names=OUTPUT_NAMES,
                        output_shapes=(("batch",), ("batch", gh, gw)), score_rel_diff=score_diff,
                        map_rel_diff=map_diff, n_checked=n, batch_sizes=sizes, warning=warning, metadata=meta)


def onnx_exporter_available() -> bool:
    """Whether this torch has the exporter ``_write_onnx`` needs: ``torch.onnx.export(dynamo=True)`` with
    ``dynamic_shapes`` and ``external_data`` (torch >= 2.6; torch 2.4 has only the TorchScript-based one)."""
    return {"dynamo", "dynamic_shapes", "external_data"} <= set(inspect.signature(torch.onnx.export).parameters)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportDependencyError(f"ONNX export needs {', '.join(missing)}: pip install onnx onnxruntime onnxscript "
                                    "(or pip install -e .[export])")


def _write_onnx(pipeline: ExportedPipeline, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    """torch.export-based exporter (``dynamo=True``, the default of torch >= 2.9). The TorchScript-based one
    (``dynamo=False``) cannot export this graph: ``embed`` computes the pooling kernel from the traced map shape,
    which that exporter sees as a dynamic value and refuses; torch.export keeps spatial sizes static and only the
    batch dimension symbolic, which is what the graph needs."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # exporter chatter about its own internals; the self-check is the judge
        program = torch.onnx.export(pipeline, (example,), None, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), opset_version=ONNX_OPSET,
                                    dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False,
                                    external_data=False)
    program.model.metadata_props.update(meta)
    # One self-contained file: the weights (a few MB to a few hundred) stay far below protobuf's 2 GB limit.
    program.save(out, external_data=False)


def _onnx_runner(path: Path) -> _Runner | None:
    """A callable uint8 (B, 3, S, S) -> (score, map) tensors running the file in ONNX Runtime; None if absent."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        score, maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
        return torch.from_numpy(score), torch.from_numpy(maps)

    return run


def _write_torchscript(pipeline: ExportedPipeline, example: Tensor, out: Path, meta: dict[str, str],
                       size: tuple[int, int]) -> None:
    with warnings.catch_warnings(), torch.inference_mode():
        # TracerWarnings are expected: the trace freezes the Python-level shape checks and the layer loop, which
        # is right for a fixed input size; the scripted guard below rejects any other size.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(pipeline, (example,), check_trace=False)
        scripted = torch.jit.script(_CheckedInput(traced, size))
        # torch.jit is deprecated in favour of torch.export but still the format a C++/LibTorch service loads.
        torch.jit.save(scripted, str(out), _extra_files={"fre_torch.json": json.dumps(meta, sort_keys=True)})


def _torchscript_runner(path: Path) -> _Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, see _write_torchscript
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            return module(images)

    return run


def _compare(detector: FREDetector, runner: _Runner, groups: list[Tensor],
             batch_size: int) -> tuple[float, float, tuple[int, ...]]:
    """Worst per-group relative differences of the artefact vs ``detector.score_and_maps``.

    Each group is run as one batch of ``batch_size`` then batches of ``batch_size + 1``, so a graph that froze the
    batch size of its trace example fails here rather than in the field.
    """
    score_diff = map_diff = 0.0
    sizes: set[int] = set()
    for images in groups:
        want_score, want_map = detector.score_and_maps(images, batch_size=batch_size)
        bounds = [0, min(batch_size, len(images))]
        while bounds[-1] < len(images):
            bounds.append(min(bounds[-1] + batch_size + 1, len(images)))
        outs = [runner(images[a:b]) for a, b in zip(bounds, bounds[1:])]
        sizes.update(b - a for a, b in zip(bounds, bounds[1:]))
        got_score = torch.cat([o[0] for o in outs])
        got_map = torch.cat([o[1] for o in outs])
        score_diff = max(score_diff, max_relative_difference(got_score, want_score), key=_nan_last)
        map_diff = max(map_diff, max_relative_difference(got_map, want_map), key=_nan_last)
    return score_diff, map_diff, tuple(sorted(sizes))


def _nan_last(value: float) -> float:
    """Sort key that makes NaN the maximum, so a NaN difference is reported (and fails) instead of being hidden."""
    return float("inf") if value != value else value
