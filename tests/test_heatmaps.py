"""Heatmap panels: sizes, the fixed colour scale, the ground-truth outline; evaluate / predict --save_heatmaps."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from fre_torch.features.images import MVTecCategory, image_size, load_image, load_mask
from fre_torch.detection.detector import MAP_FLOOR_QUANTILE, DetectorConfig, FREDetector, _map_level
from fre_torch.jobs.heatmaps import (COLORMAP, OUTLINE_COLOUR, OVERLAY_ALPHA, colorize, encode_png, heatmap_floor,
                                     heatmap_names, heatmap_scale, mask_outline, render_panel, save_heatmaps,
                                     write_png)
from fre_torch.features.synthetic import write_synthetic_mvtec

LITE = ["--model", "efficientnet_lite0", "--input_size", "64", "--device", "cpu", "--batch_size", "32"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One category: 8 training images, 6 test images (2 good, 2 per defect). One defective image (and its mask) is
    made non-square, another loses its mask file."""
    root = write_synthetic_mvtec(tmp_path_factory.mktemp("heat") / "ds", categories=("object",), n_train=8,
                                 n_test_good=2, n_test_defect=2, size=64)
    cat = root / "object"
    for path, resample in ((cat / "test" / "scratch" / "001.png", Image.Resampling.LANCZOS),
                           (cat / "ground_truth" / "scratch" / "001_mask.png", Image.Resampling.NEAREST)):
        with Image.open(path) as img:
            img.resize((80, 56), resample).save(path)  # W 80, H 56
    (cat / "ground_truth" / "missing" / "001_mask.png").unlink()
    return root


# ---------------------------------------------------------------------------------------------------- rendering
def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_panel_sizes_and_plain_image_for_a_zero_map() -> None:
    img = _image(30, 50)
    pic = render_panel(img, torch.zeros(30, 50), scale=2.0, mask=torch.zeros(30, 50, dtype=torch.bool))
    assert pic.size == (3 * 50, 30) and pic.mode == "RGB"  # PIL size is (width, height)
    arr = np.asarray(pic)
    for k in range(3):  # image | overlay of a zero map | empty outline: all exactly the image
        np.testing.assert_array_equal(arr[:, 50 * k:50 * (k + 1)], img.numpy())
    two = render_panel(img.numpy(), torch.zeros(30, 50), scale=2.0, panels=2)  # ndarray input too
    assert two.size == (2 * 50, 30)


def test_colour_scale_is_fixed_not_per_image() -> None:
    scale = 3.0
    grey = torch.full((4, 8, 3), 120, dtype=torch.uint8)
    small = torch.zeros(4, 8)
    small[1, 2] = 1.5  # the same value in both maps, at the same place ...
    large = torch.linspace(0, 10 * scale, 32).view(4, 8)  # ... in a map whose range is 20x larger
    large[1, 2] = 1.5
    a = np.asarray(render_panel(grey, small, scale, panels=2))[:, 8:]
    b = np.asarray(render_panel(grey, large, scale, panels=2))[:, 8:]
    np.testing.assert_array_equal(a[1, 2], b[1, 2])  # same value -> same colour, whatever the rest of the map
    # the map is not normalised to its own maximum: small's peak (half the scale) is not drawn at full colour
    full = np.asarray(render_panel(grey, torch.full((4, 8), scale), scale, panels=2))[0, 8]
    assert not np.array_equal(a[1, 2], full)
    # clipped above the scale: 2x and 10x the scale look the same, and equal the full colour
    b_above = [b[r, c] for r in range(4) for c in range(8) if float(large[r, c]) >= scale]
    assert len(b_above) > 2 and all(np.array_equal(p, full) for p in b_above)
    rgb, alpha = colorize(torch.tensor([0.0, scale, 5 * scale]), scale)
    torch.testing.assert_close(rgb, COLORMAP[[0, -1, -1]])
    torch.testing.assert_close(alpha, torch.tensor([0.0, OVERLAY_ALPHA, OVERLAY_ALPHA]))
    expected = (120 * (1 - OVERLAY_ALPHA) + COLORMAP[-1] * OVERLAY_ALPHA).round()
    np.testing.assert_array_equal(full, expected.to(torch.uint8).numpy())


