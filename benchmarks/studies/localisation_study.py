"""Which configuration the two heads should default to: a measurement over bottle, magnetic_tile and screw.

Decided (BENCHMARKS.md, "Two heads, resolution, bigger backbones"): the default heads -- score head `blocks.8` +
`blocks.14` on 7 x 7, map head `blocks.3` + `blocks.4` + `blocks.8` on 14 x 14 (Lite1 / Lite2 likewise); 320 / 448 px,
tiling and the brightness remedies stayed options.

    python -m benchmarks.studies.localisation_study --root_dir /work/shared/data \
        [--sets bottle magnetic_tile screw] [--candidates NAME_OR_PREFIX ...] [--cache_dir /tmp/fre_localisation_study] \
        [--json benchmarks/results/localisation_study.json] [--no_timing] [--list]

The detector has two heads on one backbone pass: the image score from detection layers, the anomaly map from
localisation layers on a finer grid, each with its own subspaces. This script measures, per data set, candidate
configurations of each head: image AUROC of its score, pixel AUROC and PRO of its map (a map head's own score is
reported too, as the "score = map" figure), the images/s of its feature extraction on this CPU and its model size
(floats held in the subspaces).

What is shared and what is measured:

- Images are decoded once per (set, input size) with ``fre_torch.features.images`` (``ImageDataset`` / ``make_loader``: PIL,
  LANCZOS to a square) and kept as uint8 in ``--cache_dir``.
- Features: one backbone pass per (set, backbone, input size, tiling, photometric mode) over train and test images
  (``fre_torch.features.backbones``), every layer any candidate of that pass needs kept at its own resolution in
  ``--cache_dir``. Cache entries are keyed by the set's files (names, sizes, modification times), the pass settings,
  the backbone's weights name and the torch version.
- Each candidate is then a :class:`fre_torch.detection.detector.DetectorConfig` (backbone, layers, input size, pool): its rows
  come from ``fre_torch.detection.detector.embed`` on the cached maps, and a ``FREDetector`` runs its own ``fit``,
  ``score_and_maps`` on them (the way ``fre_torch.jobs.crossfit`` reuses features): float64 PCA(0.97) per layer, scores
  divided by each layer's training residual variance. Pixel metrics come from ``fre_torch.jobs.evaluate.evaluation_maps``
  and ``fre_torch.detection.metrics`` (the images' own size; magnetic_tile's mixed sizes at 256 x 256).
- Tiling: overlapping ``tile`` px crops of an ``input_size`` px image at ``stride``, each run through the backbone at
  ``tile`` px; one subspace per tile position (``position``: aligned objects) or one shared by all positions
  (``shared``: textures, N x T training rows). The tile maps are placed on the image's grid and overlaps averaged;
  the image score is the sum of the tile scores.
- Brightness remedies (``photometric``), for capture shifts such as screw's darker normal test images. Every image,
  train and test alike, is changed before normalisation (rounded and clipped to uint8), towards a reference that is
  the median over the training images of the same statistic (no test statistic is used):
  ``gmean``: a gain so the image's mean grey level equals the reference; ``gmedian``: a gain on the median grey level
  (on objects in front of a uniform background, the background's level: an exposure estimate that the object's size
  and pose do not move); ``zstd``: an affine map so the mean and standard deviation of the grey level match.
- Timing: per candidate, ``FREDetector(config).features`` on the same 32 real images (bottle test) at the candidate's
  input size, best of 3 after a warm-up (crops and gain included where the candidate has them), on this machine's
  CPU threads; other processes may share the CPU, so the figures are rough. The backbone is truncated after the
  candidate's last layer, so a candidate's figure is its own, not that of the shared pass.

Results of a run are merged into the existing ``--json`` (a later run of some candidates replaces only those).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import cpu_name
from fre_torch.features.backbones import Normalize, build_feature_extractor, get_backbone_spec
from fre_torch.features.images import ImageDataset, MVTecCategory, make_loader
from fre_torch.detection.detector import DetectorConfig, FREDetector, embed
from fre_torch.jobs.evaluate import evaluation_maps
from fre_torch.detection.metrics import auroc, pixel_auroc, pro

SETS: dict[str, tuple[str, str]] = {
    "bottle": ("mvtec_bottle", "bottle"),
    "magnetic_tile": ("magnetic_tile", "magnetic_tile"),
    "screw": ("mvtec_screw", "screw"),
}
BATCH = 32
TIMING_IMAGES = 32
BASELINE = "det_l0_224"  # today's default: the table gives every candidate's speed relative to it

L0, L1, L2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"


# ----------------------------------------------------------------------------------------------------------------------
# What is run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One feature extraction over a set's train and test images.

    Attributes:
        backbone: registered backbone name.
        input_size: side of the square image the set is resized to.
        layers: layers kept (each at its own resolution), in network order.
        tile: crop side in pixels (run through the backbone at this size), 0 = no tiling.
        stride: step between crops, pixels.
        photometric: '' (none), 'gmean', 'gmedian' or 'zstd' (see the module docstring).
    """

    backbone: str
    input_size: int
    layers: tuple[str, ...]
    tile: int = 0
    stride: int = 0
    photometric: str = ""

    @property
    def key(self) -> str:
        tiles = f"_t{self.tile}s{self.stride}" if self.tile else ""
        return f"{self.backbone}_{self.input_size}{tiles}{'_' + self.photometric if self.photometric else ''}"

    @property
    def offsets(self) -> tuple[int, ...]:
        """Crop offsets along one side, pixels (the same for rows and columns); ``(0,)`` without tiling."""
        if not self.tile:
            return (0,)
        return tuple(range(0, self.input_size - self.tile + 1, self.stride))


