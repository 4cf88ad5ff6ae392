"""A user's own labelled folders as a category (``MVTecCategory.from_folders``, ``evaluate --train_dir ...``): which
mask goes with which image, what is refused, and that a defective image without a mask stays out of the pixel
metrics. The journey through the CLI is ``tests/test_journeys.py::test_evaluate_own_folders``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fre_torch.detection.metrics import pixel_auroc, pro
from fre_torch.features.images import MVTecCategory
from fre_torch.jobs import run
from fre_torch.jobs.evaluate import _pixel_metrics


def _png(path: Path, value: int = 120, size: int = 16, box: tuple[int, int, int, int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size, size), value, np.uint8)
    if box is not None:
        y0, x0, y1, x1 = box
        a[y0:y1, x0:x1] = 255
    Image.fromarray(a).save(path)
    return path


@pytest.fixture()
def folders(tmp_path: Path) -> Path:
    for i in range(3):
        _png(tmp_path / "good" / f"{i:03d}.png")
        _png(tmp_path / "ok" / f"ok_{i}.png")
    _png(tmp_path / "bad" / "scratch" / "000.png", 30)
    _png(tmp_path / "bad" / "scratch" / "001.png", 30)
    _png(tmp_path / "bad" / "dent" / "000.png", 60)
    _png(tmp_path / "bad" / "loose.png", 90)
    _png(tmp_path / "masks" / "scratch" / "000_mask.png", 0, box=(2, 2, 6, 6))
    _png(tmp_path / "masks" / "scratch" / "001.png", 0, box=(4, 4, 8, 8))   # no _mask suffix: also matched
    _png(tmp_path / "masks" / "dent" / "000_mask.png", 0, box=(0, 0, 3, 3))  # same stem, other defect
    _png(tmp_path / "masks" / "loose_mask.png", 0, box=(8, 8, 12, 12))       # flat, for bad/loose.png
    return tmp_path


def test_masks_by_relative_path_then_flat_stem(folders: Path) -> None:
    cat = MVTecCategory.from_folders(folders / "good", folders / "ok", folders / "bad", folders / "masks", name="p")
    assert cat.name == "p" and cat.masks_expected and len(cat.train) == 3
    got = {s.path.relative_to(folders).as_posix(): (s.label, s.defect,
                                                    None if s.mask is None else s.mask.relative_to(folders).as_posix())
           for s in cat.test}
    assert got == {
        "ok/ok_0.png": (0, "good", None), "ok/ok_1.png": (0, "good", None), "ok/ok_2.png": (0, "good", None),
        "bad/dent/000.png": (1, "dent", "masks/dent/000_mask.png"),
        "bad/loose.png": (1, "bad", "masks/loose_mask.png"),
        "bad/scratch/000.png": (1, "scratch", "masks/scratch/000_mask.png"),
        "bad/scratch/001.png": (1, "scratch", "masks/scratch/001.png"),
    }
    assert cat.root == folders  # paths are shown relative to the folders' common parent
    assert cat.test_labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_a_mask_in_another_defect_folder_is_not_taken(folders: Path) -> None:
    (folders / "masks" / "dent" / "000_mask.png").unlink()
    cat = MVTecCategory.from_folders(folders / "good", folders / "ok", folders / "bad", folders / "masks")
    dent = [s for s in cat.test if s.defect == "dent"]
    assert dent[0].mask is None  # scratch/000_mask.png has the same stem but belongs to scratch/000.png


def test_without_mask_folder(folders: Path) -> None:
    cat = MVTecCategory.from_folders(folders / "good", folders / "ok", folders / "bad")
    assert not cat.masks_expected and cat.name == "custom" and all(s.mask is None for s in cat.test)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "overlap", "two_masks", "shared_flat_mask"])
def test_refusals(folders: Path, case: str) -> None:
    args = [folders / "good", folders / "ok", folders / "bad", folders / "masks"]
    error: type[Exception] = ValueError
    if case == "missing":
        args[1], error, words = folders / "nope", FileNotFoundError, r"normal test folder \(--normal_dir\) .* does not"
    elif case == "file":
        args[3], error, words = _png(folders / "x.png"), FileNotFoundError, "is not a folder"
    elif case == "empty":
        (folders / "empty").mkdir()
        args[0], words = folders / "empty", "no images"
    elif case == "overlap":
        args[1], words = folders / "good", "also training images"
    elif case == "two_masks":
        _png(folders / "masks" / "scratch" / "000.png", 0)  # next to 000_mask.png
        words = "keep one"
    else:  # one flat mask for two defective images of the same stem
        flat = folders / "flat"
        _png(flat / "000_mask.png", 0, box=(1, 1, 2, 2))
        args[3], words = flat, "fits two defective images"
    with pytest.raises(error, match=words):
        MVTecCategory.from_folders(*args)


def test_a_defective_image_without_mask_stays_out_of_the_pixel_metrics(folders: Path) -> None:
    (folders / "masks" / "loose_mask.png").unlink()
    cat = MVTecCategory.from_folders(folders / "good", folders / "ok", folders / "bad", folders / "masks")
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(len(cat.test), 4, 4, generator=g)
    got = _pixel_metrics(cat, grid)
    # by hand: the maps at the images' 16 x 16 size and the masks of every image but bad/loose.png
    keep = [i for i, s in enumerate(cat.test) if s.path.name != "loose.png"]
    maps = torch.nn.functional.interpolate(grid[keep, None], size=(16, 16), mode="bilinear", antialias=True,
                                           align_corners=False)[:, 0]
    masks = torch.zeros(len(keep), 16, 16, dtype=torch.bool)
    for j, i in enumerate(keep):
        if cat.test[i].mask is not None:
            masks[j] = torch.from_numpy(np.array(Image.open(cat.test[i].mask)) > 0)
    assert got["pixel_auroc"] == pytest.approx(float(pixel_auroc(maps, masks)), abs=1e-6)
    assert got["pro"] == pytest.approx(float(pro(maps, masks)), abs=1e-6)


def test_settings_need_the_three_folders(folders: Path) -> None:
    for partial in ({"train_dir": folders / "good"}, {"mask_dir": folders / "masks"},
                    {"train_dir": folders / "good", "normal_dir": folders / "ok"}):
        with pytest.raises(ValueError, match="together"):
            run.evaluate(run.EvaluateSettings(**partial))
    with pytest.raises(ValueError, match="one name"):
        run.evaluate(run.EvaluateSettings(train_dir=folders / "good", normal_dir=folders / "ok",
                                          abnormal_dir=folders / "bad", categories=["a", "b"]))