def test_colour_starts_above_the_floor() -> None:
    """t = clip((v - floor) / (scale - floor), 0, 1): a normal-like map (every value <= floor) leaves the image
    pixel for pixel; scale gets the full colour; halfway the middle of the colour map at half the opacity."""
    floor, scale = 1.25, 3.25
    img = _image(24, 32, seed=2)
    normal_like = torch.rand(24, 32, generator=torch.Generator().manual_seed(3)) * floor
    normal_like[0, 0], normal_like[5, 7] = floor, 0.0  # exactly the floor, and 0
    pic = np.asarray(render_panel(img, normal_like, scale, panels=2, floor=floor))
    np.testing.assert_array_equal(pic[:, 32:], img.numpy())  # the overlay panel is the image itself
    # without the floor (older model files: map_floor = 0) the same map is coloured almost everywhere
    before = np.asarray(render_panel(img, normal_like, scale, panels=2))
    assert (before[:, 32:] != img.numpy()).any(axis=2).mean() > 0.9

    values = torch.tensor([0.0, floor, floor + 1e-3, (floor + scale) / 2, scale, 4 * scale])
    rgb, alpha = colorize(values, scale, floor)
    torch.testing.assert_close(alpha, OVERLAY_ALPHA * torch.tensor([0.0, 0.0, 1e-3 / 2.0, 0.5, 1.0, 1.0]))
    assert float(alpha[2]) > 0  # colour starts right above the floor
    # t = 0.5 -> LUT entry round(127.5) = 128; scale and above -> the last entry, the full colour
    torch.testing.assert_close(rgb, COLORMAP[[0, 0, 0, 128, 255, 255]], rtol=0, atol=0)
    grey = torch.full((1, 2, 3), 100, dtype=torch.uint8)
    full = np.asarray(render_panel(grey, torch.tensor([[scale, floor]]), scale, panels=2, floor=floor))[0, 2:]
    expected = (100 * (1 - OVERLAY_ALPHA) + COLORMAP[-1] * OVERLAY_ALPHA).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(full[0], expected)
    np.testing.assert_array_equal(full[1], [100, 100, 100])
    # floor == scale: full colour above it, nothing up to it
    _, step = colorize(torch.tensor([0.5, 1.0, 1.5]), 1.0, 1.0)
    torch.testing.assert_close(step, torch.tensor([0.0, 0.0, OVERLAY_ALPHA]))
    for bad in (-0.1, scale + 0.1, float("nan")):
        with pytest.raises(ValueError, match="map_floor"):
            colorize(values, scale, bad)


def test_floor_is_the_float64_quantile_of_normal_maps() -> None:
    g = torch.Generator().manual_seed(4)
    for shape in ((1, 2, 2), (3, 7, 7), (40, 14, 14), (7, 5, 3)):
        maps = torch.rand(shape, generator=g) ** 3
        expected = torch.quantile(maps.double().flatten(), MAP_FLOOR_QUANTILE)
        level = _map_level(maps, MAP_FLOOR_QUANTILE)
        assert level.dtype == torch.float64 and torch.equal(level, expected), shape
    ramp = torch.arange(101, dtype=torch.float32).view(1, 1, 101)  # 0..100: the 0.99 quantile is 99 exactly
    assert float(_map_level(ramp, MAP_FLOOR_QUANTILE)) == 99.0
    with pytest.raises(ValueError, match="floor"):
        _map_level(torch.tensor([[[1.0, float("nan")]]]), 0.99)


def test_detector_floor_from_normal_maps_saved_and_loaded(dataset: Path, tmp_path: Path) -> None:
    """set_map_scale / calibrate set map_floor to torch.quantile (float64) of the normal images' maps; the model
    file keeps it; a file written before the floor existed loads with 0 (colour from 0, as it was drawn then)."""
    cat = MVTecCategory.load(dataset, "object")
    train = torch.stack([load_image(p, 64) for p in cat.train])
    held = torch.stack([load_image(p, 64) for p, y in zip(cat.test_paths, cat.test_labels.tolist()) if y == 0])
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64), device="cpu").fit(train)
    assert float(det.map_floor) == 0.0  # not calibrated yet: no floor
    det.calibrate(held)
    _, maps = det.score_and_maps(held)
    assert torch.equal(det.map_floor, torch.quantile(maps.double().flatten(), MAP_FLOOR_QUANTILE))
    assert 0 < heatmap_floor(det) < heatmap_scale(det)
    det.set_map_scale(train)
    _, maps = det.score_and_maps(train)
    assert torch.equal(det.map_floor, torch.quantile(maps.double().flatten(), MAP_FLOOR_QUANTILE))
    loaded = FREDetector.load(det.save(tmp_path / "m.pt"))
    assert torch.equal(loaded.map_floor, det.map_floor) and float(loaded.map_scale) == float(det.map_scale)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["map_floor"]  # as written before the floor existed
    torch.save(payload, tmp_path / "old.pt")
    old = FREDetector.load(tmp_path / "old.pt")
    assert heatmap_floor(old) == 0.0 and float(old.map_scale) == float(det.map_scale)


