"""The backbone registry: what a backbone offers (``BackboneSpec``, ``LayerInfo``: layer names, channels and strides,
known before anything runs), how names find specs (``register_backbone``, ``get_backbone_spec``, ``list_backbones``)
and how weights files are read. The registered entries themselves are in ``backbones``.
"""

from __future__ import annotations

import http.client
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD", "BackboneSpec", "LayerInfo",
           "WeightsUnavailableError", "get_backbone_spec", "list_backbones", "register_backbone"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
# EfficientNet-Lite's own input scaling, (x - 127) / 128, written as ToTensor-style mean/std.
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

WeightsPath = str | os.PathLike[str]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (offline machine) nor given as a local file."""


# ----------------------------------------------------------------------------------------------------------------------
# Specs and registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """One extractable layer of a backbone, known before anything runs.

    Attributes:
        channels: Channels ``C`` of the layer output ``(B, C, h, w)``.
        stride: Total downsampling factor from the input image; ``h = ceil(H / stride)`` for an ``H``-pixel input.
        modules: Paths (in the full model) of the modules that compute this layer from the previous layer's output,
            run in this order. Layers are listed in network order, so running every layer's modules in turn is the
            backbone's forward pass.
    """

    channels: int
    stride: int
    modules: tuple[str, ...] = field(repr=False)

    def output_size(self, input_size: int) -> int:
        """Side of the output map for a square ``input_size`` input: ``ceil(input_size / stride)``.

        Every registered backbone pads so that each stride-2 step maps ``n`` to ``ceil(n / 2)``, and nested ceilings
        compose into one.
        """
        return -(-input_size // self.stride)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone offers and how to build it.

    Attributes:
        name: Registry name, e.g. ``"efficientnet_lite0"``.
        layers: Extractable layers in network order, name -> :class:`LayerInfo`.
        default_layers: Layers used when the caller does not choose.
        input_size: Square image side the weights were trained / are meant to be used at.
        mean: Per-channel RGB mean for input normalisation (images in ``[0, 1]``).
        std: Per-channel RGB standard deviation for input normalisation.
        weights_name: Which pretrained weights ``pretrained=True`` loads (for logs and cache keys).
        build: ``build(pretrained, weights) -> nn.Module``: the full model (classifier included). ``weights`` is a
            local state-dict file or None; call :func:`build_backbone` rather than this directly.
    """

    name: str
    layers: Mapping[str, LayerInfo] = field(hash=False)
    default_layers: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_name: str
    build: Callable[[bool, Path | None], nn.Module] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        # A read-only copy: specs are shared registry entries and must not be edited through one caller's handle.
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        unknown = [name for name in self.default_layers if name not in self.layers]
        if not self.default_layers or unknown:
            raise ValueError(f"{self.name}: default_layers {self.default_layers} must be non-empty layer names")

    def __deepcopy__(self, memo: dict[int, object]) -> BackboneSpec:
        return self  # immutable: copies of a module holding a spec share it

    def __reduce__(self) -> tuple[Callable[[str], BackboneSpec], tuple[str]]:
        # The builder function and the read-only mapping cannot be pickled; a registered spec is pickled by name.
        if _REGISTRY.get(self.name) is not self:
            raise TypeError(f"only registered backbone specs can be pickled; call register_backbone({self.name!r})")
        return get_backbone_spec, (self.name,)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises:
        ValueError: A backbone of that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered; choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``.

    Raises:
        ValueError: Unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Weights loading
# ----------------------------------------------------------------------------------------------------------------------


def _load_state_dict_file(path: Path) -> dict[str, Tensor]:
    # weights_only=True: a weights file is data; unpickling arbitrary objects from it would run arbitrary code.
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass the path of a saved state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load's many ways to refuse a file (unpickling, zip, EOF) name no fix
        raise ValueError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}: not a torch.save "
                         "file, or a truncated one); pass a state dict saved with torch.save(model.state_dict()) "
                         "for this backbone") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a state dict (name -> tensor); save one with torch.save(model.state_dict())"
        )
    return dict(state)


def _load_into(model: nn.Module, state: Mapping[str, Tensor], source: str, name: str) -> None:
    # strict=True: a partial load would leave random layers behind while looking pretrained.
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        raise ValueError(
            f"{source} is not a {name} state dict ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; or mismatched shapes): pass {name}'s weights"
        ) from exc


def _torchvision_state_dict(weights_enum: object, name: str) -> dict[str, Tensor]:
    """The state dict of a torchvision ``WeightsEnum`` member, from the hub cache or downloaded into it."""
    url: str = weights_enum.url  # type: ignore[attr-defined]
    # Same file torchvision's own loader uses, so a cache filled by torchvision (or by us) serves both.
    cache_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
    # Look in the cache first: an offline machine with the file must not wait on the network.
    if cache_file.is_file():
        return _load_state_dict_file(cache_file)
    match = torch.hub.HASH_REGEX.search(cache_file.name)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file and renames, so an interrupted download never leaves a bad cache entry; the hash
        # prefix in the file name rejects a truncated or wrong file. (Called directly rather than through
        # load_state_dict_from_url, which prints to stderr.)
        torch.hub.download_url_to_file(url, str(cache_file), hash_prefix=match and match.group(1), progress=False)
    except (OSError, RuntimeError, http.client.HTTPException) as exc:
        reason = " ".join(str(exc).split())  # keep the message on one line
        raise WeightsUnavailableError(
            f"{name}: pretrained weights {weights_enum} are not in the torch hub cache and could not be downloaded "
            f"({type(exc).__name__}: {reason}). Fix: run once with internet access so torchvision caches them at "
            f"{cache_file}, or pass a local state-dict file with --weights FILE (weights=FILE in Python)."
        ) from exc
    return _load_state_dict_file(cache_file)


def _torchvision_builder(
    model_fn_name: str, weights_enum_name: str, name: str
) -> Callable[[bool, Path | None], nn.Module]:
    def build(pretrained: bool, weights: Path | None) -> nn.Module:
        import torchvision.models  # deferred: efficientnet_lite0 users need not pay for the torchvision import

        model: nn.Module = getattr(torchvision.models, model_fn_name)(weights=None)
        if weights is not None:
            _load_into(model, _load_state_dict_file(weights), str(weights), name)
        elif pretrained:
            enum_cls, member = weights_enum_name.split(".")
            weights_enum = getattr(getattr(torchvision.models, enum_cls), member)
            _load_into(model, _torchvision_state_dict(weights_enum, name), str(weights_enum), name)
        return model

    return build
