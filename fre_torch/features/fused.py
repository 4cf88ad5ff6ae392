"""Fused CPU kernels: a convolution with its ReLU6 or residual add in one oneDNN call (the primitive that
``torch.compile``'s CPU backend emits for the same pattern), used by the EfficientNet-Lite blocks (``lite``) on the
CPU in float32 inference only. Traced, scripted and compiled code sees the plain modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["fused_kernels_apply"]

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
