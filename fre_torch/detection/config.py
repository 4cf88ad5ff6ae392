"""What defines a detector: ``DetectorConfig`` (the backbone, the fit, the image score) and its heads (``HeadConfig``).

A head reads some layers of one backbone pass at one image size and pools them to one grid; each has its own
subspaces (``fre_torch.detection.heads``). ``DetectorConfig`` keeps the flat fields that the library, ``cli.py`` and
the model files have always used (``layers``/``pool``, ``map_layers``/``map_pool``/``map_input_size``,
``detail_layers``/``detail_pool``); ``__post_init__`` resolves them once, here, into ``head_configs``: one
``HeadConfig`` per head, by role, which is all the detector reads. The automatic choices a training set decides
(the detail head's size rule, ``DetectorConfig.for_images``) live here too, so ``FREDetector.fit`` and the CLI make
them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.subspace import resolve_solver, select_n_components
from ..features.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, get_backbone_spec
from .geometry import HeadGeometry, as_hw, tile_offsets

__all__ = ["DefaultLayers", "DEFAULT_DETAIL_LAYERS", "DEFAULT_LAYERS", "DEFAULT_MAP_LAYERS", "DETAIL_MIN_SCALE", "DetectorConfig",
           "HEAD_ROLES", "HeadConfig", "MODES", "with_detail_for"]

# Fitting modes: closed-form PCA, or a linear autoencoder trained by gradient descent, tied or untied.
MODES = ("pca", "tae", "ae")
# The roles a head can have, in the order of ``features``' rows: the score head gives the image score; the map
# heads ('map', then 'detail', each finer than the one before) give the anomaly map together (``fuse_maps``).
HEAD_ROLES = ("score", "map", "detail")


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
# (benchmarks/studies/localisation_study.py, BENCHMARKS.md).
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
# (benchmarks/studies/local_model_study.py, BENCHMARKS.md); other backbones have no detail head unless asked for.
DEFAULT_DETAIL_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.2", "blocks.3", "blocks.4"),
}


class DefaultLayers(tuple):
    """Layer names a configuration took from a default, not from its caller: ``DetectorConfig.detail_layers`` holds
    its default detail head as one, so the head stays automatic (``DetectorConfig.for_images``) through
    ``dataclasses.replace``. Equal to the plain tuple; written to JSON and model files as a plain list, which reads
    back as asked for."""

    __slots__ = ()


@dataclass(frozen=True)
class HeadConfig:
    """One head's settings, resolved: which backbone layers it reads, pooled to which grid, at which image size.

    Attributes:
        role: one of ``HEAD_ROLES``: 'score' (the image score), 'map' or 'detail' (the anomaly map, together).
        layers: backbone layer names (``spec.layers``), all on the head's grid.
        pool: average-pooling kernel of the first layer's map: sets the grid.
        input_size: the head's image, ``(height, width)``; its tiles are cut from it when the detector tiles.
    """

    role: str
    layers: tuple[str, ...]
    pool: int
    input_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.role not in HEAD_ROLES:
            raise ValueError(f"head role must be one of {', '.join(map(repr, HEAD_ROLES))}, got {self.role!r}")


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
        n_components: 'auto' (default: 97 % of the variance, without components that carry under 1/4096 of it,
            at most 384; fitted in memory and time bounded in N, updatable: ``fre_torch.core.subspace.AUTO``),
            an int, a float in (0, 1) (explained-variance fraction, scikit-learn's rule, as the reference) or None.
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
    n_components: int | float | str | None = "auto"
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
    # Resolved from the fields above in __post_init__ (not constructor arguments, not saved: derived).
    head_configs: tuple[HeadConfig, ...] = field(init=False, repr=False, compare=False)
    # True when the detail head is the default one, not asked for: ``for_images`` may then drop it.
    detail_auto: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = get_backbone_spec(self.backbone)  # ValueError naming the known backbones
        object.__setattr__(self, "detail_auto", self.detail_layers is not None and
                           (not self.detail_layers or isinstance(self.detail_layers, DefaultLayers)))
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
        self._resolve_heads()
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
        asked = bool(self.detail_layers) and not isinstance(self.detail_layers, DefaultLayers)
        if self.detail_layers is not None and not asked:  # the default: only where it was measured, one plain pass
            default = DEFAULT_DETAIL_LAYERS.get(self.backbone, ())
            plain = self.map_layers is not None and not self.map_input_size and not self.tile_size
            object.__setattr__(self, "detail_layers", DefaultLayers(default) if default and plain else None)
            if self.detail_layers is not None:
                self._resolve_detail_pool()
            else:
                object.__setattr__(self, "detail_auto", False)
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

    def _resolve_heads(self) -> None:
        """The flat fields -> one ``HeadConfig`` per head, in ``HEAD_ROLES`` order: the one place they meet."""
        image = as_hw(self.input_size)
        second = as_hw(self.map_input_size) if self.map_input_size else image
        heads = [HeadConfig("score", self.layers, self.pool, image)]
        if self.map_layers is not None:
            heads.append(HeadConfig("map", self.map_layers, self.map_pool, second))
        if self.detail_layers is not None:
            heads.append(HeadConfig("detail", self.detail_layers, self.detail_pool, second))
        object.__setattr__(self, "head_configs", tuple(heads))

    def geometry(self, head: HeadConfig) -> HeadGeometry:
        """Where ``head``'s vectors come from and how its maps are laid out (channels, strides, grid, tiles)."""
        spec = get_backbone_spec(self.backbone)
        image = head.input_size
        tiles, pass_size = ((0, 0),), image
        if self.tile_size:
            pass_size, (sh, sw) = as_hw(self.tile_size), as_hw(self.tile_stride)
            tiles = tuple((top, left) for top in tile_offsets(image[0], pass_size[0], sh)
                          for left in tile_offsets(image[1], pass_size[1], sw))
        return HeadGeometry(head.layers, tuple(spec.layers[n].channels for n in head.layers),
                            tuple(spec.layers[n].stride for n in head.layers), pass_size, image, head.pool, tiles)

    def head_config(self, role: str) -> HeadConfig | None:
        """The head of ``role``, or None where the detector has none."""
        return next((h for h in self.head_configs if h.role == role), None)

    def _geometry_of(self, role: str) -> HeadGeometry | None:
        head = self.head_config(role)
        return None if head is None else self.geometry(head)

    @property
    def score_head(self) -> HeadGeometry:
        """The score head: ``layers`` at ``input_size`` (its tiles when tiled), pooled by ``pool``."""
        return self.geometry(self.head_configs[0])

    @property
    def map_head(self) -> HeadGeometry | None:
        """The map head (``map_layers``), or None when maps come from the score head."""
        return self._geometry_of("map")

    @property
    def detail_head(self) -> HeadGeometry | None:
        """The detail head (``detail_layers``, at the map head's image size), or None."""
        return self._geometry_of("detail")

    @property
    def map_roles(self) -> tuple[str, ...]:
        """The roles whose maps make the anomaly map, coarse to fine: the map heads, or 'score' without one."""
        roles = tuple(h.role for h in self.head_configs if h.role != "score")
        return roles or ("score",)

    @property
    def heads(self) -> tuple[HeadGeometry, ...]:
        """The score head, then the map head and the detail head where there are: the order of ``features``'
        vectors."""
        return tuple(self.geometry(h) for h in self.head_configs)

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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown detector settings {sorted(extra)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def for_images(self, sizes: Sequence[tuple[int, int]]) -> DetectorConfig:
        """This configuration for a training set whose images have ``sizes`` ``(H, W)`` as stored: the automatic
        choices made from the training images alone, in one place (``FREDetector.fit`` and ``cli.py`` call it).

        Today one: a default detail head (``detail_auto``) is kept only where the images are large enough
        (``DETAIL_MIN_SCALE``). A head asked for by name, and an empty ``sizes``, leave the configuration as it is.
        """
        if not self.detail_auto or _detail_pays(self, sizes):
            return self
        return dataclasses.replace(self, detail_layers=None)

    def with_fixed_heads(self) -> DetectorConfig:
        """This configuration with its heads as they are now, made explicit: ``for_images`` no longer changes it
        (``cli.py --map_detail on``)."""
        return self if not self.detail_auto else dataclasses.replace(self, detail_layers=tuple(self.detail_layers))


DETAIL_MIN_SCALE = 1.5
"""``with_detail_for`` keeps the detail head when the training images' median short side is at least this many times
the map head's input short side: the finer grid then shows detail the images carry (a 28 x 28 cell at 224 px spans
12 or more of their own pixels), rather than resampled pixels. Measured: bottle (384 px, 1.7x) and screw (512 px,
2.3x) gain PRO +0.010 / +0.021 with it; magnetic_tile (median short side 257 px, 1.15x; a third of its images are
narrower than 224 px) loses pixel AUROC 0.016."""


def _detail_pays(config: DetectorConfig, sizes: Sequence[tuple[int, int]]) -> bool:
    """True unless ``config``'s detail head would read images smaller than it needs (``DETAIL_MIN_SCALE``): no
    detail head, or no sizes, is True (nothing to decide)."""
    head = config.detail_head
    if head is None or not sizes:
        return True
    short = torch.tensor([min(h, w) for h, w in sizes], dtype=torch.float64)
    return float(short.median()) >= DETAIL_MIN_SCALE * min(head.image_size)


def with_detail_for(config: DetectorConfig, sizes: Sequence[tuple[int, int]]) -> DetectorConfig:
    """``config`` with its detail head kept only if the training images are large enough (``DETAIL_MIN_SCALE``),
    whether the head is the default one or asked for by name (``DetectorConfig.for_images`` decides only for the
    default one).

    Args:
        config: a configuration; returned unchanged without a detail head or without ``sizes``.
        sizes: ``(H, W)`` of the training images as stored (before any resizing).

    Returns:
        ``config``, or a copy with ``detail_layers=None`` when the median short side of ``sizes`` is below
        ``DETAIL_MIN_SCALE`` times the short side of the map head's input.
    """
    return config if _detail_pays(config, sizes) else dataclasses.replace(config, detail_layers=None)
