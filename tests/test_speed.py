"""The performance features (issue #6): preprocessed-image cache, backbone precision, torch.compile, device resize."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fre_torch.features.images import ImageDataset, PreprocessCache, _read_image
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import evaluate_category
from fre_torch.core.precision import autocast, backbone_dtype, check_precision
from fre_torch.features.synthetic import write_synthetic_mvtec

from conftest import REPO


def _png(path: Path, seed: int, size: tuple[int, int] = (40, 56)) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    Image.fromarray(arr.numpy()).save(path)
    return path


# ------------------------------------------------------------------------------------------------ cache
def test_cache_hit_is_bit_identical_and_skips_decoding(tmp_path, monkeypatch):
    img = _png(tmp_path / "a.png", 0)
    cache = PreprocessCache(tmp_path / "cache")
    first = cache.read(img, 32)
    assert len(list((tmp_path / "cache").rglob("*.u8"))) == 1
    expected = _read_image(img, 32)
    assert torch.equal(first[0], expected[0]) and first[1] == expected[1] == (56, 40)

    import fre_torch.features.images as data

    def no_decode(*a, **k):
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(data, "_read_image", no_decode)
    second = cache.read(img, 32)
    assert torch.equal(second[0], expected[0]) and second[1] == (56, 40)


def test_cache_is_keyed_by_content_and_size_never_stale(tmp_path):
    img = tmp_path / "a.png"
    cache = PreprocessCache(tmp_path / "cache")
    _png(img, 0)
    old = cache.read(img, 32)[0]
    _png(img, 1)  # same name, new content: must not return the old entry
    new = cache.read(img, 32)[0]
    assert torch.equal(new, _read_image(img, 32)[0]) and not torch.equal(new, old)
    other_size = cache.read(img, 24)[0]
    assert other_size.shape == (3, 24, 24)
    assert len(list((tmp_path / "cache").rglob("*.u8"))) == 3
    assert cache.key(b"x", 32) != cache.key(b"x", 24) != cache.key(b"y", 24)


def test_corrupt_entry_is_ignored_and_rewritten(tmp_path):
    img = _png(tmp_path / "a.png", 0)
    cache = PreprocessCache(tmp_path / "cache")
    cache.read(img, 32)
    (entry,) = (tmp_path / "cache").rglob("*.u8")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, e.g. a disk-full write by another tool
    assert torch.equal(cache.read(img, 32)[0], _read_image(img, 32)[0])
    assert entry.stat().st_size == 20 + 3 * 32 * 32  # header: magic, original H, W, stored H, W


def test_unwritable_cache_only_costs_speed(tmp_path):
    img = _png(tmp_path / "a.png", 0)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        PreprocessCache(blocker)
    cache = PreprocessCache(blocker / "sub")  # its parent is a file: every write fails
    assert torch.equal(cache.read(img, 32)[0], _read_image(img, 32)[0])


def test_dataset_with_cache_matches_and_missing_file_names_it(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", i) for i in range(5)]
    plain = ImageDataset(paths, 32)
    cached = ImageDataset(paths, 32, cache=tmp_path / "cache")
    for _ in range(2):  # cold, then warm
        for i in range(5):
            assert torch.equal(plain[i]["image"], cached[i]["image"])
            assert torch.equal(plain[i]["orig_size"], cached[i]["orig_size"])
    with pytest.raises(ValueError, match="missing.png"):
        ImageDataset([tmp_path / "missing.png"], 32, cache=tmp_path / "cache")[0]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return write_synthetic_mvtec(tmp_path_factory.mktemp("syn"), categories=("object",), n_train=16,
                                 n_test_good=4, n_test_defect=4, size=96, seed=3)


def test_evaluate_with_cache_gives_the_same_scores(synthetic_root, tmp_path):
    config = DetectorConfig("efficientnet_lite0", input_size=64)
    base = evaluate_category(FREDetector(config), synthetic_root, "object", batch_size=8, num_workers=0)
    runs = [evaluate_category(FREDetector(config), synthetic_root, "object", batch_size=8, num_workers=0,
                              cache=tmp_path / "c") for _ in range(2)]
    for r in runs:
        assert r["scores"] == base["scores"]
    assert len(list((tmp_path / "c").rglob("*.u8"))) == base["n_train"] + base["n_test"]  # one entry per image


# ------------------------------------------------------------------------------------------------ device resize
def test_device_resize_path(synthetic_root, tmp_path):
    ds = ImageDataset([p for p in sorted((synthetic_root / "object" / "train" / "good").iterdir())], 64, resize=False)
    assert ds[0]["image"].shape == (3, 96, 96)  # own size: the detector resizes on the device
    config = DetectorConfig("efficientnet_lite0", input_size=64)
    cpu = evaluate_category(FREDetector(config), synthetic_root, "object", batch_size=8, num_workers=0,
                            resize="cpu")
    dev = evaluate_category(FREDetector(config), synthetic_root, "object", batch_size=8, num_workers=0,
                            resize="device")
    # LANCZOS on the device gives the loader's LANCZOS pixels, so the same scores and figures.
    assert dev["scores"] == cpu["scores"]
    assert (dev["image_auroc"], dev["pixel_auroc"], dev["pro"]) == (cpu["image_auroc"], cpu["pixel_auroc"], cpu["pro"])
    with pytest.raises(ValueError, match="resize must be"):
        evaluate_category(FREDetector(config), synthetic_root, "object", resize="gpu")


def test_device_resize_refuses_mixed_sizes(tmp_path):
    root = tmp_path / "mixed"
    for split, n in (("train/good", 4), ("test/good", 2)):
        (root / "cat" / split).mkdir(parents=True)
        for i in range(n):
            _png(root / "cat" / split / f"{i}.png", i, size=(40 + 8 * i, 48))
    with pytest.raises(ValueError, match="one size"):
        evaluate_category(FREDetector(DetectorConfig("efficientnet_lite0", input_size=64)), root, "cat",
                          resize="device", num_workers=0)


# ------------------------------------------------------------------------------------------------ device decode
def _as_jpegs(png_root: Path, out: Path, mixed: bool) -> Path:
    """The synthetic set with its images as JPEGs (every third image grey; with ``mixed``, every fourth 112 x 80),
    masks kept as they are."""
    for png in sorted(png_root.rglob("*.png")):
        target = out / png.relative_to(png_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in png.parts:
            target.write_bytes(png.read_bytes())
            continue
        i = len(list(target.parent.glob("*.jpg")))
        with Image.open(png) as img:
            img = img.convert("L") if i % 3 == 0 else img.convert("RGB")
            if mixed and i % 4 == 1:
                img = img.resize((112, 80))
            img.save(target.with_suffix(".jpg"), quality=92)
    return out


def test_device_decode_equals_the_workers_decode(synthetic_root, tmp_path, monkeypatch):
    import fre_torch.features.images as images_module
    import fre_torch.jobs.evaluate as evaluate_module
    from fre_torch.features.images import _decode, _to_rgb, decode_images, device_decodable, make_loader

    root = _as_jpegs(synthetic_root, tmp_path / "jpg", mixed=False)
    paths = sorted((root / "object" / "train" / "good").glob("*.jpg"))
    assert device_decodable(paths) and not device_decodable([*paths, next(synthetic_root.rglob("*.png"))])
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8)).save(cmyk)
    assert not device_decodable([cmyk]) and not device_decodable([])
    ds = ImageDataset(paths, 64, resize=False, encoded=True)
    item = ds[0]
    assert torch.equal(item["image"], torch.tensor(list(paths[0].read_bytes()), dtype=torch.uint8))
    assert item["orig_size"].tolist() == [96, 96]
    batch = next(iter(make_loader(ds, 4, "cpu", num_workers=2)))  # the list collate works in worker processes
    assert isinstance(batch["image"], list) and len(batch["image"]) == 4 and batch["index"].tolist() == [0, 1, 2, 3]
    # the batched decode (libjpeg-turbo on the CPU, nvJPEG on CUDA) gives PIL's pixels, grey repeated into RGB
    decoded = decode_images(batch["image"], "cpu")
    assert torch.equal(decoded, torch.stack([_decode(p, _to_rgb)[0] for p in paths[:4]]))
    # torchvision 0.19 decodes one file per call: the same pixels
    monkeypatch.setattr(images_module, "_decode_jpeg_takes_lists", lambda: False)
    assert torch.equal(decode_images(batch["image"], "cpu"), decoded)
    monkeypatch.undo()
    # a detector scores a loader of encoded files as it scores one of decoded images
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64))
    det.fit(make_loader(ImageDataset(paths, 64, resize=False), 8, "cpu", num_workers=0))
    plain = det.score(make_loader(ImageDataset(paths, 64, resize=False), 8, "cpu", num_workers=0))
    assert torch.equal(det.score(make_loader(ds, 8, "cpu", num_workers=0)), plain)
    # evaluate's device-decode path (CUDA only by default; forced here) gives the figures of the device-resize path
    worker = evaluate_category(FREDetector(DetectorConfig("efficientnet_lite0", input_size=64)), root, "object",
                               batch_size=8, num_workers=0, resize="device")
    monkeypatch.setattr(evaluate_module, "_decode_on_device", lambda resize, device, paths: True)
    device = evaluate_category(FREDetector(DetectorConfig("efficientnet_lite0", input_size=64)), root, "object",
                               batch_size=8, num_workers=0, resize="device")
    assert device["scores"] == worker["scores"]
    assert (device["image_auroc"], device["pixel_auroc"]) == (worker["image_auroc"], worker["pixel_auroc"])


def test_device_decode_of_mixed_sizes_and_bad_input(synthetic_root, tmp_path):
    from fre_torch.features.images import ImageReadError, decode_images

    root = _as_jpegs(synthetic_root, tmp_path / "jpg", mixed=True)
    paths = sorted((root / "object" / "train" / "good").glob("*.jpg"))[:8]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    with pytest.raises(ValueError, match="common size"):
        decode_images(data, "cpu")
    images = decode_images(data, "cpu", size=64)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.uint8
    # each image resized alone on the device to the pixels the workers' LANCZOS gives
    assert torch.equal(images, torch.stack([_read_image(p, 64)[0] for p in paths]))
    with pytest.raises(ImageReadError, match="cannot decode a JPEG"):
        decode_images([data[0][:200]], "cpu")  # truncated
    with pytest.raises(ValueError, match="encoded=True needs resize=False"):
        ImageDataset(paths, 64, encoded=True)


# ------------------------------------------------------------------------------------------------ precision
def test_precision_policy():
    assert backbone_dtype("cpu") == torch.float32
    assert backbone_dtype("cuda") == torch.bfloat16
    assert backbone_dtype("cpu", "bf16") == torch.bfloat16 and backbone_dtype("cuda", "fp16") == torch.float16
    assert backbone_dtype("cuda", "fp32") == torch.float32
    with pytest.raises(ValueError, match="precision must be"):
        check_precision("int8")
    with autocast("cpu"):
        assert torch.ones(2, 2) @ torch.ones(2, 2) is not None and not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


@pytest.mark.full
def test_bf16_backbone_ranks_like_fp32_and_fit_stays_float64():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (24, 3, 64, 64), dtype=torch.uint8, generator=g)
    test = imgs.clone()
    test[:8, :, 20:40, 20:40] = 255  # bright squares: clearly anomalous
    scores = {}
    for precision in ("fp32", "bf16"):
        det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64), precision=precision)
        det.fit(imgs[8:], batch_size=8)
        assert all(s.components.dtype == torch.float32 and s.total_variance.dtype == torch.float64
                   for s in det.subspaces)
        scores[precision] = det.score(test, batch_size=8)
    for s in scores.values():  # both precisions separate the defects from normal images
        assert float(s[:8].min()) > float(s[8:].max())


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.full
def test_compiled_detector_matches_eager_with_a_padded_last_batch():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (21, 3, 64, 64), dtype=torch.uint8, generator=g)
    config = DetectorConfig("efficientnet_lite0", input_size=64)
    eager = FREDetector(config).fit(imgs, batch_size=8)
    compiled = FREDetector(config, compile=True).warmup(8).fit(imgs, batch_size=8)
    assert compiled._static_batch == 8
    a, b = eager.score(imgs[:13], batch_size=8), compiled.score(imgs[:13], batch_size=8)  # batches of 8 and 5
    assert b.shape == (13,)
    assert float(((a - b).abs() / a.abs().clamp_min(1e-12)).max()) < 1e-4


# ------------------------------------------------------------------------------------------------ gpu_check
@pytest.mark.full
def test_gpu_check_script_runs_its_head_section_on_the_cpu(tmp_path):
    # Its scratch folder goes to a temporary folder of the test's own, where a leftover would show.
    env = {**os.environ, "TMPDIR": str(tmp_path / "scratch")}
    (tmp_path / "scratch").mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--device", "cpu",
                           "--quick", "--sections", "head"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "scratch").glob("fre_gpu_check_*")) == []  # its scratch folder is removed
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["head"]["n_components"] >= 1 and doc["head"]["fit_seconds"] > 0
    assert "| head fit N=400 D=4096 |" in proc.stdout.splitlines()[-1]


@pytest.mark.full
def test_gpu_check_real_data_sections_run_on_the_cpu(tmp_path):
    """The smoke mode of the GPU check's real-data sections (decode rates, GPU/CPU ratio, evaluate on each set on
    both devices, end to end from replicated real files) on a tiny MVTec-layout set with PNGs and JPEGs."""
    import shutil

    from PIL import Image

    from fre_torch.features.synthetic import write_synthetic_mvtec

    ds = write_synthetic_mvtec(tmp_path / "tmp", categories=("object", "texture"), n_train=10, n_test_good=3,
                               n_test_defect=2, size=80, seed=0)
    data = tmp_path / "data"
    (data / "mvtec_bottle").mkdir(parents=True)
    shutil.move(str(ds / "object"), data / "mvtec_bottle" / "bottle")
    (data / "magnetic_tile").mkdir()
    tile = data / "magnetic_tile" / "magnetic_tile"
    shutil.move(str(ds / "texture"), tile)
    for png in [p for p in tile.rglob("*.png") if "ground_truth" not in p.parts]:  # grey JPEGs, as the real set
        Image.open(png).convert("L").save(png.with_suffix(".jpg"))
        png.unlink()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--device", "cpu",
                           "--quick", "--data", str(data), "--sections", "decode", "ratio", "evaluate", "real_e2e"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    for key in ("bottle_png", "magnetic_tile_jpg"):
        assert doc["decode"][key]["images"] >= 15  # 10 training and 5 or more test images
        assert doc["decode"][key]["decode_resize_224_images_per_core_s"] > 0
        assert doc["real_e2e"][key]["finite"] and doc["real_e2e"][key]["cpu_resize_images_per_s"] > 0
    assert doc["real_e2e"]["magnetic_tile_jpg"]["device_decode_images_per_s"] > 0  # the JPEGs only
    assert "device_decode_images_per_s" not in doc["real_e2e"]["bottle_png"]
    assert doc["ratio"]["gpu_over_cpu"] == 1.0 and doc["ratio"]["real"]
    for name in ("bottle", "magnetic_tile"):
        assert 0.0 <= doc["evaluate"][name]["cpu"]["image_auroc"] <= 1.0
        assert doc["evaluate"][name]["cpu"]["pro"] is not None
    assert doc["evaluate"]["screw"] == {"error": f"not found under {data}"}
    table = proc.stdout
    assert "| decode magnetic_tile_jpg per core |" in table and "| e2e real bottle_png cpu_resize |" in table
    assert "| e2e real magnetic_tile_jpg device_decode |" in table
