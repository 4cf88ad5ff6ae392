"""Output paths: checked before any work starts, and written so that a failure leaves nothing half-written.

A run that writes a file at its end (a model, a JSON document, a CSV, an export) should learn that the path is
wrong before it reads its first image, not after minutes of work. ``check_output_file`` / ``check_output_dir`` test
the kind of the path, that its folder exists, and that a file can really be created there (a probe file, created
and removed: permission bits say nothing for root or on read-only mounts). ``atomic_write`` writes to a temporary
name beside the target and renames it into place only when the write succeeded; on any failure the temporary is
removed, so a reader never sees a partial file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputPathError", "atomic_write", "check_output_dir", "check_output_file", "recording_writes"]

_written: list[Path] | None = None  # recording_writes' list while one is open


class OutputPathError(ValueError):
    """An output path cannot be written: wrong kind, missing folder, or no permission. The message names the fix."""


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the one reliable test that it accepts new files."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fre_torch-probe-", dir=folder)
    except OSError as err:
        raise OutputPathError(f"{what}: cannot create files in {folder} ({err.strerror or err}); choose a folder you "
                              "can write to") from err
    os.close(fd)
    os.unlink(name)


def _existing_parent(path: Path, what: str) -> Path:
    """The nearest folder above ``path`` that exists: the missing ones below it are created when the output is
    written (one rule for every output, file or folder)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what}: {parent} is a file, not a folder; choose a path inside a folder")
    return parent


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check that ``path`` can be written as a file, before the work that produces it.

    Args:
        path: the file to be written (it may exist: it will be replaced).
        what: how the caller names it in messages, e.g. ``"--out model.pt"``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: ``path`` is a folder, a folder above it is a file, or no file can be created in the
            nearest existing folder above it (missing folders are created when the file is written).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what}: {path} is a folder; give a file path, e.g. {path / 'NAME'}")
    _probe(_existing_parent(path, what), what)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Check that ``path`` is, or can be created as, a folder that accepts new files.

    Args:
        path: the output folder; created later by the writer if it does not exist, with any missing folders above.
        what: how the caller names it in messages, e.g. ``"--report report/"``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: ``path`` or a folder above it is a file, or no file can be created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what}: {path} is a file, not a folder; give a folder (it is created if missing)")
    _probe(path if path.is_dir() else _existing_parent(path, what), what)
    return path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; rename it to ``path`` when the block ends normally.

    On any exception the temporary file is removed and ``path`` is left as it was (absent, or the previous file):
    an interrupted or failed write never leaves a partial file under either name.

    Example::

        with atomic_write("scores.csv") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # outputs may name folders that do not exist yet
    # The process id keeps concurrent writers (DataLoader workers, ranks) off each other's temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
        if _written is not None:
            _written.append(path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable: nothing was written
            pass


@contextmanager
def recording_writes() -> Iterator[list[Path]]:
    """Within the block, the list of files ``atomic_write`` completes, in order: what a command had written when it
    was interrupted (``cli.py`` names them). Blocks nest; the outer list does not see the inner block's files."""
    global _written
    outer, _written = _written, []
    try:
        yield _written
    finally:
        _written = outer
