"""What a command prints while it runs: a one-line progress bar, and what an interrupted run had written."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TerminalProgress", "interrupted_message"]

# The settings of cli.py's commands that name an output (file or folder), in the order they are reported.
_OUTPUT_FLAGS = ("out", "json", "scores_csv", "report", "save_heatmaps")


class TerminalProgress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise (logs stay clean). A
    ``ProgressFactory``: ``TerminalProgress(total, label)``, then ``bar(n)`` per batch and ``bar.close()``."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.enabled:
            bar = "#" * int(30 * self.done / max(self.total, 1))
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r{self.label:<20} [{bar:<30}] {self.done}/{self.total} {rate:.0f} img/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def interrupted_message(written: Sequence[Path], options: Mapping[str, Any]) -> str:
    """The one line ``cli.py`` prints when a run is interrupted (Ctrl-C): which files it had completed (each whole:
    every output goes through ``atomic_write``), grouped by folder, and which of the outputs it was asked for it
    had not written.

    Args:
        written: the files completed during the run (``fre_torch.features.files.recording_writes``), in order.
        options: the command's settings by flag name (``vars(args)``); string values of ``out``, ``json``,
            ``scores_csv``, ``report`` and ``save_heatmaps`` are the outputs asked for.
    """
    asked = [Path(v) for k in _OUTPUT_FLAGS if isinstance(v := options.get(k), str)]
    by_folder: dict[Path, list[Path]] = {}
    for path in written:
        by_folder.setdefault(path.parent, []).append(path)
    done = [str(files[0]) if len(files) == 1 else f"{len(files)} files in {folder}/"
            for folder, files in by_folder.items()]
    missing = [str(p) for p in asked if not any(w == p or p in w.parents for w in written)]
    line = "interrupted: " + (f"wrote {'; '.join(done)} (each file whole)" if done else "nothing was written")
    return line + (f"; not written: {', '.join(missing)}" if missing and done else "")
