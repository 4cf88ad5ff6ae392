"""fre_torch: anomaly detection by Feature Reconstruction Error, in PyTorch.

The engine (``PCA``, ``Subspace`` and the streaming accumulators) imports only torch; ``FREDetector`` adds
the backbones (torchvision) on top. Drivers live in their own modules: ``fre_torch.features.images`` (images, MVTec layout,
``PreprocessCache``), ``fre_torch.jobs.evaluate``, ``fre_torch.jobs.predict``, ``fre_torch.jobs.export`` (ONNX / TorchScript;
needs the ``export`` extra), ``fre_torch.jobs.report`` (needs ``report``), ``fre_torch.core.distributed`` (torchrun).
"""

from .core.autoencoder import LinearAutoencoder
from .features.backbones import WeightsUnavailableError, get_backbone_spec, list_backbones
from .detection.detector import DetectorConfig, FREDetector, ModelFileError
from .core.kernel import ExactKernelFRE, KernelFRE
from .core.pca import PCA
from .core.subspace import CovarianceAccumulator, GramAccumulator, Subspace, fit_covariance, fit_gram, fit_rows

__version__ = "0.1.0"

__all__ = [
    "PCA",
    "KernelFRE",
    "ExactKernelFRE",
    "LinearAutoencoder",
    "DetectorConfig",
    "FREDetector",
    "ModelFileError",
    "WeightsUnavailableError",
    "get_backbone_spec",
    "list_backbones",
    "Subspace",
    "CovarianceAccumulator",
    "GramAccumulator",
    "fit_covariance",
    "fit_gram",
    "fit_rows",
    "__version__",
]
