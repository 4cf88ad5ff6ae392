"""A new user's first hour (issue 22), each check a command run as the user runs it, in a new process: the offline
default backbone, honest ``--help``, conflicting inputs refused, unreadable images found before any work, the quick
start's outputs git-ignored, the README's figures traced to their benchmark, the install notes, and the test loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fre_torch.features.synthetic import write_synthetic_mvtec
from test_journeys import pip_dry_run, readme_blocks, readme_commands

# The README and the pages it links (docs/): the user documentation as a whole.
README = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
# Every download refused at once (even with internet access), and an empty torch hub cache: the offline machine.
_NO_NETWORK = dict.fromkeys(("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"), "http://127.0.0.1:9")


def _env(offline: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k.lower() != "no_proxy"}
    return env if offline is None else {**env, **_NO_NETWORK, "TORCH_HOME": str(offline)}


def cli(*args: str, cwd: Path = REPO, offline: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` in a new process (``offline``: an empty torch hub folder, no network)."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=_env(offline),
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small category (10 training images, 6 test images) in the MVTec layout."""
    return write_synthetic_mvtec(tmp_path_factory.mktemp("first_hour") / "ds", categories=("texture",), n_train=10,
                                 n_test_good=2, n_test_defect=2, size=64)


# ------------------------------------------------------------------------------------------ 1. the default backbone


