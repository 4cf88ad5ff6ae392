"""fit / predict on a plain folder of images: held-out threshold, CSV output, unreadable files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli
from conftest import REPO, require_category
from fre_torch.detection.detector import FREDetector
from fre_torch.jobs.predict import split_holdout


def _write_folder(root: Path, n: int, seed: int, defect: bool = False) -> list[Path]:
    """Mixed formats, modes and sizes of one smooth textured family; `defect` adds a dark bar."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (96, 128) if i % 2 else (120, 100)
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        phase = float(torch.rand(1, generator=g)) * 6.28
        base = 128 + 60 * torch.sin(xx / 7.0 + phase) * torch.cos(yy / 9.0)
        img = (base + 8 * torch.randn(h, w, generator=g)).clamp(0, 255)
        if defect:
            img[h // 3: h // 3 + 10, w // 4: 3 * w // 4] = 10
        arr = img.to(torch.uint8).numpy()
        if i % 3 == 0:
            p = root / f"{i:03d}.jpg"
            Image.fromarray(arr, mode="L").save(p, quality=95)  # grayscale JPEG
        else:
            p = root / "sub" / f"{i:03d}.png" if i % 3 == 1 else root / f"{i:03d}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(arr, mode="L").convert("RGB").save(p)
        paths.append(p)
    return paths


def test_split_holdout_is_seeded_and_disjoint() -> None:
    paths = [Path(f"{i}.png") for i in range(20)]
    fit, held = split_holdout(paths, 0.2, seed=3)
    assert len(held) == 4 and len(fit) == 16 and not set(fit) & set(held)
    assert (fit, held) == split_holdout(paths, 0.2, seed=3)
    with pytest.raises(ValueError, match="too few"):
        split_holdout(paths[:3], 0.2)


@pytest.mark.full
def test_fit_predict_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_folder(tmp_path / "good", 30, seed=0)
    model = tmp_path / "model.pt"
    assert cli.main(["fit", "--train_dir", str(tmp_path / "good"), "--out", str(model), "--input_size", "96",
                     "--batch_size", "8"]) == 0
    det = FREDetector.load(model)
    assert det.calibration_scores.numel() == 6 and det.threshold_quantile == 0.99
    # the threshold is the 0.99 quantile of the held-out scores
    torch.testing.assert_close(det.threshold, torch.quantile(det.calibration_scores, 0.99))

    new_good = _write_folder(tmp_path / "new_good", 6, seed=1)
    bad = _write_folder(tmp_path / "bad", 6, seed=2, defect=True)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "pred"
    code = cli.main(["predict", "--model_file", str(model), str(tmp_path / "new_good"),
                     str(tmp_path / "bad" / "**" / "*.*"), "--out", str(out), "--batch_size", "4"])
    assert code == 0, capsys.readouterr().err
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "score", "calibrated_score", "is_anomalous", "error"]
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == 6 + 6 + 1 and not (out / "predictions.csv.partial").exists()
    broken = by_path[str(tmp_path / "bad" / "broken.png")]
    assert broken["score"] == "" and "broken.png" in broken["error"]
    good_scores = [float(by_path[str(p)]["score"]) for p in new_good]
    bad_scores = [float(by_path[str(p)]["score"]) for p in bad]
    assert min(bad_scores) > max(good_scores)  # the bar is far outside the normal family
    assert all(by_path[str(p)]["is_anomalous"] == "1" for p in bad)
    for r in rows:
        if r["score"]:
            c = float(r["calibrated_score"])
            assert 0.0 <= c <= 1.0
            # calibrated = fraction of held-out normal scores at or above the score
            s = torch.tensor(float(r["score"]))
            assert c == pytest.approx(float((det.calibration_scores >= s).float().mean()), abs=1e-4)  # CSV keeps 4 decimals


def test_predict_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_model = tmp_path / "model.pt"
    bad_model.write_bytes(b"garbage")
    assert cli.main(["predict", "--model_file", str(bad_model), str(tmp_path)]) == 2
    assert "not a readable fre_torch model file" in capsys.readouterr().err
    assert cli.main(["fit", "--train_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.full
def test_cli_fit_subprocess_no_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "cli.py", "fit", "--train_dir", str(empty), "--out", str(tmp_path / "m.pt")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.full
def test_threshold_false_positive_rate_on_magnetic_tile(tmp_path: Path) -> None:
    """Fit on train/good only: at the automatic 0.99 threshold the FPR on test/good is within 0.03 of 1 %."""
    root = require_category("magnetic_tile") / "magnetic_tile"
    from fre_torch.detection.detector import DetectorConfig
    from fre_torch.jobs.predict import fit_folder, predict_paths
    from fre_torch.features.images import list_images

    det = fit_folder(root / "train" / "good", DetectorConfig("efficientnet_lite0")).detector
    rows = predict_paths(det, list_images(root / "test" / "good"))
    fpr = sum(bool(r["is_anomalous"]) for r in rows) / len(rows)
    assert abs(fpr - 0.01) <= 0.03, fpr


@pytest.mark.full
def test_fit_skips_unreadable_images_and_stores_the_threshold_stats(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good"
    paths = _write_folder(good, 20, seed=0)
    (good / "broken.png").write_bytes(b"not an image at all")
    (good / "truncated.png").write_bytes(paths[2].read_bytes()[:200])
    model = tmp_path / "model.pt"
    args = ["fit", "--train_dir", str(good), "--out", str(model), "--input_size", "96", "--batch_size", "4"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "warning: skipped 2 unreadable image(s) of 22" in err and "broken.png" in err and "truncated.png" in err
    det = FREDetector.load(model)
    # 22 files: 4 held out (2 of 22 at 0.2 rounds to 4), 18 to fit; 2 unreadable dropped from whichever split
    n_fit = int(det.subspaces[0].n_samples)
    assert n_fit + det.calibration_scores.numel() == 20
    stats = det.threshold_stats()
    assert stats.n_held_out == det.calibration_scores.numel() and not stats.reliable
    assert f"fitted on {n_fit} images" in out and stats.summary() in out and "warning: only" in err
    payload = torch.load(model, weights_only=True)
    assert payload["threshold_stats"] == stats.to_dict()  # stored for readers without fre_torch

    assert cli.main(args + ["--strict"]) == 2
    assert "cannot read image" in capsys.readouterr().err

    few = tmp_path / "few"
    _write_folder(few, 3, seed=0)
    for i in range(5):
        (few / f"bad{i}.png").write_bytes(b"junk")
    model.unlink()
    assert cli.main(["fit", "--train_dir", str(few), "--out", str(model), "--input_size", "96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could be read, at least 2 are needed" in err[0] and not model.exists()


def test_predict_exits_2_when_nothing_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_folder(tmp_path / "good", 8, seed=0)
    model = tmp_path / "model.pt"
    assert cli.main(["fit", "--train_dir", str(tmp_path / "good"), "--out", str(model), "--input_size", "96"]) == 0
    capsys.readouterr()
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.png").write_bytes(b"junk")
    out = tmp_path / "pred"
    assert cli.main(["predict", "--model_file", str(model), str(tmp_path / "junk"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 3 input image(s) could be read" in err[0]
    assert not out.exists()