@dataclass(frozen=True)
class Candidate:
    """One configuration of a head.

    Attributes:
        name: short unique name.
        head: 'detect' (judge it by image AUROC) or 'map' (by pixel AUROC / PRO); every figure is reported anyway.
        source: the pass its features come from.
        layers: the candidate's layers (a subset of ``source.layers``).
        pool: pooling of the first layer's map, which sets the grid (``DetectorConfig.pool``).
        tiling: '' (whole image), 'position' (a subspace per tile position) or 'shared' (one for all positions).
        note: what it tests.
    """

    name: str
    head: str
    source: Pass
    layers: tuple[str, ...]
    pool: int
    tiling: str = ""
    note: str = ""

    @property
    def config(self) -> DetectorConfig:
        size = self.source.tile or self.source.input_size
        # One head (map_layers=None): a candidate is one set of layers, judged as a score or as a map.
        # image_score='fre': a candidate's own image score is its FRE, as in the first round (before 'top' existed).
        return DetectorConfig(self.source.backbone, layers=self.layers, input_size=size, pool=self.pool,
                              map_layers=None, image_score="fre")

    def describe(self) -> dict[str, Any]:
        c = self.config
        d = {"head": self.head, "backbone": c.backbone, "input_size": self.source.input_size, "layers": list(c.layers),
             "pool": c.pool, "grid": c.map_grid[0], "photometric": self.source.photometric, "note": self.note}
        if self.tiling:
            n = len(self.source.offsets)
            d.update(tiling=self.tiling, tile=self.source.tile, stride=self.source.stride, tiles=f"{n}x{n}",
                     image_grid=_canvas_side(self))
        return d


