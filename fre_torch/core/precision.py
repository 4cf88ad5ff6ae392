"""The one precision policy of fre_torch, defined once.

- Statistics are accumulated and decomposed in ``FIT_DTYPE`` (float64): eigendecompositions of near-low-rank
  float32 matrices lose accuracy or fail on CUDA, and the cost is small next to feature extraction.
- Fitted results are cast back to the dtype of the data they were fitted on (``type_as``), like scikit-learn.
- Scoring runs in ``SCORE_DTYPE`` (float32) unless the caller passes float64 data.
- Backbones run under bf16 autocast on CUDA and in float32 on the CPU (``autocast``, precision ``"auto"``).
  bf16 keeps float32's exponent range, so activations never overflow as they can in fp16; its AUROC is checked
  against float32 eager by ``benchmarks/gpu_check.py`` (target: within 0.002). ``"fp32"``, ``"bf16"`` and
  ``"fp16"`` force one choice, e.g. to measure the others.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = [
    "FIT_DTYPE", "SCORE_DTYPE", "BACKBONE_CUDA_DTYPE", "PRECISIONS", "autocast", "backbone_dtype", "check_device",
    "check_precision", "score_dtype_for",
]

FIT_DTYPE: torch.dtype = torch.float64
SCORE_DTYPE: torch.dtype = torch.float32
BACKBONE_CUDA_DTYPE: torch.dtype = torch.bfloat16


PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``precision`` if it is one of ``PRECISIONS`` and worth running on ``device`` (None: any device).

    Raises:
        ValueError: an unknown precision, or 'fp16' on the CPU: CPUs have no fast float16 convolutions (measured on
            a 2-core AVX2 VM: 24x the fp32 time for Lite0's features, scores up to 0.044 apart), so it would only
            slow a run down; the message names what to use instead.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device is not None and torch.device(device).type == "cpu":
        raise ValueError("--precision fp16 on the CPU only slows the run down (no fast float16 kernels on CPUs: "
                         "about 10-25x the fp32 time, other scores); use --precision auto or fp32 on the CPU, fp16 "
                         "or bf16 on CUDA")
    return precision


def backbone_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """The dtype backbones compute in: ``"auto"`` = bf16 on CUDA, float32 elsewhere."""
    check_precision(precision)
    if precision == "auto":
        return BACKBONE_CUDA_DTYPE if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[precision]


def autocast(device: torch.device | str, precision: str = "auto") -> AbstractContextManager:
    """Backbone precision context: autocast to ``backbone_dtype``, a no-op (``nullcontext``) for float32."""
    device = torch.device(device)
    dtype = backbone_dtype(device, precision)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def score_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Scoring dtype for data of ``dtype``: float64 stays float64, everything else is scored in float32."""
    return torch.float64 if dtype == torch.float64 else SCORE_DTYPE


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` with the fix for a bad name or CUDA that is not there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine; use device 'cpu'")
    return dev