def test_heatmaps_are_deterministic(dataset: Path, tmp_path: Path) -> None:
    paths = sorted((dataset / "object" / "test" / "scratch").glob("*.png"))
    maps = torch.rand(len(paths), 7, 7, generator=torch.Generator().manual_seed(5))
    written = [save_heatmaps(tmp_path / d, paths, maps, 0.8, floor=0.3) for d in ("a", "b")]
    for a, b in zip(*written):
        assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.rglob("*.partial"))


def test_outline_on_the_mask_boundary() -> None:
    img = _image(20, 24, seed=1)
    mask = torch.zeros(20, 24, dtype=torch.bool)
    mask[5:15, 6:18] = True
    arr = np.asarray(render_panel(img, torch.zeros(20, 24), 1.0, mask))
    changed = torch.from_numpy((arr[:, 48:] != img.numpy()).any(axis=2))
    ring = mask.clone()
    ring[6:14, 7:17] = False  # the rectangle minus its interior: a 1-pixel ring just inside the mask
    assert torch.equal(mask_outline(mask), ring)
    # every ring pixel is drawn in the outline colour (random image pixels are never exactly that colour here)
    assert (arr[:, 48:][ring.numpy()] == np.array(OUTLINE_COLOUR, dtype=np.uint8)).all()
    assert torch.equal(changed, ring & changed) and int(changed.sum()) >= int(ring.sum()) - 2
    # a region touching the border is closed along the border
    edge = torch.zeros(6, 6, dtype=torch.bool)
    edge[:, :3] = True
    assert mask_outline(edge)[:, 0].all() and not mask_outline(edge)[2:4, 1].any()


