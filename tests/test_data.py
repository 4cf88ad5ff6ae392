"""fre_torch.features.images: decoding against PIL directly, the MVTec AD layout reader, loaders and their errors.

Images are generated into tmp_path; the real data sets are used when present (skipped otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fre_torch.features.images import (

    ImageDataset,
    ImageReadError,
    MVTecCategory,
    image_size,
    list_categories,
    list_images,
    load_image,
    load_mask,
    make_loader,
)

from conftest import find_category, skip_reason

BOTTLE = find_category("bottle")
MAGNETIC = find_category("magnetic_tile")


def _pattern(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise, ``uint8 (h, w, channels)``, so that resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 5 + xx * 3)[..., None] + 40 * np.arange(channels)
    return ((base + rng.integers(0, 60, (h, w, channels))) % 256).astype(np.uint8)


def _make(mode: str, h: int = 23, w: int = 37, seed: int = 0) -> Image.Image:
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.fromarray(_pattern(h, w, len(mode), seed), mode)
    if mode == "LA":
        return Image.fromarray(_pattern(h, w, 2, seed), "LA")
    grey = Image.fromarray(_pattern(h, w, 1, seed)[..., 0], "L")
    if mode == "L":
        return grey
    if mode == "1":
        return grey.convert("1")
    if mode == "P":
        return Image.fromarray(_pattern(h, w, 3), "RGB").quantize(colors=16)
    if mode == "I;16":
        return Image.fromarray(_pattern(h, w, 1)[..., 0].astype(np.uint16) * 257)
    raise AssertionError(mode)


def _direct(path: Path, size: int) -> np.ndarray:
    """The reference decode with PIL alone: convert to RGB, LANCZOS resize, HWC -> CHW."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb).transpose(2, 0, 1)


# (file name, mode): every format with the modes it stores.
FORMATS = [
    ("a.png", "RGB"), ("a.png", "L"), ("a.png", "LA"), ("a.png", "RGBA"), ("a.png", "P"), ("a.png", "1"),
    ("a.jpg", "RGB"), ("a.jpeg", "L"), ("a.JPG", "CMYK"),
    ("a.bmp", "RGB"), ("a.BMP", "L"), ("a.bmp", "P"),
    ("a.tif", "RGB"), ("a.tiff", "RGBA"), ("a.TIFF", "CMYK"), ("a.tif", "L"),
]  # fmt: skip


@pytest.mark.parametrize("name,mode", FORMATS, ids=[f"{n}-{m}" for n, m in FORMATS])
def test_load_image_equals_pil_lanczos(tmp_path, name, mode):
    path = tmp_path / name
    _make(mode).save(path)
    img = load_image(path, 32)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    np.testing.assert_array_equal(img.numpy(), _direct(path, 32))
    assert image_size(path) == (23, 37)
    assert list_images(tmp_path) == [path]


def test_load_image_upsamples_and_str_paths(tmp_path):
    path = tmp_path / "small.png"
    _make("RGB", 5, 9).save(path)
    img = load_image(str(path), 64)
    assert img.shape == (3, 64, 64)
    np.testing.assert_array_equal(img.numpy(), _direct(path, 64))


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "p.png"
    pal = _make("P")
    pal.info["transparency"] = 0
    pal.save(path, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    np.testing.assert_array_equal(load_image(path, 16).numpy(), _direct(path, 16))


@pytest.mark.parametrize("name", ["g16.png", "g16.tif"])
def test_16bit_grey_is_rescaled_not_clipped(tmp_path, name):
    path = tmp_path / name
    _make("I;16").save(path)
    grey8 = Image.fromarray(_pattern(23, 37, 1)[..., 0], "L")  # the same picture at 8 bits (x 257 undone)
    expected = np.asarray(grey8.convert("RGB").resize((20, 20), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(load_image(path, 20).numpy(), expected)
    big_endian = Image.frombytes("I;16B", (37, 23), np.asarray(_make("I;16")).astype(">u2").tobytes())
    big_endian.save(tmp_path / "g16b.tif")
    with Image.open(tmp_path / "g16b.tif") as raw:
        assert raw.mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(tmp_path / "g16b.tif", 20).numpy(), expected)


@pytest.mark.parametrize(
    "content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], ids=["text", "header"]
)
def test_corrupt_file_raises_image_read_error_with_path(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=re.escape(str(path))) as info:
        load_image(path, 8)
    assert isinstance(info.value, ValueError) and info.value.path == path


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "trunc.png"
    _make("RGB", 64, 64).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        load_image(path, 8)
    jpg = tmp_path / "trunc.jpg"
    _make("RGB", 64, 64).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:200])
    with pytest.raises(ImageReadError, match=re.escape(str(jpg))):
        load_image(jpg, 8)
    with pytest.raises(ImageReadError, match="nope.png"):
        load_image(tmp_path / "nope.png", 8)
    with pytest.raises(ImageReadError, match="nope.png"):
        load_mask(tmp_path / "nope.png", 8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, None])
