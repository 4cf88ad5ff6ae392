"""The one precision policy of fre_torch, defined once.

- Statistics are accumulated and decomposed in ``FIT_DTYPE`` (float64): eigendecompositions of near-low-rank
  float32 matrices lose accuracy or fail on CUDA, and the cost is small next to feature extraction.
- Fitted results are cast back to the dtype of the data they were fitted on (``type_as``), like scikit-learn.
- Scoring runs in ``SCORE_DTYPE`` (float32) unless the caller passes float64 data.
- Backbones run under bf16 autocast on CUDA and in float32 on the CPU (``autocast``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = [
    "FIT_DTYPE", "SCORE_DTYPE", "BACKBONE_CUDA_DTYPE", "autocast", "check_device", "score_dtype_for",
]

FIT_DTYPE: torch.dtype = torch.float64
SCORE_DTYPE: torch.dtype = torch.float32
BACKBONE_CUDA_DTYPE: torch.dtype = torch.bfloat16


def autocast(device: torch.device | str) -> AbstractContextManager:
    """Backbone precision context: bf16 autocast on CUDA, a no-op (float32) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=BACKBONE_CUDA_DTYPE)
    return nullcontext()


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
