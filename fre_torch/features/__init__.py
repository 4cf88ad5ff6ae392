"""From image files to feature tensors: the backbone registry, image decoding, the MVTec AD layout, the caches.

Rule: knows nothing of fitting or scoring (imports ``core`` at most); the only files it writes are its caches'
entries, generated data sets (``synthetic``) and, for everyone, ``files``' atomic writes and output-path checks.
"""

from .backbones import WeightsUnavailableError, get_backbone_spec, list_backbones
from .images import (FeatureCache, ImageDataset, ImageReadError, MVTecCategory, PreprocessCache, list_categories,
                     list_images, load_image, load_mask, make_loader)

__all__ = ["FeatureCache", "ImageDataset", "ImageReadError", "MVTecCategory", "PreprocessCache",
           "WeightsUnavailableError", "get_backbone_spec", "list_backbones", "list_categories", "list_images",
           "load_image", "load_mask", "make_loader"]
