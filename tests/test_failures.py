"""When things go wrong (issue 32): each failure a new user met, run as the user runs it, in a new process: one line
and exit code 2 (never a traceback), advice that works, a model without a threshold said so, settings that only slow
refused, one rule for the demo's folder and for missing output folders, an interrupted run naming what it wrote."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO
from fre_torch.features.files import atomic_write, recording_writes
from fre_torch.features.synthetic import write_synthetic_mvtec
from fre_torch.jobs.progress import interrupted_message
from test_first_hour import _one_error_line, cli


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mvtec(tmp_path_factory.mktemp("failures") / "ds", categories=("texture",), n_train=10,
                                 n_test_good=2, n_test_defect=2, size=64)


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------ 1. weights files


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_a_bad_weights_file_is_one_line(kind: str, data: Path, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    if kind == "text":
        weights.write_text("# not weights\n", encoding="utf-8")
    else:
        torch.save({"w": torch.zeros(1000)}, weights)
        weights.write_bytes(weights.read_bytes()[:500])
    proc = cli("fit", "--train_dir", str(data / "texture" / "train"), "--out", str(tmp_path / "m.pt"),
               "--weights", str(weights))
    _no_traceback(proc)
    line = _one_error_line(proc)
    assert f"{weights} is not a readable PyTorch weights file" in line and "torch.save(model.state_dict())" in line
    assert "miniz" not in line and not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------------------ 2. the check and the skip


def _jpeg(seed: int) -> bytes:
    pixels = torch.randint(0, 255, (64, 64, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.full
def test_what_the_run_would_fail_on_the_check_finds_and_the_skip_leaves_out(tmp_path: Path) -> None:
    """A truncated PNG, a text file named .png and a truncated JPEG: the check names all three before any work, and
    the run its advice points to (--skip_unreadable) completes without them."""
    root = write_synthetic_mvtec(tmp_path / "ds", categories=("texture",), n_train=10, n_test_good=2,
                                 n_test_defect=2, size=64)
    good = root / "texture" / "train" / "good"
    png, text, jpeg = good / "003.png", good / "004.png", good / "zz_truncated.jpg"
    png.write_bytes(png.read_bytes()[:200])
    text.write_text("not an image\n" * 20, encoding="utf-8")
    data = _jpeg(0)
    jpeg.write_bytes(data[:len(data) // 2])
    line = _one_error_line(cli("evaluate", "--dataset_directory", str(root), "--json", str(tmp_path / "r.json")))
    assert "3 of the run's" in line and all(str(p) in line for p in (png, text, jpeg)), line
    assert "--skip_unreadable" in line and not (tmp_path / "r.json").exists()
    proc = cli("evaluate", "--dataset_directory", str(root), "--skip_unreadable", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["categories"]["texture"]
    assert (got["n_train"], got["n_unreadable_skipped"]) == (8, 3)


# ------------------------------------------------------------------------------------------ 3. a model without threshold


def test_predict_says_when_the_model_has_no_threshold(data: Path, tmp_path: Path) -> None:
    """The README's Python snippet fits and saves without calibrating: predict says so and how to get one."""
    from fre_torch import DetectorConfig, FREDetector
    from fre_torch.features.images import ImageDataset, list_images, make_loader

    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64))
    det.fit(make_loader(ImageDataset(list_images(data / "texture" / "train"), 64), 32, "cpu", num_workers=0))
    model = det.save(tmp_path / "m.pt")
    proc = cli("predict", "--model_file", str(model), str(data / "texture" / "test"), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"warning: {model} has no threshold") and "cli.py fit" in proc.stderr
    assert "det.calibrate(" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "none flagged (no threshold)" in proc.stdout and (tmp_path / "r" / "predictions.csv").is_file()


# ------------------------------------------------------------------------------------------ 4. settings that only slow


@pytest.mark.parametrize("verb", ["evaluate", "fit", "predict"])
def test_fp16_on_the_cpu_is_refused_with_what_to_use(verb: str, data: Path, tmp_path: Path) -> None:
    args = {"evaluate": ["--dataset_directory", str(data)],
            "fit": ["--train_dir", str(data / "texture" / "train"), "--out", str(tmp_path / "m.pt")],
            "predict": ["--model_file", str(tmp_path / "absent.pt"), str(data)]}[verb]
    line = _one_error_line(cli(verb, *args, "--precision", "fp16", "--device", "cpu"))
    assert "--precision fp16 on the CPU" in line and "auto or fp32" in line


