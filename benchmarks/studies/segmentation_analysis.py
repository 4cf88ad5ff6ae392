"""Where a category's pooled pixel AUROC is lost: a per-defect-class breakdown of one detector's maps.

Decided (BENCHMARKS.md, "Where magnetic_tile's pixel AUROC is lost"): nothing in the defaults; it located the
loss (normal pixels of other defective images ranked above defective ones) and stays as an analysis tool.

    python -m benchmarks.studies.segmentation_analysis --root $FRE_TORCH_DATA/magnetic_tile --category magnetic_tile \
        [--layers blocks.8 blocks.14] [--pool 2] [--knn] [--json PATH]

Pixel AUROC pools every test pixel of every image: the defective pixels of all classes against the normal pixels
of all images, the normal pixels of defective images included. A low pooled figure can therefore come from three
different places, which call for different fixes; this script measures each, per defect class:

- ``pixel_auroc``: the class's images and the good images only (what a per-class table would show);
- ``vs_good``: the class's defective pixels against the pixels of good images only (detection of the pixels);
- ``within``: the mean AUROC inside each of the class's images (localisation within an image);
- ``far_leak``: the class's normal pixels lying more than ``--far`` pixels from any defective pixel, against the
  pixels of good images. 0.5 means they look like good images; near 1 means the whole defective image scores high,
  so its normal pixels outrank the faint defects of other images in the pooled metric.

Then two "what if" figures on the pooled metric (oracles, they use the masks; a diagnosis, not a method):
``if_no_far_leak`` sets those far normal pixels of every defective image to the map's minimum, and
``without_<class>`` drops the images of the class with the most defective pixels.

``image_far_leak`` is the far-leak of two plain image statistics instead of a map (grey level and its standard
deviation in 15 x 15 px windows): near 0.5 means the far regions of defective images are not brighter, darker or
rougher than good images, so what makes them score high comes from the features, not from the pixels.

``--knn`` adds the same breakdown for a patch nearest-neighbour map on the same features (a local method: each grid
cell's distance to the closest of 16,384 training cells, after 3 x 3 neighbourhood averaging), to show whether a
purely local score fares better on the same backbone. The detector and its features come from the library; only
the breakdown and the kNN baseline live here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import data_root
from fre_torch.jobs.allocator import retain_if_requested
from fre_torch.features.images import FeatureCache, ImageDataset, MVTecCategory, load_image, make_loader
from fre_torch.detection.detector import DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import evaluation_maps
from fre_torch.detection.metrics import auroc, pixel_auroc

FAR_PX = 32
KNN_BANK = 16384


def _auroc_of(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """AUROC of positive vs negative score samples (nan when either side is empty)."""
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos.flatten(), neg.flatten()])
    labels = torch.cat([torch.ones(pos.numel(), dtype=torch.bool), torch.zeros(neg.numel(), dtype=torch.bool)])
    return float(auroc(scores, labels))


def far_from(masks: torch.Tensor, far: int) -> torch.Tensor:
    """``(N, H, W)`` bool: normal pixels more than ``far`` pixels (Chebyshev) from any defective pixel of their image.
    Images without a defective pixel are all False (they have no 'far from the defect' region)."""
    if far < 0:
        raise ValueError(f"far must be >= 0 pixels, got {far}")
    near = F.max_pool2d(masks[:, None].float(), 2 * far + 1, stride=1, padding=far)[:, 0] > 0
    has = masks.flatten(1).any(1)[:, None, None]
    return ~near & has


def breakdown(maps: torch.Tensor, masks: torch.Tensor, defects: Sequence[str], *, far: int = FAR_PX) -> dict[str, Any]:
    """The per-class decomposition of the pooled pixel AUROC (see the module docstring).

    Args:
        maps: ``(N, H, W)`` float anomaly maps at the evaluation size.
        masks: ``(N, H, W)`` bool ground truth.
        defects: the defect class of each image, ``"good"`` for normal ones.
        far: distance in pixels beyond which a normal pixel of a defective image counts as far from the defect.

    Returns:
        ``{"pixel_auroc", "far_leak", "if_no_far_leak", "largest_class", "without_largest", "far_px", "classes":
        {name: {"images", "defect_pixel_share", "pixel_auroc", "vs_good", "within", "far_leak"}}}``.
    """
    if maps.shape != masks.shape or maps.ndim != 3 or len(defects) != maps.shape[0]:
        raise ValueError(f"maps {tuple(maps.shape)}, masks {tuple(masks.shape)} and {len(defects)} defect names "
                         "must describe the same (N, H, W) images")
    maps = maps.float()
    names = list(defects)
    good = torch.tensor([d == "good" for d in names])
    if not bool(good.any()) or not bool(masks.any()):
        raise ValueError("the breakdown needs good test images and at least one defective pixel")
    good_px = maps[good]
    far_px = far_from(masks, far)
    total_defect = int(masks.sum())
    classes: dict[str, Any] = {}
    for name in sorted(set(names) - {"good"}):
        sel = torch.tensor([d == name for d in names])
        m, k = maps[sel], masks[sel]
        within = [_auroc_of(mi[ki], mi[~ki]) for mi, ki in zip(m, k) if bool(ki.any()) and not bool(ki.all())]
        both = sel | good
        classes[name] = {
            "images": int(sel.sum()),
            "defect_pixel_share": int(k.sum()) / total_defect,
            "pixel_auroc": float(pixel_auroc(maps[both], masks[both])) if bool(k.any()) else float("nan"),
            "vs_good": _auroc_of(m[k], good_px),
            "within": sum(within) / len(within) if within else float("nan"),
            "far_leak": _auroc_of(m[far_px[sel]], good_px),
        }
    oracle = maps.clone()
    oracle[far_px] = maps.min()
    largest = max(classes, key=lambda c: classes[c]["defect_pixel_share"])
    keep = torch.tensor([d != largest for d in names])
    return {
        "pixel_auroc": float(pixel_auroc(maps, masks)),
        "far_leak": _auroc_of(maps[far_px], good_px),
        "if_no_far_leak": float(pixel_auroc(oracle, masks)),
        "largest_class": largest,
        "without_largest": float(pixel_auroc(maps[keep], masks[keep])) if bool(masks[keep].any()) else float("nan"),
        "far_px": far,
        "classes": classes,
    }


def local_statistics(images: torch.Tensor, window: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey level and its standard deviation in ``window`` x ``window`` neighbourhoods: ``(N, H, W)`` each, from
    ``(N, 3, H, W)`` images (channels averaged)."""
    grey = images.float().mean(1, keepdim=True)
    pad = window // 2
    mean = F.avg_pool2d(grey, window, stride=1, padding=pad, count_include_pad=False)
    sq = F.avg_pool2d(grey * grey, window, stride=1, padding=pad, count_include_pad=False)
    return mean[:, 0], (sq - mean * mean).clamp_min(0).sqrt()[:, 0]


