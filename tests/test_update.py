"""``fit --update``: new normal images added to a fitted model equal a fit on all the images, the threshold is
recalibrated, and every model that cannot take them is refused in one line with the fix."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fre_torch import DetectorConfig, FREDetector, run
from fre_torch.features.images import list_images, load_image
from fre_torch.features.synthetic import write_synthetic_mvtec

CONFIG = DetectorConfig("efficientnet_lite0", input_size=64)
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folders of normal images of one category (first / later batch) and its test images."""
    root = write_synthetic_mvtec(tmp_path_factory.mktemp("update") / "ds", categories=("object",), n_train=24,
                                 n_test_good=4, n_test_defect=4, size=64)
    train = sorted((root / "object" / "train" / "good").glob("*.png"))
    for name, files in (("first", train[:14]), ("later", train[14:])):
        (root / name).mkdir()
        for f in files:
            (root / name / f.name).symlink_to(f)
    return root


def _images(paths: list[Path]) -> torch.Tensor:
    return torch.stack([load_image(p, 64) for p in paths])


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_update_equals_a_fit_on_all_the_images(dataset: Path) -> None:
    train = _images(sorted((dataset / "object" / "train" / "good").glob("*.png")))
    test = _images(sorted((dataset / "object" / "test").rglob("*.png")))
    full = FREDetector(CONFIG).fit(train)
    updated = FREDetector(CONFIG).fit(train[:14]).update(train[14:])
    assert updated.n_images == full.n_images == 24
    for a, b in zip(full.heads.values(), updated.heads.values()):
        for ma, mb in zip(a.models, b.models):
            assert ma.n_components == mb.n_components and ma.has_summary and mb.has_summary
        torch.testing.assert_close(b.scales, a.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(updated.cell_mean, full.cell_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(updated.cell_std, full.cell_std, rtol=1e-5, atol=1e-6)
    (s_full, m_full), (s_up, m_up) = full.score_and_maps(test), updated.score_and_maps(test)
    assert float(((s_up - s_full).abs() / s_full.abs()).max()) < 1e-4
    assert float((m_up - m_full).abs().max() / m_full.abs().max()) < 1e-4


def test_models_without_the_summary_are_refused(dataset: Path) -> None:
    train = _images(sorted((dataset / "first").glob("*.png")))
    with pytest.raises(ValueError, match=r"keeps no summary .*n_components=0\.97.*fit it again"):
        FREDetector(DetectorConfig("efficientnet_lite0", input_size=64, n_components=0.97)).fit(train).update(train)
    old = FREDetector.load(FIXTURES / "model_v3.pt")  # version 3: subspaces without their summary
    with pytest.raises(ValueError, match="keeps no summary .*before model-file version 4"):
        old.update(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not fitted"):
        FREDetector(CONFIG).update(train)


@pytest.mark.full
def test_cli_fit_update_then_predict(dataset: Path, tmp_path: Path) -> None:
    """The README's journey, each command a new process: fit, fit --update, predict with the updated model."""
    first = _cli("fit", "--train_dir", str(dataset / "first"), "--out", "m1.pt", "--input_size", "64", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = _digest(tmp_path / "m1.pt")
    upd = _cli("fit", "--update", "m1.pt", "--train_dir", str(dataset / "later"), "--out", "m2.pt", cwd=tmp_path)
    assert upd.returncode == 0, upd.stderr
    assert "m1.pt updated with 8 images (19 in all)" in upd.stdout, upd.stdout  # 11 + 8 fitted; 3 + 2 held out
    assert "of 5 held-out scores" in upd.stdout, upd.stdout
    assert _digest(tmp_path / "m1.pt") == before  # the old model is read, never written
    pred = _cli("predict", "--model_file", "m2.pt", str(dataset / "object" / "test"), "--out", "p", cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv", newline="")))
    assert len(rows) == len(list_images(dataset / "object" / "test")) and all(r["is_anomalous"] in ("0", "1")
                                                                             for r in rows)
    # the library's update of the same files gives the same model (same split, same order)
    lib = run.fit(run.FitSettings(train_dir=dataset / "later", update=tmp_path / "m1.pt", config=None))
    again = FREDetector.load(tmp_path / "m2.pt")
    test = _images(sorted((dataset / "object" / "test").rglob("*.png")))
    torch.testing.assert_close(lib.detector.score(test), again.score(test), rtol=1e-6, atol=0)
    torch.testing.assert_close(lib.detector.threshold, again.threshold)


@pytest.mark.full
def test_cli_update_refusals_are_one_line(dataset: Path, tmp_path: Path) -> None:
    fixed = _cli("fit", "--train_dir", str(dataset / "first"), "--out", "fixed.pt", "--input_size", "64",
                 "--pca", "0.97", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert _cli("fit", "--train_dir", str(dataset / "first"), "--out", "auto.pt", "--input_size", "64",
                cwd=tmp_path).returncode == 0
    assert _cli("fit", "--train_dir", str(dataset / "first"), "--out", "compact.pt", "--input_size", "64",
                "--compact", cwd=tmp_path).returncode == 0
    # the compact file scores as the full one and is smaller
    auto, compact = FREDetector.load(tmp_path / "auto.pt"), FREDetector.load(tmp_path / "compact.pt")
    test = _images(sorted((dataset / "object" / "test").rglob("*.png")))
    assert torch.equal(auto.score(test), compact.score(test))
    assert (tmp_path / "compact.pt").stat().st_size < (tmp_path / "auto.pt").stat().st_size
    assert all(not m.has_summary for h in compact.heads.values() for m in h.models) and not compact.cell_index.numel()
    cases = {
        "keeps no summary": ("--update", "fixed.pt"),
        "before model-file version 4": ("--update", str(FIXTURES / "model_v3.pt")),
        "saved compact": ("--update", "compact.pt"),
        "drop --model / --input_size": ("--update", "auto.pt", "--model", "efficientnet_lite1"),
        "model file not found": ("--update", "missing.pt"),
    }
    for expected, flags in cases.items():
        proc = _cli("fit", *flags, "--train_dir", str(dataset / "later"), "--out", "new.pt", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (expected, proc.stderr)
        assert not (tmp_path / "new.pt").exists() and not list(tmp_path.glob("*.partial"))


def test_an_interrupted_update_leaves_the_old_model_and_no_file(dataset: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run.fit(run.FitSettings(train_dir=dataset / "first", out=tmp_path / "m1.pt", config=CONFIG))
    before = _digest(tmp_path / "m1.pt")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FREDetector, "calibrate", interrupted)  # after the subspaces took the new images
    with pytest.raises(KeyboardInterrupt):
        run.fit(run.FitSettings(train_dir=dataset / "later", update=tmp_path / "m1.pt", out=tmp_path / "m1.pt",
                                config=None))
    assert _digest(tmp_path / "m1.pt") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.pt"]
    assert list_images(dataset / "later")  # the inputs are untouched too
