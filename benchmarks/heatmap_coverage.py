"""Where heatmaps put colour: on normal images, and outside the defect's outline on defective ones.

    python -m benchmarks.heatmap_coverage --label after [--sets bottle screw] \
        [--json benchmarks/results/heatmap_coverage.json]

For each set, ``cli.py evaluate --dataset_directory ROOT --object_category CAT --save_heatmaps DIR`` runs through the
CLI's own parser and code path (defaults: efficientnet_lite0, 224 px, the map head's 14 x 14 grid), then the PNGs it
wrote are read back. A pixel is **coloured** where the overlay panel differs from the image panel: what a person
sees (a value whose overlay rounds back to the image's own pixel counts as plain). Figures per set:

- ``normal_coloured``: coloured pixels / all pixels of the normal test images ("a violet wash over normal images");
- ``normal_images_plain``: normal test images with no coloured pixel at all;
- ``outside_mask``: coloured pixels outside the ground-truth mask / all coloured pixels, over the defective test
  images with a mask ("blobs that spill past the defect's outline");
- ``mask_coloured``: mask pixels coloured / all mask pixels (how much of the defects still gets colour);
- ``pixel_auroc``, ``pro``: evaluate's figures, which rendering must not move.

``variants`` recomputes the last three from the kept grid maps, exactly (``t > 0``, i.e. value > the colour floor,
no rounding), for other ways of bringing the grid map to the image's size: bilinear (antialiased: what
``upsample_maps`` and the pixel metrics use), bicubic and nearest, and bilinear with the floor at 0 (the rendering
before the floor); so a rendering-only change can be judged without touching the pixel metrics. Each variant adds
where the outside colour lies: ``outside_far``, coloured pixels more than one grid cell (chessboard distance) from
the mask / all coloured pixels (what is not a blob reaching past the outline at the grid's resolution, but colour
elsewhere), and ``ink_outside``, the share of the opacity (``t`` summed) that falls outside the mask. ``--label`` names the entry in the results file (e.g. ``before`` / ``after`` a change);
other labels' entries are kept. Run it with ``OMP_NUM_THREADS=1`` on a shared machine: it measures areas, not time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.common import REPO, data_root

SETS = {"bottle": ("mvtec_bottle", "bottle"), "screw": ("mvtec_screw", "screw"),
        "magnetic_tile": ("magnetic_tile", "magnetic_tile")}
RESULTS = REPO / "benchmarks" / "results" / "heatmap_coverage.json"
MODES = ("bilinear", "bicubic", "nearest")  # grid map -> image size


def _upsample(grid: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """``(g, g)`` -> ``(H, W)`` float32; bilinear as ``fre_torch.detection.detector.upsample_maps``."""
    x = grid[None, None].float()
    if mode == "nearest":
        return F.interpolate(x, size=hw, mode="nearest")[0, 0]
    return F.interpolate(x, size=hw, mode=mode, antialias=True, align_corners=False)[0, 0]


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """``(H, W)`` bool -> pixels within chessboard distance ``r`` of the mask (a box sum from 2-d prefix sums)."""
    x = F.pad(mask.to(torch.int64), (r + 1, r, r + 1, r)).cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (x[k:, k:] - x[:-k, k:] - x[k:, :-k] + x[:-k, :-k]) > 0


class _Tally:
    """Pixel counts over one set's test images."""

    def __init__(self) -> None:
        self.normal_px = self.normal_col = self.normal_images = self.normal_plain = 0
        self.col = self.col_out = self.col_far = self.mask_px = self.mask_col = 0
        self.ink = self.ink_out = 0.0

    def add(self, coloured: torch.Tensor, mask: torch.Tensor | None, label: int, t: torch.Tensor | None = None,
            near: torch.Tensor | None = None) -> None:
        if label == 0:
            n = int(coloured.sum())
            self.normal_px += coloured.numel()
            self.normal_col += n
            self.normal_images += 1
            self.normal_plain += n == 0
        elif mask is not None:
            self.col += int(coloured.sum())
            self.col_out += int((coloured & ~mask).sum())
            self.mask_px += int(mask.sum())
            self.mask_col += int((coloured & mask).sum())
            if near is not None:
                self.col_far += int((coloured & ~near).sum())
            if t is not None:
                self.ink += float(t.double().sum())
                self.ink_out += float(t[~mask].double().sum())

    def figures(self) -> dict[str, Any]:
        out = {"normal_coloured": self.normal_col / max(1, self.normal_px),
               "normal_images_plain": f"{self.normal_plain} of {self.normal_images}",
               "outside_mask": self.col_out / max(1, self.col),
               "mask_coloured": self.mask_col / max(1, self.mask_px)}
        if self.ink:
            out.update(outside_far=self.col_far / max(1, self.col), ink_outside=self.ink_out / self.ink)
        return out


