"""Shared pieces of the benchmarks: seeded data, timing and peak-memory measurement in a child process."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "FRE_TORCH_DATA"


def data_root() -> Path:
    """Where the real data sets are: ``$FRE_TORCH_DATA`` (as for the tests; README), else the project's data folder
    beside the checkout. Data sets sit in subfolders (``magnetic_tile/``, ``mvtec_bottle/``, ...)."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else REPO.parent / "shared" / "data"


def low_rank_features(n: int, d: int, *, rank: int = 48, seed: int = 0) -> np.ndarray:
    """float32 (n, d): a decaying rank-`rank` signal plus noise and an offset, like pooled CNN features."""
    g = np.random.default_rng(seed)
    scales = np.geomspace(8.0, 0.5, rank).astype(np.float32)
    basis = g.standard_normal((rank, d), dtype=np.float32) / np.sqrt(d, dtype=np.float32)
    x = (g.standard_normal((n, rank), dtype=np.float32) * scales) @ basis
    x += 0.02 * g.standard_normal((n, d), dtype=np.float32)
    x += 0.5
    return x


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Smallest wall time of `repeat` calls, in seconds (after one untimed warm-up when repeat > 1)."""
    if repeat > 1:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux VmHWM), so the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak RSS since start or the last ``reset_peak_rss`` (VmHWM; falls back to ru_maxrss)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(module: str, args: dict) -> dict:
    """Run `python -m module json-args` in a fresh process (so its peak RSS is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, "-m", module, json.dumps(args)], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" elsewhere)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    cpu = cpu_name()
    import sklearn
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, Python {platform.python_version()}")


def write_section(name: str, text: str, path: Path | None = None) -> Path:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in BENCHMARKS.md (appended with
    its markers when absent), so generated tables sit beside the hand-written notes around them."""
    path = path or REPO / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + begin + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + f"\n\n{begin}\n{text.strip()}\n{end}\n"
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path
