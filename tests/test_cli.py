"""cli.py end to end on generated data: the table, the JSON document, and bad input -> exit 2 with one line."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli
from conftest import NEEDS_NO_CUDA, REPO
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import METRICS, PIXEL_METRICS
from fre_torch.features.synthetic import write_synthetic_mvtec

# The synthetic categories have masks, so the pixel metrics are reported too.
CATEGORY_KEYS = {*METRICS, *PIXEL_METRICS, "n_train", "n_test", "fit_seconds", "test_images_per_second", "map_grid"}
ALL_METRICS = (*METRICS, *PIXEL_METRICS)
LITE = ["--model", "efficientnet_lite0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, 12 training and 12 test images each (4 normal, 4 per defect type)."""
    return write_synthetic_mvtec(tmp_path_factory.mktemp("cli") / "ds", n_train=12, n_test_good=4, n_test_defect=4,
                                 size=64)


@pytest.fixture
def corrupt_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """One small category whose first defective test image is a truncated JPEG: its header is intact, so PIL's
    verify() passes it; the check before the run decodes it and finds it."""
    root = write_synthetic_mvtec(tmp_path / "bad_ds", categories=("texture",), n_train=4, n_test_good=2,
                                 n_test_defect=2, size=64)
    bad = root / "texture" / "test" / "scratch" / "000.png"
    buffer = io.BytesIO()
    Image.open(bad).convert("RGB").save(buffer, "JPEG")
    bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root, bad


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _table_rows(out: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for the table's data rows (header and separators dropped)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and not set(line.strip()) <= {"-"} and cells[0] not in ("category", "wrote", "synthetic", "reference"):
            rows[cells[0]] = cells[1:]
    return rows


def _check_document(doc: dict, categories: list[str], n_train: int, n_test: int, extra: set[str]) -> None:
    assert set(doc) == {"categories", "mean", "config"}
    assert list(doc["categories"]) == categories
    for name, r in doc["categories"].items():
        assert set(r) == CATEGORY_KEYS, name
        for metric in ALL_METRICS:
            assert 0.0 <= r[metric] <= 1.0, (name, metric, r[metric])
        assert (r["n_train"], r["n_test"]) == (n_train, n_test)
        assert isinstance(r["n_train"], int) and isinstance(r["n_test"], int)
        assert r["fit_seconds"] > 0 and math.isfinite(r["fit_seconds"])
        assert r["test_images_per_second"] > 0 and math.isfinite(r["test_images_per_second"])
    assert set(doc["mean"]) == set(ALL_METRICS)
    for metric in ALL_METRICS:
        expected = sum(r[metric] for r in doc["categories"].values()) / len(categories)
        assert doc["mean"][metric] == pytest.approx(expected)
    fields = set(DetectorConfig().to_dict())
    assert set(doc["config"]) == fields | {"device", "batch_size"} | extra
    DetectorConfig.from_dict({k: v for k, v in doc["config"].items() if k in fields})  # a valid configuration


def _check_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_all_categories(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out" / "out.json"
    out_json.parent.mkdir()  # an output's folder must exist (a missing one is an error: test_output_paths)
    code, out, err = _run(["evaluate", "--dataset_directory", str(dataset), *LITE, "--object_category", "all",
                           "--json", str(out_json), "--batch_size", "8"], capsys)
    assert code == 0, err
    assert err == ""
    rows = _table_rows(out)
    assert list(rows) == ["object", "texture", "mean"]
    assert all(len(cells) == 10 for name, cells in rows.items() if name != "mean")
    assert f"wrote {out_json}" in out
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["out.json"]  # no .partial left behind
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    _check_document(doc, ["object", "texture"], 12, 12, {"reference"})
    assert doc["config"]["backbone"] == "efficientnet_lite0" and doc["config"]["batch_size"] == 8
    assert doc["config"]["reference"] is False and doc["config"]["device"] == "cpu"
    # The table shows the JSON's numbers.
    for name, r in doc["categories"].items():
        assert rows[name][:6] == [f"{r[m]:.4f}" for m in ALL_METRICS]
    assert rows["mean"] == [f"{doc['mean'][m]:.4f}" for m in ALL_METRICS]
    # Generated defects are easy: the default detector finds them even from 12 training images.
    assert doc["mean"]["image_auroc"] >= 0.9


@pytest.mark.parametrize("categories", [["texture"], ["texture", "object"]], ids=["one", "several"])
def test_evaluate_selected_categories(categories: list[str], dataset: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out.json"
    code, out, err = _run(["evaluate", "--dataset_directory", str(dataset), *LITE, "--object_category", *categories,
                           "--json", str(out_json), "--batch_size", "16", "--workers", "0", "--reference"], capsys)
    assert code == 0, err
    assert list(_table_rows(out)) == [*categories, "mean"]
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    _check_document(doc, categories, 12, 12, {"reference"})
    assert doc["config"]["reference"] is True and doc["config"]["layers"] == ["blocks.8"]


@pytest.mark.parametrize(("flags", "grid"), [
    ([], [4, 4]),  # 64 px images at a 64 px input: no detail they carry beyond it, so no detail head (auto)
    (["--map_detail", "on"], [8, 8]),  # asked for: the detail head's grid (stride 8 at 64 px)
    (["--input_size", "32"], [4, 4]),  # images twice the input: the detail head is kept (32 / 8 = 4)
    (["--input_size", "32", "--map_detail", "off"], [2, 2]),  # the map head's grid alone
], ids=["auto-small", "on", "auto-large", "off"])
def test_map_detail_follows_the_image_size(flags: list[str], grid: list[int], dataset: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out.json"
    code, _, err = _run(["evaluate", "--dataset_directory", str(dataset), *LITE, "--object_category", "texture",
                         "--json", str(out_json), "--batch_size", "16", "--workers", "0", "--input_size", "64",
                         *flags], capsys)
    assert code == 0, err
    assert json.loads(out_json.read_text(encoding="utf-8"))["categories"]["texture"]["map_grid"] == grid
    # fit decides the same way, and the model file keeps the decision
    model = tmp_path / "m.pt"
    code, _, err = _run(["fit", "--train_dir", str(dataset / "texture" / "train"), "--out", str(model), *LITE,
                         "--input_size", "64", *flags, "--workers", "0"], capsys)
    assert code == 0, err
    assert FREDetector.load(model).config.map_grid == tuple(grid)


@pytest.mark.parametrize("size", [64, 32], ids=["small-images", "large-images"])
def test_library_fit_makes_the_cli_fit_choices(size: int, dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``FREDetector(DetectorConfig()).fit`` on a folder's loader decides the heads where ``cli.py fit`` does
    (``DetectorConfig.for_images``, one place) and gives the same model: the same heads, subspaces and statistics."""
    from fre_torch.features.images import ImageDataset, list_images, make_loader
    from fre_torch.jobs.predict import split_holdout

    train = dataset / "texture" / "train"
    model = tmp_path / "m.pt"
    code, _, err = _run(["fit", "--train_dir", str(train), "--out", str(model), *LITE, "--input_size", str(size),
                         "--workers", "0"], capsys)
    assert code == 0, err
    by_cli = FREDetector.load(model)
    fit_paths, _ = split_holdout(list_images(train, recursive=True), 0.2, 0)  # what cli.py fit fitted on
    config = DetectorConfig("efficientnet_lite0", input_size=size)
    assert config.detail_head is not None  # the default has it until the images are seen
    by_library = FREDetector(config).fit(make_loader(ImageDataset(fit_paths, size), 32, "cpu", num_workers=0))
    assert by_library.config == by_cli.config and list(by_library.heads) == list(by_cli.heads)
    assert ("detail" in by_library.heads) == (size == 32)  # 64 px images carry detail for a 32 px input only
    for role, head in by_library.heads.items():
        torch.testing.assert_close(head.scales, by_cli.heads[role].scales, rtol=1e-9, atol=0)
        for a, b in zip(head.models, by_cli.heads[role].models):
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-9, atol=0)
            torch.testing.assert_close(a.explained_variance, b.explained_variance, rtol=1e-9, atol=0)
    torch.testing.assert_close(by_library.cell_std, by_cli.cell_std, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback, no output file
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--dataset_directory", "{tmp}/absent", *LITE], ["dataset directory not found", "absent"]),
        (["--dataset_directory", "{ds}", "--model", "nonet"], ["unknown model 'nonet'", "efficientnet_lite0"]),
        (["--dataset_directory", "{ds}", *LITE, "--object_category", "texture", "carpet"],
         ["unknown category carpet", "object, texture"]),
        (["--dataset_directory", "{tmp}/empty", *LITE], ["no category folder"]),
        (["--dataset_directory", "{ds}", *LITE, "--pca", "1.5"], ["--pca 1.5"]),
        (["--dataset_directory", "{ds}", *LITE, "--pca", "0"], ["--pca"]),
        (["--dataset_directory", "{ds}", *LITE, "--batch_size", "0"], ["--batch_size"]),
        (["--dataset_directory", "{ds}", *LITE, "--layers", "blocks.99"], ["blocks.99"]),
        (["--dataset_directory", "{ds}", *LITE, "--weights", "{tmp}/absent.pt"], ["absent.pt"]),
    ],
    ids=["missing-dir", "unknown-model", "unknown-category", "no-categories", "pca-1.5", "pca-0", "batch-0",
         "unknown-layer", "missing-weights-file"],
)
def test_evaluate_bad_input(args: list[str], needles: list[str], dataset: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    out_json = tmp_path / "out.json"
    argv = ["evaluate", *[a.format(tmp=tmp_path, ds=dataset) for a in args], "--json", str(out_json)]
    _check_error(*_run(argv, capsys), *needles)
    assert not out_json.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.skipif(torch.cuda.is_available(), reason=NEEDS_NO_CUDA)
def test_evaluate_gpu_without_cuda(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out.json"
    _check_error(*_run(["evaluate", "--dataset_directory", str(dataset), *LITE, "--gpu", "--json", str(out_json)],
                       capsys), "CUDA is not available")
    assert not out_json.exists()


# TORCH_HOME in an empty folder and every download refused at once, even on a machine with internet access.
_NO_NETWORK = dict.fromkeys(("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), "http://127.0.0.1:9")


def _offline_env(torch_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    return {**env, **_NO_NETWORK, "TORCH_HOME": str(torch_home)}


def test_torchvision_weights_not_cached(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**_NO_NETWORK, "TORCH_HOME": str(tmp_path / "torch_home")}.items():
        monkeypatch.setenv(key, value)
    out_json = tmp_path / "out.json"
    _check_error(*_run(["evaluate", "--dataset_directory", str(dataset), "--model", "resnet18", "--json",
                        str(out_json)], capsys),
                 "--weights", str(tmp_path / "torch_home" / "hub" / "checkpoints"))
    assert not out_json.exists()


def test_corrupt_image_names_the_file(corrupt_dataset: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root, bad = corrupt_dataset
    out_json = tmp_path / "out.json"
    # The check before the run decodes what verify() cannot vouch for: it names the truncated JPEG.
    _check_error(*_run(["evaluate", "--dataset_directory", str(root), *LITE, "--json", str(out_json)], capsys),
                 "cannot be decoded", str(bad))
    # A file spoiled after the check (here: the check bypassed) fails where it is read, named in one line too.
    import fre_torch.jobs.run as run_module

    monkeypatch.setattr(run_module, "unreadable", lambda paths: {})
    # batch_size 2: several batches, so the images are decoded in DataLoader worker processes.
    for workers in (["--workers", "0"], []):
        _check_error(*_run(["evaluate", "--dataset_directory", str(root), *LITE, "--batch_size", "2", *workers,
                            "--json", str(out_json)], capsys), "cannot read image", str(bad))
        assert not out_json.exists()
        assert not out_json.with_name("out.json.partial").exists()


# ------------------------------------------------------------------------------------------------------------------
# As a program: python cli.py ...
# ------------------------------------------------------------------------------------------------------------------


def _subprocess(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.full
def test_program_weights_not_cached(dataset: Path, tmp_path: Path) -> None:
    env = _offline_env(tmp_path / "torch_home")
    out_json = tmp_path / "out.json"
    proc = _subprocess(["evaluate", "--dataset_directory", str(dataset), "--model", "resnet18", "--json",
                        str(out_json)], env)
    _check_error(proc.returncode, proc.stdout, proc.stderr, "--weights",
                 str(tmp_path / "torch_home" / "hub" / "checkpoints"))
    assert not out_json.exists()


@pytest.mark.full
def test_program_corrupt_image(corrupt_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, bad = corrupt_dataset
    out_json = tmp_path / "out.json"
    proc = _subprocess(["evaluate", "--dataset_directory", str(root), *LITE, "--batch_size", "2", "--json",
                        str(out_json)])
    _check_error(proc.returncode, proc.stdout, proc.stderr, "cannot be decoded", str(bad))  # found before any work
    assert not out_json.exists()


@pytest.mark.full
def test_program_demo(tmp_path: Path) -> None:
    out_json = tmp_path / "demo.json"
    proc = _subprocess(["demo", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no progress bar, and no warning or traceback
    rows = _table_rows(proc.stdout)
    assert list(rows) == ["object", "texture", "mean"]
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    _check_document(doc, ["object", "texture"], 40, 30, {"demo"})
    assert doc["config"]["demo"] is True


@pytest.mark.full
def test_kernel_evaluate_says_maps_need_linear_mode(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["evaluate", "--dataset_directory", str(dataset), *LITE, "--object_category", "texture",
                           "--kernel", "rbf", "--kernel_features", "64", "--batch_size", "8"], capsys)
    assert code == 0, err
    assert "pixel metrics need the linear mode" in err
    assert list(_table_rows(out)) == ["texture", "mean"]