@pytest.mark.full
def test_every_verb_defaults_to_the_offline_backbone(data: Path, tmp_path: Path) -> None:
    """No --model, no network, an empty torch hub cache: evaluate and fit run on efficientnet_lite0."""
    ev = cli("evaluate", "--dataset_directory", str(data), "--json", str(tmp_path / "r.json"), offline=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["config"]["backbone"] == "efficientnet_lite0"
    fit = cli("fit", "--train_dir", str(data / "texture" / "train" / "good"), "--out", str(tmp_path / "m.pt"),
              offline=tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert "efficientnet_lite0" in cli("fit", "--help").stdout and "efficientnet_lite0" in cli("evaluate", "--help").stdout


@pytest.mark.full
def test_reference_means_efficientnet_b5_and_says_so(data: Path, tmp_path: Path) -> None:
    """--reference without --model is the reference's own backbone, b5 (a download: offline, the hint); with
    --model, that backbone, named in the line above the table."""
    line = _one_error_line(cli("evaluate", "--dataset_directory", str(data), "--reference", offline=tmp_path))
    assert line.startswith("error: efficientnet_b5: pretrained weights") and "--weights FILE" in line
    assert "efficientnet_b5 with --reference" in " ".join(cli("evaluate", "--help").stdout.split())
    lite = cli("evaluate", "--dataset_directory", str(data), "--reference", "--model", "efficientnet_lite0",
               offline=tmp_path)
    assert lite.returncode == 0, lite.stderr
    assert lite.stdout.splitlines()[0] == ("reference configuration (run_mvtec.py): efficientnet_lite0, layer "
                                           "blocks.8, pool 2, input 224 px, ImageNet normalisation, plain FRE")


# ------------------------------------------------------------------------------------------ 2. --help


def _help(command: str) -> str:
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # argparse wraps lines at the terminal width


def test_help_shows_defaults_and_every_flag_has_help() -> None:
    evaluate, fit = _help("evaluate"), _help("fit")
    for flag, default in (("--device {cpu,cuda}", "(default cpu)"), ("--batch_size BATCH_SIZE", "(default 32)"),
                          ("--pca PCA", "(default auto)")):
        for text in (evaluate, fit):
            assert f"{flag} " in text and default in text.split(f" {flag} ", 1)[1].split(" --")[0], (flag, text)
    assert "(default ./mvtec)" in evaluate.split(" --dataset_directory DATASET_DIRECTORY ", 1)[1].split(" --")[0]
    assert "a model file written by fit" in _help("predict") and "a model file written by fit" in _help("export")
    demo = _help("demo")
    assert "--seed SEED the data set's seed" in demo and "--json PATH write the results as JSON" in demo
    for text in (evaluate, fit):  # sizes: one number (a square) or two (height, width)
        assert "S | H W" not in text and "--input_size H [W] image size: a square side, or height and width" in text


def test_list_models_says_which_backbones_need_a_download() -> None:
    proc = cli("evaluate", "--list_models")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()}
    assert lines == {"efficientnet_lite0": "offline", "efficientnet_lite1": "offline", "efficientnet_lite2": "offline",
                     "efficientnet_b5": "download", "resnet18": "download", "resnet50": "download",
                     "wide_resnet50_2": "download"}
    assert "[default]" in next(line for line in proc.stdout.splitlines() if line.startswith("efficientnet_lite0"))


def test_a_flag_of_another_command_prints_that_commands_usage(data: Path, tmp_path: Path) -> None:
    proc = cli("fit", "--train_dir", str(data), "--out", str(tmp_path / "m.pt"), "--gpu")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: cli.py fit [-h] --train_dir TRAIN_DIR --out OUT"), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "cli.py fit: error: unrecognized arguments: --gpu"
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------------------------------ 3. conflicting inputs


def test_dataset_directory_and_own_folders_exclude_each_other(data: Path) -> None:
    good, test = data / "texture" / "train" / "good", data / "texture" / "test"
    line = _one_error_line(cli("evaluate", "--dataset_directory", str(data), "--train_dir", str(good),
                               "--normal_dir", str(test / "good"), "--abnormal_dir", str(test / "scratch")))
    assert line == ("error: --dataset_directory and --train_dir, --normal_dir, --abnormal_dir exclude each other: "
                    "give an MVTec-layout folder or your own folders (--train_dir, --normal_dir, --abnormal_dir), "
                    "not both")


# ------------------------------------------------------------------------------------------ 4. unreadable images


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A category with an unreadable training image (truncated PNG) and test image (not an image at all)."""
    root = write_synthetic_mvtec(tmp_path / "broken", categories=("texture",), n_train=8, n_test_good=2,
                                 n_test_defect=2, size=64)
    train, test = root / "texture" / "train" / "good" / "003.png", root / "texture" / "test" / "spot" / "001.png"
    train.write_bytes(train.read_bytes()[:200])
    test.write_bytes(b"not an image\n" * 20)
    return root, [train, test]


def test_unreadable_images_are_all_named_before_any_work(broken: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Both files in one line, before the model is even built: here resnet18's weights, absent offline, would
    otherwise be the error."""
    root, (train, test) = broken
    line = _one_error_line(cli("evaluate", "--dataset_directory", str(root), "--model", "resnet18", "--json",
                               str(tmp_path / "r.json"), offline=tmp_path / "hub"))
    assert line == (f"error: 2 of the run's 18 images and masks cannot be decoded, nothing was fitted: {train} "
                    f"(Truncated File Read); {test} (not an image). Fix or remove them, or pass --skip_unreadable "
                    "to leave them out")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.full
def test_skip_unreadable_leaves_them_out_and_counts_them(broken: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, (train, test) = broken
    proc = cli("evaluate", "--dataset_directory", str(root), "--skip_unreadable", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (f"warning: texture: 2 unreadable files left out (--skip_unreadable): {train}, "
                                   f"{test}")
    head, _, row = proc.stdout.splitlines()[:3]
    assert head.split()[7:10] == ["n_train", "n_test", "skipped"] and row.split()[7:10] == ["7", "5", "2"]
    got = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["categories"]["texture"]
    assert (got["n_train"], got["n_test"], got["n_unreadable_skipped"]) == (7, 5, 2)


# ------------------------------------------------------------------------------------------ 5. .gitignore


def readme_outputs() -> set[str]:
    """Every path a README command or Python block writes (or the data folders it tells the user to create)."""
    flags = r"--(?:out|json|save_heatmaps|report|scores_csv|dataset_directory)"
    found = {m for c in readme_commands() for m in re.findall(rf"{flags} (\S+)", c)}
    found |= {m for c in readme_commands() for m in re.findall(r"FRE_TORCH_DATA=(\S+)", c)}
    for lang, text in readme_blocks():
        if lang == "python":
            found |= set(re.findall(r'\b(?:out|json|report|heatmaps)="([^"]+)"', text))
            found |= set(re.findall(r'\.(?:write_heatmaps|write_report|save)\("([^"]+)"\)', text))
            found |= set(re.findall(r'InferenceSession\("([^"]+)"\)', text))
    return {os.path.normpath(p) for p in found}


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_everything_the_readme_writes_is_git_ignored() -> None:
    outputs = readme_outputs()
    assert {"demo_data", "demo_model.pt", "demo_results", "heat", "report", "results.json", "model.pt", "results",
            "model.onnx", "model.ts", "my_results.json", "mvtec"} <= outputs, outputs
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *sorted(outputs)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    not_ignored = [line.split("\t")[1] for line in proc.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"README outputs missing from .gitignore: {not_ignored}"
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ 6. the README's figures


def test_readme_figures_are_those_of_the_benchmark() -> None:
    """Every figure benchmarks/readme_figures.py measures is in the README as its results file holds it."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.readme_figures", "--check"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "README figures match benchmarks/results/readme_figures.json" in proc.stdout


# ------------------------------------------------------------------------------------------ 7, 8. the install
# (7, and 9 the test loop: README commands, so their tests are journeys: tests/test_journeys.py)


@pytest.mark.full
def test_the_cpu_only_install_needs_its_index(tmp_path: Path) -> None:
    """The README's CPU-only command, with download.pytorch.org out of reach and no other index: pip fails."""
    command = re.search(r"`(pip install torch==\S+ torchvision==\S+ --index-url (https://\S+))`", README)
    assert command is not None and command.group(2) == "https://download.pytorch.org/whl/cpu"
    env = {**_env(), **_NO_NETWORK}
    proc = pip_dry_run("--isolated", "--ignore-installed", "--retries", "0", "--timeout", "5", "--no-cache-dir",
                *command.group(1).split()[2:], env=env)
    assert proc.returncode != 0 and "torch" in proc.stdout + proc.stderr
    assert "needs access to download.pytorch.org" in " ".join(README.split())
