"""The detector: features of one backbone pass, one fitted subspace per layer, scores and maps; its metrics.

Rule: builds on ``core`` and ``features``; fitted state is ``nn.Module`` buffers; the only file it reads or writes
is its own model file. ``detector`` (``DetectorConfig``, ``FREDetector``), ``threshold`` (what a held-out threshold
promises), ``metrics`` (AUROC, AUPR, F1-max, pixel AUROC, PRO in torch) and ``regions`` (connected components).
"""

from .detector import DetectorConfig, FREDetector, ModelFileError

__all__ = ["DetectorConfig", "FREDetector", "ModelFileError"]
