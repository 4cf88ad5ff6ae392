"""The synthetic MVTec AD style data set: layout, masks, determinism, refusal to overwrite, reading back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fre_torch.features import synthetic
from fre_torch.features.images import MVTecCategory, list_categories, load_image, load_mask
from fre_torch.features.synthetic import CATEGORY_DEFECTS, write_synthetic_mvtec

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 3, "size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mvtec(tmp_path_factory.mktemp("synthetic") / "data", **SMALL)


def test_layout_and_counts(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir()) == ["object", "texture"]  # no staging folder left behind
    for category, defects in CATEGORY_DEFECTS.items():
        folder = small_root / category
        assert len(defects) == 2
        assert sorted(p.name for p in folder.iterdir()) == ["ground_truth", "test", "train"]
        assert sorted(p.name for p in (folder / "train").iterdir()) == ["good"]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(("good", *defects))
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(defects)
        assert [p.name for p in sorted((folder / "train" / "good").iterdir())] == ["000.png", "001.png", "002.png",
                                                                                    "003.png"]
        assert [p.name for p in sorted((folder / "test" / "good").iterdir())] == ["000.png", "001.png"]
        for defect in defects:
            assert [p.name for p in sorted((folder / "test" / defect).iterdir())] == ["000.png", "001.png", "002.png"]
            masks = sorted((folder / "ground_truth" / defect).iterdir())
            assert [p.name for p in masks] == ["000_mask.png", "001_mask.png", "002_mask.png"]
        for path in folder.rglob("*.png"):
            with Image.open(path) as img:
                assert img.size == (48, 48)
                assert img.mode == ("L" if path.stem.endswith("_mask") else "RGB")


def test_masks_are_binary_and_non_empty(small_root: Path) -> None:
    for category, defects in CATEGORY_DEFECTS.items():
        for defect in defects:
            for path in sorted((small_root / category / "ground_truth" / defect).iterdir()):
                with Image.open(path) as img:
                    values = set(img.tobytes())
                assert values == {0, 255}, path


def test_normal_images_vary(small_root: Path) -> None:
    for category in CATEGORY_DEFECTS:
        images = [load_image(p, 48) for p in sorted((small_root / category / "train" / "good").iterdir())]
        for i in range(len(images)):
            for j in range(i):
                assert not torch.equal(images[i], images[j])


@pytest.mark.parametrize("category", sorted(CATEGORY_DEFECTS))
@pytest.mark.parametrize("size", [32, pytest.param(128, marks=pytest.mark.full)])
def test_mask_is_exactly_where_the_defect_changed_the_image(category: str, size: int) -> None:
    for defect in CATEGORY_DEFECTS[category]:
        for seed in range(8):
            clean, image, mask = synthetic._render(category, defect, size, seed)
            assert clean.shape == image.shape == (3, size, size) and clean.dtype == image.dtype == torch.uint8
            assert mask.shape == (size, size) and mask.dtype == torch.bool and mask.any()
            change = (image.int() - clean.int()).abs().amax(dim=0)  # (S, S)
            # Every mask pixel is visibly changed ...
            assert bool((change[mask] >= 4).all())
            # ... and nothing changed farther than the 2-pixel anti-aliased edge around the mask.
            near = F.max_pool2d(mask[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0
            assert not bool((change[~near] > 0).any())
        clean, image, mask = synthetic._render(category, None, size, 0)
        assert torch.equal(clean, image) and not mask.any()


def test_object_masks_sit_where_images_differ_from_the_normal_median(tmp_path: Path) -> None:
    root = write_synthetic_mvtec(tmp_path, categories=("object",), n_train=15, n_test_good=1, n_test_defect=4,
                                 size=64, seed=3)
    folder = root / "object"
    good = torch.stack([load_image(p, 64) for p in sorted((folder / "train" / "good").iterdir())]).float()
    median = good.median(dim=0).values  # (3, 64, 64)
    for defect in CATEGORY_DEFECTS["object"]:
        for path in sorted((folder / "test" / defect).iterdir()):
            mask = load_mask(folder / "ground_truth" / defect / f"{path.stem}_mask.png")
            deviation = (load_image(path, 64).float() - median).abs().amax(dim=0)  # (64, 64)
            assert deviation[mask].mean() > 3 * deviation[~mask].mean(), path


def test_texture_mask_pixels_stand_out_from_the_rest_of_their_image(small_root: Path) -> None:
    folder = small_root / "texture"
    for defect in CATEGORY_DEFECTS["texture"]:
        for path in sorted((folder / "test" / defect).iterdir()):
            mask = load_mask(folder / "ground_truth" / defect / f"{path.stem}_mask.png")
            image = load_image(path, 48).float()  # (3, 48, 48)
            normal_colour = image[:, ~mask].mean(dim=1, keepdim=True)  # (3, 1)
            deviation = (image.flatten(1) - normal_colour).norm(dim=0).view(48, 48)
            assert deviation[mask].mean() > 2 * deviation[~mask].mean(), path


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, small_root: Path) -> None:
    again = _files(write_synthetic_mvtec(tmp_path / "again", **SMALL))
    assert again == _files(small_root)
    other = _files(write_synthetic_mvtec(tmp_path / "other", **SMALL, seed=1))
    assert other.keys() == again.keys()
    assert all(other[k] != again[k] for k in again if not k.endswith("_mask.png"))


def test_refuses_a_non_empty_category_folder(tmp_path: Path) -> None:
    (tmp_path / "object").mkdir()
    (tmp_path / "object" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(tmp_path / "object")):
        write_synthetic_mvtec(tmp_path, **SMALL)
    # Checked before anything is written: the other category is not created either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["object"]
    assert (tmp_path / "object" / "keep.txt").read_text() == "mine"


def test_fills_an_existing_empty_category_folder(tmp_path: Path) -> None:
    (tmp_path / "texture").mkdir()
    write_synthetic_mvtec(tmp_path, categories=("texture",), **SMALL)
    assert len(list((tmp_path / "texture" / "train" / "good").iterdir())) == 4


def test_an_interrupted_run_leaves_no_partial_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save = synthetic._save_png
    calls = []

    def failing_save(pixels: torch.Tensor, path: Path) -> None:
        calls.append(path)
        if len(calls) == 20:  # in the middle of the second category
            raise KeyboardInterrupt
        save(pixels, path)

    monkeypatch.setattr(synthetic, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_mvtec(tmp_path, categories=("texture", "object"), n_train=4, n_test_good=2, n_test_defect=2,
                              size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texture"]  # complete; "object" and staging are gone
    assert len(list((tmp_path / "texture").rglob("*.png"))) == 4 + 2 + 2 * 2 * 2


def test_reads_back_with_mvtec_category(small_root: Path) -> None:
    assert list_categories(small_root) == ["object", "texture"]
    for category, defects in CATEGORY_DEFECTS.items():
        data = MVTecCategory.load(small_root, category)
        assert len(data.train) == 4
        assert len(data.test) == 2 + 2 * 3
        assert data.test_labels.tolist() == [1 if d != "good" else 0 for d in data.defect_types]
        assert sorted(set(data.defect_types)) == sorted(("good", *defects))
        for sample in data.test:
            assert (sample.mask is None) == (sample.label == 0)
            if sample.mask is not None:
                assert load_mask(sample.mask).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"categories": ("fabric",)}, "unknown synthetic category"),
        ({"categories": "texture"}, "string"),
        ({"categories": ()}, "empty"),
        ({"categories": ("object", "object")}, "repeat"),
        ({"n_train": 0}, "n_train"),
        ({"n_test_defect": -1}, "n_test_defect"),
        ({"n_test_good": 0, "n_test_defect": 0}, "at least one test image"),
        ({"size": 16}, "size"),
        ({"size": 64.0}, "size"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic_mvtec(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()