def test_bad_size(tmp_path, size):
    path = tmp_path / "a.png"
    _make("RGB").save(path)
    with pytest.raises(ValueError, match="positive int"):
        load_image(path, size)


def test_load_mask_nearest_and_original_size(tmp_path):
    arr = np.zeros((23, 37), np.uint8)
    arr[5:12, 10:30] = 255
    arr[20, 2] = 1  # any value > 0 is anomalous
    path = tmp_path / "m_mask.png"
    Image.fromarray(arr).save(path)
    full = load_mask(path)
    assert full.dtype == torch.bool and full.shape == (23, 37)
    np.testing.assert_array_equal(full.numpy(), arr > 0)
    small = load_mask(path, 16)
    assert small.shape == (16, 16)
    expected = np.asarray(Image.fromarray(arr).resize((16, 16), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(small.numpy(), expected)
    Image.fromarray(arr).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png").numpy(), arr > 127)


def test_list_images(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["b.png", "A.JPG", "sub/c.jpeg", "sub/deep/d.Tif", ".hidden/e.png", "._f.png"]:
        _make("RGB", 4, 4).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "A.JPG", "b.png", "sub/c.jpeg", "sub/deep/d.Tif",
    ]  # fmt: skip
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["A.JPG", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


def _tiny_mvtec(root: Path) -> Path:
    """``root/widget`` with 3 train images, test good 2, crack 2 (one mask missing), hole 1, and a mask for each."""
    cat = root / "widget"
    files = {
        "train/good": ["002.png", "000.png", "001.png"],
        "test/good": ["001.png", "000.png"],
        "test/crack": ["000.png", "001.png"],
        "test/hole": ["000.jpg"],
    }
    for folder, names in files.items():
        (cat / folder).mkdir(parents=True)
        for name in names:
            _make("RGB", 6, 8).save(cat / folder / name)
    for defect, stem in [("crack", "000"), ("hole", "000")]:
        (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8), 255, np.uint8)).save(cat / "ground_truth" / defect / f"{stem}_mask.png")
    (root / "not_a_category").mkdir()
    return cat


def test_mvtec_layout(tmp_path):
    cat = _tiny_mvtec(tmp_path)
    assert list_categories(tmp_path) == ["widget"]
    c = MVTecCategory.load(tmp_path, "widget")
    assert c.name == "widget" and c.root == cat
    assert [p.name for p in c.train] == ["000.png", "001.png", "002.png"]
    assert [p.relative_to(cat / "test").as_posix() for p in c.test_paths] == [
        "crack/000.png", "crack/001.png", "good/000.png", "good/001.png", "hole/000.jpg",
    ]  # fmt: skip
    assert c.test_labels.tolist() == [1, 1, 0, 0, 1] and c.test_labels.dtype == torch.int64
    assert c.defect_types == ["crack", "crack", "good", "good", "hole"]
    assert c.mask_paths == [
        cat / "ground_truth/crack/000_mask.png", None, None, None, cat / "ground_truth/hole/000_mask.png",
    ]  # fmt: skip
    assert MVTecCategory.load(str(tmp_path), "widget") == c  # deterministic


def test_mvtec_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing")) + ".*train/good"):
        list_categories(tmp_path / "nothing")
    cat = _tiny_mvtec(tmp_path)
    with pytest.raises(ValueError, match="pass its parent"):
        list_categories(cat)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gadget"))):
        MVTecCategory.load(tmp_path, "gadget")
    (tmp_path / "notrain" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "notrain" / "train" / "good"))):
        MVTecCategory.load(tmp_path, "notrain")
    (tmp_path / "notest" / "train" / "good").mkdir(parents=True)
    _make("RGB").save(tmp_path / "notest" / "train" / "good" / "0.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "notest" / "test"))):
        MVTecCategory.load(tmp_path, "notest")
    (tmp_path / "notest" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "notest" / "test"))):
        MVTecCategory.load(tmp_path, "notest")
    (tmp_path / "emptytrain" / "train" / "good").mkdir(parents=True)
    (tmp_path / "emptytrain" / "test").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "emptytrain" / "train" / "good"))):
        MVTecCategory.load(tmp_path, "emptytrain")


