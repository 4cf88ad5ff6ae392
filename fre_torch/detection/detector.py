"""``FREDetector``: backbone features -> streaming subspace fits -> feature reconstruction error per image.

The detector owns no I/O beyond ``save``/``load``: images arrive as uint8 tensors (or a DataLoader of them, see
``fre_torch.features.images.make_loader``), are normalised and run through the backbone on ``device`` under the precision
policy, embedded into one vector per image and layer, and streamed into the engine's accumulators. Nothing keeps a
Python list of embeddings: the Gram path stores the (N, D) rows it needs in one tensor, the covariance path only
D x D moments.

Embedding: every requested layer's map ``(B, C, h, w)`` is brought to one grid, the first layer's map
average-pooled by ``pool`` (the reference: 2), by adaptive average pooling, and flattened in C x H x W order (the
reference's vector).

Fusion (default ``fusion='sum'``): one subspace per layer; the image score is ``sum_l FRE_l / r_l`` where ``r_l`` is layer l's
residual variance on the training set (the variance its subspace leaves out, i.e. the expected FRE of a normal
image). Dividing by it puts layers of very different scales in the same unit, so each depth counts equally. With
``normalize_scores=False`` and one layer (the reference configuration) the score is the plain FRE.
``fusion='concat'`` instead concatenates the layers' vectors into one and fits a single subspace to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.autoencoder import LinearAutoencoder
from ..features.backbones import (IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, FeatureExtractor, Normalize,
                        build_feature_extractor, get_backbone_spec)
from ..core.distributed import gather_rows, is_distributed, reduce_accumulator
from ..features.files import atomic_write
from ..features.images import decode_images
from ..features.resample import lanczos_resize
from .geometry import HeadGeometry, as_hw, cut_tiles, embed, stitch, tile_offsets
from .threshold import ThresholdStats, threshold_stats
from ..core.precision import FIT_DTYPE, autocast, backbone_dtype, check_device, check_precision
from ..core.subspace import (
    check_features,
    CovarianceAccumulator,
    GramAccumulator,
    RowSpanSubspace,
    Subspace,
    fit_accumulator,
    fit_row_span,
    fit_rows,
    gram_matrix,
    resolve_solver,
    select_n_components,
)

if TYPE_CHECKING:  # the cache does file I/O; the detector only calls its key / get / put
    from ..features.images import FeatureCache

__all__ = ["CELL_FOLDS", "DEFAULT_DETAIL_LAYERS", "DEFAULT_LAYERS", "DEFAULT_MAP_LAYERS", "DETAIL_MIN_SCALE",
           "DetectorConfig", "embed", "FREDetector", "MAP_FLOOR_QUANTILE", "MAP_SCALE_QUANTILE", "ModelFileError",
           "MODES", "ROW_SPAN_MAX_BYTES", "upsample_maps", "with_detail_for"]

_FORMAT = "fre_torch.detector"
_VERSION = 3  # 2: two heads (map_subspaces, map_scales); 3: the detail head. Version-1 files load as one head
_MIN_RESIDUAL_FRACTION = 1e-6  # floor of a layer's score scale, as a fraction of its total variance
# Fitting modes: closed-form PCA, or a linear autoencoder trained by gradient descent, tied or untied.
MODES = ("pca", "tae", "ae")
ROW_SPAN_MAX_BYTES = 1 << 30
"""The most memory the dual-form fold fits (``FREDetector.fit_subset``, the cell statistics) hold in float64 copies of
the training rows and their Gram matrices; subspaces beyond it are fitted per fold (slower, from the float32 rows).
1 GiB covers all five subspaces of the default layers up to about 2,000 training images."""
_FIT_BYTES = torch.finfo(FIT_DTYPE).bits // 8
# Folds of the cross-fitting that gives the score head's per-cell normal statistics (``image_score='top'``).
CELL_FOLDS = 5


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or not a fre_torch detector."""


# Default layers per backbone: the reference layer plus the end of the deepest spatial stage. Anomalies range from
# local texture flaws (mid-level features) to structural ones (deep features); two depths cover both, and their
# maps share the reference's grid (stride-16 map pooled by 2 = stride-32 map). These layers DETECT: the image score.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.8", "blocks.14"),
    # Same roles as Lite0's, in the deeper Lite1 / Lite2 (stages 1.1 / 1.2 x as deep): the first block of the
    # stride-16 112-channel (Lite2: 120) stage and the last block of the stride-32 192-channel (Lite2: 208) stage.
    "efficientnet_lite1": ("blocks.11", "blocks.19"),
    "efficientnet_lite2": ("blocks.11", "blocks.19"),
    "efficientnet_b5": ("features.6", "features.7"),
    "resnet18": ("layer3", "layer4"),
    "resnet50": ("layer3", "layer4"),
    "wide_resnet50_2": ("layer3", "layer4"),
}
# Default layers of the map head, which LOCATES: the stride-8 stage and the reference's stride-16 layer, on a grid
# twice as fine (stride 8 pooled by 2 = stride 16). Without the stride-32 layers, whose receptive field spans the
# whole image and blurs every defect over its neighbours. The first and the last block of the stride-8 stage (Lite0:
# blocks.3, receptive field 35 px, and blocks.4, 67 px; Lite1 / Lite2: blocks.4 and blocks.6): better maps than the
# last block alone, on all three measured sets and all three backbones, at no backbone cost
# (benchmarks/localisation_study.py, BENCHMARKS.md).
DEFAULT_MAP_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.3", "blocks.4", "blocks.8"),
    "efficientnet_lite1": ("blocks.4", "blocks.6", "blocks.11"),
    "efficientnet_lite2": ("blocks.4", "blocks.6", "blocks.11"),
    "efficientnet_b5": ("features.3", "features.5"),
    "resnet18": ("layer2", "layer3"),
    "resnet50": ("layer2", "layer3"),
    "wide_resnet50_2": ("layer2", "layer3"),
}
# Default layers of the detail head: the map head's stride-8 layers unpooled and the last stride-4 block (receptive
# field 19 px) pooled by 2, on a grid twice as fine again (28 x 28 at 224 px; ``detail_pool`` 0 = to stride 8). The
# map is the geometric mean of the two heads' maps (``FREDetector.head_maps``): a cell is high only where the coarse
# map (whole-part context) and the fine one (the defect's outline) agree. Measured on Lite0 only
# (benchmarks/local_model_study.py, BENCHMARKS.md); other backbones have no detail head unless asked for.
DEFAULT_DETAIL_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.2", "blocks.3", "blocks.4"),
}


