"""The README's commands, run as a user runs them: a new process per command, in a folder holding the files the
README names (generated data in place of MVTec AD), at the default sizes, each file written by one command read by
the next (fit -> predict -> export -> ONNX Runtime / TorchScript).

The commands are read from README.md itself. Every command line and Python block of the README must appear in
``JOURNEYS`` below, which says which test runs it (or, for the few that cannot run here, why): a README command that
changes, or a new one, fails ``test_every_readme_command_has_a_journey`` until its journey is updated.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import FULL, REPO
from fre_torch import FREDetector
from fre_torch.features.images import list_images, load_image
from fre_torch.features.synthetic import write_synthetic_mvtec
from fre_torch.jobs.export import onnx_exporter_available

README = REPO / "README.md"
# The user documentation: the README and the reference pages it links (their commands are README commands too).
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = "not run"

# README command (continuation lines joined, comment dropped) or "python: <first line>" of a Python block -> the
# journey (test) that runs it, or NOT_RUN with the reason.
JOURNEYS: dict[str, str] = {
    "python -m venv .venv && . .venv/bin/activate": f"{NOT_RUN}: installation (.ci/run does it on a clean clone)",
    "pip install -r requirements.txt -e .": f"{NOT_RUN}: installation (.ci/run does it on a clean clone)",
    "pip install -e .[export]": "test_the_export_extra_adds_nothing_after_the_quick_start",
    "python -m pytest": "test_fast_default_and_full_suite",
    "python -m pytest --full": f"{NOT_RUN}: this test suite itself (.ci/run runs it)",
    "FRE_TORCH_DATA=./mvtec python -m pytest --full -rs": "test_real_data_tests_follow_FRE_TORCH_DATA",
    "python cli.py demo --out demo_data": "test_quick_start",
    "python cli.py evaluate --dataset_directory demo_data --object_category all": "test_quick_start",
    "python cli.py fit --train_dir demo_data/object/train/good --out demo_model.pt": "test_quick_start",
    "python cli.py predict --model_file demo_model.pt demo_data/object/test --out demo_results/": "test_quick_start",
    "python cli.py evaluate --dataset_directory ./mvtec --object_category all --device cpu --json results.json":
        "test_evaluate",
    "python cli.py evaluate --dataset_directory ./mvtec --object_category bottle --model efficientnet_lite0 "
    "--reference": "test_evaluate",
    "python cli.py evaluate --list_models": "test_evaluate",
    "python cli.py evaluate --dataset_directory ./mvtec --object_category all --reference --json reference.json":
        "test_reproduce_the_paper",
    "python cli.py fit --train_dir good_parts/ --out model.pt": "test_fit_predict_export",
    "python cli.py fit --update model.pt --train_dir new_good_parts/ --out model2.pt": "test_fit_predict_export",
    'python cli.py predict --model_file model.pt new_images/ "line2/*.png" --out results/': "test_fit_predict_export",
    "python cli.py evaluate --dataset_directory ./mvtec --object_category bottle --save_heatmaps heat/ "
    "--report report/": "test_heatmaps_and_report",
    "python cli.py predict --model_file model.pt new_images/ --out results/ --save_heatmaps": "test_fit_predict_export",
    "python cli.py export --model_file model.pt --format onnx --out model.onnx --check_images good_parts/":
        "test_fit_predict_export",
    "python cli.py export --model_file model.pt --format torchscript --out model.ts": "test_fit_predict_export",
    "python: import numpy as np, onnxruntime as ort": "test_fit_predict_export",
    "python cli.py evaluate --train_dir good_parts/ --normal_dir test_ok/ --abnormal_dir test_defective/ "
    "--mask_dir test_masks/ --json my_results.json": "test_evaluate_own_folders",
    "python: import numpy as np": "test_python_api",
    "python: from fre_torch import DetectorConfig, run": "test_python_api",
    "python: from fre_torch import DetectorConfig, FREDetector": "test_python_api",
    "torchrun --nproc_per_node 4 cli.py evaluate --dataset_directory ./mvtec --object_category all --device cuda "
    "--json results.json": f"{NOT_RUN}: needs 4 CUDA GPUs (test_distributed runs "
                                                            "the same code path on CPU processes)",
    "torchrun --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --nproc_per_node 8 cli.py fit "
    "--train_dir good_parts/ --out model.pt --device cuda": f"{NOT_RUN}: needs two machines with 8 GPUs each",
    "torchrun --nproc_per_node 2 cli.py evaluate --dataset_directory ./mvtec --object_category bottle --device cpu":
        "test_distributed_cpu",
}


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of the README and of docs/*.md."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCS)
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def readme_commands() -> list[str]:
    """Every command of the README's ``bash`` blocks (continuations joined, comments dropped) and one
    ``python: <first line>`` entry per ``python`` block."""
    out: list[str] = []
    for lang, text in readme_blocks():
        if lang == "python":
            out.append(f"python: {text.splitlines()[0].strip()}")
        elif lang == "bash":
            joined = re.sub(r"\\\n\s*", "", text)
            for line in joined.splitlines():
                command = re.sub(r"(^|\s+)#.*$", "", line).strip()
                if command:
                    out.append(re.sub(r"\s+", " ", command))
    return out


def readme_python(first_line: str) -> str:
    """The README's Python block that starts with ``first_line``."""
    blocks = [text for lang, text in readme_blocks() if lang == "python" and text.startswith(first_line)]
    assert len(blocks) == 1, f"{len(blocks)} README Python blocks start with {first_line!r}"
    return blocks[0]


