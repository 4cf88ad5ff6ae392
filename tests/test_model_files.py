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
    assert torch.load(tmp_path / "again.pt", weights_only=True)["version"] == 4


@pytest.mark.full
def test_onnx_export_of_a_version_3_file_has_the_graph_it_had(tmp_path: Path) -> None:
    """``cli.py export`` of the version-3 fixture gives the same operations, in the same order, as the code that
    wrote it exported (module paths in initializer names may differ; values and nodes do not)."""
    import json
    import subprocess
    import sys

    onnx = pytest.importorskip("onnx")
    from fre_torch.jobs.export import onnx_exporter_available

    if not onnx_exporter_available():
        pytest.skip("this torch has no torch.export-based ONNX exporter (torch >= 2.6)")
    out = tmp_path / "m.onnx"
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    done = subprocess.run([sys.executable, str(cli), "export", "--model_file", str(FIXTURES / "model_v3.pt"),
                           "--format", "onnx", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    want = json.loads((FIXTURES / "model_v3_onnx_ops.json").read_text(encoding="utf-8"))["ops"]
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == want
