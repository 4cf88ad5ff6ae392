"""Keep freed CPU memory in the process, so large tensors reuse pages instead of faulting fresh ones in.

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above its mmap threshold (at most 32 MiB with
the default dynamic threshold) with a fresh ``mmap`` and unmaps it on free, so each large activation of a backbone
(Lite0's first blocks at batch 32 and 224 px: 50-150 MB each) is page-faulted in again, page by page, on every batch.
On the 2-core VM of BENCHMARKS.md that fault-in cost half of the backbone's time (15.2 -> 7.5 ms per image to
``blocks.14``). Raising the mmap and trim thresholds makes glibc keep freed blocks in the heap and hand them out
again; the peak of live memory is unchanged, but the process keeps up to ``threshold`` bytes of freed memory instead
of returning it to the system at once.

This changes a process-wide setting, so it is made where it is used, never on import: ``FREDetector`` applies it
when it is built for the CPU (``retain_if_requested``, once per process), and ``cli.py`` at start. Set
``FRE_TORCH_RETAIN_MEMORY=0`` to opt out of both. On anything but glibc Linux it does nothing and returns False
(macOS and Windows allocators cache large blocks already; musl has no such setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

__all__ = ["DEFAULT_RETAIN_BYTES", "ENV_OPT_OUT", "retain_freed_memory", "retain_if_requested", "retain_once",
           "retain_requested"]

# Covers the largest activations of the registered backbones at their default sizes and batch 32 (EfficientNet-B5 at
# 456 px: about 1 GB for its widest expansion), so none of them goes back to mmap.
DEFAULT_RETAIN_BYTES = 1 << 30
ENV_OPT_OUT = "FRE_TORCH_RETAIN_MEMORY"

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_requested() -> bool:
    """False when the environment opts out (``FRE_TORCH_RETAIN_MEMORY`` set to 0, false, no or off)."""
    return os.environ.get(ENV_OPT_OUT, "1").strip().lower() not in ("0", "false", "no", "off")


def retain_freed_memory(threshold: int = DEFAULT_RETAIN_BYTES) -> bool:
    """Make glibc keep freed blocks of up to ``threshold`` bytes for reuse instead of unmapping them.

    Sets ``M_MMAP_THRESHOLD`` (blocks up to ``threshold`` come from the heap, not from a fresh mmap) and
    ``M_TRIM_THRESHOLD`` (up to ``threshold`` freed bytes stay at the top of the heap). Process-wide and permanent;
    DataLoader workers forked afterwards inherit it.

    Args:
        threshold: Bytes, >= 1 MiB.

    Returns:
        True when glibc accepted both settings; False on other platforms or C libraries (nothing changed).

    Raises:
        ValueError: ``threshold`` below 1 MiB (smaller than glibc's own default, so it would make things worse).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1 << 20:
        raise ValueError(f"threshold must be an int of at least 1 MiB (1048576 bytes), got {threshold!r}")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    value = min(threshold, 2**31 - 1)  # mallopt takes a C int
    # mallopt returns 1 on success, 0 when it refuses (e.g. a glibc that caps the mmap threshold).
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


def retain_if_requested(threshold: int = DEFAULT_RETAIN_BYTES) -> bool:
    """``retain_freed_memory(threshold)`` unless the environment opts out (``retain_requested``): what a driver
    (``cli.py``, the benchmark scripts) calls at start, before any tensor exists. True when the setting was applied."""
    return retain_requested() and bool(retain_freed_memory(threshold))


_APPLIED: bool | None = None


def retain_once() -> bool:
    """``retain_if_requested()`` the first time it is called in a process; its result again after that (the setting
    is process-wide and permanent, and finding glibc reads the interpreter's binary). What ``FREDetector`` calls."""
    global _APPLIED
    if _APPLIED is None:
        _APPLIED = retain_if_requested()
    return _APPLIED
