"""Output paths checked before the work (``fre_torch.features.files``), atomic writes, and the same checks through every
output flag of ``cli.py`` in a new process: exit 2, one line, nothing written, before any image is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fre_torch.features.files import OutputPathError, atomic_write, check_output_dir, check_output_file
from fre_torch.features.synthetic import write_synthetic_mvtec

# A place no file can be created in, even as root: /proc accepts no new entries.
UNWRITABLE = Path("/proc")


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_check_output_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    before = _listing(tmp_path)
    assert check_output_file(tmp_path / "new.pt", "--out") == tmp_path / "new.pt"
    assert check_output_file(tmp_path / "file", "--out") == tmp_path / "file"  # replaced later, atomically
    assert _listing(tmp_path) == before  # the probe file is gone
    with pytest.raises(OutputPathError, match=r"is a folder; give a file path"):
        check_output_file(tmp_path / "dir", "--out")
    # One rule for every output: missing folders are created when it is written (the check creates nothing).
    deep = tmp_path / "missing" / "deeper" / "m.pt"
    assert check_output_file(deep, "--out") == deep
    assert _listing(tmp_path) == before
    with pytest.raises(OutputPathError, match=r"file is a file, not a folder"):
        check_output_file(tmp_path / "file" / "m.pt", "--out")
    if UNWRITABLE.is_dir():
        with pytest.raises(OutputPathError, match="cannot create files in /proc"):
            check_output_file(UNWRITABLE / "m.pt", "--out")
        with pytest.raises(OutputPathError, match=r"cannot create files in /proc \("):  # not "mkdir -p /proc/fre"
            check_output_file(UNWRITABLE / "fre" / "m.pt", "--out")


def test_check_output_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert check_output_dir(tmp_path / "new", "--report") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # created by the writer, not by the check
    assert check_output_dir(tmp_path, "--report") == tmp_path
    assert _listing(tmp_path) == ["file"]
    with pytest.raises(OutputPathError, match="is a file, not a folder; give a folder"):
        check_output_dir(tmp_path / "file", "--report")
    assert check_output_dir(tmp_path / "a" / "b", "--report") == tmp_path / "a" / "b"
    assert _listing(tmp_path) == ["file"]
    if UNWRITABLE.is_dir():
        with pytest.raises(OutputPathError, match="cannot create files"):
            check_output_dir(UNWRITABLE / "out", "--report")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "scores.csv"
    with atomic_write(target) as tmp:
        tmp.write_text("first\n")
    assert target.read_text() == "first\n" and _listing(tmp_path) == ["scores.csv"]
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text("half a sec")
            raise RuntimeError("disk full")
    assert target.read_text() == "first\n" and _listing(tmp_path) == ["scores.csv"]  # old file kept, no partial
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path) as tmp:  # the rename onto a folder fails: the temporary is removed
            tmp.write_text("x")
    assert _listing(tmp_path) == ["scores.csv"]


# ---------------------------------------------------------------------------------------------------------------
# Every output flag of cli.py, wrong, in a new process. The inputs hold only unreadable images, so an error about
# the output path (rather than about an image) proves the check ran before any image was read.


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    data = write_synthetic_mvtec(root / "mvtec", categories=("texture",), n_train=4, n_test_good=2,
                                 n_test_defect=1, size=64)
    for p in data.rglob("*.png"):
        if "ground_truth" not in p.parts:
            p.write_bytes(b"not an image")
    (root / "bad_parts").mkdir()
    for i in range(4):
        (root / "bad_parts" / f"{i}.png").write_bytes(b"not an image")
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("x")
    (root / "model.pt").write_bytes(b"placeholder: never read when the output is wrong")
    return root


FIT = ["fit", "--train_dir", "bad_parts"]
PREDICT = ["predict", "--model_file", "model.pt", "bad_parts"]
EXPORT = ["export", "--model_file", "model.pt", "--format", "torchscript"]
EVALUATE = ["evaluate", "--dataset_directory", "mvtec", "--model", "efficientnet_lite0"]
CASES = [
    (FIT + ["--out", "a_folder"], "--out a_folder: a_folder is a folder"),
    # Missing folders are created (tests/test_failures.py); a file on the way is not a folder.
    (FIT + ["--out", "a_file/missing/m.pt"], "--out a_file/missing/m.pt: a_file is a file, not a folder"),
    (FIT + ["--out", "/proc/m.pt"], "--out /proc/m.pt: cannot create files in /proc"),
    (FIT + ["--out", "m.pt", "--cache", "a_file"], "--cache a_file: a_file is a file, not a folder"),
    (PREDICT + ["--out", "a_file"], "--out a_file: a_file is a file, not a folder"),
    (PREDICT + ["--out", "a_file/missing/results"], "--out a_file/missing/results: a_file is a file, not a folder"),
    (EXPORT + ["--out", "a_folder"], "--out a_folder: a_folder is a folder"),
    (EXPORT + ["--out", "a_file/m.ts"], "--out a_file/m.ts: a_file is a file, not a folder"),
    (EVALUATE + ["--json", "a_folder"], "--json a_folder: a_folder is a folder"),
    (EVALUATE + ["--json", "a_file/missing/r.json"], "--json a_file/missing/r.json: a_file is a file, not a folder"),
    (EVALUATE + ["--scores_csv", "a_folder"], "--scores_csv a_folder: a_folder is a folder"),
    (EVALUATE + ["--report", "a_file"], "--report a_file: a_file is a file, not a folder"),
    (EVALUATE + ["--save_heatmaps", "a_file"], "--save_heatmaps a_file: a_file is a file, not a folder"),
    (EVALUATE + ["--cache", "a_file"], "--cache a_file: a_file is a file, not a folder"),
    (["demo", "--out", "a_file"], "--out a_file: a_file is a file, not a folder"),
    (["demo", "--json", "a_folder"], "--json a_folder: a_folder is a folder"),
]


@pytest.mark.full
@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_cli_wrong_output_path(user: Path, argv: list[str], message: str) -> None:
    before = {p.relative_to(user) for p in user.rglob("*")}
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *argv], cwd=user, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert "fix" in lines[0] or "choose" in lines[0] or "give" in lines[0] or "create" in lines[0]
    assert {p.relative_to(user) for p in user.rglob("*")} == before  # nothing written, nothing half-written
