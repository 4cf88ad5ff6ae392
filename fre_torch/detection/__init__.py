"""The detector: features of one backbone pass, heads of fitted subspaces, scores and maps; its metrics.

Rule: builds on ``core`` and ``features``; fitted state is ``nn.Module`` buffers; the only file it reads or writes
is its own model file. ``config`` (``DetectorConfig``, ``HeadConfig``: what defines a detector and its heads),
``heads`` (``Head``: one head's models, cell maps and map; ``fuse_maps``), ``folds`` (fold fits, the cross-fitted
cell statistics), ``levels`` (the heatmap colour scale), ``model_file`` (save / load, every version),
``detector`` (``FREDetector``, which composes them), ``geometry`` (grids and tiles), ``threshold`` (what a held-out
threshold promises), ``metrics`` (AUROC, AUPR, F1-max, pixel AUROC, PRO in torch) and ``regions`` (connected
components).
"""

from .config import DetectorConfig, HeadConfig
from .detector import FREDetector
from .heads import Head
from .model_file import ModelFileError

__all__ = ["DetectorConfig", "FREDetector", "Head", "HeadConfig", "ModelFileError"]