def image_far_leak(images: torch.Tensor, masks: torch.Tensor, defects: Sequence[str], *,
                   far: int = FAR_PX) -> dict[str, float]:
    """Far-leak (see ``breakdown``) of the local grey level and local contrast instead of an anomaly map."""
    good = torch.tensor([d == "good" for d in defects])
    far_px = far_from(masks, far)
    mean, std = local_statistics(images)
    return {"grey_level": _auroc_of(mean[far_px], mean[good]), "contrast": _auroc_of(std[far_px], std[good])}


def knn_grid_maps(train: Sequence[torch.Tensor], test: Sequence[torch.Tensor], grid: int, *,
                  bank_size: int = KNN_BANK, seed: int = 0) -> torch.Tensor:
    """Patch nearest-neighbour maps ``(M, grid, grid)`` from per-layer feature rows.

    Args:
        train: per-layer rows ``[(N, C_l * grid * grid)]`` of the training images (the detector's features).
        test: the same for the test images ``[(M, ...)]``.
        grid: the side of the feature grid.

    Each cell's vector is its layers' channels after 3 x 3 neighbourhood averaging; its score is the Euclidean
    distance to the nearest of ``bank_size`` training cells drawn at random (seeded).
    """
    def cells(rows: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = torch.cat([r.float().view(r.shape[0], -1, grid, grid) for r in rows], dim=1)
        maps = F.avg_pool2d(maps, 3, stride=1, padding=1, count_include_pad=False)
        return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])

    bank = cells(train)
    pick = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(seed))[:bank_size]
    bank = bank[pick]
    query = cells(test)
    bank_sq = (bank * bank).sum(1)
    dist = torch.cat([((q * q).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq).amin(1)
                      for q in query.split(8192)])
    return dist.clamp_min(0).sqrt().view(-1, grid, grid)