def _outline_reference(mask: torch.Tensor, thickness: int) -> torch.Tensor:
    """Mask pixels within ``thickness`` (chessboard) of a non-mask pixel or the border, by brute force."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    for y, x in mask.nonzero().tolist():
        y0, y1, x0, x1 = y - thickness, y + thickness + 1, x - thickness, x + thickness + 1
        out[y, x] = y0 < 0 or x0 < 0 or y1 > h or x1 > w or not bool(mask[y0:y1, x0:x1].all())
    return out


@pytest.mark.parametrize("thickness", [1, 2, 3])
def test_outline_equals_brute_force(thickness: int) -> None:
    g = torch.Generator().manual_seed(thickness)
    for _ in range(4):
        mask = torch.zeros(23, 31, dtype=torch.bool)
        for _ in range(3):  # blobs, some touching the border
            y, x = torch.randint(-3, 23, (1,), generator=g).item(), torch.randint(-3, 31, (1,), generator=g).item()
            mask[max(0, y):y + 9, max(0, x):x + 7] = True
        mask[torch.rand(23, 31, generator=g) < 0.03] = True  # single pixels: all outline
        assert torch.equal(mask_outline(mask, thickness), _outline_reference(mask, thickness))
    assert not mask_outline(torch.zeros(5, 5, dtype=torch.bool)).any()
    assert torch.equal(mask_outline(torch.ones(5, 5, dtype=torch.bool), 1), _outline_reference(
        torch.ones(5, 5, dtype=torch.bool), 1))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 3), (50, 96)])
def test_encode_png_is_lossless(shape: tuple[int, int], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    pixels = torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8).numpy()
    pixels[: shape[0] // 2] = pixels[0]  # flat rows too (the "up" filter's zeros)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and img.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(img), pixels)
    grey = Image.fromarray(pixels[..., 0])  # other modes are converted to RGB
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(grey)))), np.asarray(grey.convert("RGB")))
    path = write_png(Image.fromarray(pixels), tmp_path / "a.png")
    assert path.read_bytes() == data and not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        encode_png(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        encode_png(pixels[..., :2])


def test_no_mask_label_and_bad_input() -> None:
    img = torch.full((40, 60, 3), 90, dtype=torch.uint8)
    arr = np.asarray(render_panel(img, torch.zeros(40, 60), 1.0, None))  # ground truth unknown
    third = arr[:, 120:]
    assert (third != 90).any()  # the "no mask" label
    assert (third[30:, :] == 90).all()  # ... small, in the top-left corner; the rest is the image
    with pytest.raises(ValueError, match="upsample"):
        render_panel(img, torch.zeros(7, 7), 1.0)
    with pytest.raises(ValueError, match="map_scale"):
        render_panel(img, torch.zeros(40, 60), float("nan"))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        render_panel(img.permute(2, 0, 1), torch.zeros(40, 60), 1.0)


def test_names_are_unique() -> None:
    assert heatmap_names(["ds/test/good/000.png", "ds/test/scratch/000.png"]) == ["good_000.png", "scratch_000.png"]
    names = heatmap_names(["a/x/000.png", "b/x/000.png", "a/x/000.jpg", "a/x/000.png", "q r/é.png"])
    assert len(set(n.lower() for n in names)) == 5 and all(n.endswith(".png") and "/" not in n for n in names)
    assert names[-1] == "q_r_é.png"


# ---------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_save_heatmaps(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "heat"
    code = cli.main(["evaluate", "--dataset_directory", str(dataset), "--object_category", "object", *LITE,
                     "--save_heatmaps", str(out)])
    assert code == 0, capsys.readouterr().err
    folder = out / "object"
    test = dataset / "object" / "test"
    expected = {f"{d}_{s}.png": test / d / f"{s}.png" for d in ("good", "missing", "scratch") for s in ("000", "001")}
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)  # one per test image, no .partial left
    for name, image_path in expected.items():
        h, w = image_size(image_path)
        arr = _pixels(folder / name)
        assert arr.shape == (h, 3 * w, 3), name  # 3W x H at the image's own size
        np.testing.assert_array_equal(arr[:, :w], _pixels(image_path))  # first panel: the image itself
    assert image_size(expected["scratch_001.png"]) == (56, 80)  # the non-square one
    # ground truth: outline exactly on the mask's boundary; a good image unchanged; a lost mask labelled
    mask = load_mask(dataset / "object" / "ground_truth" / "scratch" / "000_mask.png")
    arr = _pixels(folder / "scratch_000.png")
    changed = torch.from_numpy((arr[:, 128:] != arr[:, :64]).any(axis=2))
    assert torch.equal(changed, mask_outline(mask) & changed) and int(changed.sum()) > 0
    good = _pixels(folder / "good_000.png")
    np.testing.assert_array_equal(good[:, 128:], good[:, :64])
    lost = _pixels(folder / "missing_001.png")
    assert (lost[:12, 128:] != lost[:12, :64]).any()


def test_evaluate_heatmaps_refuse_kernel_mode(dataset: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["evaluate", "--dataset_directory", str(dataset), *LITE, "--kernel", "rbf",
                     "--save_heatmaps", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert code == 2 and "kernel" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h").exists()


# ---------------------------------------------------------------------------------------------------- predict
@pytest.mark.full
def test_predict_save_heatmaps(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.pt"
    assert cli.main(["fit", "--train_dir", str(dataset / "object" / "train" / "good"), "--out", str(model),
                     "--model", "efficientnet_lite0", "--input_size", "64"]) == 0
    det = FREDetector.load(model)
    assert math.isfinite(heatmap_scale(det)) and 0 < heatmap_floor(det) < heatmap_scale(det)
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    test = dataset / "object" / "test"
    for src, dst in ((test / "scratch" / "001.png", inputs / "a" / "000.png"),  # same stem in two folders
                     (test / "good" / "000.png", inputs / "b" / "000.png")):
        dst.write_bytes(src.read_bytes())
    (inputs / "b" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    code = cli.main(["predict", "--model_file", str(model), str(inputs), "--out", str(out), "--save_heatmaps"])
    assert code == 0, capsys.readouterr().err
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and sum(bool(r["error"]) for r in rows) == 1  # the unreadable one is still reported
    files = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert files == ["a_000.png", "b_000.png"]  # one per readable image, none for the broken one
    for name, src in (("a_000.png", inputs / "a" / "000.png"), ("b_000.png", inputs / "b" / "000.png")):
        h, w = image_size(src)
        assert _pixels(out / "heatmaps" / name).shape == (h, 2 * w, 3)  # image | overlay

    # a model file without a heatmap scale (as written before map_scale existed): one clear line, nothing written
    det.map_scale = torch.tensor(float("nan"))
    old = det.save(tmp_path / "old.pt")
    capsys.readouterr()
    code = cli.main(["predict", "--model_file", str(old), str(inputs), "--out", str(tmp_path / "p2"),
                     "--save_heatmaps"])
    err = capsys.readouterr().err
    assert code == 2 and "re-fit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p2").exists()
