"""``benchmarks/run_scale.py`` in its smoke mode, the way the benchmark runs: a fresh process that builds training sets
by mirrors and shifts, fits and predicts through ``cli.py`` under both rules, and PatchCore beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


@pytest.mark.full
def test_run_scale_smoke_writes_every_row(tmp_path: Path) -> None:
    benchmarks_md = (REPO / "BENCHMARKS.md").read_bytes()
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_scale", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {(r["method"], r["n"]): r for r in doc["rows"]}
    assert set(rows) == {("fre_torch --pca auto", 12), ("fre_torch --pca 0.97", 12), ("fre_torch --pca auto", 24),
                         ("fre_torch --pca 0.97", 24), ("PatchCore (Lite0)", 12)}
    for n in (12, 24):
        auto, fixed = rows["fre_torch --pca auto", n], rows["fre_torch --pca 0.97", n]
        # a few images: the 97 % term binds, so both rules keep the same components and score alike
        assert auto["components"] == fixed["components"]
        assert auto["image_auroc"] == pytest.approx(fixed["image_auroc"], abs=1e-9)
        assert 0.5 <= auto["image_auroc"] <= 1.0 and 0.5 <= auto["pixel_auroc"] <= 1.0
        # the auto model also keeps its summary and cell sample: larger, never smaller
        assert auto["model_mb"] > fixed["model_mb"] > 0.1
        assert auto["fit_s"] > 0 and auto["fit_peak_rss_gb"] > 0.2 and auto["predict_images_per_s"] > 0
    assert rows["PatchCore (Lite0)", 12]["bank_patches"] >= 1
    assert "| fre_torch --pca auto | 24 |" in proc.stdout
    assert (REPO / "BENCHMARKS.md").read_bytes() == benchmarks_md  # the smoke mode writes nothing there


def test_built_copies_are_mirrored_and_shifted_real_images(tmp_path: Path) -> None:
    from benchmarks.run_scale import SHIFT, build_training_set, variant

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(src / f"{i}.png")
    out = build_training_set(src, 10, tmp_path / "pool")
    files = sorted(out.iterdir())
    assert len(files) == 10 and [f.name[:4] for f in files[:3]] == ["000_"] * 3
    arrays = [np.asarray(Image.open(f)) for f in files]
    assert all(a.shape == (20, 30) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 10  # no two images equal
    original = np.asarray(Image.open(src / "0.png"))
    assert np.array_equal(arrays[0], original)
    copy = np.asarray(variant(Image.fromarray(original), 1))
    # copy 1: mirrored left-right, then moved down by SHIFT px, the top row repeated above it
    mirrored = original[:, ::-1]
    assert np.array_equal(copy[SHIFT:], mirrored[:-SHIFT])
    assert np.array_equal(copy[:SHIFT], np.repeat(mirrored[:1], SHIFT, axis=0))
