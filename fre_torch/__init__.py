"""fre_torch: anomaly detection by Feature Reconstruction Error, in PyTorch.

Four layers, each importing only the ones before it (docs/internals.md, "Architecture"): ``core`` (the engine: subspaces, PCA,
kernel FRE, the precision policy, data-parallel collectives; torch only), ``features`` (backbones, images, caches),
``detection`` (``FREDetector``, metrics, the threshold's statistics) and ``jobs`` (what ``cli.py`` runs, one call per
command: ``run.evaluate``, ``run.fit``, ``run.predict``, ``run.export``, ``run.demo``).
"""

from .core import (PCA, CovarianceAccumulator, ExactKernelFRE, GramAccumulator, KernelFRE, LinearAutoencoder,
                   SketchAccumulator, Subspace, fit_covariance, fit_gram, fit_rows, fit_sketch)
from .detection import DetectorConfig, FREDetector, HeadConfig, ModelFileError
from .features import WeightsUnavailableError, get_backbone_spec, list_backbones
from .jobs import run

__version__ = "0.1.0"

__all__ = [
    "PCA",
    "KernelFRE",
    "ExactKernelFRE",
    "LinearAutoencoder",
    "DetectorConfig",
    "HeadConfig",
    "FREDetector",
    "ModelFileError",
    "WeightsUnavailableError",
    "get_backbone_spec",
    "list_backbones",
    "Subspace",
    "CovarianceAccumulator",
    "GramAccumulator",
    "SketchAccumulator",
    "fit_covariance",
    "fit_gram",
    "fit_rows",
    "fit_sketch",
    "run",
    "__version__",
]