# ------------------------------------------------------------------------------------------ 5. the demo's folder


@pytest.mark.full
def test_demo_refreshes_its_own_folder_and_refuses_any_other(tmp_path: Path) -> None:
    first = cli("demo", "--out", "demo_data", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = cli("demo", "--out", "demo_data", cwd=tmp_path)  # the quick start run twice
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-2:] == first.stdout.splitlines()[-2:]  # refreshed: the same data, same table
    train = tmp_path / "train"
    train.mkdir()
    (train / "part.png").write_bytes(b"x")
    line = _one_error_line(cli("demo", "--out", "train", cwd=tmp_path))
    assert "not a demo data set" in line and [p.name for p in train.iterdir()] == ["part.png"]


# ------------------------------------------------------------------------------------------ 6. interrupted runs


def test_the_interrupted_message_names_what_was_written_and_what_was_not(tmp_path: Path) -> None:
    with recording_writes() as written:
        for name in ("predictions.csv", "heatmaps/a.png", "heatmaps/b.png"):
            with atomic_write(tmp_path / "out" / name) as tmp:
                tmp.write_text("x", encoding="utf-8")
    line = interrupted_message(written, {"out": str(tmp_path / "out"), "json": str(tmp_path / "r.json")})
    assert line == (f"interrupted: wrote {tmp_path / 'out' / 'predictions.csv'}; 2 files in {tmp_path / 'out'}/"
                    f"heatmaps/ (each file whole); not written: {tmp_path / 'r.json'}")
    assert interrupted_message([], {"json": "r.json"}) == "interrupted: nothing was written"


@pytest.mark.full
def test_ctrl_c_during_predict_names_what_was_written(tmp_path: Path) -> None:
    # Enough heatmaps that writing them lasts well over the polling interval, also on a loaded machine.
    root = write_synthetic_mvtec(tmp_path / "ds", categories=("texture",), n_train=10, n_test_good=400,
                                 n_test_defect=0, size=96)
    fit = cli("fit", "--train_dir", str(root / "texture" / "train"), "--out", str(tmp_path / "m.pt"))
    assert fit.returncode == 0, fit.stderr
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "predict", "--model_file", str(tmp_path / "m.pt"),
                             str(root / "texture" / "test"), "--out", str(out), "--save_heatmaps"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((out / "heatmaps").glob("*.png"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("predict finished before the interrupt arrived")
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    said = re.fullmatch(rf"interrupted: wrote {re.escape(str(out / 'predictions.csv'))}; (\d+) files in "
                        rf"{re.escape(str(out / 'heatmaps'))}/ \(each file whole\)", line)
    assert said, line
    n = len(list((out / "heatmaps").glob("*.png")))
    assert 5 <= int(said.group(1)) <= n <= int(said.group(1)) + 1  # + 1: renamed just as the interrupt came
    assert not list(out.rglob("*.partial"))


# ------------------------------------------------------------------------------------------ 7. smaller ones


@pytest.mark.full
def test_fit_creates_the_folder_of_its_output(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "m.pt"
    proc = cli("fit", "--train_dir", str(data / "texture" / "train"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_unwritable_output_is_refused_without_impossible_advice(data: Path) -> None:
    line = _one_error_line(cli("fit", "--train_dir", str(data / "texture" / "train"), "--out", "/proc/fre/m.pt"))
    assert "cannot create files in /proc" in line and "mkdir" not in line


def test_help_shows_every_default() -> None:
    evaluate = cli("evaluate", "--help").stdout
    flat = " ".join(evaluate.split())
    lines = evaluate.splitlines()
    for flag in ("--object_category", "--solver", "--map_detail", "--modes", "--pixel_metrics", "--resize",
                 "--kernel_method"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} "))
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("  -")), len(lines))
        assert "default" in " ".join(lines[start:end]), (flag, lines[start:end])
    assert "fit skips them unless --strict" in flat
    assert "evaluate stops unless --skip_unreadable" in " ".join(cli("fit", "--help").stdout.split())
    assert "onnx (opset 18" in " ".join(cli("export", "--help").stdout.split())
