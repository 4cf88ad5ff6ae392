"""Pack a subset of the real data sets into ``.gpu_data/`` (git-ignored), small enough for the device tool's carry.

    python -m benchmarks.pack_gpu_data [--max_mb 40] [--src ../shared/data]

The device machine sees only the checkout, and a call carries at most 64 MiB of it, so ``gpu_check``'s real-data
sections read this pack there (``run(carry=[".gpu_data", ...])``). The AUROC there compares the GPU with the CPU on
the same images, so a subset is a fair check. Per set: the same fraction of every image folder, spread over it in
order, with the masks of the kept defective images. Prints what it packed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.common import REPO, data_root

SETS = (("mvtec_bottle", "bottle"), ("magnetic_tile", "magnetic_tile"), ("mvtec_screw", "screw"))


def pack(src: Path, dst: Path, max_mb: float) -> dict[str, dict[str, int]]:
    """Copy an even share of each image folder of each set (``train/good`` and every ``test/<defect>``, the same
    fraction everywhere, at least 2 per folder) with the masks of the kept defective images into ``dst``, so that
    the pack stays under ``max_mb``. Returns the images kept per set and folder."""
    budget = max_mb * 2**20 / len(SETS)
    kept: dict[str, dict[str, int]] = {}
    if dst.exists():
        shutil.rmtree(dst)
    for folder, name in SETS:
        cat = src / folder / name
        if not (cat / "train" / "good").is_dir():
            continue
        groups = [cat / "train" / "good"] + sorted(d for d in (cat / "test").iterdir() if d.is_dir())
        files = {g: sorted(p for p in g.iterdir() if p.is_file()) for g in groups}
        total = sum(p.stat().st_size for fs in files.values() for p in fs)
        fraction = min(1.0, budget / max(total, 1) * 0.9)  # masks take the last tenth
        kept[name] = {}
        for g, fs in files.items():
            n = min(len(fs), max(2, round(len(fs) * fraction)))
            chosen = [fs[round(i * (len(fs) - 1) / max(n - 1, 1))] for i in range(n)]
            for p in chosen:
                targets = [p]
                mask = cat / "ground_truth" / g.name / f"{p.stem}_mask.png"
                if g.parent.name == "test" and mask.is_file():
                    targets.append(mask)
                for t in targets:
                    out = dst / folder / t.relative_to(src / folder)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(t, out)
            kept[name][str(g.relative_to(cat))] = n
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="the data sets (default: $FRE_TORCH_DATA or ../shared/data)")
    ap.add_argument("--dst", default=str(REPO / ".gpu_data"))
    ap.add_argument("--max_mb", type=float, default=40.0)
    args = ap.parse_args()
    kept = pack(Path(args.src) if args.src else data_root(), Path(args.dst), args.max_mb)
    size = sum(p.stat().st_size for p in Path(args.dst).rglob("*") if p.is_file()) / 2**20
    print(f"packed {size:.1f} MiB into {args.dst}: images kept per folder {kept}")


if __name__ == "__main__":
    main()