def _rows(detector: FREDetector, loader: Any) -> list[torch.Tensor]:
    parts = [detector.features(batch["image"]) for batch in loader]
    return [torch.cat(layer) for layer in zip(*parts)]


def run(root: str, category: str, *, layers: Sequence[str] = (), pool: int = 2, knn: bool = False,
        far: int = FAR_PX, batch_size: int = 32) -> dict[str, Any]:
    """Fit efficientnet_lite0 FRE on the category, map its test images and break the pixel AUROC down."""
    t0 = time.perf_counter()
    cat = MVTecCategory.load(root, category)
    # One head (map_layers=None): the maps of exactly these layers, the analysed configuration.
    config = DetectorConfig(backbone="efficientnet_lite0", layers=tuple(layers), pool=pool, map_layers=None)
    grid = config.map_grid[0]  # square at the default input size
    # The kNN baseline reads the features a second time: keep them in memory (one backbone pass per image).
    detector = FREDetector(config, device="cpu", feature_cache=FeatureCache(None) if knn else None)
    size = config.input_size
    train = make_loader(ImageDataset(list(cat.train), size), batch_size, "cpu")
    test = make_loader(ImageDataset(cat.test_paths, size), batch_size, "cpu")
    detector.fit(train)
    with torch.inference_mode():
        _, grid_maps = detector.score_and_maps(test)
    maps, masks = evaluation_maps(cat, grid_maps)
    out: dict[str, Any] = {"category": category, "layers": list(config.layers), "pool": pool, "grid": grid,
                           "fre": breakdown(maps, masks, cat.defect_types, far=far)}
    h, w = masks.shape[-2:]
    if h == w:  # the evaluation size is square (MVTec, or mixed sizes compared at MIXED_SIZE_EVAL)
        images = torch.stack([load_image(p, h) for p in cat.test_paths])
        out["image_far_leak"] = image_far_leak(images, masks, cat.defect_types, far=far)
    if knn:
        with torch.inference_mode():
            knn_maps = knn_grid_maps(_rows(detector, train), _rows(detector, test), grid)
        out["knn"] = breakdown(evaluation_maps(cat, knn_maps)[0], masks, cat.defect_types, far=far)
    out["seconds"] = time.perf_counter() - t0
    return out


def markdown(result: dict[str, Any]) -> str:
    """One table per method: a row per defect class, then the pooled figures."""
    lines = []
    for method in ("fre", "knn"):
        if method not in result:
            continue
        b = result[method]
        lines += [f"**{method}** ({result['category']}, layers {' '.join(result['layers'])}, "
                  f"{result['grid']} x {result['grid']} grid): pooled pixel AUROC **{b['pixel_auroc']:.4f}**; "
                  f"far-leak {b['far_leak']:.3f}; if no far leak {b['if_no_far_leak']:.4f}; "
                  f"without {b['largest_class']} {b['without_largest']:.4f}", "",
                  "| class | images | share of defective pixels | pixel AUROC (class + good) | defective vs good "
                  f"pixels | within image | far-leak (> {b['far_px']} px) |",
                  "|---|---|---|---|---|---|---|"]
        for name, c in b["classes"].items():
            lines.append(f"| {name} | {c['images']} | {c['defect_pixel_share']:.1%} | {c['pixel_auroc']:.3f} | "
                         f"{c['vs_good']:.3f} | {c['within']:.3f} | {c['far_leak']:.3f} |")
        lines.append("")
    if "image_far_leak" in result:
        leak = result["image_far_leak"]
        lines.append(f"Far-leak of the pixels themselves (15 px windows): grey level {leak['grey_level']:.3f}, "
                     f"contrast {leak['contrast']:.3f}.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(data_root() / "magnetic_tile"))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--layers", nargs="*", default=[], help="efficientnet_lite0 layers (default: the detector's)")
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--far", type=int, default=FAR_PX, help="pixels from a defect beyond which 'far' starts")
    p.add_argument("--knn", action="store_true", help="add the patch nearest-neighbour baseline")
    p.add_argument("--json", help="write the figures there")
    args = p.parse_args(argv)
    retain_if_requested()  # as cli.py does
    result = run(args.root, args.category, layers=args.layers, pool=args.pool, knn=args.knn, far=args.far)
    print(markdown(result))
    print(f"({result['seconds']:.1f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