def _images(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        _make("RGB" if i % 2 else "L", 10 + i, 20 - i, seed=i).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataset_and_loader(tmp_path, num_workers):
    paths = _images(tmp_path, 7)
    ds = ImageDataset(paths, 16, labels=[0, 1, 0, 1, 0, 1, 1])
    item = ds[3]
    assert item["image"].shape == (3, 16, 16) and item["index"] == 3 and item["label"] == 1
    assert item["orig_size"].tolist() == [13, 17]
    loader = make_loader(ds, batch_size=3, device="cpu", num_workers=num_workers)
    assert not loader.pin_memory
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [3, 3, 1]
    images = torch.cat([b["image"] for b in batches])
    assert images.dtype == torch.uint8
    for i, path in enumerate(paths):
        assert torch.equal(images[i], load_image(path, 16))
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(7))
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 0, 1, 0, 1, 1]
    assert torch.cat([b["orig_size"] for b in batches]).tolist() == [[10 + i, 20 - i] for i in range(7)]
    assert "label" not in ImageDataset(paths, 16)[0]


def test_loader_defaults(monkeypatch):
    import fre_torch.features.images as images_module

    ds = ImageDataset([Path(f"{i}.png") for i in range(100)], 8)
    assert make_loader(ds, batch_size=100, device="cpu").num_workers == 0  # one batch: no worker processes
    monkeypatch.setattr(images_module, "cpu_count", lambda: 8)
    many = make_loader(ds, batch_size=10, device="cpu")
    assert many.num_workers == 4 and many.persistent_workers
    # a small machine feeding its CPU decodes between batches; feeding a GPU it keeps its workers
    monkeypatch.setattr(images_module, "cpu_count", lambda: images_module.SMALL_CPU_CORES)
    assert make_loader(ds, batch_size=10, device="cpu").num_workers == 0
    gpu = make_loader(ds, batch_size=10, device=torch.device("cuda"))
    assert gpu.pin_memory and gpu.num_workers == images_module.SMALL_CPU_CORES
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset([Path("a.png")], 8, labels=[0, 1])


