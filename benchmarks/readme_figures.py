"""The README's times and figures, measured the way a user meets them: whole commands in new processes.

    python -m benchmarks.readme_figures                  # demo, verify, export, crossfit (about 5 minutes, 2 cores)
    python -m benchmarks.readme_figures --parts fast_suite ci   # the fast subset; .ci/run on a clean clone (30 min)
    python -m benchmarks.readme_figures --check          # the README says what the results file holds (no measuring)

Each part writes its figures, the machine and the load average it ran under into
``benchmarks/results/readme_figures.json`` (other parts' entries are kept), and prints the README phrases they give.
``--check`` fails when a phrase of ``PHRASES`` is not in the README as the results file fills it in, so a re-run that
changes a figure shows which README line to update (``tests/test_first_hour.py`` runs ``--check``).

Parts:
    demo      ``python cli.py demo`` (generate the synthetic set, evaluate it), wall time of ``--repeat`` runs.
    verify    the pre-run readability check (``fre_torch.features.verify``) on magnetic_tile's files, against a full
              decode of the same files.
    export    ``fit`` on MVTec bottle's training images, then ``export`` to ONNX and TorchScript checked on its test
              images: the largest relative difference to torch that ``export`` prints.
    crossfit  ``evaluate`` bottle, plain and with ``--save_heatmaps`` (which adds the 5-fold cross-fit of the training
              images and the drawing), whole process.
    fast_suite  ``python -m pytest`` (the fast subset): wall time and counts.
    ci        ``bash .ci/run`` in a clean clone of the checkout's commit (a new virtual environment, the README's
              install, then the full suite ``python -m pytest --full``): wall time of the whole and of the suite, and
              its counts.
    Both leave out the one test that checks these figures (``PYTEST_ADDOPTS``): while they are measured, the
    figures are not yet known.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "readme_figures.json"
README = REPO / "README.md"
PARTS = ("demo", "verify", "export", "crossfit", "fast_suite", "ci")
DEFAULT_PARTS = ("demo", "verify", "export", "crossfit")

# part -> the README phrases its figures fill in (whitespace-normalised; ``{part[key]}`` reads the results file).
PHRASES = {
    "demo": ["`python cli.py demo` took {demo[min_s]:.1f}-{demo[max_s]:.1f} s (whole process, {demo[runs]} runs, "
             "{demo[cores]}-core CPU, load average {demo[load_1min]:.1f} at the start, "
             "{demo[load_1min_after]:.1f} at the end)"],
    "verify": ["checking magnetic_tile's {verify[files]:,} files takes {verify[verify_s]:.2f} s against "
               "{verify[decode_s]:.1f} s to decode them ({verify[cores]}-core CPU)"],
    "export": ["On bottle the measured difference is {export[onnx_score]:.1e} (ONNX) and "
               "{export[torchscript_score]:.1e} (TorchScript) on the score, {export[onnx_map]:.1e} and "
               "{export[torchscript_map]:.1e} on the map"],
    "crossfit": ["`evaluate` bottle takes {crossfit[plain_s]:.0f} s, {crossfit[heatmaps_s]:.0f} s with "
                 "`--save_heatmaps` ({crossfit[cores]}-core CPU, whole process, load average "
                 "{crossfit[load_1min]:.1f} at the start, {crossfit[load_1min_after]:.1f} at the end)"],
    "fast_suite": ["`python -m pytest` ran {fast_suite[passed]} tests in {fast_suite[min]:.1f} min on a "
                   "{fast_suite[cores]}-core CPU shared with other work (load average {fast_suite[load_1min]:.1f} at "
                   "the start, {fast_suite[load_1min_after]:.1f} at the end)"],
    "ci": ["`bash .ci/run` on a clean clone took {ci[min]:.0f} min, {ci[suite_min]:.0f} of them for `python -m pytest "
           "--full` ({ci[passed]} passed, {ci[skipped]} skipped; load average {ci[load_1min]:.1f} at the start, "
           "{ci[load_1min_after]:.1f} at the end)"],
}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def phrases(results: dict) -> dict[str, list[str]]:
    """The README phrases of every measured part."""
    return {part: [p.format(**results) for p in templates] for part, templates in PHRASES.items() if part in results}


def check(results: dict) -> list[str]:
    """What is wrong: parts never measured, and phrases missing from the README (empty: it says what the results
    file holds)."""
    readme = _normalise(README.read_text(encoding="utf-8"))
    unmeasured = [f"(part {part} not measured: run --parts {part})" for part in PHRASES if part not in results]
    return unmeasured + [p for ps in phrases(results).values() for p in ps if _normalise(p) not in readme]


def _context() -> dict:
    from benchmarks.common import machine

    return {"machine": machine(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
            "when": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _cli(*args: str, cwd: Path) -> tuple[float, str]:
    """Wall time and stdout of ``python cli.py ARGS``; a failure stops the benchmark with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds, proc.stdout


