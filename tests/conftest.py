"""Shared fixtures and the one place the tests look for real data.

Real-data tests read the folder named by the environment variable ``FRE_TORCH_DATA`` (see README, "Run the tests on
your copy of MVTec AD"). Under it, each data set is found either in its own subfolder or directly:

    $FRE_TORCH_DATA/mvtec_bottle/bottle/...     or  $FRE_TORCH_DATA/bottle/...          (MVTec AD bottle)
    $FRE_TORCH_DATA/mvtec_screw/screw/...       or  $FRE_TORCH_DATA/screw/...           (MVTec AD screw)
    $FRE_TORCH_DATA/magnetic_tile/magnetic_tile/...  or  $FRE_TORCH_DATA/magnetic_tile/...  (Magnetic Tile Defect)

so pointing it at an extracted MVTec AD folder (the one holding ``bottle/``, ``screw/``, ...) runs the MVTec tests.
Each category folder is in the MVTec AD layout. Tests whose data is absent skip, saying all of this.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "FRE_TORCH_DATA"
# Skip reasons of the CUDA-only tests (CPU = CUDA checks) and of the CPU-only ones (the error without CUDA).
NEEDS_CUDA = "needs an NVIDIA GPU and a CUDA build of torch: it checks that CUDA gives the CPU's results"
NEEDS_NO_CUDA = "checks the error for --device cuda on a machine without CUDA; this machine has CUDA"
_LAYOUT = ("<category>/train/good/*.png|jpg, <category>/test/<good|defect>/*, "
           "<category>/ground_truth/<defect>/<stem>_mask.png")
# Per category the tests use: its data set's subfolder under $FRE_TORCH_DATA (the category may also sit directly
# there), and where a user gets it.
_SETS = {"bottle": ("mvtec_bottle", "e.g. your extracted MVTec AD folder"),
         "screw": ("mvtec_screw", "e.g. your extracted MVTec AD folder"),
         "magnetic_tile": ("magnetic_tile", "the Magnetic Tile Defect set arranged in this layout")}


def data_root() -> Path:
    """``$FRE_TORCH_DATA``, or this project's own data folder beside the checkout when the variable is unset."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else REPO.parent / "shared" / "data"


def find_category(category: str) -> Path | None:
    """The MVTec-layout root holding ``<category>/train/good`` under ``data_root()``, or None."""
    base = data_root()
    for root in (base / _SETS.get(category, (category,))[0], base):
        if (root / category / "train" / "good").is_dir():
            return root
    return None


def skip_reason(category: str) -> str:
    """Why a test of ``category`` skips, and how to run it."""
    where = f"{DATA_ENV}={os.environ[DATA_ENV]}" if os.environ.get(DATA_ENV) else f"{DATA_ENV} is not set"
    subfolder, source = _SETS.get(category, (category, "your copy of the data"))
    return (f"real data for '{category}' not found ({where}). To run this test, set {DATA_ENV} to a folder holding "
            f"{category}/ ({source}) or {subfolder}/{category}/, in the layout {_LAYOUT}")


def require_category(category: str) -> Path:
    """The data root holding ``category`` (pass it to ``MVTecCategory.load(root, category)``); skips the calling
    test with ``skip_reason`` when the data is absent."""
    root = find_category(category)
    if root is None:
        pytest.skip(skip_reason(category))
    return root


FULL = "--full"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(FULL, action="store_true",
                     help="the full suite: also the tests marked 'full' (the README's commands in new processes, real "
                          "data, data-parallel runs, export; minutes each on a 2-core CPU). Without it, the fast "
                          "default subset runs. CI (.ci/run) runs the full suite.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes on a 2-core CPU; deselected by default, run with -m slow")
    config.addinivalue_line("markers", f"full: part of the full suite only ({FULL}); deselected by default")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--full``, the tests marked ``full`` are deselected (counted as such in pytest's summary)."""
    if config.getoption(FULL):
        return
    fast = [item for item in items if item.get_closest_marker("full") is None]
    if len(fast) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("full") is not None])
        items[:] = fast


def pytest_report_header(config: pytest.Config) -> str:
    return ("full suite (--full)" if config.getoption(FULL) else
            f"fast subset: tests marked 'full' deselected; {FULL} runs the full suite (as CI does)")
