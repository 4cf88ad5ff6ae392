"""retain_freed_memory: freed large tensors are reused instead of page-faulted in again (counted, not timed)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from fre_torch.core.allocator import DEFAULT_RETAIN_BYTES, ENV_OPT_OUT, retain_freed_memory, retain_requested

# A child process allocates, fills and frees a 64 MiB tensor 16 times and prints the minor page faults of the last 10
# (the first ones fault their pages in whatever the setting, and let the heap reach its size). 64 MiB is above glibc's
# largest dynamic mmap threshold. One thread: the intra-op pool's own small allocations can land above a freed block
# and make the heap grow once more at a random point (measured with 2 threads and 1 warm-up: 16,384 or 32,768 faults;
# with 1 thread and 3 warm-ups: 0 in 32 of 32 runs). After building a detector a small allocation can also split the
# freed block a few times more (3 warm-ups: 65,536 faults in 4 of 12 runs; 6 warm-ups: at most 16,384 in 16 runs).
_CHILD = """
import resource, sys, torch
from fre_torch.core.allocator import retain_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "retain":
    assert retain_freed_memory()
elif sys.argv[1] == "detector":  # what a plain Python user does: build a detector, nothing else
    from fre_torch import DetectorConfig, FREDetector
    FREDetector(DetectorConfig(input_size=64), device="cpu", pretrained=False)
for _ in range(6):
    torch.empty(1 << 24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(1 << 24).fill_(1.0)  # 2**24 float32 = 64 MiB = 16,384 pages of 4 KiB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _faults(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


@pytest.mark.full
@pytest.mark.skipif(not _GLIBC, reason="mallopt thresholds exist only in glibc (Linux)")
def test_retained_memory_is_reused_without_page_faults() -> None:
    default, retained = _faults("default"), _faults("retain")
    import resource  # Unix only

    pages = (1 << 26) // resource.getpagesize()  # of one 64 MiB tensor
    if default < 10 * pages // 4:
        pytest.skip(f"{default} faults for 10 fresh 64 MiB blocks: huge pages make faulting cheap on this machine")
    # Without the setting every allocation is a fresh mmap whose pages all fault in again (10 x 16,384 here). With it
    # the freed block comes back from the heap, already faulted in: fewer faults than one block has pages.
    assert retained < pages, (retained, default)


@pytest.mark.full
@pytest.mark.skipif(not _GLIBC, reason="mallopt thresholds exist only in glibc (Linux)")
def test_a_cpu_detector_applies_the_setting_unless_opted_out() -> None:
    """A plain Python process that builds a detector for the CPU gets what ``cli.py`` gets, with no call to know
    of; ``FRE_TORCH_RETAIN_MEMORY=0`` opts out."""
    import os
    import resource

    pages = (1 << 26) // resource.getpagesize()
    opted_out = _faults("detector", {**os.environ, ENV_OPT_OUT: "0"})
    if opted_out < 10 * pages // 4:
        pytest.skip(f"{opted_out} faults for 10 fresh 64 MiB blocks: huge pages make faulting cheap on this machine")
    env = {k: v for k, v in os.environ.items() if k != ENV_OPT_OUT}
    # The freed blocks come back from the heap: a block's pages or two at most (the detector's own allocations can
    # make the heap grow once more), against every page of all ten blocks opted out.
    assert _faults("detector", env) <= 2 * pages < opted_out // 4, opted_out


def test_threshold_is_validated() -> None:
    for bad in (0, 1000, -1, 2.5, True, "1G"):
        with pytest.raises(ValueError, match="at least 1 MiB"):
            retain_freed_memory(bad)  # type: ignore[arg-type]
    assert DEFAULT_RETAIN_BYTES >= 1 << 30


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("1", True), ("0", False), ("off", False),
                                                 ("False", False), (" no ", False), ("yes", True)])
def test_opt_out_variable(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv(ENV_OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(ENV_OPT_OUT, value)
    assert retain_requested() is expected


@pytest.mark.parametrize(("value", "called"), [(None, True), ("0", False)])
def test_cli_sets_it_at_start_unless_opted_out(monkeypatch: pytest.MonkeyPatch, tmp_path, value, called) -> None:
    import cli
    import fre_torch.core.allocator as allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda threshold=DEFAULT_RETAIN_BYTES: calls.append(1))
    if value is None:
        monkeypatch.delenv(ENV_OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(ENV_OPT_OUT, value)
    # A run that fails on its input still starts with the setting (it must come before any tensor exists).
    assert cli.main(["evaluate", "--dataset_directory", str(tmp_path / "missing")]) == 2
    assert calls == ([1] if called else [])