def measure(name: str, root: Path) -> dict[str, Any]:
    import cli
    from fre_torch.features.images import load_mask
    from fre_torch.jobs import run
    from fre_torch.jobs.heatmaps import heatmap_names

    folder, category = SETS[name]
    with tempfile.TemporaryDirectory() as tmp:
        heat = Path(tmp) / "heat"
        args = cli._parser().parse_args(["evaluate", "--dataset_directory", str(root / folder), "--object_category",
                                         category, "--save_heatmaps", str(heat)])
        t0 = time.perf_counter()
        result = cli.cmd_evaluate(args, run)
        seconds = time.perf_counter() - t0
        r = result.results[next(iter(result.results))][category]
        floor = float(r.get("map_floor", 0.0))  # absent before the colour floor existed: colour started at 0
        scale = float(r["map_scale"])
        variants = [(mode, mode, floor) for mode in MODES] + [("bilinear, floor 0", "bilinear", 0.0)]
        seen, exact = _Tally(), {name: _Tally() for name, _, _ in variants}
        names = heatmap_names(r["paths"])
        grid_h = r["grid_maps"].shape[1]
        for path, file_name, mask_path, label, grid in zip(r["paths"], names, r["mask_paths"], r["labels"],
                                                           r["grid_maps"]):
            with Image.open(heat / category / file_name) as img:
                arr = torch.from_numpy(np.asarray(img.convert("RGB")).copy())
            h, w = arr.shape[0], arr.shape[1] // 3
            coloured = (arr[:, w:2 * w] != arr[:, :w]).any(dim=2)
            mask = load_mask(mask_path) if mask_path is not None else None
            seen.add(coloured, mask, label)
            near = _dilate(mask, round(h / grid_h)) if mask is not None else None  # within one grid cell
            for variant, mode, start in variants:
                value = _upsample(grid, (h, w), mode)
                t = ((value - start) / (scale - start)).clamp(0.0, 1.0)
                exact[variant].add(value > start, mask, label, t, near)
    return {"set": name, "n_test": len(r["paths"]), "evaluate_s": seconds, "map_floor": floor, "map_scale": scale,
            "pixel_auroc": r.get("pixel_auroc"), "pro": r.get("pro"), "image_auroc": r["image_auroc"],
            **seen.figures(), "variants": {mode: t.figures() for mode, t in exact.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="the entry's name in the results file, e.g. before / after")
    p.add_argument("--sets", nargs="+", default=["bottle", "screw"], choices=sorted(SETS))
    p.add_argument("--root_dir", default=None, help="the data sets' parent folder (default: $FRE_TORCH_DATA or "
                                                    "../shared/data)")
    p.add_argument("--json", default=str(RESULTS))
    a = p.parse_args()
    root = Path(a.root_dir) if a.root_dir else data_root()
    entries = []
    for name in a.sets:
        e = measure(name, root)
        entries.append(e)
        print(f"{a.label} {name}: {e['n_test']} test images, evaluate --save_heatmaps {e['evaluate_s']:.0f} s "
              f"({torch.get_num_threads()} threads); floor {e['map_floor']:.4g}, scale {e['map_scale']:.4g}; "
              f"normal pixels coloured {e['normal_coloured']:.2%} ({e['normal_images_plain']} normal images plain); "
              f"coloured pixels outside the masks {e['outside_mask']:.2%}; mask pixels coloured "
              f"{e['mask_coloured']:.2%}; pixel AUROC {e['pixel_auroc']:.4f}, PRO {e['pro']:.4f}")
        for variant, v in e["variants"].items():
            print(f"    value > floor, {variant:17s}: normal {v['normal_coloured']:.2%}, outside "
                  f"{v['outside_mask']:.2%} (beyond one cell {v['outside_far']:.2%}; opacity outside "
                  f"{v['ink_outside']:.2%}), mask {v['mask_coloured']:.2%}")
    path = Path(a.json)
    doc = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    doc[a.label] = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "sets": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