def test_every_readme_command_has_a_journey() -> None:
    commands = readme_commands()
    missing = [c for c in commands if c not in JOURNEYS]
    assert not missing, f"README commands without a journey test (add them to JOURNEYS and run them): {missing}"
    stale = [c for c in JOURNEYS if c not in commands]
    assert not stale, f"JOURNEYS names commands the README no longer has: {stale}"
    tests = {name for name in JOURNEYS.values() if not name.startswith(NOT_RUN)}
    assert tests <= set(globals()), f"journeys without a test function: {tests - set(globals())}"


# ---------------------------------------------------------------------------------------------------------------
# A user's folder


def _write_workspace(root: Path) -> Path:
    """The files the README's commands name: ``mvtec/`` (categories ``bottle`` and ``texture``, with masks),
    ``good_parts/`` (normal images), ``new_images/`` and ``line2/`` (normal and defective), ``test_ok/``,
    ``test_defective/`` and ``test_masks/`` (bottle's test images and masks as a user's own folders), ``a.png``,
    ``b.png``, and ``cli.py`` (a link to the repository's)."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_mvtec(root / "mvtec", n_train=20, n_test_good=6, n_test_defect=4, size=128, seed=3)
    (data / "object").rename(data / "bottle")
    shutil.copytree(data / "bottle" / "train" / "good", root / "good_parts")
    new = root / "new_images"
    new.mkdir()
    for p in list_images(data / "bottle" / "test"):
        shutil.copy(p, new / f"{p.parent.name}_{p.name}")
    (root / "line2").mkdir()
    for p in list_images(data / "texture" / "test")[:4]:
        shutil.copy(p, root / "line2" / f"{p.parent.name}_{p.name}")
    # a.png / b.png (the README's snippets): a normal and a defective image, also under new_images/
    shutil.copy(new / "good_000.png", root / "a.png")
    shutil.copy(new / "missing_000.png", root / "b.png")
    # The same test images as a user's own folders: normal, defective by subfolder, masks as <defect>/<stem>_mask.
    shutil.copytree(data / "bottle" / "test" / "good", root / "test_ok")
    for d in (data / "bottle" / "test").iterdir():
        if d.name != "good":
            shutil.copytree(d, root / "test_defective" / d.name)
    shutil.copytree(data / "bottle" / "ground_truth", root / "test_masks")
    # new_good_parts/: normal images collected later (fit --update, FREDetector.update)
    later = write_synthetic_mvtec(root / "later", categories=("object",), n_train=10, n_test_good=1, n_test_defect=1,
                                  size=128, seed=4)
    shutil.copytree(later / "object" / "train" / "good", root / "new_good_parts")
    shutil.rmtree(later)
    (root / "cli.py").symlink_to(REPO / "cli.py")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_workspace(tmp_path_factory.mktemp("user"))


def _env() -> dict[str, str]:
    """The user's shell: this interpreter's ``python`` first on PATH (a venv's bin folder), no test variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(command: str, cwd: Path, *, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run one README command in bash, in ``cwd``, as typed (``python`` = this interpreter)."""
    assert command in JOURNEYS, f"not a README command: {command}"
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, f"{command}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _command(prefix: str) -> str:
    """The README command that starts with ``prefix`` (exactly one)."""
    found = [c for c in readme_commands() if c.startswith(prefix)]
    assert len(found) == 1, f"{len(found)} README commands start with {prefix!r}: {found}"
    return found[0]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _table(stdout: str) -> dict[str, list[float]]:
    """Rows of a printed metrics table: first cell -> the numbers after it."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) > 3 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The journeys


@pytest.mark.full
def test_quick_start(tmp_path: Path) -> None:
    (tmp_path / "cli.py").symlink_to(REPO / "cli.py")
    demo = run(_command("python cli.py demo"), tmp_path)
    assert "demo_data" in demo.stdout and (tmp_path / "demo_data" / "object" / "train" / "good").is_dir()
    table = _table(demo.stdout)
    assert set(table) == {"object", "texture", "mean"}
    assert all(0.9 <= v <= 1.0 for v in table["mean"][:3]), demo.stdout  # image AUROC / AUPR / F1-max
    again = run(_command("python cli.py evaluate --dataset_directory demo_data"), tmp_path)
    metrics = lambda t: {k: v[:6] for k, v in t.items()}  # noqa: E731  (the metrics, not the timings)
    assert metrics(_table(again.stdout)) == metrics(table)  # the kept data set evaluates to the same figures
    fit = run(_command("python cli.py fit --train_dir demo_data"), tmp_path)
    assert "wrote demo_model.pt" in fit.stdout and "held-out" in fit.stdout
    run(_command("python cli.py predict --model_file demo_model.pt"), tmp_path)
    rows = _csv(tmp_path / "demo_results" / "predictions.csv")
    assert len(rows) == 30 and all(r["error"] == "" for r in rows)
    flagged = {r["path"].split(os.sep)[-2]: [] for r in rows}
    for r in rows:
        flagged[r["path"].split(os.sep)[-2]].append(int(r["is_anomalous"]))
    assert sum(flagged["good"]) <= 2 and sum(sum(v) for k, v in flagged.items() if k != "good") >= 15, flagged


@pytest.mark.full
def test_evaluate(workspace: Path) -> None:
    ev = run(_command("python cli.py evaluate --dataset_directory ./mvtec --object_category all --device"), workspace)
    doc = json.loads((workspace / "results.json").read_text(encoding="utf-8"))
    assert list(doc["categories"]) == ["bottle", "texture"]
    table = _table(ev.stdout)
    for name, r in doc["categories"].items():
        assert table[name][:3] == pytest.approx([r["image_auroc"], r["image_aupr"], r["image_f1_max"]], abs=5e-5)
        assert r["n_train"] == 20 and r["n_test"] == 14 and r["image_auroc"] >= 0.9
    assert doc["config"]["input_size"] == 224 and doc["config"]["backbone"] == "efficientnet_lite0"
    ref = run(_command("python cli.py evaluate --dataset_directory ./mvtec --object_category bottle "
                       "--model efficientnet_lite0 --reference"), workspace)
    assert list(_table(ref.stdout)) == ["bottle", "mean"]
    models = run(_command("python cli.py evaluate --list_models"), workspace)
    assert {"efficientnet_lite0", "efficientnet_b5", "resnet18", "resnet50"} <= set(models.stdout.split())


@pytest.mark.full
def test_evaluate_own_folders(workspace: Path) -> None:
    """A user's own labelled folders give exactly the figures of the same images in the MVTec layout; a defective
    image without a mask is reported and left out of the pixel metrics."""
    run(_command("python cli.py evaluate --train_dir good_parts/"), workspace)
    doc = json.loads((workspace / "my_results.json").read_text(encoding="utf-8"))
    assert list(doc["categories"]) == ["custom"]
    got = doc["categories"]["custom"]
    mvtec = subprocess.run([sys.executable, "cli.py", "evaluate", "--dataset_directory", "mvtec", "--object_category",
                            "bottle", "--model", "efficientnet_lite0", "--json", "mvtec.json"], cwd=workspace,
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert mvtec.returncode == 0, mvtec.stderr
    want = json.loads((workspace / "mvtec.json").read_text(encoding="utf-8"))["categories"]["bottle"]
    for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pro", "pixel_f1_max", "n_train",
                "n_test"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert "n_defective_without_mask" not in got

    # one mask gone: named on stderr, counted in the JSON, and the pixel metrics are those without that image
    masks = workspace / "test_masks_one_missing"
    shutil.copytree(workspace / "test_masks", masks)
    gone = sorted(masks.rglob("*_mask.png"))[0]
    gone.unlink()
    proc = subprocess.run([sys.executable, "cli.py", "evaluate", "--train_dir", "good_parts", "--normal_dir",
                           "test_ok", "--abnormal_dir", "test_defective", "--mask_dir", masks.name,
                           "--model", "efficientnet_lite0", "--object_category", "parts", "--json", "missing.json"],
                          cwd=workspace, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stem = gone.name.replace("_mask", "")
    assert "1 defective test images have no mask" in proc.stderr and stem in proc.stderr
    part = json.loads((workspace / "missing.json").read_text(encoding="utf-8"))["categories"]["parts"]
    assert part["n_defective_without_mask"] == 1 and part["image_auroc"] == pytest.approx(want["image_auroc"])
    assert part["pixel_auroc"] != pytest.approx(want["pixel_auroc"], abs=1e-9)

    # missing companions and a training image among the test images: exit 2, one line
    for argv, words in ((["--train_dir", "good_parts", "--normal_dir", "test_ok"], "together"),
                        (["--train_dir", "good_parts", "--normal_dir", "good_parts", "--abnormal_dir",
                          "test_defective"], "also training images")):
        bad = subprocess.run([sys.executable, "cli.py", "evaluate", *argv], cwd=workspace, env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.full
def test_reproduce_the_paper(workspace: Path, tmp_path: Path) -> None:
    """The paper's command runs the reference configuration on efficientnet_b5: offline, with an empty torch hub
    cache, it stops with the hint; given b5 weights (here random ones, as a local file) it runs on b5."""
    command = _command("python cli.py evaluate --dataset_directory ./mvtec --object_category all --reference")
    offline = {**_env(), "TORCH_HOME": str(tmp_path / "hub"), "http_proxy": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    proc = subprocess.run(["bash", "-c", command], cwd=workspace, env=offline, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: efficientnet_b5: pretrained weights"), proc.stderr
    assert "--weights FILE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from fre_torch.features.backbones import build_backbone

    torch.save(build_backbone("efficientnet_b5", pretrained=False).state_dict(), tmp_path / "b5.pt")
    proc = subprocess.run(["bash", "-c", f"{command} --weights {tmp_path / 'b5.pt'} --object_category bottle"],
                          cwd=workspace, env=offline, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("reference configuration (run_mvtec.py): efficientnet_b5, layer features.6, pool 2, "
                                  "input 456 px")
    config = json.loads((workspace / "reference.json").read_text(encoding="utf-8"))["config"]
    assert (config["backbone"], config["layers"], config["image_score"]) == ("efficientnet_b5", ["features.6"], "fre")


@pytest.mark.full
def test_fit_predict_export(workspace: Path) -> None:
    """fit -> predict (CSV) -> export ONNX and TorchScript in new processes -> the README's ONNX Runtime snippet and
    torch.jit on the exported files give predict's CSV scores (1e-4 relative)."""
    fit = run(_command("python cli.py fit --train_dir good_parts/"), workspace)
    assert "wrote model.pt" in fit.stdout and "warning: only 4 held-out images" in fit.stderr
    run(_command('python cli.py predict --model_file model.pt new_images/ "line2/*.png"'), workspace)
    rows = _csv(workspace / "results" / "predictions.csv")
    assert len(rows) == len(list_images(workspace / "new_images")) + 4
    assert all(r["error"] == "" and math.isfinite(float(r["score"])) for r in rows)
    scores = {Path(r["path"]).as_posix(): float(r["score"]) for r in rows}

    heat = run(_command("python cli.py predict --model_file model.pt new_images/ --out results/ --save_heatmaps"),
               workspace)
    assert "heatmaps" in heat.stdout
    assert len(list((workspace / "results" / "heatmaps").glob("*.png"))) == len(list_images(workspace / "new_images"))

    want = torch.tensor([scores["new_images/good_000.png"], scores["new_images/missing_000.png"]], dtype=torch.float64)
    assert want[1] > want[0]  # the defective image scores higher
    if onnx_exporter_available():
        onnx_line = run(_command("python cli.py export --model_file model.pt --format onnx"), workspace).stdout
        assert "wrote model.onnx" in onnx_line and "(batch, 3, 224, 224)" in onnx_line
        # The README's ONNX Runtime snippet, as written (a.png, b.png are new_images/good_000.png,
        # missing_000.png), then its results printed.
        snippet = readme_python("import numpy as np, onnxruntime as ort")
        probe = snippet + "\nimport json; print(json.dumps([score.tolist(), list(amap.shape)]))\n"
        out = subprocess.run([sys.executable, "-c", probe], cwd=workspace, env=_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        onnx_scores, map_shape = json.loads(out.stdout.strip().splitlines()[-1])
        assert map_shape == [2, 14, 14]  # the map head: blocks.3, blocks.4 + blocks.8 on a 14 x 14 grid
        assert (torch.tensor(onnx_scores, dtype=torch.float64) - want).abs().max() <= 1e-4 * want.abs().max()
    else:  # torch < 2.6 (setup.py allows 2.4): one line naming the fix, exit 2, no file
        refused = run(_command("python cli.py export --model_file model.pt --format onnx"), workspace, expect=2)
        assert len(refused.stderr.strip().splitlines()) == 1 and "--format torchscript" in refused.stderr
        assert not (workspace / "model.onnx").exists()
    run(_command("python cli.py export --model_file model.pt --format torchscript"), workspace)

    images = torch.stack([load_image(workspace / name, 224) for name in ("a.png", "b.png")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        ts_score, ts_map = torch.jit.load(str(workspace / "model.ts"))(images)
    assert tuple(ts_map.shape) == (2, 14, 14)
    assert (ts_score.double() - want).abs().max() <= 1e-4 * want.abs().max()

    # More normal images later: model.pt is read, model2.pt written, and it has seen both folders' fitted images.
    before = (workspace / "model.pt").read_bytes()
    update = run(_command("python cli.py fit --update model.pt"), workspace)
    assert "model.pt updated with 8 images (24 in all)" in update.stdout, update.stdout  # 16 + 8; 4 + 2 held out
    assert (workspace / "model.pt").read_bytes() == before
    updated = FREDetector.load(workspace / "model2.pt")
    assert updated.n_images == 24 and updated.calibration_scores.numel() == 4 + 2


@pytest.mark.full
def test_heatmaps_and_report(workspace: Path) -> None:
    proc = run(_command("python cli.py evaluate --dataset_directory ./mvtec --object_category bottle "
                        "--save_heatmaps"), workspace)
    n_test = len(list_images(workspace / "mvtec" / "bottle" / "test"))
    assert len(list((workspace / "heat" / "bottle").glob("*.png"))) == n_test
    index = workspace / "report" / "index.html"
    assert index.is_file() and f"wrote {Path('report') / 'index.html'}" in proc.stdout
    html = index.read_text(encoding="utf-8")
    for src in re.findall(r'src="([^"]+)"', html):
        assert (index.parent / src).is_file(), src


@pytest.mark.full
def test_python_api(tmp_path: Path) -> None:
    """The README's Python blocks run as written, in a folder holding the files they name."""
    _write_workspace(tmp_path)

    def python(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    jobs = python(readme_python("from fre_torch import DetectorConfig, run") +
                  "\nimport json; print(json.dumps([auroc, len(flagged), len(predicted.rows)]))\n")
    auroc, n_flagged, n_rows = json.loads(jobs)
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert auroc == doc["categories"]["bottle"]["image_auroc"] >= 0.9
    assert (tmp_path / "report" / "index.html").is_file() and len(list((tmp_path / "heat").rglob("*.png"))) == 28
    assert n_rows == 14 and 4 <= n_flagged <= 10  # 8 of the 14 bottle test images are defective
    assert (tmp_path / "results" / "predictions.csv").is_file() and (tmp_path / "model.pt").is_file()

    k_one_shot, k_stream, shape = python(readme_python("import numpy as np\n")).split(maxsplit=2)
    assert k_one_shot == k_stream and shape.strip() == "(10,)"

    code = readme_python("from fre_torch import DetectorConfig, FREDetector")
    probe = code + ("\nimport json; print(json.dumps([float(scores[0]), list(maps.shape), float(det.score(images)[0]), "
                    "det.n_images]))\n")
    score, shape, reloaded, n_images = json.loads(python(probe))
    # The detail head (28 x 28) where good_parts/ carries detail beyond the input (DetectorConfig.for_images), as
    # cli.py fit decides; 14 x 14 without.
    from fre_torch import DetectorConfig
    from fre_torch.detection.detector import stored_sizes
    from fre_torch.features.images import list_images

    grid = DetectorConfig().for_images(stored_sizes(list_images(tmp_path / "good_parts"))).map_grid
    assert shape == [1, *grid] and math.isfinite(score) and math.isfinite(reloaded)
    # updated with new_good_parts/, then saved and loaded: it has seen both folders (20 + 10 images)
    assert n_images == 30 and reloaded != score


@pytest.mark.full
def test_distributed_cpu(workspace: Path) -> None:
    proc = run(_command("torchrun --nproc_per_node 2"), workspace)
    assert list(_table(proc.stdout)) == ["bottle", "mean"]


@pytest.mark.full
def test_real_data_tests_follow_FRE_TORCH_DATA(workspace: Path, tmp_path: Path) -> None:
    """The README's command with ./mvtec holding an MVTec-layout ``bottle``: the bottle tests look there (and fail
    on this generated bottle's counts, which proves they ran), and a skip names the variable."""
    (tmp_path / "tests").symlink_to(REPO / "tests")
    (tmp_path / "pytest.ini").symlink_to(REPO / "pytest.ini")
    (tmp_path / "mvtec").symlink_to(workspace / "mvtec")
    command = _command("FRE_TORCH_DATA=./mvtec python -m pytest --full -rs")
    proc = subprocess.run(["bash", "-c", command + " tests/test_data.py -k real -p no:cacheprovider"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    # It read the generated bottle (20 training images), and failed on MVTec's count (209): the test ran there.
    assert "_ test_real_mvtec_bottle _" in proc.stdout and "1 failed" in proc.stdout, proc.stdout
    assert "20 == 209" in proc.stdout, proc.stdout
    assert "FRE_TORCH_DATA=./mvtec" in proc.stdout and "magnetic_tile" in proc.stdout  # the skip says what to set


def pip_dry_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pip install --dry-run ARGS`` in the repository: what pip would do, changing nothing."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.full
def test_the_export_extra_adds_nothing_after_the_quick_start() -> None:
    """What the README says: after ``pip install -r requirements.txt -e .``, ``pip install -e .[export]`` would
    install this package again and nothing else."""
    assert "pip install -r requirements.txt -e ." in readme_commands()
    proc = pip_dry_run("-e", ".[export]")
    assert proc.returncode == 0, proc.stderr
    would = [line for line in proc.stdout.splitlines() if line.startswith("Would install")]
    assert would == ["Would install fre_torch-0.1.0"], proc.stdout
    extras = re.search(r'"export": \[([^\]]*)\]', (REPO / "setup.py").read_text(encoding="utf-8")).group(1)
    readme = "\n".join(path.read_text(encoding="utf-8") for path in DOCS)
    assert "does nothing" in readme and all(name.strip(' "') in readme for name in extras.split(","))


def _collect(*args: str) -> tuple[int, int]:
    """(selected, deselected) of ``python -m pytest --collect-only ARGS`` in a new process."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))? in .*", last)
    assert m is not None, last
    selected = int(m.group(1))
    deselected = int(m.group(3) or 0)
    return selected, deselected


@pytest.mark.full
def test_fast_default_and_full_suite() -> None:
    """``python -m pytest`` leaves out the tests marked ``full``; the README's ``python -m pytest --full`` (what
    .ci/run runs) keeps them; only the minutes-long ``slow`` ones stay out of both."""
    fast, fast_out = _collect()
    full, full_out = _collect(FULL)
    assert fast + fast_out == full + full_out and full_out < fast_out and fast < full
    assert "python -m pytest --full" in readme_commands() and "python -m pytest" in readme_commands()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.rstrip().splitlines()[-1] == "python -m pytest --full"
