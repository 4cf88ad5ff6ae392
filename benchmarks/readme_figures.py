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
    accuracy  ``evaluate`` on bottle, magnetic_tile and screw: the default, one head (``--map_layers none
              --image_score fre``) and the 448 px map pass; image AUROC / pixel AUROC / PRO (docs/method.md's table)
              and magnetic_tile's whole-process time.
    backbones ``evaluate`` with efficientnet_lite1 / lite2 (and the default's figures of ``accuracy``), and ``fit`` on
              bottle per backbone: the model file's size (docs/method.md, "Bigger backbones").
    threshold ``fit`` on each set's ``train/good`` (20 % held out), ``predict`` on its normal test images: the
              threshold's place, its 95 % interval and the flagged normal test images (README's threshold table).
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
DOCS = REPO / "docs"  # the pages the README links: their figures are checked as the README's
PARTS = ("demo", "verify", "export", "crossfit", "accuracy", "backbones", "threshold", "fast_suite", "ci")
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
    "accuracy": [f"| {name} | {{accuracy[default][{name}]}} | {{accuracy[one_head][{name}]}} | "
                 f"{{accuracy[map448][{name}]}} |" for name in ("bottle", "magnetic_tile", "screw")] + [
                 "| `evaluate` magnetic_tile, whole process | {accuracy[seconds][default]:.1f} s | "
                 "{accuracy[seconds][one_head]:.1f} s ({accuracy[ratio][one_head]:.2f}x) | "
                 "{accuracy[seconds][map448]:.1f} s ({accuracy[ratio][map448]:.1f}x) |"],
    "backbones": [f"| `{model}` ({{backbones[{model}][input]}}{', default' if model.endswith('0') else ''}) | "
                  f"{{backbones[{model}][image]}} | {{backbones[{model}][pro]}} | {{backbones[{model}][img_s]:.0f}} | "
                  f"{{backbones[{model}][model_mb]:.0f}} MB |"
                  for model in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")],
    "threshold": [f"| {name} | {{threshold[{name}][n_held_out]}} | {{threshold[{name}][place]}} | "
                  f"{{threshold[{name}][interval]}} | {{threshold[{name}][flagged]}} |"
                  for name in ("bottle", "magnetic_tile", "screw")] + [
                  "({threshold[needed]:,} held-out, i.e. about {threshold[needed_total]:,.0f} normal images at "
                  "the default hold-out)",
                  "(EfficientNet-Lite0: {threshold[bottle][model_mb]:.0f} MB fitted on {threshold[bottle][n_fit]} bottle "
                  "images with the detail head, {threshold[magnetic_tile][model_mb]:.0f} MB on "
                  "{threshold[magnetic_tile][n_fit]} magnetic tiles without it"],
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
    readme = _normalise("\n".join(p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.glob("*.md"))]))
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


SETS = {"bottle": "mvtec_bottle", "magnetic_tile": "magnetic_tile", "screw": "mvtec_screw"}
_CONFIGS = {"default": (), "one_head": ("--map_layers", "none", "--image_score", "fre"),
            "map448": ("--map_input_size", "448", "--map_pool", "4")}


def _evaluate(name: str, flags: tuple[str, ...], tmp: Path) -> tuple[float, dict]:
    """Whole-process seconds and the category's JSON entry of ``cli.py evaluate`` on one data set."""
    root = _category(SETS[name], name)
    seconds, _ = _cli("evaluate", "--dataset_directory", str(root), "--object_category", name, "--json", "r.json",
                      *flags, cwd=tmp)
    return seconds, json.loads((tmp / "r.json").read_text(encoding="utf-8"))["categories"][name]


def _triple(got: dict) -> str:
    return " / ".join(f"{got[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro"))


def measure_accuracy() -> dict:
    out: dict = {name: {} for name in _CONFIGS}
    seconds: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config, flags in _CONFIGS.items():
            for name in SETS:
                t, got = _evaluate(name, flags, Path(tmp))
                out[config][name] = _triple(got)
                out[config][f"{name}_raw"] = got
                if name == "magnetic_tile":
                    seconds[config] = t
    return {**out, "seconds": seconds, "ratio": {k: v / seconds["default"] for k, v in seconds.items()}}


def measure_backbones() -> dict:
    from fre_torch.features.backbones import get_backbone_spec

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
            got = {name: _evaluate(name, ("--model", model), tmp)[1] for name in SETS}
            bottle = _category("mvtec_bottle", "bottle") / "bottle" / "train" / "good"
            _cli("fit", "--train_dir", str(bottle), "--out", "m.pt", "--model", model, cwd=tmp)
            out[model] = {"input": get_backbone_spec(model).input_size,
                          "image": " / ".join(f"{got[n]['image_auroc']:.3f}" for n in SETS),
                          "pro": " / ".join(f"{got[n]['pro']:.3f}" for n in SETS),
                          "img_s": got["magnetic_tile"]["test_images_per_second"],
                          "model_mb": (tmp / "m.pt").stat().st_size / 1e6, "raw": got}
    return out


def measure_threshold() -> dict:
    import csv

    from fre_torch import FREDetector
    from fre_torch.detection.threshold import _ordinal, _percent, held_out_needed

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in SETS:
            category = _category(SETS[name], name) / name
            _cli("fit", "--train_dir", str(category / "train" / "good"), "--out", "m.pt", cwd=tmp)
            _cli("predict", "--model_file", "m.pt", str(category / "test" / "good"), "--out", "p", cwd=tmp)
            stats = FREDetector.load(tmp / "m.pt").threshold_stats()
            with open(tmp / "p" / "predictions.csv", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            flagged = sum(r["is_anomalous"] == "1" for r in rows)
            n = stats.n_held_out
            place = (f"above all {n}" if stats.rank >= n else f"between the {_ordinal(stats.rank)} and "
                     f"{_ordinal(stats.rank + 1)}{' (the largest)' if stats.rank + 1 == n else ''}")
            share = f" ({100 * flagged / len(rows):.1f} %)" if flagged else ""
            det = FREDetector.load(tmp / "m.pt")
            out[name] = {"n_held_out": n, "place": place,
                         "interval": f"{_percent(stats.rate_low)}-{_percent(stats.rate_high)}",
                         "flagged": f"{flagged} of {len(rows)}{share}", "stats": stats.to_dict(),
                         "model_mb": (tmp / "m.pt").stat().st_size / 1e6,
                         "n_fit": int(det.subspaces[0].n_samples), "detail": "detail" in det.heads}
    needed = held_out_needed(0.99)
    return {**out, "needed": needed, "needed_total": round(needed / 0.2, -1)}


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
               "crossfit": measure_crossfit, "accuracy": measure_accuracy, "backbones": measure_backbones,
               "threshold": measure_threshold, "fast_suite": measure_fast_suite, "ci": measure_ci}
    for part in args.parts:
        context = _context()
        results[part] = {**measure[part](), **context, "load_1min_after": os.getloadavg()[0]}
        RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"{part}: " + " | ".join(phrases(results)[part]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