def test_worker_error_names_the_file(tmp_path):
    paths = _images(tmp_path, 4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    loader = make_loader(ImageDataset([*paths, bad], 8), batch_size=2, device="cpu", num_workers=2)
    for _ in range(2):  # the persistent workers are stopped on the error and the next epoch starts afresh
        with pytest.raises(ImageReadError, match=re.escape(str(bad))):
            list(loader)
    good = make_loader(ImageDataset(paths, 8), batch_size=2, device="cpu", num_workers=2)
    assert [b["index"].tolist() for b in good] == [[0, 1], [2, 3]]


# ---- the real data sets (read-only; skipped when absent) ----


@pytest.mark.full
@pytest.mark.skipif(BOTTLE is None, reason=skip_reason("bottle"))
def test_real_mvtec_bottle():
    assert "bottle" in list_categories(BOTTLE)  # alone, or among MVTec AD's 15 categories
    c = MVTecCategory.load(BOTTLE, "bottle")
    assert len(c.train) == 209 and len(c.test) == 83
    assert int((c.test_labels == 0).sum()) == 20
    assert sorted(set(c.defect_types)) == ["broken_large", "broken_small", "contamination", "good"]
    assert all((m is None) == (label == 0) for m, label in zip(c.mask_paths, c.test_labels.tolist()))
    sample = next(s for s in c.test if s.label == 1)
    assert load_image(sample.path, 64).shape == (3, 64, 64)
    mask = load_mask(sample.mask)
    assert mask.shape == image_size(sample.path) == (384, 384) and mask.any()


@pytest.mark.full
@pytest.mark.skipif(MAGNETIC is None, reason=skip_reason("magnetic_tile"))
def test_real_magnetic_tile():
    assert "magnetic_tile" in list_categories(MAGNETIC)
    c = MVTecCategory.load(MAGNETIC, "magnetic_tile")
    assert len(c.train) == 666 and len(c.test) == 678
    assert int((c.test_labels == 0).sum()) == 286
    assert all(p.suffix == ".jpg" for p in c.test_paths)
    assert all(m is not None for m, label in zip(c.mask_paths, c.test_labels.tolist()) if label == 1)
    sample = next(s for s in c.test if s.defect == "crack")
    with Image.open(sample.path) as raw:
        assert raw.mode == "L" and raw.format == "JPEG" and raw.width != raw.height
    # At the default input size (no tile is over twice it, so no JPEG is reduced in the DCT first): the reference's
    # pixels exactly.
    img = load_image(sample.path, 224)
    assert img.shape == (3, 224, 224) and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    np.testing.assert_array_equal(img.numpy(), _direct(sample.path, 224))
    assert load_mask(sample.mask).shape == image_size(sample.path)


def test_grey_images_resized_before_rgb_give_the_reference_pixels(tmp_path: Path) -> None:
    """A grey image is resized as L, then made RGB (a third of the filtering): exactly PIL's convert + resize (at a
    size where a JPEG is not reduced in the DCT first: that needs an image over twice the input size)."""
    g = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 200), (97, 311)]):
        arr = g.integers(0, 256, (h, w), dtype=np.uint8)
        for suffix in (".png", ".jpg"):
            path = tmp_path / f"grey{i}{suffix}"
            Image.fromarray(arr, "L").save(path)
            with Image.open(path) as im:
                want = np.asarray(im.convert("RGB").resize((160, 120), Image.Resampling.LANCZOS))
            assert np.array_equal(load_image(path, (120, 160)).permute(1, 2, 0).numpy(), want), path


def test_large_jpeg_decoded_at_reduced_scale_keeps_its_size_and_look(tmp_path: Path) -> None:
    """A JPEG over twice the input size is decoded at a DCT scale that keeps it >= 2x the input, then LANCZOS:
    close to the full decode (mean difference under 1 grey level), and the reported size is the file's own."""
    from fre_torch.features.images import _read_image

    y, x = np.mgrid[0:1200, 0:1600]
    arr = np.stack([(x * 255 // 1600), (y * 255 // 1200), ((x + y) % 256)], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=95)
    got, own = _read_image(path, 224)
    assert own == (1200, 1600)
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.LANCZOS)).astype(np.float64)
    diff = np.abs(got.permute(1, 2, 0).numpy().astype(np.float64) - full)
    assert diff.mean() < 1.0 and diff.max() < 40
    with Image.open(path) as im:  # and the draft did apply: 1600 x 1200 -> 1/2 scale, still >= 448
        im.draft("RGB", (448, 448))
        assert im.size == (800, 600)