def _size_field(value: Any, what: str, minimum: int) -> int | tuple[int, int]:
    """An ``input_size``-like field: an int (square) or ``(height, width)``, each side >= ``minimum``; a square
    ``(S, S)`` is kept as ``S`` (model files and JSON stay as they were)."""
    h, w = as_hw(value if not isinstance(value, list) else tuple(value), what)
    if min(h, w) < minimum:
        raise ValueError(f"{what} must be >= {minimum} pixels per side, got {value!r}")
    return h if h == w else (h, w)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector, validated on construction.

    A detector has two heads over one backbone: the **score head** (``layers``, ``pool``) gives the image score,
    the **map head** (``map_layers``, ``map_pool``, optionally its own ``map_input_size``) gives the anomaly map.
    Each has its own subspaces. With ``map_layers=None`` there is one head: maps come from the score layers and the
    score is the sum of the map (the reference's model, and model files written before the two heads).

    Args:
        backbone: a name from ``fre_torch.list_backbones()``.
        layers: the score head's layers; empty = ``DEFAULT_LAYERS`` (else the backbone's default layer).
        input_size: the image size in pixels, an int (square) or ``(height, width)`` for long parts (keep their
            aspect: the image is resized to exactly this); 0 = the backbone's default square.
        pool: average-pooling kernel of the first score layer's map; it sets the score grid (the reference uses 2).
        n_components: int, float in (0, 1) (explained-variance fraction, scikit-learn's rule) or None.
        solver: 'auto', 'gram' or 'covariance' (see ``fre_torch.core.subspace``).
        normalization: 'native' (the mean/std the backbone's weights were trained with) or 'imagenet' (the
            reference pipeline's ImageNet mean/std, whatever the backbone).
        normalize_scores: divide each layer's FRE by its training residual variance before summing.
        fusion: 'sum' (one subspace per layer, scores summed) or 'concat' (one subspace on the concatenation),
            in each head.
        kernel: None (linear FRE) or 'rbf' / 'laplacian': FRE in a kernel feature space (``fre_torch.core.kernel``),
            bandwidth by the median heuristic on the training vectors. Image scores only: no map head.
        kernel_features: M, the number of explicit kernel features (random Fourier features or landmarks).
        kernel_method: 'rff' (random Fourier features) or 'nystroem' (M k-center landmarks; needs N >= M).
        mode: 'pca' (closed-form float64 subspace, the default), 'tae' (tied linear autoencoder) or 'ae' (untied),
            trained with Adam on the device (``fre_torch.core.autoencoder``; the reference's trained alternatives), at
            the k PCA would keep, in both heads. Linear only: not with ``kernel``.
        map_layers: the map head's layers; empty = ``DEFAULT_MAP_LAYERS``; None = no map head (maps from ``layers``).
        map_pool: average-pooling kernel of the first map layer's map: the map grid.
        map_input_size: the map head's image size (int or ``(height, width)``); 0 = ``input_size`` (one backbone pass
            for both heads), else a second pass at this size.
        detail_layers: the detail head's layers: a third head on the map head's pass, on its own finer grid; the
            anomaly map is then the geometric mean of the map head's map (upsampled bilinear to the finer grid) and
            the detail head's. Empty = ``DEFAULT_DETAIL_LAYERS`` (none for backbones without an entry, and none
            with tiling or ``map_input_size``); None = no detail head (the map head's map alone).
        detail_pool: average-pooling kernel of the first detail layer's map: the detail grid; 0 = the kernel that
            brings it to stride 8 (``8 // stride``, at least 1: 28 x 28 at 224 px).
        tile_size: 0 (no tiling) or the side (int or ``(height, width)``) of square-ish tiles cut from the
            ``input_size`` image, each run through the backbone at that size; both heads read the tiles, and one
            subspace per layer is shared by all tile positions (the tiles are its samples).
        tile_stride: step between tiles in pixels (int or ``(height, width)``); 0 = half a tile.
        image_score: how the score head's cells make the image score. 'top' (default): each cell's error is
            standardised by the mean and standard deviation that cell has on normal images the subspaces did not
            see (out-of-fold, ``CELL_FOLDS``-fold cross-fitting of the training images at fit time), and the score is
            the mean of the ``top_fraction`` largest standardised cells: a small defect raises a few cells, which a
            sum over all cells dilutes, and the standardisation keeps cells that vary a lot on normal parts from
            always being the top ones. 'fre': the sum over all cells and layers, i.e. the (normalised) FRE of the
            image -- the reference's score, used by ``reference()`` and kernel FRE (which has no cells).
        top_fraction: the share of the score head's cells (over all tiles) averaged by ``image_score='top'``.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ()
    input_size: int | tuple[int, int] = 0
    pool: int = 2
    n_components: int | float | None = 0.97
    solver: str = "auto"
    normalization: str = "native"
    normalize_scores: bool = True
    fusion: str = "sum"
    kernel: str | None = None
    kernel_features: int = 4096
    kernel_method: str = "rff"
    mode: str = "pca"
    map_layers: tuple[str, ...] | None = ()
    map_pool: int = 2
    map_input_size: int | tuple[int, int] = 0
    detail_layers: tuple[str, ...] | None = ()
    detail_pool: int = 0
    tile_size: int | tuple[int, int] = 0
    tile_stride: int | tuple[int, int] = 0
    image_score: str = "top"
    top_fraction: float = 0.1

    def __post_init__(self) -> None:
        spec = get_backbone_spec(self.backbone)  # ValueError naming the known backbones
        layers = self._check_layers(tuple(self.layers) if self.layers else
                                    DEFAULT_LAYERS.get(self.backbone, spec.default_layers), "layers")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "input_size", _size_field(self.input_size or spec.input_size, "input_size", 32))
        for name in ("pool", "map_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.kernel not in (None, "rbf", "laplacian"):
            raise ValueError(f"kernel must be None, 'rbf' or 'laplacian', got {self.kernel!r}")
        if self.kernel_method not in ("rff", "nystroem"):
            raise ValueError(f"kernel_method must be 'rff' or 'nystroem', got {self.kernel_method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if self.kernel is not None and self.mode != "pca":
            raise ValueError(f"mode={self.mode!r} trains a linear autoencoder, kernel={self.kernel!r} fits kernel PCA: "
                             "they do not combine; use mode='pca' with a kernel, or kernel=None with an autoencoder")
        if isinstance(self.kernel_features, bool) or not isinstance(self.kernel_features, int) \
                or self.kernel_features < 1:
            raise ValueError(f"kernel_features must be an int >= 1, got {self.kernel_features!r}")
        if self.fusion not in ("sum", "concat"):
            raise ValueError(f"fusion must be 'sum' or 'concat', got {self.fusion!r}")
        if self.normalization not in ("native", "imagenet"):
            raise ValueError(f"normalization must be 'native' or 'imagenet', got {self.normalization!r}")
        resolve_solver(self.solver, 1, 1)
        select_n_components(torch.ones(1), self.n_components, 2 ** 31 - 1, 2 ** 31 - 1)  # range check only
        self._resolve_map_head(spec)
        self._resolve_tiling()
        self._resolve_detail_head()
        if self.image_score not in ("fre", "top"):
            raise ValueError(f"image_score must be 'fre' or 'top', got {self.image_score!r}")
        if self.kernel is not None:
            object.__setattr__(self, "image_score", "fre")  # kernel FRE scores whole-image vectors: no cells
        if isinstance(self.top_fraction, bool) or not isinstance(self.top_fraction, (int, float)) \
                or not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must lie in (0, 1], got {self.top_fraction!r}")
        for head in self.heads:
            first = tuple(-(-side // head.strides[0]) for side in head.pass_size)
            pool = head.pool
            if pool > min(first):
                raise ValueError(f"pool {pool} is larger than the {first[0]}x{first[1]} map of {head.layers[0]} at "
                                 f"{head.pass_size[0]}x{head.pass_size[1]} px; use a smaller pool or a larger size")
        (self.map_head or self.score_head).check_tiling()  # the head whose tile maps are stitched

    def _check_layers(self, layers: tuple[str, ...], what: str) -> tuple[str, ...]:
        spec = get_backbone_spec(self.backbone)
        unknown = [name for name in layers if name not in spec.layers]
        if unknown:
            raise ValueError(f"{self.backbone} has no layer(s) {unknown}; choose from {', '.join(spec.layers)}")
        if len(set(layers)) != len(layers) or not layers:
            raise ValueError(f"{what} must be distinct layer names, got {list(layers)}")
        return layers

    def _resolve_map_head(self, spec: BackboneSpec) -> None:
        if self.kernel is not None:
            if self.map_layers:
                raise ValueError("map_layers needs the linear mode: kernel FRE has no maps; drop map_layers or kernel")
            object.__setattr__(self, "map_layers", None)
        elif self.map_layers is not None:
            layers = tuple(self.map_layers) or DEFAULT_MAP_LAYERS.get(self.backbone, ())
            object.__setattr__(self, "map_layers", self._check_layers(layers, "map_layers") if layers else None)
        if self.map_input_size:
            if self.map_layers is None:
                raise ValueError("map_input_size needs a map head (map_layers); it sets the map head's image size")
            object.__setattr__(self, "map_input_size", _size_field(self.map_input_size, "map_input_size", 32))
            if as_hw(self.map_input_size) == as_hw(self.input_size):
                object.__setattr__(self, "map_input_size", 0)  # the same size: one pass, not two

    def _resolve_detail_head(self) -> None:
        pool = self.detail_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
            raise ValueError(f"detail_pool must be an int >= 0 (0 = to stride 8), got {pool!r}")
        asked = bool(self.detail_layers)
        if self.detail_layers is not None and not asked:  # the default: only where it was measured, one plain pass
            default = DEFAULT_DETAIL_LAYERS.get(self.backbone, ())
            plain = self.map_layers is not None and not self.map_input_size and not self.tile_size
            object.__setattr__(self, "detail_layers", default if default and plain else None)
            if self.detail_layers is not None:
                self._resolve_detail_pool()
            return
        if self.detail_layers is None:
            return
        if self.map_layers is None:
            raise ValueError("detail_layers needs a map head (map_layers): its map is combined with the map head's")
        if self.map_input_size or self.tile_size:
            raise ValueError("detail_layers does not combine with map_input_size or tile_size: the detail head reads "
                             "the map head's single pass at input_size; drop one of them")
        layers = self._check_layers(tuple(self.detail_layers), "detail_layers")
        object.__setattr__(self, "detail_layers", layers)
        self._resolve_detail_pool()

    def _resolve_detail_pool(self) -> None:
        if self.detail_pool == 0:
            stride = get_backbone_spec(self.backbone).layers[self.detail_layers[0]].stride
            object.__setattr__(self, "detail_pool", max(1, 8 // stride))

    def _resolve_tiling(self) -> None:
        if not self.tile_size:
            if self.tile_stride:
                raise ValueError("tile_stride needs tile_size")
            return
        tile = _size_field(self.tile_size, "tile_size", 32)
        object.__setattr__(self, "tile_size", tile)
        th, tw = as_hw(tile)
        stride = _size_field(self.tile_stride or (max(th // 2, 1), max(tw // 2, 1)), "tile_stride", 1)
        object.__setattr__(self, "tile_stride", stride)
        if self.map_input_size:
            raise ValueError("tiling and map_input_size do not combine: both heads read the tiles of input_size")
        if self.kernel is not None or self.fusion == "concat":
            raise ValueError("tiling needs the linear mode and fusion='sum' (one subspace per layer, shared by the "
                             "tile positions)")

    @property
    def spec(self) -> BackboneSpec:
        """The backbone spec, with the ImageNet mean/std when ``normalization='imagenet'``."""
        spec = get_backbone_spec(self.backbone)
        if self.normalization == "imagenet":
            spec = dataclasses.replace(spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return spec

    def _head(self, layers: tuple[str, ...], pool: int, image_size: int | tuple[int, int]) -> HeadGeometry:
        spec = get_backbone_spec(self.backbone)
        image = as_hw(image_size)
        tiles, pass_size = ((0, 0),), image
        if self.tile_size:
            pass_size, (sh, sw) = as_hw(self.tile_size), as_hw(self.tile_stride)
            tiles = tuple((top, left) for top in tile_offsets(image[0], pass_size[0], sh)
                          for left in tile_offsets(image[1], pass_size[1], sw))
        return HeadGeometry(layers, tuple(spec.layers[n].channels for n in layers),
                            tuple(spec.layers[n].stride for n in layers), pass_size, image, pool, tiles)

    @property
    def score_head(self) -> HeadGeometry:
        """The score head: ``layers`` at ``input_size`` (its tiles when tiled), pooled by ``pool``."""
        return self._head(self.layers, self.pool, self.input_size)

    @property
    def map_head(self) -> HeadGeometry | None:
        """The map head (``map_layers``), or None when maps come from the score head."""
        if self.map_layers is None:
            return None
        return self._head(self.map_layers, self.map_pool, self.map_input_size or self.input_size)

    @property
    def detail_head(self) -> HeadGeometry | None:
        """The detail head (``detail_layers``, at the map head's image size), or None."""
        if self.detail_layers is None:
            return None
        return self._head(self.detail_layers, self.detail_pool, self.map_input_size or self.input_size)

    @property
    def heads(self) -> tuple[HeadGeometry, ...]:
        """The score head, then the map head and the detail head where there are: the order of ``features``'
        vectors."""
        return tuple(h for h in (self.score_head, self.map_head, self.detail_head) if h is not None)

    @property
    def load_size(self) -> int | tuple[int, int]:
        """The size images are read at (the larger head's image size): each head resizes on the device from it."""
        sizes = [h.image_size for h in self.heads]
        h, w = max(sizes, key=lambda s: s[0] * s[1])
        return h if h == w else (h, w)

    @property
    def map_grid(self) -> tuple[int, int]:
        """``(GH, GW)`` of the anomaly maps: the detail head's, else the map head's (the score head's without one),
        tiles stitched."""
        return (self.detail_head or self.map_head or self.score_head).canvas

    @property
    def layer_dims(self) -> tuple[int, ...]:
        """D of each layer's row per image, score head first, then map head (all tiles), before any fusion."""
        return tuple(d for head in self.heads for d in head.dims)

    def _fused(self, head: HeadGeometry, dims: tuple[int, ...]) -> tuple[int, ...]:
        return (sum(dims),) if self.fusion == "concat" else dims

    @property
    def layer_features(self) -> tuple[int, ...]:
        """D of each subspace's row per image (``layer_dims``, or their sum per head with 'concat')."""
        return tuple(d for head in self.heads for d in self._fused(head, head.dims))

    @property
    def subspace_dims(self) -> tuple[int, ...]:
        """D of the vectors each subspace is fitted on: one tile's (a whole image's when untiled)."""
        return tuple(d for head in self.heads for d in self._fused(head, head.tile_dims))

    @property
    def n_score_subspaces(self) -> int:
        """How many of ``layer_features`` belong to the score head (the rest to the map and detail heads)."""
        return len(self._fused(self.score_head, self.score_head.dims))

    @property
    def n_map_subspaces(self) -> int:
        """How many of ``layer_features`` belong to the map head (0 without one); the detail head's follow them."""
        head = self.map_head
        return 0 if head is None else len(self._fused(head, head.dims))

    @classmethod
    def reference(cls, backbone: str = "efficientnet_b5") -> DetectorConfig:
        """The reference run_mvtec.py configuration: the backbone's one default layer, pool 2, ImageNet
        normalisation, PCA(0.97) with scikit-learn's rule, the plain FRE as score, the map from the same layer."""
        spec = get_backbone_spec(backbone)
        return cls(backbone=backbone, layers=tuple(spec.default_layers), input_size=spec.input_size, pool=2,
                   n_components=0.97, solver="auto", normalization="imagenet", normalize_scores=False,
                   map_layers=None, detail_layers=None, image_score="fre")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples): JSON documents and model files."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown detector settings {sorted(extra)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _batches(data: Any, batch_size: int, device: torch.device | str = "cpu",
             size: int | tuple[int, int] | None = None) -> Iterator[Tensor]:
    """uint8 image batches ``(B, 3, H, W)`` from a tensor, a sequence of tensors, or a loader of dicts/tensors; a
    loader of encoded JPEGs (``ImageDataset(encoded=True)``) is decoded on ``device`` (``decode_images``: images
    of mixed sizes resized to ``size``)."""
    if isinstance(data, Tensor):
        if data.ndim == 3:
            data = data.unsqueeze(0)
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size]
        return
    for item in data:
        if isinstance(item, dict):
            item = item["image"]
            if isinstance(item, list):  # encoded files
                item = decode_images(item, device, size)
        elif isinstance(item, (tuple, list)):
            item = item[0]
        yield item if item.ndim == 4 else item.unsqueeze(0)


def _length(data: Any) -> int | None:
    if isinstance(data, Tensor):
        return 1 if data.ndim == 3 else data.shape[0]
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return len(data) if hasattr(data, "__len__") else None


class FREDetector(nn.Module):
    """Anomaly detector by feature reconstruction error.

    Args:
        config: what to extract and how to fit.
        device: where the backbone and the subspaces run ('cpu' or 'cuda').
        pretrained: load the backbone's pretrained weights (False = random weights, for tests and speed runs).
        weights: a local weights file for the backbone instead of the registry's source.
        compile: ``torch.compile`` the backbone and embedding (static shapes; call ``warmup`` before timing).
        precision: the backbone's compute precision, ``"auto"`` (bf16 on CUDA, float32 on the CPU), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (``fre_torch.core.precision``). Fitting is float64 and scoring float32 regardless.
        feature_cache: a ``fre_torch.features.images.FeatureCache`` (or its folder): ``features`` reads each image's vectors
            from it when present and stores the ones it computes, so a repeated run over the same images skips the
            backbone. Keyed by the exact input pixels and everything that shapes the features (see
            ``feature_settings``); a run-time choice, not saved with the model. Also settable as an attribute.

    Fitted state (buffers): ``subspaces`` (one ``Subspace`` per layer; a ``LinearAutoencoder`` in modes 'tae' /
    'ae', a ``KernelFRE`` with a kernel) and ``scales`` (L,) float64, the divisor of each layer's FRE (its training
    residual variance, floored at 1e-6 of the layer's total variance; or 1).

    Typical use::

        det = FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu").fit(train_loader)
        scores = det.score(test_loader)        # (N,) float32, higher = more anomalous
        det.save("model.pt"); det2 = FREDetector.load("model.pt", device="cpu")
    """

    scales: Tensor

    def __init__(self, config: DetectorConfig | None = None, *, device: torch.device | str = "cpu",
                 pretrained: bool = True, weights: str | os.PathLike | None = None, compile: bool = False,
                 precision: str = "auto", feature_cache: FeatureCache | str | os.PathLike | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.device = check_device(device)
        self.pretrained = pretrained
        self.weights = None if weights is None else str(weights)
        # One extractor holds every layer either head reads; each backbone pass runs it only as far as it needs.
        layers = list(dict.fromkeys(name for head in self.config.heads for name in head.layers))
        extractor = build_feature_extractor(self.config.backbone, layers, pretrained=pretrained, weights=weights)
        self.extractor: FeatureExtractor = extractor.to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalize(self.config.spec.mean, self.config.spec.std).to(self.device)
        # Backbone passes: the heads that read the same input (size and tiles) share one.
        self._passes: list[tuple[HeadGeometry, list[int]]] = []
        for i, head in enumerate(self.config.heads):
            same = [p for p in self._passes if (p[0].image_size, p[0].pass_size, p[0].tiles) ==
                    (head.image_size, head.pass_size, head.tiles)]
            if same:
                same[0][1].append(i)
            else:
                self._passes.append((head, [i]))
        # torch.compile (opt-in): each pass's backbone and embedding as one graph, shapes kept static (dynamic=False)
        # by padding a short last batch up to the largest batch seen, so one compiled graph serves the whole run.
        # It pays on CUDA (fused kernels, fewer launches); on a CPU the ~30 s compile is rarely won back.
        self.precision = check_precision(precision)  # the backbone's (fre_torch.core.precision); fits stay float64
        self.compiled = bool(compile)
        self._backbone = torch.compile(self._extract_embed, dynamic=False) if compile else self._extract_embed
        self._static_batch = 0
        self.subspaces = nn.ModuleList()  # the score head's, one per layer (or one with fusion='concat')
        self.map_subspaces = nn.ModuleList()  # the map head's; empty without a map head
        self.register_buffer("scales", torch.ones(0, dtype=torch.float64, device=self.device))
        self.register_buffer("map_scales", torch.ones(0, dtype=torch.float64, device=self.device))
        # image_score='top': each score-head cell's mean and standard deviation on out-of-fold normal images.
        self.register_buffer("cell_mean", torch.zeros(0, dtype=torch.float32, device=self.device))
        self.register_buffer("cell_std", torch.ones(0, dtype=torch.float32, device=self.device))
        # Calibration on held-out normal images (see ``calibrate``): their sorted scores and the threshold.
        self.register_buffer("calibration_scores", torch.empty(0, dtype=torch.float32, device=self.device))
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self.threshold_quantile: float | None = None
        # Heatmap colour scale: high quantiles of normal images' grid-map values (``set_map_scale``), so a heatmap's
        # colours mean the same thing on every image and are never set from test scores. Colour starts above
        # ``map_floor`` (the normal level; 0, today's default, colours every value above 0) and is full at
        # ``map_scale``.
        self.register_buffer("map_scale", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self.register_buffer("map_floor", torch.zeros((), dtype=torch.float64, device=self.device))
        self._weights_id = _weights_identity(self.config.backbone, pretrained, weights)
        if isinstance(feature_cache, (str, os.PathLike)):
            from ..features.images import FeatureCache

            feature_cache = FeatureCache(feature_cache)
        self.feature_cache: FeatureCache | None = feature_cache
        self._feature_settings: str | None = None

    @property
    def is_fitted(self) -> bool:
        n = self.config.n_score_subspaces
        return len(self.subspaces) == n and len(self.map_subspaces) == len(self.config.layer_features) - n

    # ------------------------------------------------------------------------------------------------ features
    def _image_batches(self, data: Any, batch_size: int) -> Iterator[Tensor]:
        """``_batches`` of ``data`` for this detector: encoded JPEGs decoded on its device, at its load size."""
        return _batches(data, batch_size, self.device, self.config.load_size)

    @torch.inference_mode()
    def features(self, images: Tensor) -> list[Tensor]:
        """uint8 images ``(B, 3, H, W)`` (any device) -> one float32 row per image and subspace, ``[(B, D_s)]`` on the
        device: the score head's subspaces first, then the map head's (``config.layer_features`` gives each D).

        A row holds the layer's C x gh x gw vector of each tile, tile after tile (one tile untiled). Images not at
        ``config.load_size`` are resized on the device with the data reader's LANCZOS, to the same pixels
        (``lanczos_resize``); so a batch of raw tensors at their own size gives the features of the reader's resized
        images. A head whose image is smaller than the load size (a map head at a second size) resizes on the
        device from the load size (bilinear, antialiased).
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        rows = self._layer_rows(images) if self.feature_cache is None else self._cached_layer_rows(images)
        if self.config.fusion != "concat":
            return rows
        out, start = [], 0
        for head in self.config.heads:  # one concatenated row per head
            n = len(head.layers)
            out.append(torch.cat(rows[start:start + n], dim=1) if n > 1 else rows[start])
            start += n
        return out

    def _layer_rows(self, images: Tensor) -> list[Tensor]:
        """uint8 images -> per-layer rows ``[(B, T * C_l * gh * gw)]`` of every head, through the backbone passes."""
        images = images.to(self.device, non_blocking=True)
        size = as_hw(self.config.load_size)
        if tuple(images.shape[-2:]) != size:  # the reader's resize, PIL's LANCZOS, to its pixels, on the device
            images = lanczos_resize(images, size)
        x = self.normalize(images)
        b = x.shape[0]
        if self.compiled:
            self._static_batch = max(self._static_batch, b)
            if b < self._static_batch:  # pad with zeros (cheap, finite); the padded rows are dropped below
                x = torch.cat([x, x.new_zeros(self._static_batch - b, *x.shape[1:])])
        by_head: dict[int, list[Tensor]] = {}
        for index, (head, members) in enumerate(self._passes):
            xp = x if tuple(x.shape[-2:]) == head.image_size else F.interpolate(
                x, size=head.image_size, mode="bilinear", antialias=True, align_corners=False)
            xp = cut_tiles(xp, head).contiguous(memory_format=torch.channels_last)
            for i, rows in zip(members, self._backbone(xp, index)):
                by_head[i] = [r.view(x.shape[0], -1)[:b] for r in rows]  # (B * T, D) -> (B, T * D): tile after tile
        return [r for i in range(len(self.config.heads)) for r in by_head[i]]

    def _extract_embed(self, x: Tensor, index: int) -> list[list[Tensor]]:
        """Normalised float inputs of pass ``index`` -> for each head of that pass, its embedded rows (the compiled
        step). The backbone runs only as far as the pass's deepest layer."""
        head, members = self._passes[index]
        heads = [self.config.heads[i] for i in members]
        with autocast(self.device, self.precision):
            maps = self.extractor(x, layers=[name for h in heads for name in h.layers])
        return [embed([maps[name] for name in h.layers], h.grid) for h in heads]

    def _cached_layer_rows(self, images: Tensor) -> list[Tensor]:
        """``_layer_rows`` through ``feature_cache``: entries found are read, the rest computed (one backbone call
        for the batch's misses) and stored. Hashing and storing need the images and rows on the host: with a
        DataLoader the images already are; storing misses copies their rows back (a sync, paid once per image)."""
        cache = self.feature_cache
        dims = self.config.layer_dims
        settings = self.feature_settings()
        keys = [cache.key(image, settings) for image in images.cpu()]
        found = [cache.get(key, sum(dims)) for key in keys]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            subset = images if len(missing) == len(keys) else images[missing]
            computed = torch.cat(self._layer_rows(subset), dim=1).cpu()
            for j, i in enumerate(missing):
                cache.put(keys[i], computed[j])
                found[i] = computed[j]
        rows = torch.stack(found).to(self.device, non_blocking=True)
        return [r.contiguous() for r in rows.split(dims, dim=1)]

    def feature_settings(self) -> str:
        """Everything besides the input pixels that shapes ``features``, as one string (``FeatureCache`` keys):
        a SHA-256 of the backbone's weights as loaded, each head's layers, sizes, grid and tiles, the normalisation,
        compute dtype, device type, compilation and the torch version. Computed once per detector."""
        if self._feature_settings is None:
            h = hashlib.sha256()
            for name, t in self.extractor.state_dict().items():
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
                h.update(t.view(torch.uint8).numpy().data)
            c, spec = self.config, self.config.spec
            heads = ";".join(f"{','.join(g.layers)}@{g.image_size}/{g.pass_size}:{g.grid}:{g.tiles}" for g in c.heads)
            self._feature_settings = (
                f"{c.backbone}|weights={h.hexdigest()}|heads={heads}|load={c.load_size}|mean={spec.mean}|"
                f"std={spec.std}|dtype={backbone_dtype(self.device, self.precision)}|device={self.device.type}|"
                f"compiled={self.compiled}|torch={torch.__version__}")
        return self._feature_settings

    @torch.inference_mode()
    def warmup(self, batch_size: int) -> FREDetector:
        """Run one batch of zeros through the feature path, so compilation (``compile=True``) and one-time
        allocations happen before a timed run and fix the static batch size."""
        h, w = as_hw(self.config.load_size)
        self.features(torch.zeros(batch_size, 3, h, w, dtype=torch.uint8, device=self.device))
        return self

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, data: Any, *, batch_size: int = 32, cell_statistics: bool = True,
            grams: list[Tensor | None] | None = None) -> FREDetector:
        """Fit the subspaces of both heads on normal images, in one streaming pass.

        Args:
            data: uint8 images ``(N, 3, H, W)``, or an iterable (e.g. ``make_loader``) of such batches or of dicts
                with an ``"image"`` entry.
            batch_size: batch size when ``data`` is a tensor.
            cell_statistics: with ``image_score='top'``, also estimate each score-head cell's normal mean and
                standard deviation by ``CELL_FOLDS``-fold cross-fitting of the score head on the same features
                (closed-form PCA fits, no second backbone pass). False keeps the current ones (cross-fitting's own
                fold models take their parent's).
            grams: a list that receives, in subspace order, each subspace's ``(N, N)`` float64 Gram matrix of the
                training rows in ``data``'s order (None where the covariance solver ran), for fold fits of the same
                rows (``FREDetector.fit_subset``'s ``shared``). Left empty in data-parallel runs and modes other
                than 'pca'.

        Each subspace is fitted on its vectors (with tiling: every tile of every image). In data-parallel mode
        (``fre_torch.core.distributed.init_from_env``) ``data`` is this rank's shard: the statistics of all ranks are
        merged exactly and every rank ends with the same fit (as do ``calibrate``'s quantiles).
        """
        if self.config.kernel is not None:
            return self._fit_kernel(data, batch_size)
        if self.config.mode != "pca":
            return self._fit_autoencoder(data, batch_size, cell_statistics)
        n = _length(data)
        accs: list[GramAccumulator | CovarianceAccumulator] = []
        for d, t in zip(self.config.subspace_dims, self._tiles_per_subspace()):
            solver = resolve_solver(self.config.solver, n * t if n is not None else d, d)
            accs.append(GramAccumulator(d, device=self.device) if solver == "gram"
                        else CovarianceAccumulator(d, device=self.device))
        keep = self.config.image_score == "top" and cell_statistics
        score_rows = self._row_buffers(n, self.config.layer_features[:self.config.n_score_subspaces]) if keep else []
        start = 0
        for batch in self._image_batches(data, batch_size):
            feats = self.features(batch)
            # No per-batch host sync: finiteness is checked once, on the accumulated statistics.
            for acc, rows in zip(accs, feats):
                acc.update(rows.view(-1, acc.n_features), check_finite=False)
            for buf, rows in zip(score_rows, feats):  # the score head's rows, for the cross-fitted cell statistics
                buf[start:start + rows.shape[0]] = rows
            start += batch.shape[0]
        # Data-parallel (fre_torch.core.distributed): ``data`` was this rank's shard; merge all ranks' statistics
        # exactly. The identity otherwise.
        accs = [reduce_accumulator(acc, self.config.solver) for acc in accs]
        self._set_models([self._solve(acc) for acc in accs])
        if grams is not None and not is_distributed():
            grams[:] = [acc.gram if isinstance(acc, GramAccumulator) else None for acc in accs]
        if keep:
            # One process: the score head's Gram accumulators hold these very rows, in this order, and their Gram
            # matrices are formed already; the fold fits take blocks of them.
            shared = [(acc.gram, None) if isinstance(acc, GramAccumulator) else None
                      for acc in accs[:len(score_rows)]] if not is_distributed() else None
            self._fit_cell_statistics([gather_rows(r[:start]) for r in score_rows], shared)
        return self

    def _row_buffers(self, n: int | None, dims: Sequence[int]) -> list[Tensor]:
        if n is None:
            raise ValueError("image_score='top' needs a sized training set (a tensor, a list or a DataLoader) to "
                             "keep its rows for the cell statistics; or use image_score='fre'")
        return [torch.empty(n, d, device=self.device) for d in dims]

    def _fit_cell_statistics(self, rows: Sequence[Tensor],
                             shared: list[tuple[Tensor, Tensor | None] | None] | None = None) -> None:
        """Each score-head cell's mean and standard deviation on out-of-fold normal images.

        ``rows``: the score head's ``(N, D_s)`` rows of every training image (all ranks'). The images are cut into
        ``CELL_FOLDS`` seeded folds; each fold's cell maps come from score-head subspaces fitted (closed-form PCA, in
        float64, at the configured ``n_components``) on the other folds, divided by those subspaces' own scales, so
        every map is that of an image its model did not see -- as a test image's is. In-sample maps would be far too
        small (17x on MVTec bottle). Fewer than 4 images: mean 0, standard deviation 1 (the raw cells). ``shared``:
        the Gram matrices and float64 rows of ``rows`` where the caller has them (see ``_subset_models``).
        """
        head = self.config.score_head
        n = rows[0].shape[0]
        cells = head.n_tiles * head.grid[0] * head.grid[1]
        if n < 4:
            self.cell_mean = torch.zeros(cells, device=self.device)
            self.cell_std = torch.ones(cells, device=self.device)
            return
        k = min(CELL_FOLDS, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(self.device)
        fold_of = torch.empty(n, dtype=torch.int64, device=self.device)
        fold_of[order] = torch.arange(n, device=self.device) % k
        oof = torch.empty(n, cells, device=self.device)
        shared = list(shared) if shared is not None else [None] * len(rows)
        for f in range(k):
            held = fold_of == f
            models = self._subset_models(rows, ~held, shared)
            scales = self._scales(models)
            maps = self._cell_maps([r[held] for r in rows], models, scales, head, index=torch.nonzero(held).flatten())
            oof[held] = maps.flatten(1)
        self.cell_mean = oof.mean(dim=0)
        std = oof.std(dim=0)
        # A cell that is constant on normal images (padding, a fixed background) would divide by ~0: floor the
        # deviation at a millionth of the largest one.
        self.cell_std = std.clamp_min(float(std.max()) * 1e-6 + torch.finfo(torch.float32).tiny)

    def _subset_models(self, rows: Sequence[Tensor], keep: Tensor,
                       shared: list[tuple[Tensor, Tensor | None] | None]) -> list[RowSpanSubspace | Subspace]:
        """Closed-form PCA fits (float64, the configured ``n_components``) of the images ``keep`` selects, one per
        entry of ``rows`` (``(N, D_s)`` as ``features`` gives them, the first subspaces' in order).

        Where the Gram solver applies, in dual form (``fit_row_span``) from a block of the Gram matrix of all ``N``
        images' rows: ``shared[i]`` (that Gram matrix, or ``(gram, None)`` when the caller has it, and one float64
        copy of the rows) is formed on first use and kept by the caller, so ``k`` fold fits cost one Gram matrix
        instead of ``k`` Gram matrices and ``k`` sets of components. Else (the covariance solver, or float64 copies
        beyond ``ROW_SPAN_MAX_BYTES``) ``fit_rows`` on the kept rows.
        """
        models: list[RowSpanSubspace | Subspace] = []
        n_keep = int(keep.sum())
        for i, (r, d) in enumerate(zip(rows, self.config.subspace_dims)):
            flat = r.reshape(-1, d)
            tiles = flat.shape[0] // r.shape[0]
            kept = keep.repeat_interleave(tiles)  # each image's tiles are consecutive rows
            gram, rows64 = shared[i] if shared[i] is not None else (None, None)
            if rows64 is None and resolve_solver(self.config.solver, n_keep * tiles, d) == "gram":
                held = sum(t.numel() * t.element_size() for entry in shared if entry is not None
                           for t in entry if t is not None)
                need = flat.shape[0] * (d + (flat.shape[0] if gram is None else 0)) * _FIT_BYTES
                if held + need <= ROW_SPAN_MAX_BYTES:
                    rows64 = flat.to(FIT_DTYPE)
                    if gram is None:
                        gram = gram_matrix(rows64)
                        if not bool(torch.isfinite(gram).all()):
                            raise ValueError("NaN or Inf features on the training images; check the weights file "
                                             "and the input images")
                    shared[i] = (gram, rows64)
            if rows64 is None:
                # The covariance solver, or float64 copies beyond the budget (thousands of images): a fit per fold.
                models.append(fit_rows(flat[kept], self.config.n_components, solver=self.config.solver))
                continue
            models.append(fit_row_span(rows64, self.config.n_components, gram=gram, keep=kept))
        return models

    def fit_subset(self, rows: Sequence[Tensor], keep: Tensor, *,
                   shared: list[tuple[Tensor, Tensor | None] | None] | None = None) -> FREDetector:
        """Fit both heads (mode 'pca') on the training rows of the images ``keep`` selects, without the backbone;
        the cell statistics stay as they are. For scoring held-out images once (``fre_torch.jobs.crossfit``): where
        the Gram solver applies the models are ``RowSpanSubspace`` (dual form, not saved in model files).

        Args:
            rows: every subspace's ``(N, D_s)`` rows, as ``features`` gives them.
            keep: ``(N,)`` bool, the images to fit on.
            shared: one slot per subspace for the Gram matrix and float64 copy of all ``N`` images' rows, filled
                on first use: pass the same list to every fold of one set of rows.
        """
        if self.config.mode != "pca" or self.config.kernel is not None:
            raise ValueError(f"fit_subset fits closed-form PCA; got mode={self.config.mode!r}, "
                             f"kernel={self.config.kernel!r}")
        if len(rows) != len(self.config.subspace_dims):
            raise ValueError(f"expected rows for {len(self.config.subspace_dims)} subspaces, got {len(rows)}")
        shared = shared if shared is not None else [None] * len(rows)
        self._set_models(self._subset_models(rows, keep.to(rows[0].device), shared))
        return self

    def _tiles_per_subspace(self) -> list[int]:
        return [head.n_tiles for head in self.config.heads for _ in self.config._fused(head, head.dims)]

    def _set_models(self, models: Sequence[nn.Module], residual_models: Sequence[Any] | None = None) -> None:
        """Install fitted models (score head's first) and their score scales."""
        n = self.config.n_score_subspaces
        scales = self._scales(residual_models if residual_models is not None else models)
        self.subspaces, self.map_subspaces = nn.ModuleList(models[:n]), nn.ModuleList(models[n:])
        self.scales, self.map_scales = scales[:n], scales[n:]

    def _scales(self, subspaces: Sequence[Subspace | LinearAutoencoder]) -> Tensor:
        total = torch.stack([s.total_variance for s in subspaces])
        residual = torch.stack([_residual_variance(s) for s in subspaces])
        if not self.config.normalize_scores:
            return torch.ones_like(residual)
        # With few training images the subspace can keep every direction they span (k = N - 1): the residual is then
        # 0 up to rounding and FRE / residual is inf for every test image. Floor it at a millionth of the layer's
        # total variance (still scale-free; far above float64 rounding, far below any residual a 0.97 cut leaves),
        # and at the smallest float64 for a constant training set.
        floor = (total * _MIN_RESIDUAL_FRACTION).clamp_min(torch.finfo(torch.float64).tiny)
        return torch.maximum(residual, floor)

    def _fit_kernel(self, data: Any, batch_size: int) -> FREDetector:
        """Kernel mode: the bandwidth (median heuristic) and landmarks come from ALL training vectors, so their rows
        are gathered (``_gather_rows``), then fitted in one shot."""
        models = [self._kernel_model().fit(r) for r in self._gather_rows(data, batch_size, "kernel mode")]
        self._set_models(models, [m.fitted_subspace() for m in models])
        return self

    def _fit_autoencoder(self, data: Any, batch_size: int, cell_statistics: bool = True) -> FREDetector:
        """Modes 'tae' / 'ae': gradient descent runs over all training rows many times, so they are gathered
        (``_gather_rows``); one autoencoder per subspace, each seeded alike (deterministic). The cell statistics
        come from closed-form fold fits, as in mode 'pca' (the autoencoders converge to the same subspaces)."""
        rows = self._gather_rows(data, batch_size, f"mode={self.config.mode!r}")
        self._set_models([self._autoencoder_model().fit(r, seed=0) for r in rows])
        if self.config.image_score == "top" and cell_statistics:
            tiles = self.config.score_head.n_tiles
            n = self.config.n_score_subspaces
            self._fit_cell_statistics([r.view(-1, tiles * r.shape[1]) for r in rows[:n]])
        return self

    def _gather_rows(self, data: Any, batch_size: int, what: str) -> list[Tensor]:
        """All training vectors, one ``(N * T, D_s)`` float32 tensor per subspace on the device (data-parallel:
        every rank's rows, in order), checked finite once per subspace after the loop."""
        n = _length(data)
        if n is None:
            raise ValueError(f"{what} needs a sized training set (a tensor, a list or a DataLoader)")
        rows = [torch.empty(n, d, device=self.device) for d in self.config.layer_features]
        start = 0
        for batch in self._image_batches(data, batch_size):
            if start + batch.shape[0] > n:
                raise ValueError(f"the training loader yielded more than the {n} images it reports")
            for buf, r in zip(rows, self.features(batch)):
                buf[start:start + r.shape[0]] = r
            start += batch.shape[0]
        # Fewer than reported: a loader that drops unreadable images (``fre_torch.jobs.predict.fit_folder``).
        rows = [gather_rows(r[:start]) for r in rows]  # data-parallel: every rank's rows, in order
        rows = [r.view(-1, d) for r, d in zip(rows, self.config.subspace_dims)]
        for r in rows:
            check_features(r, name="training features")  # one sync per subspace, after the loop
        return rows

    def _kernel_model(self) -> nn.Module:
        from ..core.kernel import KernelFRE

        c = self.config
        return KernelFRE(c.n_components, kernel=c.kernel, method=c.kernel_method, kernel_features=c.kernel_features,
                         device=self.device)

    def _autoencoder_model(self) -> LinearAutoencoder:
        return LinearAutoencoder(self.config.n_components, tied=self.config.mode == "tae", device=self.device)

    def _solve(self, acc: GramAccumulator | CovarianceAccumulator) -> Subspace:
        stats = acc.gram if isinstance(acc, GramAccumulator) else acc.scatter
        if not bool(torch.isfinite(stats).all()):
            raise ValueError("the backbone produced NaN or Inf features on the training images; "
                             "check the weights file and the input images")
        return fit_accumulator(acc, self.config.n_components, what="training images")

    # ------------------------------------------------------------------------------------------------ scoring
    def score_features(self, features: Sequence[Tensor], *, index: Tensor | None = None) -> Tensor:
        """The image score from ``features``' rows -> (B,) float32: with ``image_score='top'`` the mean of the
        largest standardised score-head cells (``score_from_cells``), with 'fre' the score head's
        ``sum_l sum_tiles FRE_l / scale_l``. ``index``: as ``head_maps``'."""
        self._fitted()
        if self.config.image_score == "top":
            return self.score_from_cells(self.head_maps(features, "score", stitched=False, index=index))
        total = None
        kernel = self.config.kernel is not None
        head = self.config.score_head
        for model, rows, scale in zip(self.subspaces, features, self.scales):
            flat = rows.view(rows.shape[0] * head.n_tiles, -1)
            if index is not None and isinstance(model, RowSpanSubspace):
                fre = model.residual_of_rows(_own_rows(index, head.n_tiles)).square_().sum(dim=1).to(flat.dtype)
            else:
                fre = model.score(flat) if kernel else model.fre(flat)
            fre = fre.view(rows.shape[0], -1).sum(dim=1)
            fre = fre / scale.to(fre.dtype)
            total = fre if total is None else total + fre
        return total

    def score_from_cells(self, cells: Tensor) -> Tensor:
        """The image score from the score head's unstitched maps ``(B, T, gh, gw)`` -> (B,) float32.

        'top': each cell standardised by its out-of-fold normal mean and standard deviation (``cell_mean``,
        ``cell_std``), then the mean of the ``ceil(top_fraction * cells)`` largest. 'fre': the sum of all cells.
        """
        flat = cells.flatten(1)
        if self.config.image_score == "fre":
            return flat.sum(dim=1)
        if self.cell_mean.numel() != flat.shape[1]:
            raise ValueError("this detector has no cell statistics for image_score='top': fit it (fit computes them) "
                             "or load a model file that has them")
        z = (flat - self.cell_mean.to(flat.dtype)) / self.cell_std.to(flat.dtype)
        k = max(1, math.ceil(self.config.top_fraction * flat.shape[1]))
        return z.topk(k, dim=1).values.mean(dim=1)

    def _cell_maps(self, rows: Sequence[Tensor], models: Sequence[nn.Module], scales: Tensor,
                   geometry: HeadGeometry, index: Tensor | None = None) -> Tensor:
        """One head's unstitched maps ``(B, T, gh, gw)``: each subspace's squared residual summed over channels,
        divided by its scale, summed over the head's subspaces. ``index``: where ``rows`` are the models' own
        training rows (images held out of a fold fit, ``(B,)`` positions), a dual-form model scores them from its
        Gram matrix (``RowSpanSubspace.residual_of_rows``: half the products)."""
        gh, gw = geometry.grid
        t = geometry.n_tiles
        total = None
        for model, r, scale in zip(models, rows, scales):
            b = r.shape[0]
            if index is not None and isinstance(model, RowSpanSubspace):
                err = model.residual_of_rows(_own_rows(index, t)).square_().to(r.dtype).view(b, t, -1, gh, gw)
            else:
                err = model.error_map(r.reshape(b * t, -1)).view(b, t, -1, gh, gw)
            err = err.sum(dim=2) / scale.to(err.dtype)
            total = err if total is None else total + err
        return total

    def head_maps(self, features: Sequence[Tensor], head: str = "map", *, stitched: bool = True,
                  index: Tensor | None = None) -> Tensor:
        """One head's anomaly maps from ``features``' rows.

        Each subspace's squared reconstruction error is reshaped to ``(B, T, C, gh, gw)``, summed over channels and
        divided by the subspace's scale; a head's layers are summed (they share the grid). A vector inside its
        subspace gives a map of exactly zero up to rounding.

        With a detail head, 'map' is the geometric mean of the map head's map, upsampled bilinear to the detail grid,
        and the detail head's map (both are squared residuals, so it is >= 0, and 0 wherever either model
        reconstructs the cell exactly).

        Args:
            features: rows from ``features``.
            head: 'map' (the anomaly map: the map head's, combined with the detail head's where there is one; the
                score head's when there is no map head), 'score', 'coarse' (the map head's alone) or 'detail'.
            stitched: the tiles placed on the image's grid, ``(B, GH, GW)``; False gives them apart,
                ``(B, T, gh, gw)``. The score head's unstitched maps are the cells of the image score
                (``score_from_cells``); with ``image_score='fre'`` the score is their sum (up to rounding: that
                score uses the one-product FRE, maps the explicit residual).
            index: ``(B,)`` positions of these images among the training rows of the models (images held out of
                a fold fit, ``fit_subset``): dual-form models then score them from their Gram matrix.
        """
        self._fitted()
        if self.config.kernel is not None:
            raise ValueError("anomaly maps need the linear mode: kernel FRE is computed on whole-image vectors, whose "
                             "kernel features have no spatial layout; fit with kernel=None for maps")
        if head not in ("map", "score", "coarse", "detail"):
            raise ValueError(f"head must be 'map', 'score', 'coarse' or 'detail', got {head!r}")
        c = self.config
        n, m = c.n_score_subspaces, c.n_map_subspaces
        if head == "score" or not self.map_subspaces:
            geometry, models, rows_, scales = c.score_head, self.subspaces, features[:n], self.scales
        elif head == "detail" or (head == "map" and c.detail_head is not None):
            if c.detail_head is None:
                raise ValueError("this detector has no detail head (detail_layers=None)")
            fine = self._cell_maps(features[n + m:], self.map_subspaces[m:], self.map_scales[m:], c.detail_head,
                                   index)
            if head == "detail":
                return stitch(fine, c.detail_head) if stitched else fine
            coarse = self.head_maps(features, "coarse", index=index)
            coarse = F.interpolate(coarse[:, None], size=fine.shape[-2:], mode="bilinear", align_corners=False)
            # Geometric mean: high only where both agree (the coarse map's context, the fine map's outline). Both are
            # sums of squared residuals (>= 0); the clamp only guards rounding of the bilinear weights.
            both = (coarse[:, 0].clamp_min(0) * fine[:, 0].clamp_min(0)).sqrt()
            return both if stitched else both[:, None]
        else:
            geometry, models, rows_, scales = c.map_head, self.map_subspaces[:m], features[n:n + m], self.map_scales[:m]
        total = self._cell_maps(rows_, models, scales, geometry, index)
        return stitch(total, geometry) if stitched else total

    def maps_from_features(self, features: Sequence[Tensor]) -> Tensor:
        """The anomaly maps ``(B, GH, GW)`` float32 from ``features``' rows: the map head's (``head_maps``)."""
        return self.head_maps(features, "map")

    @torch.inference_mode()
    def anomaly_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images ``(B, 3, H, W)`` -> (scores ``(B,)``, maps ``(B, GH, GW)``), both float32 on the device:
        the score from the score head, the map from the map head, in one backbone pass (two with ``map_input_size``).

        Use ``upsample_maps`` to bring the maps to each image's own size.
        """
        feats = self.features(images)
        return self.score_features(feats), self.maps_from_features(feats)

    # ------------------------------------------------------------------------------------------------ threshold
    def calibrate(self, held_out: Any, *, quantile: float = 0.99, batch_size: int = 32) -> FREDetector:
        """Set the decision threshold from normal images the subspaces were NOT fitted on.

        The threshold is the ``quantile`` of their scores (linear interpolation, ``torch.quantile``), so about
        ``1 - quantile`` of normal images are flagged; no anomalous example and no test label is used. The sorted
        held-out scores are kept for ``calibrated_score``. In linear mode the same pass sets ``map_scale`` and
        ``map_floor`` (the heatmap colour scale) from the held-out maps.
        """
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}; e.g. 0.99 flags about 1 % of normal images")
        if self.config.kernel is None:
            scores, maps = self.score_and_maps(held_out, batch_size=batch_size)
        else:
            scores, maps = self.score(held_out, batch_size=batch_size), None
        # Data-parallel: ``held_out`` was this rank's shard; the quantiles need every rank's (identity otherwise).
        scores, maps = gather_rows(scores), None if maps is None else gather_rows(maps)
        scores = scores.float()
        if scores.numel() < 2:
            raise ValueError(f"need at least 2 held-out normal images to set a threshold, got {scores.numel()}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("held-out normal images produced NaN/Inf scores; check the images and weights")
        self.calibration_scores = torch.sort(scores).values
        self.threshold = torch.quantile(scores, quantile)
        self.threshold_quantile = float(quantile)
        if maps is not None:
            self.map_scale, self.map_floor = _map_levels(maps)
        return self

    @torch.inference_mode()
    def set_map_scale(self, normal: Any, *, batch_size: int = 32) -> FREDetector:
        """Set the heatmap colour scale from normal images' grid-map values: ``map_scale``, shown as full colour, their
        ``MAP_SCALE_QUANTILE``, and ``map_floor``, where colour starts, their ``MAP_FLOOR_QUANTILE``. Prefer images
        the subspaces were not fitted on (``calibrate`` does this with the held-out split, ``fre_torch.jobs.crossfit``
        with out-of-fold maps); the training images' own residuals are far smaller (17x on MVTec bottle), which
        would make every test heatmap saturate."""
        _, maps = self.score_and_maps(normal, batch_size=batch_size)
        maps = gather_rows(maps)  # data-parallel: every rank's maps (identity otherwise)
        self.map_scale, self.map_floor = _map_levels(maps)
        return self

    def threshold_stats(self) -> ThresholdStats:
        """How far the held-out threshold can be trusted: the number of held-out images, the threshold's rank among
        their scores, the false-positive rate on them, and a 95 % interval of the rate on new normal images
        (``fre_torch.detection.threshold``). Read from the stored held-out scores, so a loaded model gives the same."""
        if self.calibration_scores.numel() == 0 or self.threshold_quantile is None:
            raise ValueError("this detector has no held-out threshold; fit it with a held-out split (cli.py fit) or "
                             "call calibrate(held_out_normal_images)")
        return threshold_stats(self.calibration_scores, float(self.threshold), self.threshold_quantile)

    def calibrated_score(self, scores: Tensor) -> Tensor:
        """Fraction of held-out normal scores at or above each score, (N,) -> (N,) in [0, 1]: a p-value-like
        number that reads the same for every model (small = unusual)."""
        if self.calibration_scores.numel() == 0:
            raise ValueError("this detector has no calibration; fit it with a held-out split (cli.py fit) or call "
                             "calibrate(held_out_normal_images)")
        ref = self.calibration_scores
        below = torch.searchsorted(ref, scores.to(ref.dtype).contiguous(), right=False)
        return (ref.numel() - below).to(torch.float32) / ref.numel()

    @torch.inference_mode()
    def score_and_maps(self, data: Any, *, batch_size: int = 32) -> tuple[Tensor, Tensor]:
        """Scores ``(N,)`` and anomaly maps ``(N, GH, GW)`` for a tensor or loader of images, in one pass."""
        self._fitted()
        scores, maps = zip(*(self.anomaly_maps(batch) for batch in self._image_batches(data, batch_size)))
        return torch.cat(scores), torch.cat(maps)

    @torch.inference_mode()
    def score(self, data: Any, *, batch_size: int = 32) -> Tensor:
        """Image anomaly scores ``(N,)`` float32 on ``self.device`` (higher = more anomalous)."""
        self._fitted()
        # One small (B,) tensor per batch, joined at the end: no host sync inside the loop.
        return torch.cat([self.score_features(self.features(batch)) for batch in self._image_batches(data, batch_size)])

    def _fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("this detector is not fitted yet; call fit(...) or FREDetector.load(path)")

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write config + fitted subspaces (not the backbone weights, which are re-created from their source).

        The file loads with ``torch.load(weights_only=True)``: tensors and plain Python values only. It is written
        to a temporary name and renamed, so an interrupted save leaves no half-written file.
        """
        self._fitted()
        path = Path(path)
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config.to_dict(),
            "pretrained": self.pretrained,
            "weights_id": self._weights_id,
            "subspaces": [{k: v.detach().cpu() for k, v in s.state_dict().items()} for s in self.subspaces],
            "scales": self.scales.detach().cpu(),
            "map_subspaces": [{k: v.detach().cpu() for k, v in s.state_dict().items()} for s in self.map_subspaces],
            "map_scales": self.map_scales.detach().cpu(),
            "cell_mean": self.cell_mean.detach().cpu(),
            "cell_std": self.cell_std.detach().cpu(),
            "calibration_scores": self.calibration_scores.detach().cpu(),
            "threshold": self.threshold.detach().cpu(),
            "threshold_quantile": self.threshold_quantile,
            "map_scale": self.map_scale.detach().cpu(),
            "map_floor": self.map_floor.detach().cpu(),
        }
        if self.calibration_scores.numel() and self.threshold_quantile is not None:
            # Derived from the held-out scores above (load recomputes it); stored in plain values for readers of the
            # file without fre_torch.
            payload["threshold_stats"] = self.threshold_stats().to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             weights: str | os.PathLike | None = None, compile: bool = False,
             precision: str = "auto") -> FREDetector:
        """Re-create a saved detector on ``device``; it scores identically to the saved one on the same device
        (``compile`` and ``precision`` as in the constructor: run-time choices, not part of the model)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt or foreign file: never unpickle arbitrary objects
            raise ModelFileError(f"{path} is not a readable fre_torch model file ({type(err).__name__}); "
                                 "re-create it with FREDetector.save or `cli.py fit`") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ModelFileError(f"{path} is not a fre_torch detector file")
        version = payload.get("version")
        if version not in (1, 2, _VERSION):
            raise ModelFileError(f"{path} has model-file version {version}; this fre_torch reads versions 1 to "
                                 f"{_VERSION}")
        config_dict = dict(payload["config"])
        if version < 3:
            config_dict["detail_layers"] = None  # written before the detail head: maps from the map head alone
        if version == 1:
            # Written before the two heads: its maps came from the score layers. Converted as such, so it loads and
            # scores exactly as it did (DetectorConfig's map head default would ask for subspaces it does not have).
            config_dict["map_layers"] = None
            config_dict["image_score"] = "fre"
        config = DetectorConfig.from_dict(config_dict)
        saved_id = str(payload.get("weights_id", ""))
        if weights is None and saved_id.startswith("file:"):
            raise ModelFileError(f"{path} was fitted with a local backbone weights file "
                                 f"({saved_id[5:]}); pass the same file with weights=")
        det = cls(config, device=device, pretrained=bool(payload.get("pretrained", True)), weights=weights,
                  compile=compile, precision=precision)
        if det._weights_id != saved_id:
            raise ModelFileError(f"{path} was fitted with backbone weights {saved_id!r}, "
                                 f"but these are {det._weights_id!r}")
        states = list(payload["subspaces"]) + list(payload.get("map_subspaces", []))
        if len(states) != len(config.subspace_dims):
            raise ModelFileError(f"{path}: {len(states)} subspaces where the config implies "
                                 f"{len(config.subspace_dims)}")
        subspaces = []
        for state, d in zip(states, config.subspace_dims):
            if config.kernel is not None:
                model = det._kernel_model()
                model.load_state_dict(state)
                subspaces.append(model.to(det.device))
                continue
            sub = Subspace() if config.mode == "pca" else det._autoencoder_model()
            sub.load_state_dict(state)
            if sub.n_features != d:
                raise ModelFileError(f"{path}: a subspace has {sub.n_features} features, the config implies {d}")
            subspaces.append(sub.to(det.device))
        n = config.n_score_subspaces
        det.subspaces, det.map_subspaces = nn.ModuleList(subspaces[:n]), nn.ModuleList(subspaces[n:])
        det.scales = payload["scales"].to(det.device)
        det.map_scales = payload.get("map_scales", torch.ones(0, dtype=torch.float64)).to(det.device)
        det.cell_mean = payload.get("cell_mean", torch.zeros(0)).to(det.device)
        det.cell_std = payload.get("cell_std", torch.ones(0)).to(det.device)
        if "calibration_scores" in payload:
            det.calibration_scores = payload["calibration_scores"].to(det.device)
            det.threshold = payload["threshold"].to(det.device)
            det.threshold_quantile = payload.get("threshold_quantile")
        if "map_scale" in payload:
            det.map_scale = payload["map_scale"].to(det.device)
        # Files written before the colour floor have none: 0 colours every value above 0, as they were drawn then.
        # An additive key, so no new file version (an older fre_torch reading a newer file ignores it).
        if "map_floor" in payload:
            det.map_floor = payload["map_floor"].to(det.device, torch.float64)
        return det


DETAIL_MIN_SCALE = 1.5
"""``with_detail_for`` keeps the detail head when the training images' median short side is at least this many times
the map head's input short side: the finer grid then shows detail the images carry (a 28 x 28 cell at 224 px spans
12 or more of their own pixels), rather than resampled pixels. Measured: bottle (384 px, 1.7x) and screw (512 px,
2.3x) gain PRO +0.010 / +0.021 with it; magnetic_tile (median short side 257 px, 1.15x; a third of its images are
narrower than 224 px) loses pixel AUROC 0.016."""


def with_detail_for(config: DetectorConfig, sizes: Sequence[tuple[int, int]]) -> DetectorConfig:
    """``config`` with its detail head kept only if the training images are large enough (``DETAIL_MIN_SCALE``).

    Args:
        config: a configuration; returned unchanged without a detail head or without ``sizes``.
        sizes: ``(H, W)`` of the training images as stored (before any resizing).

    Returns:
        ``config``, or a copy with ``detail_layers=None`` when the median short side of ``sizes`` is below
        ``DETAIL_MIN_SCALE`` times the short side of the map head's input.
    """
    head = config.detail_head
    if head is None or not sizes:
        return config
    short = torch.tensor([min(h, w) for h, w in sizes], dtype=torch.float64)
    if float(short.median()) >= DETAIL_MIN_SCALE * min(head.image_size):
        return config
    return dataclasses.replace(config, detail_layers=None)


MAP_SCALE_QUANTILE = 0.999
"""Heatmaps draw this quantile of normal images' grid-map values (``map_scale``) and above at full colour."""

MAP_FLOOR_QUANTILE = 0.99
"""Heatmaps leave values up to this quantile of normal images' grid-map values (``map_floor``) uncoloured: about 99 %
of a normal image's cells (more of its pixels, which interpolate between cells) stay plain, and colour means "above
what normal images reach"."""


def _map_quantile(maps: Tensor) -> Tensor:
    """The ``MAP_SCALE_QUANTILE`` of all values of grid maps ``(N, g, g)`` -> 0-dim float32 (exact, via kthvalue;
    torch.quantile refuses more than 16M elements)."""
    flat = maps.detach().float().flatten()
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot set the heatmap scale: no maps, or NaN/Inf in the normal images' maps")
    k = max(1, min(flat.numel(), int(round(MAP_SCALE_QUANTILE * flat.numel()))))
    return flat.kthvalue(k).values.clamp_min(torch.finfo(torch.float32).tiny)


def _map_level(maps: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of all values of grid maps ``(N, g, g)`` -> 0-dim float64: ``torch.quantile``'s (linear
    interpolation) in float64, computed with two ``kthvalue`` calls, since ``torch.quantile`` refuses inputs of more
    than 16M elements."""
    flat = maps.detach().double().flatten()
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot set the heatmap floor: no maps, or NaN/Inf in the normal images' maps")
    rank = torch.tensor(q * (flat.numel() - 1), dtype=torch.float64)  # as torch.quantile: q (N - 1), then lerp
    below = int(rank.floor())
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(min(below + 2, flat.numel())).values
    return torch.lerp(low, high, (rank - below).to(flat.device))


def _map_levels(maps: Tensor) -> tuple[Tensor, Tensor]:
    """The heatmap colour scale of normal grid maps ``(N, g, g)``: ``(map_scale, map_floor)``, their
    ``MAP_SCALE_QUANTILE`` (float32) and ``MAP_FLOOR_QUANTILE`` (float64)."""
    return _map_quantile(maps), _map_level(maps, MAP_FLOOR_QUANTILE)


def _own_rows(index: Tensor, tiles: int) -> Tensor:
    """Image positions ``(B,)`` -> their rows in a subspace's ``(N * T, D)`` training rows (image i: i*T .. i*T+T-1)."""
    return (index[:, None] * tiles + torch.arange(tiles, device=index.device)).flatten()


def _residual_variance(model: Subspace | LinearAutoencoder) -> Tensor:
    """The training variance a fitted layer model leaves out, 0-dim float64: a subspace's left-out spectrum, an
    autoencoder's measured training residual (both sums of squares over N - 1, so they agree at convergence)."""
    if isinstance(model, LinearAutoencoder):
        return model.residual_variance
    return model.total_variance - model.explained_variance.sum()


def _weights_identity(backbone: str, pretrained: bool, weights: str | os.PathLike | None) -> str:
    """A string naming the exact backbone weights, stored in model files so a mismatch is caught at load."""
    if weights is not None:
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
        return f"file:{Path(weights).name}:{digest}"
    return f"{backbone}:{'pretrained' if pretrained else 'random'}"


def upsample_maps(maps: Tensor, sizes: Sequence[tuple[int, int]] | tuple[int, int]) -> list[Tensor] | Tensor:
    """Resize grid maps ``(B, g, g)`` to image sizes (bilinear, antialiased, as the reference).

    Args:
        maps: ``(B, g, g)`` anomaly maps.
        sizes: one ``(H, W)`` for all (returns a ``(B, H, W)`` tensor) or one per map (returns a list of
            ``(H_i, W_i)`` tensors, for images of different sizes).
    """
    if isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(v, int) for v in sizes):
        return F.interpolate(maps[:, None], size=sizes, mode="bilinear", antialias=True, align_corners=False)[:, 0]
    if len(sizes) != maps.shape[0]:
        raise ValueError(f"got {len(sizes)} sizes for {maps.shape[0]} maps")
    return [F.interpolate(m[None, None], size=tuple(int(v) for v in hw), mode="bilinear", antialias=True,
                          align_corners=False)[0, 0] for m, hw in zip(maps, sizes)]
