"""The model file: a fitted detector's configuration and fitted state, without the backbone's weights.

Written by ``FREDetector.save``, read by ``FREDetector.load``: a ``torch.save`` dict of tensors and plain values
(loads with ``weights_only=True``), written to a temporary name and renamed. Versions: 1, one head (maps from the
score layers, image score 'fre'); 2, the map head (``map_subspaces``, ``map_scales``); 3, the detail head, whose
models follow the map head's in ``map_subspaces``; 4, each subspace's summary of its training rows
(``Subspace.tail_components`` ...) and the cell statistics' sample (``cell_rows``, ``cell_index``), which
``FREDetector.update`` adds new images to (files of ``n_components='auto'``; others store them empty). Older versions are converted here, once, so they load and score
as they did.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..features.files import atomic_write
from .config import DetectorConfig

if TYPE_CHECKING:
    from .detector import FREDetector

__all__ = ["FORMAT", "ModelFileError", "VERSION", "read_model_file", "weights_identity", "write_model_file"]

FORMAT = "fre_torch.detector"
VERSION = 4


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or not a fre_torch detector."""


def weights_identity(backbone: str, pretrained: bool, weights: str | os.PathLike | None) -> str:
    """A string naming the exact backbone weights, stored in model files so a mismatch is caught at load."""
    if weights is not None:
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
        return f"file:{Path(weights).name}:{digest}"
    return f"{backbone}:{'pretrained' if pretrained else 'random'}"


_SUMMARY = ("tail_components", "tail_singular_values", "summary_rank")


def _states(models: Any, summary: bool = True) -> list[dict[str, Tensor]]:
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    if not summary:  # an empty summary: the subspace scores the same and cannot take new rows
        for state in states:
            if "summary_rank" in state:
                state["tail_components"] = state["tail_components"][:0]
                state["tail_singular_values"] = state["tail_singular_values"][:0]
                state["summary_rank"] = torch.zeros_like(state["summary_rank"])
    return states


def write_model_file(detector: FREDetector, path: str | os.PathLike, *, summary: bool = True) -> Path:
    """Write ``detector`` (fitted) to ``path``: the score head's models as ``subspaces``, the map heads' (map, then
    detail) as ``map_subspaces``, so files keep the layout every version since 2 has. ``summary=False``: without
    what ``FREDetector.update`` needs (``FREDetector.save``)."""
    path = Path(path)
    heads = list(detector.heads.values())
    score, maps = heads[0], heads[1:]
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": detector.config.to_dict(),
        "pretrained": detector.pretrained,
        "weights_id": detector.weights_id,
        "subspaces": _states(score.models, summary),
        "scales": score.scales.detach().cpu(),
        "map_subspaces": _states([m for h in maps for m in h.models], summary),
        "map_scales": torch.cat([h.scales for h in maps]).detach().cpu() if maps
        else torch.ones(0, dtype=torch.float64),
        "cell_mean": detector.cell_mean.detach().cpu(),
        "cell_std": detector.cell_std.detach().cpu(),
        "cell_rows": detector.cell_rows.detach().cpu() if summary else torch.empty(0, 0),
        "cell_index": detector.cell_index.detach().cpu() if summary else torch.empty(0, dtype=torch.int64),
        "calibration_scores": detector.calibration_scores.detach().cpu(),
        "threshold": detector.threshold.detach().cpu(),
        "threshold_quantile": detector.threshold_quantile,
        "map_scale": detector.map_scale.detach().cpu(),
        "map_floor": detector.map_floor.detach().cpu(),
    }
    if detector.calibration_scores.numel() and detector.threshold_quantile is not None:
        # Derived from the held-out scores above (load recomputes it); stored in plain values for readers of the
        # file without fre_torch.
        payload["threshold_stats"] = detector.threshold_stats().to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_model_file(path: str | os.PathLike) -> tuple[DetectorConfig, dict[str, Any]]:
    """``(config, payload)`` of a model file, its configuration converted from older versions.

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelFileError: not a readable fre_torch model file, or a version this fre_torch does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: never unpickle arbitrary objects
        raise ModelFileError(f"{path} is not a readable fre_torch model file ({type(err).__name__}); "
                             "re-create it with FREDetector.save or `cli.py fit`") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a fre_torch detector file")
    version = payload.get("version")
    if version not in (1, 2, 3, VERSION):
        raise ModelFileError(f"{path} has model-file version {version}; this fre_torch reads versions 1 to "
                             f"{VERSION}")
    config_dict = dict(payload["config"])
    if version < 3:
        config_dict["detail_layers"] = None  # written before the detail head: maps from the map head alone
    if version == 1:
        # Written before the two heads: its maps came from the score layers. Converted as such, so it loads and
        # scores exactly as it did (DetectorConfig's map head default would ask for subspaces it does not have).
        config_dict["map_layers"] = None
        config_dict["image_score"] = "fre"
    return DetectorConfig.from_dict(config_dict), payload


def load_state(detector: FREDetector, payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Put a model file's fitted state (``read_model_file``'s payload) into ``detector``, built from its config."""
    config = detector.config
    saved_id = str(payload.get("weights_id", ""))
    if detector.weights_id != saved_id:
        raise ModelFileError(f"{path} was fitted with backbone weights {saved_id!r}, "
                             f"but these are {detector.weights_id!r}")
    states = list(payload["subspaces"]) + list(payload.get("map_subspaces", []))
    if len(states) != len(config.subspace_dims):
        raise ModelFileError(f"{path}: {len(states)} subspaces where the config implies {len(config.subspace_dims)}")
    models: list[nn.Module] = []
    for state, d in zip(states, config.subspace_dims):
        model = detector.new_model()
        model.load_state_dict(state)
        if config.kernel is None and model.n_features != d:
            raise ModelFileError(f"{path}: a subspace has {model.n_features} features, the config implies {d}")
        models.append(model.to(detector.device))
    scales = torch.cat([payload["scales"], payload.get("map_scales", torch.ones(0, dtype=torch.float64))])
    start = 0
    for head in detector.heads.values():
        m = head.n_models
        head.set_models(models[start:start + m], scales[start:start + m].to(detector.device))
        start += m
    detector.cell_mean = payload.get("cell_mean", torch.zeros(0)).to(detector.device)
    detector.cell_std = payload.get("cell_std", torch.ones(0)).to(detector.device)
    detector.cell_rows = payload.get("cell_rows", torch.empty(0, 0)).to(detector.device)
    detector.cell_index = payload.get("cell_index", torch.empty(0, dtype=torch.int64)).to(detector.device)
    if "calibration_scores" in payload:
        detector.calibration_scores = payload["calibration_scores"].to(detector.device)
        detector.threshold = payload["threshold"].to(detector.device)
        detector.threshold_quantile = payload.get("threshold_quantile")
    if "map_scale" in payload:
        detector.map_scale = payload["map_scale"].to(detector.device)
    # Files written before the colour floor have none: 0 colours every value above 0, as they were drawn then.
    # An additive key, so no new file version (an older fre_torch reading a newer file ignores it).
    if "map_floor" in payload:
        detector.map_floor = payload["map_floor"].to(detector.device, torch.float64)