def _candidates() -> list[Candidate]:
    l0_224 = Pass(L0, 224, ("blocks.4", "blocks.8", "blocks.10", "blocks.14"))
    l0_320 = Pass(L0, 320, ("blocks.4", "blocks.8", "blocks.14"))
    l0_448 = Pass(L0, 448, ("blocks.4", "blocks.8", "blocks.14"))
    l0_224_gmean = Pass(L0, 224, ("blocks.4", "blocks.8", "blocks.14"), photometric="gmean")
    l0_224_gmedian = Pass(L0, 224, ("blocks.4", "blocks.8", "blocks.14"), photometric="gmedian")
    l0_224_zstd = Pass(L0, 224, ("blocks.4", "blocks.8", "blocks.14"), photometric="zstd")
    l0_448_gmean = Pass(L0, 448, ("blocks.4", "blocks.8"), photometric="gmean")
    # Lite1 / Lite2 layers in Lite0's roles: blocks.6 = end of the stride-8 stage (Lite0 blocks.4), blocks.11 = first
    # of the 112 / 120-channel stride-16 stage (blocks.8), blocks.14 = its end (blocks.10), blocks.19 = end of the
    # 192 / 208-channel stride-32 stage (blocks.14).
    lite_layers = ("blocks.6", "blocks.11", "blocks.14", "blocks.19")
    l1 = Pass(L1, 240, lite_layers)
    l2 = Pass(L2, 260, lite_layers)
    # Lite1 / Lite2 stride-8 stage: blocks.4 (the first, stride 2), blocks.5, blocks.6 (its end).
    l1_s8 = Pass(L1, 240, ("blocks.4", "blocks.5", "blocks.6", "blocks.11"))
    l2_s8 = Pass(L2, 260, ("blocks.4", "blocks.5", "blocks.6", "blocks.11"))
    l1_448 = Pass(L1, 448, ("blocks.6", "blocks.11"))
    l2_448 = Pass(L2, 448, ("blocks.6", "blocks.11"))
    l1_gmean = Pass(L1, 240, lite_layers, photometric="gmean")
    l2_gmean = Pass(L2, 260, lite_layers, photometric="gmean")
    tiles_384 = Pass(L0, 384, ("blocks.4", "blocks.8"), tile=224, stride=160)
    tiles_448 = Pass(L0, 448, ("blocks.4", "blocks.8"), tile=224, stride=112)
    # Every block of the stride-8 and stride-16 stages a 224 px map head could use (blocks.5-7: the 80-channel stage).
    l0_224_mid = Pass(L0, 224, ("blocks.3", "blocks.4", "blocks.5", "blocks.6", "blocks.7", "blocks.8", "blocks.10"))
    l0_224_fine = Pass(L0, 224, ("blocks.2", "blocks.3", "blocks.4", "blocks.8"))
    b4, b8, b10, b14 = "blocks.4", "blocks.8", "blocks.10", "blocks.14"
    return [
        # Detection head.
        Candidate("det_l0_224", "detect", l0_224, (b8, b14), 2, note="today's default: 7 x 7"),
        Candidate("det_l0_224_b10", "detect", l0_224, (b10, b14), 2, note="end of the stride-16 stage instead"),
        Candidate("det_l0_224_b8", "detect", l0_224, (b8,), 2, note="the reference layer alone"),
        Candidate("det_l0_320", "detect", l0_320, (b8, b14), 2, note="default layers at 320 px: 10 x 10"),
        Candidate("det_l1_240", "detect", l1, ("blocks.11", "blocks.19"), 2, note="Lite1 DEFAULT_LAYERS"),
        Candidate("det_l1_240_b14", "detect", l1, ("blocks.14", "blocks.19"), 2, note="Lite1, end of stride-16"),
        Candidate("det_l2_260", "detect", l2, ("blocks.11", "blocks.19"), 2, note="Lite2 DEFAULT_LAYERS: 8 x 8"),
        Candidate("det_l2_260_b14", "detect", l2, ("blocks.14", "blocks.19"), 2, note="Lite2, end of stride-16"),
        Candidate("det_l0_448_p4", "detect", l0_448, (b8, b14), 4, note="default layers at 448 px pooled to 7 x 7"),
        Candidate("det_l0_224_gmean", "detect", l0_224_gmean, (b8, b14), 2, note="default + gain on the mean grey"),
        Candidate("det_l0_224_gmedian", "detect", l0_224_gmedian, (b8, b14), 2, note="default + gain on the median"),
        Candidate("det_l0_224_zstd", "detect", l0_224_zstd, (b8, b14), 2, note="default + grey mean/std matched"),
        Candidate("det_l1_240_gmean", "detect", l1_gmean, ("blocks.11", "blocks.19"), 2, note="Lite1 + mean gain"),
        Candidate("det_l2_260_gmean", "detect", l2_gmean, ("blocks.11", "blocks.19"), 2, note="Lite2 + mean gain"),
        # Map head, Lite0 at 224 px.
        Candidate("map_l0_224_b4b8_p2", "map", l0_224, (b4, b8), 2, note="today's localisation pair: 14 x 14"),
        Candidate("map_l0_224_b4_p1", "map", l0_224, (b4,), 1, note="blocks.4 alone, 28 x 28"),
        Candidate("map_l0_224_b4b8_p1", "map", l0_224, (b4, b8), 1, note="the pair at 28 x 28"),
        Candidate("map_l0_224_b8_p1", "map", l0_224, (b8,), 1, note="blocks.8 alone, 14 x 14"),
        Candidate("map_l0_224_b4b8b14_p2", "map", l0_224, (b4, b8, b14), 2, note="three depths, 14 x 14"),
        # Map head, Lite0 at 224 px: the other depths of the stride-8 / stride-16 stages (second round).
        Candidate("map_l0_224_b4b7_p2", "map", l0_224_mid, (b4, "blocks.7"), 2, note="end of the 80-channel stage"),
        Candidate("map_l0_224_b4b6_p2", "map", l0_224_mid, (b4, "blocks.6"), 2, note="middle of the 80-channel stage"),
        Candidate("map_l0_224_b4b10_p2", "map", l0_224_mid, (b4, b10), 2, note="end of the stride-16 stage"),
        Candidate("map_l0_224_b4b8b10_p2", "map", l0_224_mid, (b4, b8, b10), 2, note="both 112-channel ends"),
        Candidate("map_l0_224_b4b7b10_p2", "map", l0_224_mid, (b4, "blocks.7", b10), 2,
                  note="the end of every stage from stride 8 to 16"),
        Candidate("map_l0_224_b3b4b8_p2", "map", l0_224_mid, ("blocks.3", b4, b8), 2, note="both 40-channel blocks"),
        Candidate("map_l0_224_b7_p1", "map", l0_224_mid, ("blocks.7",), 1, note="blocks.7 alone, 14 x 14"),
        Candidate("map_l0_224_b3b4_p2", "map", l0_224_mid, ("blocks.3", b4), 2, note="the stride-8 stage alone"),
        Candidate("map_l0_224_b3b4b7_p2", "map", l0_224_mid, ("blocks.3", b4, "blocks.7"), 2,
                  note="both 40-channel blocks + the end of the 80-channel stage"),
        Candidate("map_l0_224_b2b4b8_p4", "map", l0_224_fine, ("blocks.2", b4, b8), 4,
                  note="+ the end of the stride-4 stage, pooled by 4"),
        Candidate("map_l0_224_b2b3b4b8_p4", "map", l0_224_fine, ("blocks.2", "blocks.3", b4, b8), 4,
                  note="the stride-4 end, both stride-8 blocks, blocks.8"),
        # Map head, resolution.
        Candidate("map_l0_320_b4b8_p2", "map", l0_320, (b4, b8), 2, note="the pair at 320 px: 20 x 20"),
        Candidate("map_l0_320_b8_p1", "map", l0_320, (b8,), 1, note="blocks.8 at 320 px: 20 x 20"),
        Candidate("map_l0_448_b4b8_p2", "map", l0_448, (b4, b8), 2, note="the pair at 448 px: 28 x 28"),
        Candidate("map_l0_448_b4b8_p4", "map", l0_448, (b4, b8), 4, note="the pair at 448 px pooled to 14 x 14"),
        Candidate("map_l0_448_b4_p4", "map", l0_448, (b4,), 4, note="blocks.4 at 448 px pooled to 14 x 14"),
        Candidate("map_l0_448_b4b8b14_p4", "map", l0_448, (b4, b8, b14), 4, note="three depths, 448 px, 14 x 14"),
        Candidate("map_l0_448_b8_p1", "map", l0_448, (b8,), 1, note="blocks.8 at 448 px: 28 x 28"),
        Candidate("map_l0_448_b4b8b14_p2", "map", l0_448, (b4, b8, b14), 2, note="three depths at 448 px: 28 x 28"),
        # Map head, tiling.
        Candidate("map_tile384_position", "map", tiles_384, (b4, b8), 2, "position",
                  note="2 x 2 tiles of 224 px at stride 160 of a 384 px image, a subspace per position"),
        Candidate("map_tile384_shared", "map", tiles_384, (b4, b8), 2, "shared",
                  note="the same tiles, one subspace for all positions"),
        Candidate("map_tile448_position", "map", tiles_448, (b4, b8), 2, "position",
                  note="3 x 3 tiles of 224 px at stride 112 of a 448 px image, a subspace per position"),
        Candidate("map_tile448_shared", "map", tiles_448, (b4, b8), 2, "shared",
                  note="the same tiles, one subspace for all positions"),
        # Map head, bigger backbones.
        Candidate("map_l1_240_b6b11_p2", "map", l1, ("blocks.6", "blocks.11"), 2, note="Lite1 pair: 15 x 15"),
        Candidate("map_l2_260_b6b11_p2", "map", l2, ("blocks.6", "blocks.11"), 2, note="Lite2 pair: 16 x 16"),
        Candidate("map_l1_240_b4b6b11_p2", "map", l1_s8, ("blocks.4", "blocks.6", "blocks.11"), 2,
                  note="Lite1, the first and last stride-8 blocks (Lite0's default roles)"),
        Candidate("map_l1_240_b5b6b11_p2", "map", l1_s8, ("blocks.5", "blocks.6", "blocks.11"), 2,
                  note="Lite1, the last two stride-8 blocks"),
        Candidate("map_l1_240_b4b5b6b11_p2", "map", l1_s8, ("blocks.4", "blocks.5", "blocks.6", "blocks.11"), 2,
                  note="Lite1, every stride-8 block"),
        Candidate("map_l2_260_b4b6b11_p2", "map", l2_s8, ("blocks.4", "blocks.6", "blocks.11"), 2,
                  note="Lite2, the first and last stride-8 blocks (Lite0's default roles)"),
        Candidate("map_l2_260_b5b6b11_p2", "map", l2_s8, ("blocks.5", "blocks.6", "blocks.11"), 2,
                  note="Lite2, the last two stride-8 blocks"),
        Candidate("map_l2_260_b4b5b6b11_p2", "map", l2_s8, ("blocks.4", "blocks.5", "blocks.6", "blocks.11"), 2,
                  note="Lite2, every stride-8 block"),
        Candidate("map_l1_448_b6b11_p2", "map", l1_448, ("blocks.6", "blocks.11"), 2, note="Lite1 pair, 448 px"),
        Candidate("map_l2_448_b6b11_p2", "map", l2_448, ("blocks.6", "blocks.11"), 2, note="Lite2 pair, 448 px"),
        Candidate("map_l1_448_b6b11_p4", "map", l1_448, ("blocks.6", "blocks.11"), 4, note="Lite1, 448 px, 14 x 14"),
        Candidate("map_l2_448_b6b11_p4", "map", l2_448, ("blocks.6", "blocks.11"), 4, note="Lite2, 448 px, 14 x 14"),
        # Map head, brightness remedy.
        Candidate("map_l0_224_b4b8_p2_gmean", "map", l0_224_gmean, (b4, b8), 2, note="14 x 14 pair + mean gain"),
        Candidate("map_l0_224_b4b8_p2_gmedian", "map", l0_224_gmedian, (b4, b8), 2, note="14 x 14 pair + median gain"),
        Candidate("map_l0_224_b4b8_p2_zstd", "map", l0_224_zstd, (b4, b8), 2, note="14 x 14 pair + mean/std matched"),
        Candidate("map_l0_448_b4b8_p2_gmean", "map", l0_448_gmean, (b4, b8), 2, note="448 px pair + mean gain"),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Images and features, extracted once
# ----------------------------------------------------------------------------------------------------------------------


def _files_digest(cat: MVTecCategory) -> str:
    """SHA-256 over the category's train and test files: relative name, size and modification time."""
    h = hashlib.sha256()
    for path in [*cat.train, *cat.test_paths]:
        st = path.stat()
        h.update(f"{path.relative_to(cat.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class Store:
    """``torch.save`` files in a folder, keyed by a readable name plus a digest of everything that shapes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, settings: str) -> Path:
        return self.root / f"{name}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"

    def load(self, name: str, settings: str) -> Any | None:
        path = self.path(name, settings)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save(self, name: str, settings: str, value: Any) -> None:
        path = self.path(name, settings)
        tmp = path.with_name(path.name + ".partial")
        torch.save(value, tmp)
        os.replace(tmp, path)


def decode(cat: MVTecCategory, size: int, store: Store, digest: str) -> dict[str, torch.Tensor]:
    """``{"train": (N, 3, size, size), "test": (M, 3, size, size)}`` uint8, decoded by ``fre_torch.features.images``."""
    settings = f"{cat.name}|{digest}|{size}|LANCZOS"
    found = store.load(f"images_{cat.name}_{size}", settings)
    if found is not None:
        return found
    out = {}
    for split, paths in (("train", list(cat.train)), ("test", cat.test_paths)):
        loader = make_loader(ImageDataset(paths, size), BATCH, "cpu")
        out[split] = torch.cat([batch["image"] for batch in loader])
    store.save(f"images_{cat.name}_{size}", settings, out)
    return out


PHOTOMETRIC = ("", "gmean", "gmedian", "zstd")


def _grey_statistics(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Per image of ``(B, 3, H, W)`` uint8: ``(B, 2)`` float, the location (mean or median grey level) and the
    standard deviation of the grey level (channel mean)."""
    grey = images.float().mean(dim=1).flatten(1)
    location = grey.median(dim=1).values if mode == "gmedian" else grey.mean(dim=1)
    return torch.stack([location, grey.std(dim=1)], dim=1)


def photometric_reference(train: torch.Tensor, mode: str) -> torch.Tensor:
    """``(2,)``: the median over the training images ``(N, 3, H, W)`` uint8 of their grey statistics."""
    if mode not in PHOTOMETRIC[1:]:
        raise ValueError(f"photometric mode must be one of {PHOTOMETRIC[1:]}, got {mode!r}")
    return _grey_statistics(train, mode).median(dim=0).values


def photometric(images: torch.Tensor, mode: str, reference: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> the same, each image's grey statistics brought to ``reference`` (see the module
    docstring): a gain for 'gmean' / 'gmedian', an affine map for 'zstd'. Rounded and clipped to 0..255."""
    if not mode:
        return images
    x = images.float()
    stats = _grey_statistics(images, mode)[:, :, None, None, None]
    location, spread = stats[:, 0], stats[:, 1]
    if mode == "zstd":
        x = (x - location) * (reference[1] / spread.clamp_min(1.0)) + reference[0]
    else:
        x = x * (reference[0] / location.clamp_min(1.0))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def crops(images: torch.Tensor, spec: Pass) -> torch.Tensor:
    """``(B, 3, S, S)`` -> ``(B * T, 3, tile, tile)``, tile positions row-major within each image (T = 1 untiled)."""
    if not spec.tile:
        return images
    t = spec.tile
    parts = [images[:, :, y:y + t, x:x + t] for y in spec.offsets for x in spec.offsets]
    return torch.stack(parts, dim=1).flatten(0, 1)


def extract(spec: Pass, images: dict[str, torch.Tensor], threads: int) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                              float]:
    """Feature maps of every layer of ``spec``: ``{split: {layer: (N * T, C, h, w)}}`` float32, and the seconds the
    backbone took (normalisation, crops and gain included, decoding not)."""
    torch.set_num_threads(threads)
    fx = build_feature_extractor(spec.backbone, list(spec.layers)).to(memory_format=torch.channels_last)
    backbone = get_backbone_spec(spec.backbone)
    norm = Normalize(backbone.mean, backbone.std)
    reference = photometric_reference(images["train"], spec.photometric) if spec.photometric else None
    out: dict[str, dict[str, torch.Tensor]] = {}
    seconds = 0.0
    for split in ("train", "test"):
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in spec.layers}
        for start in range(0, images[split].shape[0], BATCH):
            t0 = time.perf_counter()
            batch = images[split][start:start + BATCH]
            batch = photometric(batch, spec.photometric, reference)
            x = norm(crops(batch, spec)).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                maps = fx(x)
            for name, m in maps.items():
                parts[name].append(m.contiguous())
            seconds += time.perf_counter() - t0
        out[split] = {name: torch.cat(p) for name, p in parts.items()}
    return out, seconds


def features(spec: Pass, cat: MVTecCategory, store: Store, digest: str,
             threads: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``extract`` through the cache (images decoded only on a miss); also returns the pass's timing record."""
    settings = (f"{cat.name}|{digest}|{asdict(spec)}|{get_backbone_spec(spec.backbone).weights_name}|"
                f"torch={torch.__version__}")
    found = store.load(f"features_{cat.name}_{spec.key}", settings)
    if found is not None:
        return found["features"], found["timing"]
    images = decode(cat, spec.input_size, store, digest)
    feats, seconds = extract(spec, images, threads)
    n = images["train"].shape[0] + images["test"].shape[0]
    timing = {"images": n, "backbone_seconds": seconds, "images_per_second": n / seconds,
              "layers": list(spec.layers), "threads": threads}
    store.save(f"features_{cat.name}_{spec.key}", settings, {"features": feats, "timing": timing})
    return feats, timing


# ----------------------------------------------------------------------------------------------------------------------
# A detector on precomputed rows
# ----------------------------------------------------------------------------------------------------------------------


class RowsDetector(FREDetector):
    """An ``FREDetector`` whose ``features`` looks rows up by index: its own ``fit`` and ``score_and_maps`` then run
    unchanged on features extracted once (as ``fre_torch.jobs.crossfit`` does). The backbone it builds is never run.

    Args:
        config: the candidate's configuration.
        rows: per-layer rows ``[(N, D_l)]`` of the images the index batches refer to.
    """

    def __init__(self, config: DetectorConfig, rows: Sequence[torch.Tensor]) -> None:
        super().__init__(config, pretrained=False)
        self.rows = list(rows)

    def use(self, rows: Sequence[torch.Tensor]) -> RowsDetector:
        """Look up these rows from now on (the test rows after fitting on the training rows)."""
        self.rows = list(rows)
        return self

    def features(self, index: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Index batch ``(B,)`` -> per-layer rows ``[(B, D_l)]``."""
        return [r[index] for r in self.rows]


def _all(n: int) -> torch.Tensor:
    return torch.arange(n)


def model_floats(detector: FREDetector) -> int:
    """Floats held by the fitted subspaces: means and components (the per-layer scales are negligible)."""
    return sum(s.mean.numel() + s.components.numel() for s in detector.subspaces)


def _canvas_side(cand: Candidate) -> int:
    """Side of the image-level grid a tiled candidate's maps are placed on (cell = tile / grid pixels)."""
    s = cand.source
    cell = s.tile // cand.config.map_grid[0]
    if s.stride % cell or s.input_size % cell:
        raise ValueError(f"{cand.name}: stride {s.stride} and image {s.input_size} must be multiples of the "
                         f"{cell} px grid cell")
    return s.input_size // cell


def _rows(cand: Candidate, maps: dict[str, torch.Tensor], select: torch.Tensor | slice = slice(None)
          ) -> list[torch.Tensor]:
    """The candidate's per-layer rows ``[(n, C_l * g * g)]`` from cached maps ``{layer: (n_all, C, h, w)}``."""
    return embed([maps[name][select] for name in cand.layers], cand.config.map_grid)


def run_candidate(cand: Candidate, feats: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         dict[str, Any]]:
    """Fit on the training maps, score and map the test maps.

    Returns:
        ``scores: (M,)``, ``grid_maps: (M, g, g)`` float32 (for tiling, on the image-level grid), and facts about the
        fit (``model_floats``, ``n_components``, ``fit_seconds``).
    """
    config = cand.config
    t0 = time.perf_counter()
    if not cand.tiling:
        det = RowsDetector(config, _rows(cand, feats["train"]))
        det.fit(_all(det.rows[0].shape[0]), batch_size=4096)
        fit_seconds = time.perf_counter() - t0
        test = _rows(cand, feats["test"])
        scores, maps = det.use(test).score_and_maps(_all(test[0].shape[0]), batch_size=256)
        info = {"model_floats": model_floats(det), "n_components": [s.n_components for s in det.subspaces]}
        return scores.float(), maps.float(), {**info, "fit_seconds": fit_seconds}
    t = len(cand.source.offsets) ** 2
    n_train = feats["train"][cand.layers[0]].shape[0] // t
    n_test = feats["test"][cand.layers[0]].shape[0] // t
    if cand.tiling == "shared":
        det = RowsDetector(config, _rows(cand, feats["train"]))
        det.fit(_all(n_train * t), batch_size=4096)
        dets = [det] * t
    elif cand.tiling == "position":
        dets = []
        for p in range(t):
            det = RowsDetector(config, _rows(cand, feats["train"], torch.arange(p, n_train * t, t)))
            dets.append(det.fit(_all(n_train), batch_size=4096))
    else:
        raise ValueError(f"tiling must be '', 'position' or 'shared', got {cand.tiling!r}")
    fit_seconds = time.perf_counter() - t0
    g = config.map_grid[0]
    side = _canvas_side(cand)
    cell = cand.source.tile // g
    total = torch.zeros(n_test, side, side)
    count = torch.zeros(side, side)
    scores = torch.zeros(n_test)
    positions = [(y // cell, x // cell) for y in cand.source.offsets for x in cand.source.offsets]
    for p, (det, (y, x)) in enumerate(zip(dets, positions)):
        rows = _rows(cand, feats["test"], torch.arange(p, n_test * t, t))
        s, m = det.use(rows).score_and_maps(_all(n_test), batch_size=256)
        scores += s.float()
        total[:, y:y + g, x:x + g] += m.float()
        count[y:y + g, x:x + g] += 1
    floats = sum(model_floats(d) for d in dict.fromkeys(dets))  # a shared detector counted once
    info = {"model_floats": floats, "n_components": [s.n_components for d in dict.fromkeys(dets) for s in d.subspaces]}
    return scores, total / count, {**info, "fit_seconds": fit_seconds}


def metrics(cat: MVTecCategory, scores: torch.Tensor, grid_maps: torch.Tensor) -> dict[str, float]:
    """Image AUROC of ``scores: (M,)``; pixel AUROC and PRO (FPR <= 0.3) of ``grid_maps: (M, g, g)``."""
    maps, masks = evaluation_maps(cat, grid_maps)
    return {"image_auroc": float(auroc(scores, cat.test_labels)), "pixel_auroc": float(pixel_auroc(maps, masks)),
            "pro": float(pro(maps, masks))}


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def time_candidate(cand: Candidate, images: torch.Tensor, threads: int) -> dict[str, Any]:
    """images/s of the candidate's own feature extraction on ``images: (B, 3, S, S)`` uint8 (see module docstring)."""
    torch.set_num_threads(threads)
    det = FREDetector(cand.config)
    mode = cand.source.photometric
    reference = photometric_reference(images, mode) if mode else None

    def run() -> None:
        batch = photometric(images, mode, reference)
        det.features(crops(batch, cand.source))

    run()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return {"images_per_second": images.shape[0] / best, "batch": images.shape[0], "threads": threads}


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def _selected(cands: Sequence[Candidate], wanted: Sequence[str]) -> list[Candidate]:
    if not wanted:
        return list(cands)
    out = [c for c in cands if any(c.name == w or c.name.startswith(w) for w in wanted)]
    if not out:
        raise ValueError(f"no candidate matches {list(wanted)}; see --list")
    return out


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def _by_pass(cands: Sequence[Candidate]) -> Iterator[tuple[Pass, list[Candidate]]]:
    passes: dict[Pass, list[Candidate]] = {}
    for c in cands:
        passes.setdefault(c.source, []).append(c)
    yield from passes.items()


def run(root: Path, sets: Sequence[str], cands: Sequence[Candidate], store: Store, document: dict[str, Any], *,
        timing: bool, threads: int, out: Path) -> dict[str, Any]:
    """Evaluate ``cands`` on ``sets``, merging into ``document`` and writing it to ``out`` after every candidate."""
    document.setdefault("candidates", {})
    document.setdefault("results", {})
    document.setdefault("passes", {})
    document.setdefault("timing", {})
    for c in cands:
        document["candidates"][c.name] = c.describe()
    for name in sets:
        folder, category = SETS[name]
        cat = MVTecCategory.load(root / folder, category)
        digest = _files_digest(cat)
        for spec, group in _by_pass(cands):
            feats, pass_timing = features(spec, cat, store, digest, threads)
            document["passes"].setdefault(spec.key, {})[name] = pass_timing
            for c in group:
                scores, maps, info = run_candidate(c, feats)
                t1 = time.perf_counter()
                result = {**metrics(cat, scores, maps), **info, "metric_seconds": time.perf_counter() - t1}
                document["results"].setdefault(name, {})[c.name] = result
                print(f"{name:14s} {c.name:28s} image {result['image_auroc']:.4f}  pixel {result['pixel_auroc']:.4f}"
                      f"  PRO {result['pro']:.4f}  floats {result['model_floats']:,}  fit {info['fit_seconds']:.1f}s",
                      flush=True)
                _write(out, document)
            del feats
    if timing:
        cat = MVTecCategory.load(root / SETS["bottle"][0], SETS["bottle"][1])
        digest = _files_digest(cat)
        for c in cands:
            images = decode(cat, c.source.input_size, store, digest)["test"][:TIMING_IMAGES]
            document["timing"][c.name] = time_candidate(c, images, threads)
            print(f"timing {c.name:28s} {document['timing'][c.name]['images_per_second']:.1f} img/s", flush=True)
            _write(out, document)
    return document


def _write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def table(document: dict[str, Any]) -> str:
    """Markdown: one row per candidate, per set image AUROC / pixel AUROC / PRO, then images/s, its ratio to
    ``BASELINE``'s measured in the same run, and model floats."""
    sets = [s for s in SETS if s in document.get("results", {})]
    head = ("| candidate | " + " | ".join(f"{s} img / px / PRO" for s in sets)
            + " | img/s | x default | floats (largest set) |")
    lines = [head, "|" + "---|" * (len(sets) + 4)]
    base = document.get("timing", {}).get(BASELINE, {}).get("images_per_second")
    for name in document.get("candidates", {}):
        cells = []
        for s in sets:
            r = document["results"][s].get(name)
            cells.append("" if r is None else f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['pro']:.3f}")
        speed = document.get("timing", {}).get(name, {}).get("images_per_second")
        floats = max((document["results"][s][name]["model_floats"] for s in sets if name in document["results"][s]),
                     default=None)
        ratio = "" if speed is None or base is None else f"{speed / base:.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if speed is None else f'{speed:.0f}'} | {ratio} | "
                     f"{'' if floats is None else f'{floats:,}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_dir", default="../shared/data", help="folder holding mvtec_bottle, magnetic_tile, ...")
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    p.add_argument("--candidates", nargs="*", default=[], help="names or name prefixes (default: all; see --list)")
    p.add_argument("--cache_dir", default="/tmp/fre_localisation_study", help="decoded images and feature maps")
    p.add_argument("--json", default="benchmarks/results/localisation_study.json")
    p.add_argument("--no_timing", action="store_true", help="skip the per-candidate images/s measurement")
    p.add_argument("--timing_only", action="store_true", help="only the images/s measurement (needs no features)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--list", action="store_true", help="print the candidates and exit")
    p.add_argument("--table", action="store_true", help="print the table of --json and exit")
    args = p.parse_args(argv)
    cands = _selected(_candidates(), args.candidates)
    if args.list:
        for c in cands:
            print(f"{c.name:28s} {json.dumps(c.describe())}")
        return
    out = Path(args.json)
    document = json.loads(out.read_text()) if out.is_file() else {}
    if args.table:
        print(table(document))
        return
    document["machine"] = _machine()
    document["command"] = "python -m benchmarks.studies.localisation_study " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    run(Path(args.root_dir), [] if args.timing_only else args.sets, cands, Store(Path(args.cache_dir)), document,
        timing=not args.no_timing, threads=args.threads, out=out)
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    print(table(document))


if __name__ == "__main__":
    main()
