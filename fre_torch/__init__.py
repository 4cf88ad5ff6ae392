"""fre_torch: anomaly detection by Feature Reconstruction Error, in PyTorch.

The engine (``PCA``, ``Subspace`` and the streaming accumulators) imports only torch; ``FREDetector`` adds
the backbones (torchvision) on top. Drivers live in their own modules: ``fre_torch.data`` (images, MVTec layout,
``PreprocessCache``), ``fre_torch.evaluate``, ``fre_torch.predict``, ``fre_torch.export`` (ONNX / TorchScript;
needs the ``export`` extra), ``fre_torch.report`` (needs ``report``), ``fre_torch.distributed`` (torchrun).
"""

from .autoencoder import LinearAutoencoder
from .backbones import WeightsUnavailableError, get_backbone_spec, list_backbones
from .detector import DetectorConfig, FREDetector, ModelFileError
from .kernel import ExactKernelFRE, KernelFRE
from .pca import PCA
from .subspace import CovarianceAccumulator, GramAccumulator, Subspace, fit_covariance, fit_gram, fit_rows

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