def _category(folder: str, name: str) -> Path:
    from benchmarks.common import data_root

    root = data_root() / folder
    if not (root / name / "train" / "good").is_dir():
        raise SystemExit(f"{name} not found under {root}: set FRE_TORCH_DATA (README, 'Tests and benchmarks')")
    return root


def measure_demo(repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(_cli("demo", cwd=Path(tmp))[0])
    return {"runs": repeat, "min_s": min(times), "max_s": max(times), "seconds": times, "images": 2 * (40 + 30)}


def measure_verify() -> dict:
    from PIL import Image

    from fre_torch.features.images import list_images
    from fre_torch.features.verify import unreadable

    files = list_images(_category("magnetic_tile", "magnetic_tile") / "magnetic_tile")
    unreadable(files)  # warm the page cache: both timings read files from memory
    t0 = time.perf_counter()
    bad = unreadable(files)
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.load()
    decode_s = time.perf_counter() - t0
    return {"files": len(files), "unreadable": len(bad), "verify_s": verify_s, "decode_s": decode_s,
            "ratio": decode_s / verify_s}


_DIFF = re.compile(r"max relative difference score ([\d.e+-]+), map ([\d.e+-]+)")


def measure_export() -> dict:
    bottle = _category("mvtec_bottle", "bottle") / "bottle"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["fit_s"], _ = _cli("fit", "--train_dir", str(bottle / "train" / "good"), "--out", "model.pt", cwd=tmp)
        for fmt, file in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
            seconds, stdout = _cli("export", "--model_file", "model.pt", "--format", fmt, "--out", file,
                                   "--check_images", str(bottle / "test"), cwd=tmp)
            score, amap = map(float, _DIFF.search(stdout).groups())
            out.update({f"{fmt}_s": seconds, f"{fmt}_score": score, f"{fmt}_map": amap})
    return out


def measure_crossfit() -> dict:
    root = _category("mvtec_bottle", "bottle")
    common = ("evaluate", "--dataset_directory", str(root), "--object_category", "bottle")
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, _ = _cli(*common, cwd=Path(tmp))
        heatmaps_s, _ = _cli(*common, "--save_heatmaps", "heat", cwd=Path(tmp))
    return {"plain_s": plain_s, "heatmaps_s": heatmaps_s, "ratio": heatmaps_s / plain_s}


# Left out of the measured runs: the test of these figures, which are not yet known while they are measured.
_FIGURES_TEST = "tests/test_first_hour.py::test_readme_figures_are_those_of_the_benchmark"
_COUNTS = re.compile(r"(\d+) (passed|skipped|deselected|failed|errors?)")


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Minutes and output of ``command`` with the figures' test deselected; a failure stops the benchmark."""
    env = {**env, "PYTEST_ADDOPTS": f"--deselect {_FIGURES_TEST}"}
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}): {proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return minutes, proc.stdout


def _summary(stdout: str) -> dict:
    """pytest's last line as counts (passed, skipped, deselected) and its own time, ``suite_min``."""
    last = [line for line in stdout.splitlines() if _COUNTS.search(line) and " in " in line][-1]
    seconds = float(re.search(r" in ([\d.]+)s", last).group(1))
    return {**{kind: int(n) for n, kind in _COUNTS.findall(last)}, "suite_min": seconds / 60}


def measure_fast_suite() -> dict:
    minutes, stdout = _timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], REPO, dict(os.environ))
    return {"min": minutes, **_summary(stdout)}


def measure_ci() -> dict:
    """``bash .ci/run`` in a clean clone of HEAD (uncommitted changes are not in it)."""
    with tempfile.TemporaryDirectory(prefix="fre_torch_ci_") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        # As on a new machine: nothing of this checkout's environment (PYTHONPATH, FRE_TORCH_DATA, a venv).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FRE_TORCH_DATA", "VIRTUAL_ENV")}
        minutes, stdout = _timed(["bash", ".ci/run"], clone, env)
    return {"min": minutes, "commit": _commit(), **_summary(stdout)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    p.add_argument("--repeat", type=int, default=3, help="runs of the demo (default 3)")
    p.add_argument("--check", action="store_true", help="only check the README against the results file")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    if args.check:
        missing = check(results)
        if missing:
            print("README figures differ from benchmarks/results/readme_figures.json; the README should say:")
            print("\n".join(f"  {p}" for p in missing))
            return 1
        print(f"README figures match benchmarks/results/readme_figures.json ({sum(map(len, phrases(results).values()))}"
              " phrases)")
        return 0
    measure = {"demo": lambda: measure_demo(args.repeat), "verify": measure_verify, "export": measure_export,
               "crossfit": measure_crossfit, "fast_suite": measure_fast_suite, "ci": measure_ci}
    for part in args.parts:
        context = _context()
        results[part] = {**measure[part](), **context, "load_1min_after": os.getloadavg()[0]}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"{part}: " + " | ".join(phrases(results)[part]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
