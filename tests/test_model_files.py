"""Model files written by earlier versions of fre_torch still load and score the same.

``tests/data/model_v1_lite0_64.pt`` was written by fre_torch 0.1.0 (model-file version 1, before the package
layout of the architecture issue): EfficientNet-Lite0 (the packaged ImageNet weights) at 64 px, fitted on 9 and
calibrated on 3 generated images. ``model_v1_lite0_64.json`` holds the scores it gave then, on generated images
that ``write_synthetic_mvtec`` reproduces byte for byte from their seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fre_torch import FREDetector
from fre_torch.features.images import list_images, load_image
from fre_torch.features.synthetic import write_synthetic_mvtec

DATA = Path(__file__).parent / "data"


def test_version_1_model_file_loads_and_scores_the_same(tmp_path: Path) -> None:
    expected = json.loads((DATA / "model_v1_lite0_64.json").read_text(encoding="utf-8"))
    root = write_synthetic_mvtec(tmp_path / "ds", categories=("texture",), n_train=12, n_test_good=2,
                                 n_test_defect=2, size=64, seed=0)
    paths = list_images(root / "texture" / "test")
    assert [str(p.relative_to(root)) for p in paths] == expected["test_files"]
    det = FREDetector.load(DATA / "model_v1_lite0_64.pt", device="cpu")
    images = torch.stack([load_image(p, 64) for p in paths])
    scores, maps = det.score_and_maps(images)
    torch.testing.assert_close(scores, torch.tensor(expected["scores"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(maps.sum((1, 2)), torch.tensor(expected["map_sums"]), rtol=1e-4, atol=0)
    assert float(det.threshold) == pytest.approx(expected["threshold"], rel=1e-6)
    assert float(det.map_floor) == 0.0  # written before the heatmap colour floor: colour starts at 0, as then
