"""Model files of every version load and score as they did when written (fixtures in tests/fixtures, written by
``make_model_files.py`` with the code of 2026-12-07 before heads were objects: versions 1, 2 and 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fre_torch import FREDetector

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "model_files_expected.pt", weights_only=True)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_model_file_version_loads_and_scores_as_written(version: int, expected: dict, tmp_path: Path) -> None:
    det = FREDetector.load(FIXTURES / f"model_v{version}.pt")
    roles = {1: ["score"], 2: ["score", "map"], 3: ["score", "map", "detail"]}[version]
    assert list(det.heads) == roles
    want = expected[f"v{version}"]
    scores, maps = det.anomaly_maps(expected["test"])
    torch.testing.assert_close(scores, want["scores"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps, want["maps"], rtol=1e-6, atol=0)
    assert float(det.threshold) == float(want["threshold"])
    assert float(scores[0]) == float(scores.max())  # the image with the drawn defect scores highest
    # Saved again, it is today's version and scores the same.
    again = FREDetector.load(det.save(tmp_path / "again.pt"))
    torch.testing.assert_close(again.anomaly_maps(expected["test"])[1], maps, rtol=0, atol=0)
    assert torch.load(tmp_path / "again.pt", weights_only=True)["version"] == 3
