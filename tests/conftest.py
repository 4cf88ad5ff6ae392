"""Shared fixtures: locations of the real data beside the repository (absent on a user's clone)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BOTTLE_ROOT = SHARED_DATA / "mvtec_bottle"
MAGNETIC_ROOT = SHARED_DATA / "magnetic_tile"


def require_data(root: Path) -> Path:
    """Skip the calling test, with the reason, when a real data set is absent."""
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (it lives in ../shared/data beside the repository)")
    return root


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes on a 2-core CPU; deselected by default, run with -m slow")
