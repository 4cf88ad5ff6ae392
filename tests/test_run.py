"""The library's jobs (``fre_torch.run``) do what ``cli.py`` does: the same JSON, the same model file and the same
predictions from the same data, and the documented errors before any work."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from fre_torch import DetectorConfig, FREDetector, run
from fre_torch.core.distributed import ProcessContext, process_context
from fre_torch.features.synthetic import write_synthetic_mvtec

TIMINGS = {"fit_seconds", "test_images_per_second"}
CONFIG = DetectorConfig("efficientnet_lite0", input_size=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mvtec(tmp_path_factory.mktemp("run") / "ds", n_train=12, n_test_good=4, n_test_defect=3,
                                 size=64)


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _without_timings(doc: dict) -> dict:
    for r in doc["categories"].values():
        assert TIMINGS <= set(r) and all(r[k] > 0 for k in TIMINGS)
        for k in TIMINGS:
            del r[k]
    return doc


@pytest.mark.full
def test_library_evaluate_json_equals_the_cli(dataset: Path, tmp_path: Path) -> None:
    lib_json, cli_json = tmp_path / "lib.json", tmp_path / "cli.json"
    result = run.evaluate(run.EvaluateSettings(root=dataset, config=CONFIG, batch_size=8, json=lib_json,
                                               scores_csv=tmp_path / "lib.csv", tags={"reference": False}))
    proc = _cli("evaluate", "--dataset_directory", str(dataset), "--model", "efficientnet_lite0", "--input_size",
                "64", "--batch_size", "8", "--json", str(cli_json), "--scores_csv", str(tmp_path / "cli.csv"))
    lib, cli_doc = (json.loads(p.read_text(encoding="utf-8")) for p in (lib_json, cli_json))
    assert _without_timings(lib) == _without_timings(cli_doc)  # every metric, count and setting, to the last digit
    assert (tmp_path / "lib.csv").read_text() == (tmp_path / "cli.csv").read_text()
    assert result.is_main and result.modes == ["pca"] and result.document()["config"] == lib["config"]
    # what the library hands back is what the CLI printed: the table (timings aside) and the lines written
    assert result.lines()[-2:] == [f"wrote {tmp_path / 'lib.csv'}", f"wrote {lib_json}"]
    table, printed = result.table().splitlines(), proc.stdout.splitlines()
    assert [row.split()[:7] for row in table] == [row.split()[:7] for row in printed[:len(table)]]
    assert result.results["pca"]["object"]["image_auroc"] == lib["categories"]["object"]["image_auroc"]


@pytest.mark.full
def test_library_evaluate_modes_and_maps_on_demand(dataset: Path, tmp_path: Path) -> None:
    result = run.evaluate(run.EvaluateSettings(root=dataset, categories=["texture"], config=CONFIG, batch_size=8,
                                               modes=["pca", "tae"]))
    assert result.modes == ["pca", "tae"] and set(result.document()) == {"modes"}
    assert result.table().splitlines()[0] == "mode: pca"
    with pytest.raises(ValueError, match="take one mode"):
        result.write_heatmaps(tmp_path / "heat")
    single = run.evaluate(run.EvaluateSettings(root=dataset, categories=["texture"], config=CONFIG, batch_size=8))
    with pytest.raises(ValueError, match="keep_maps=True"):
        single.write_heatmaps(tmp_path / "heat")
    kept = run.evaluate(run.EvaluateSettings(root=dataset, categories=["texture"], config=CONFIG, batch_size=8,
                                             keep_maps=True))
    assert kept.write_heatmaps(tmp_path / "heat") == 10 == len(list((tmp_path / "heat" / "texture").glob("*.png")))
    assert kept.results["pca"]["texture"]["threshold"] > 0  # cross-fitted, as with --save_heatmaps


@pytest.mark.full
def test_library_fit_and_predict_equal_the_cli(dataset: Path, tmp_path: Path) -> None:
    good = dataset / "object" / "train" / "good"
    fitted = run.fit(run.FitSettings(train_dir=good, out=tmp_path / "lib.pt", config=CONFIG, batch_size=8))
    _cli("fit", "--train_dir", str(good), "--out", str(tmp_path / "cli.pt"), "--input_size", "64",
         "--batch_size", "8")
    assert fitted.path == tmp_path / "lib.pt" and fitted.n_fit + fitted.n_held_out == fitted.n_images == 12
    assert any("held-out" in line for line in fitted.lines())
    a, b = FREDetector.load(tmp_path / "lib.pt"), FREDetector.load(tmp_path / "cli.pt")
    torch.testing.assert_close(a.calibration_scores, b.calibration_scores, rtol=0, atol=0)

    test = dataset / "object" / "test"
    predicted = run.predict(run.PredictSettings(model_file=tmp_path / "lib.pt", inputs=[test], out=tmp_path / "lib"))
    _cli("predict", "--model_file", str(tmp_path / "cli.pt"), str(test), "--out", str(tmp_path / "cli"))
    rows = [list(csv.reader(open(tmp_path / d / "predictions.csv", newline=""))) for d in ("lib", "cli")]
    assert rows[0] == rows[1] and len(rows[0]) == 1 + 10
    assert predicted.n_unreadable == 0 and predicted.lines()[0].startswith(f"wrote {tmp_path / 'lib'}")


def test_jobs_check_their_inputs_first(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        run.evaluate(run.EvaluateSettings(root=tmp_path / "absent", config=CONFIG))
    with pytest.raises(ValueError, match="unknown category carpet"):
        run.evaluate(run.EvaluateSettings(root=dataset, categories=["carpet"], config=CONFIG))
    with pytest.raises(ValueError, match="is a folder"):  # the output is checked before the data
        run.evaluate(run.EvaluateSettings(root=tmp_path / "absent", json=tmp_path, config=CONFIG))
    with pytest.raises(ValueError, match="--batch_size must be >= 1"):
        run.fit(run.FitSettings(train_dir=dataset, batch_size=0))
    with pytest.raises(ValueError, match="unknown model 'nonet'"):
        run.detector_config("nonet")
    with pytest.raises(ValueError, match="--pca 2.5"):
        run.detector_config("efficientnet_lite0", pca=2.5)
    assert run.detector_config("efficientnet_lite0", reference=True) == DetectorConfig.reference("efficientnet_lite0")


def test_process_context_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with process_context("cpu") as ctx:
        assert ctx == ProcessContext(torch.device("cpu")) and ctx.is_main and ctx.label == ""
    with pytest.raises(Exception, match="distributed mode needs"):  # asked for, but not launched by torchrun
        with process_context("cpu", distributed=True):
            pass
    err = ValueError("bad")
    err.rank_label = "rank 1 of 2"  # what process_context attaches inside a data-parallel run
    assert run.error_message(err) == "error (rank 1 of 2): bad"
    assert run.error_message(ValueError("first\nsecond")) == "error: first"
