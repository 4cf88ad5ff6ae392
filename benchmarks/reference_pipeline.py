"""The reference pipeline (run_mvtec.py's algorithm) as its users run it today, for side-by-side timing.

PIL loading in the main process (open, RGB, LANCZOS resize to a square, ToTensor, ImageNet Normalize), batches of
64, the backbone in float32 NCHW under ``torch.no_grad``, ``avg_pool2d(2)``, flatten, numpy, scikit-learn
``PCA(0.97)``, and FRE from ``transform`` + ``inverse_transform``. The backbone is the same truncated extractor as
fre_torch's (stopping at the layer), which only flatters the baseline.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA as SkPCA
from torchvision import transforms

from fre_torch.features.backbones import IMAGENET_MEAN, IMAGENET_STD, build_feature_extractor, get_backbone_spec
from fre_torch.features.images import MVTecCategory
from fre_torch.detection.metrics import auroc


def _features(extractor, layer: str, paths: list[Path], size: int, batch: int = 64) -> np.ndarray:
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            imgs = [tf(Image.open(p).convert("RGB").resize((size, size), Image.LANCZOS))
                    for p in paths[start:start + batch]]
            f = extractor(torch.stack(imgs))[layer]
            out.append(F.avg_pool2d(f, 2).flatten(1).numpy())
    return np.concatenate(out)


def run_reference(root: str | Path, category: str, backbone: str = "efficientnet_lite0") -> dict:
    """Fit on train/good, score test/*; returns times (s), AUROC and the scores."""
    spec = get_backbone_spec(backbone)
    layer = spec.default_layers[0]
    t0 = time.perf_counter()
    extractor = build_feature_extractor(backbone, [layer], fuse_batchnorm=False)  # as the reference runs it
    cat = MVTecCategory.load(root, category)
    t1 = time.perf_counter()
    train = _features(extractor, layer, list(cat.train), spec.input_size)
    pca = SkPCA(0.97).fit(train)
    t2 = time.perf_counter()
    test = _features(extractor, layer, cat.test_paths, spec.input_size)
    scores = ((test - pca.inverse_transform(pca.transform(test))) ** 2).sum(axis=1)
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "fit_s": t2 - t1, "test_s": t3 - t2, "total_s": t3 - t0,
            "auroc": float(auroc(torch.from_numpy(scores), cat.test_labels)), "n_components": int(pca.n_components_),
            "scores": scores}
