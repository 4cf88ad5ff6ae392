"""``FREDetector``: backbone features -> one head per role, each with streaming subspace fits -> scores and maps.

The detector owns no I/O beyond its model file (``model_file``): images arrive as uint8 tensors (or a DataLoader of
them, see ``fre_torch.features.images.make_loader``), are normalised and run through the backbone on ``device`` under
the precision policy, embedded into one vector per image and layer, and streamed into the engine's accumulators.
Nothing keeps a Python list of embeddings: the Gram path stores the (N, D) rows it needs in one tensor, the
covariance path only D x D moments.

It composes its heads (``heads.Head``, one per ``HeadConfig`` of ``config.head_configs``, by role): the backbone
passes feed every head whose input they share; the image score comes from the score head's cells, the anomaly map
from the map heads by ``heads.fuse_maps``. A head knows its layers, grid, models and scales; the detector knows none
of a head's internals.

Fusion of a head's layers (``fusion='sum'``, the default): one subspace per layer; the image score is
``sum_l FRE_l / r_l`` where ``r_l`` is layer l's residual variance on the training set (the variance its subspace
leaves out, i.e. the expected FRE of a normal image). Dividing by it puts layers of very different scales in the
same unit, so each depth counts equally. With ``normalize_scores=False`` and one layer (the reference
configuration) the score is the plain FRE. ``fusion='concat'`` instead concatenates a head's layers' vectors into
one and fits a single subspace to it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.allocator import retain_once
from ..core.autoencoder import LinearAutoencoder
from ..core.distributed import gather_rows, is_distributed, rank, reduce_accumulator
from ..core.precision import autocast, backbone_dtype, check_device, check_precision
from ..core.sketch import SketchAccumulator
from ..core.subspace import (AUTO, CovarianceAccumulator, GramAccumulator, Subspace, check_features, fit_accumulator,
                             make_room, new_accumulator)
from ..features.backbones import FeatureExtractor, Normalize, build_feature_extractor
from ..features.images import ImageReadError, decode_images, image_size
from ..features.resample import lanczos_resize
from .config import (DEFAULT_DETAIL_LAYERS, DEFAULT_LAYERS, DEFAULT_MAP_LAYERS, DETAIL_MIN_SCALE, MODES,
                     DetectorConfig, HeadConfig, with_detail_for)
from .folds import (CELL_FOLDS, CELL_SAMPLE_IMAGES, ROW_SPAN_MAX_BYTES, CellSample, cell_statistics, subset_models,
                    top_cells_score)
from .geometry import HeadGeometry, as_hw, cut_tiles, embed
from .heads import Head, fuse_maps, score_scales
from .levels import _map_level, MAP_FLOOR_QUANTILE, MAP_SCALE_QUANTILE, map_levels  # noqa: F401 (_map_level: re-export)
from .model_file import ModelFileError, load_state, read_model_file, weights_identity, write_model_file
from .threshold import ThresholdStats, threshold_stats

if TYPE_CHECKING:  # the cache does file I/O; the detector only calls its key / get / put
    from ..features.images import FeatureCache

Accumulator = GramAccumulator | CovarianceAccumulator | SketchAccumulator

# The detector's own names, and the ones it has always exported from this module (their homes are config, folds,
# geometry, levels and model_file).
__all__ = ["CELL_FOLDS", "DEFAULT_DETAIL_LAYERS", "DEFAULT_LAYERS", "DEFAULT_MAP_LAYERS", "DETAIL_MIN_SCALE",
           "DetectorConfig", "embed", "FREDetector", "HeadConfig", "MAP_FLOOR_QUANTILE", "MAP_SCALE_QUANTILE",
           "ModelFileError", "MODES", "ROW_SPAN_MAX_BYTES", "stored_sizes", "training_image_sizes", "upsample_maps",
           "with_detail_for"]


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


def training_image_sizes(data: Any) -> list[tuple[int, int]] | None:
    """``(H, W)`` of each training image as stored, where ``data`` says: a uint8 tensor (its own size), a sequence
    of tensors (each one's), or a loader over an ``ImageDataset`` (each file's header; unreadable files are left
    out). None for other iterables: their images' stored size is unknown."""
    if isinstance(data, Tensor):
        return [tuple(data.shape[-2:])] * _length(data)  # type: ignore[list-item]
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, Tensor) for t in data):
        return [tuple(t.shape[-2:]) for t in data for _ in range(1 if t.ndim == 3 else t.shape[0])]  # type: ignore
    paths = getattr(getattr(data, "dataset", None), "paths", None)
    return stored_sizes(paths) if isinstance(paths, list) else None


def stored_sizes(paths: Sequence[str | os.PathLike]) -> list[tuple[int, int]]:
    """``(H, W)`` of image files as stored, from their headers; unreadable files are left out."""
    sizes = []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except ImageReadError:
            continue
    return sizes


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
        feature_cache: a ``fre_torch.features.images.FeatureCache`` (or its folder): ``features`` reads each image's
            vectors from it when present and stores the ones it computes, so a repeated run over the same images
            skips the backbone. Keyed by the exact input pixels and everything that shapes the features (see
            ``feature_settings``); a run-time choice, not saved with the model. Also settable as an attribute.

    Fitted state (buffers): ``heads``, one ``Head`` per role of ``config.head_configs`` ('score', and 'map' /
    'detail' where the configuration has them), each with its models (one ``Subspace`` per layer; a
    ``LinearAutoencoder`` in modes 'tae' / 'ae', a ``KernelFRE`` with a kernel) and their ``scales`` (float64, the
    divisor of each layer's FRE: its training residual variance, floored at 1e-6 of the layer's total variance; or
    1); the score head's cell statistics ``cell_mean`` / ``cell_std``; the held-out calibration and the heatmap
    colour scale.

    Memory: built for the CPU, the detector makes glibc keep freed blocks of up to 1 GiB for reuse (once per process,
    ``fre_torch.core.allocator.retain_once``) instead of unmapping them, since every large backbone activation was
    otherwise page-faulted in again on every batch (half the backbone's time on a 2-core VM). Process-wide; set
    ``FRE_TORCH_RETAIN_MEMORY=0`` before building one to opt out.

    Automatic choices: with a default detail head (``DetectorConfig.detail_auto``) ``fit`` keeps it only where the
    training images are large enough (``DetectorConfig.for_images``), as ``cli.py`` does.

    Typical use::

        det = FREDetector(DetectorConfig("efficientnet_lite0"), device="cpu").fit(train_loader)
        scores = det.score(test_loader)        # (N,) float32, higher = more anomalous
        det.save("model.pt"); det2 = FREDetector.load("model.pt", device="cpu")
    """

    def __init__(self, config: DetectorConfig | None = None, *, device: torch.device | str = "cpu",
                 pretrained: bool = True, weights: str | os.PathLike | None = None, compile: bool = False,
                 precision: str = "auto", feature_cache: FeatureCache | str | os.PathLike | None = None) -> None:
        super().__init__()
        config = config or DetectorConfig()
        self.device = check_device(device)
        if self.device.type == "cpu":
            retain_once()  # see "Memory" above: made here, where the backbone's large activations begin
        self.pretrained = pretrained
        self.weights = None if weights is None else str(weights)
        # One extractor holds every layer any head reads; each backbone pass runs it only as far as it needs.
        layers = list(dict.fromkeys(name for head in config.head_configs for name in head.layers))
        extractor = build_feature_extractor(config.backbone, layers, pretrained=pretrained, weights=weights)
        self.extractor: FeatureExtractor = extractor.to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalize(config.spec.mean, config.spec.std).to(self.device)
        # torch.compile (opt-in): each pass's backbone and embedding as one graph, shapes kept static (dynamic=False)
        # by padding a short last batch up to the largest batch seen, so one compiled graph serves the whole run.
        # It pays on CUDA (fused kernels, fewer launches); on a CPU the ~30 s compile is rarely won back.
        # The backbone's (fre_torch.core.precision); fits stay float64. fp16 on the CPU is refused there.
        self.precision = check_precision(precision, self.device)
        self.compiled = bool(compile)
        self._backbone = torch.compile(self._extract_embed, dynamic=False) if compile else self._extract_embed
        self._static_batch = 0
        # image_score='top': each score-head cell's mean and standard deviation on out-of-fold normal images.
        self.register_buffer("cell_mean", torch.zeros(0, dtype=torch.float32, device=self.device))
        self.register_buffer("cell_std", torch.ones(0, dtype=torch.float32, device=self.device))
        # n_components='auto': the score head's rows of the images the cell statistics were taken on and their
        # positions (``folds.CellSample``), so that ``update`` takes them again with the new images.
        self.register_buffer("cell_rows", torch.empty(0, 0, dtype=torch.float32, device=self.device))
        self.register_buffer("cell_index", torch.empty(0, dtype=torch.int64, device=self.device))
        # Calibration on held-out normal images (see ``calibrate``): their sorted scores and the threshold.
        self.register_buffer("calibration_scores", torch.empty(0, dtype=torch.float32, device=self.device))
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self.threshold_quantile: float | None = None
        # Heatmap colour scale: high quantiles of normal images' grid-map values (``set_map_scale``), so a heatmap's
        # colours mean the same thing on every image and are never set from test scores. Colour starts above
        # ``map_floor`` (the normal level; 0 colours every value above 0) and is full at ``map_scale``.
        self.register_buffer("map_scale", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self.register_buffer("map_floor", torch.zeros((), dtype=torch.float64, device=self.device))
        self.weights_id = weights_identity(config.backbone, pretrained, weights)
        if isinstance(feature_cache, (str, os.PathLike)):
            from ..features.images import FeatureCache

            feature_cache = FeatureCache(feature_cache)
        self.feature_cache: FeatureCache | None = feature_cache
        self._given_config = config  # what the automatic choices start from at each fit
        self._configure(config)

    def _configure(self, config: DetectorConfig) -> None:
        """Build the heads and backbone passes of ``config`` (unfitted). The extractor is kept: it holds every layer
        the given configuration's heads read, and ``config``'s heads read a subset of them."""
        self.config = config
        self.heads = nn.ModuleDict({h.role: Head(h, config.geometry(h), fusion=config.fusion, device=self.device)
                                    for h in config.head_configs})
        # Backbone passes: the heads that read the same input (size and tiles) share one.
        self._passes: list[tuple[HeadGeometry, list[int]]] = []
        for i, head in enumerate(config.heads):
            same = [p for p in self._passes if (p[0].image_size, p[0].pass_size, p[0].tiles) ==
                    (head.image_size, head.pass_size, head.tiles)]
            if same:
                same[0][1].append(i)
            else:
                self._passes.append((head, [i]))
        self._feature_settings: str | None = None

    @property
    def is_fitted(self) -> bool:
        return all(head.is_fitted for head in self.heads.values())

    @property
    def n_images(self) -> int:
        """Training images the subspaces were fitted on (0 before ``fit``)."""
        if not self.is_fitted:
            return 0
        model = self.heads["score"].models[0]
        return int(getattr(model, "n_samples", 0)) // self.config.score_head.n_tiles

    @property
    def is_calibrated(self) -> bool:
        """Whether a held-out threshold was set (``calibrate``; ``cli.py fit`` does it): without one, ``predict``
        leaves ``is_anomalous`` and ``calibrated_score`` empty."""
        return self.calibration_scores.numel() > 0

    # Views of the heads' models and scales under the names they had before heads were objects (read only).
    @property
    def subspaces(self) -> nn.ModuleList:
        """The score head's models."""
        return self.heads["score"].models

    @property
    def scales(self) -> Tensor:
        """The score head's scales ``(M,)`` float64."""
        return self.heads["score"].scales

    @property
    def map_subspaces(self) -> nn.ModuleList:
        """The map heads' models (map, then detail), as model files store them."""
        return nn.ModuleList([m for role, h in self.heads.items() if role != "score" for m in h.models])

    @property
    def map_scales(self) -> Tensor:
        """The map heads' scales (map, then detail), as model files store them."""
        rest = [h.scales for role, h in self.heads.items() if role != "score"]
        return torch.cat(rest) if rest else torch.ones(0, dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------------------------------------ features
    def _image_batches(self, data: Any, batch_size: int) -> Iterator[Tensor]:
        """``_batches`` of ``data`` for this detector: encoded JPEGs decoded on its device, at its load size."""
        return _batches(data, batch_size, self.device, self.config.load_size)

    @torch.inference_mode()
    def features(self, images: Tensor) -> list[Tensor]:
        """uint8 images ``(B, 3, H, W)`` (any device) -> one float32 row per image and subspace, ``[(B, D_s)]`` on the
        device: head after head in ``config.head_configs`` order, each head's models in order
        (``config.layer_features`` gives each D).

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
        for head in self.heads.values():  # one concatenated row per head
            n = len(head.config.layers)
            out += head.join(rows[start:start + n])
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
    def decide_for(self, data: Any) -> None:
        """Make the configuration's automatic choices for training data ``data`` (``DetectorConfig.for_images``,
        from the images' stored sizes, ``training_image_sizes``), rebuilding the heads where they change. ``fit``
        calls it; a no-op when nothing is automatic, the sizes are unknown, or in data-parallel runs (each rank holds
        a shard: ``cli.py`` decides before sharding)."""
        if not self._given_config.detail_auto or is_distributed():
            return
        sizes = training_image_sizes(data)
        if sizes is None:
            return
        config = self._given_config.for_images(sizes)
        if config != self.config:
            self._configure(config)

    def fit(self, data: Any, *, batch_size: int = 32, cell_statistics: bool = True,
            grams: list[Tensor | None] | None = None) -> FREDetector:
        """Fit every head's subspaces on normal images, in one streaming pass.

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

        The automatic choices are made first (``decide_for``). Each subspace is fitted on its vectors (with tiling:
        every tile of every image). In data-parallel mode (``fre_torch.core.distributed.init_from_env``) ``data``
        is this rank's shard: the statistics of all ranks are merged exactly and every rank ends with the same fit
        (as do ``calibrate``'s quantiles).
        """
        self.decide_for(data)
        if self.config.kernel is not None:
            return self._fit_kernel(data, batch_size)
        if self.config.mode != "pca":
            return self._fit_autoencoder(data, batch_size, cell_statistics)
        n = _length(data)
        c = self.config
        accs: list[Accumulator] = [
            new_accumulator(d, n * t if n is not None else (None if c.n_components == AUTO else d), c.solver,
                            c.n_components, device=self.device)
            for d, t in zip(c.subspace_dims, self._tiles_per_subspace())]
        keep = c.image_score == "top" and cell_statistics
        n_score = self.heads["score"].n_models
        # The score head's rows of (at most CELL_SAMPLE_IMAGES) training images, for the cell statistics. A
        # data-parallel rank keeps all of its own: the sample is drawn over every rank's images at the end. Rules
        # other than 'auto' keep every image, as they always did.
        bounded = c.n_components == AUTO and not is_distributed()
        sample = CellSample(self.heads["score"].row_dims, device=self.device,
                            limit=CELL_SAMPLE_IMAGES if bounded else 2 ** 62) if keep else None
        start = 0
        for batch in self._image_batches(data, batch_size):
            feats = self.features(batch)
            # No per-batch host sync: finiteness is checked once, on the accumulated statistics.
            for i, rows in enumerate(feats):
                acc = make_room(accs[i], rows.numel() // accs[i].n_features, c.solver, c.n_components)
                accs[i] = acc.update(rows.view(-1, acc.n_features), check_finite=False)
            if sample is not None:
                sample.add(feats[:n_score], start)
            start += batch.shape[0]
        # Data-parallel (fre_torch.core.distributed): ``data`` was this rank's shard; merge all ranks' statistics
        # exactly. The identity otherwise.
        accs = [reduce_accumulator(acc, c.solver, c.n_components) for acc in accs]
        self._set_models([self._solve(acc) for acc in accs])
        if grams is not None and not is_distributed():
            grams[:] = [acc.gram if isinstance(acc, GramAccumulator) else None for acc in accs]
        if sample is not None:
            sample = self._global_sample(sample)
            rows, _ = sample.ordered()
            # One process with every image in the sample: the score head's Gram accumulators hold these very rows,
            # in this order, and their Gram matrices are formed already; the fold fits take blocks of them.
            whole = not is_distributed() and all(isinstance(acc, GramAccumulator) and acc.n_samples ==
                                                 rows[0].shape[0] * t for acc, t in
                                                 zip(accs[:n_score], self._tiles_per_subspace()))
            self._fit_cell_statistics(rows, [(acc.gram, None) for acc in accs[:n_score]] if whole else None)
            self._keep_sample(sample)
        return self

    def update(self, data: Any, *, batch_size: int = 32) -> FREDetector:
        """Add normal images to a fitted detector without refitting, in time proportional to the new images.

        Every subspace keeps a fixed-size summary of its training rows (``n_components='auto'``, the default:
        ``fre_torch.core.sketch``) and the cell statistics keep their sample of score-head rows
        (``folds.CellSample``); the new images' rows are added to both and the models solved again. While the
        summaries are exact (at most ``SKETCH_RANK`` + 1 training rows per subspace) the result is the fit of all
        the images, old then new, up to float rounding. The threshold is not changed here: calibrate again on
        held-out normal images (``cli.py fit --update`` does).

        Args:
            data: the new normal images, as for ``fit``.

        Raises:
            ValueError: not fitted, or fitted without the summaries (another ``n_components``, a mode other than
                'pca', kernel FRE, a model file older than version 4), or no new images.
        """
        self._fitted()
        c = self.config
        models = [m for head in self.heads.values() for m in head.models]
        if c.mode != "pca" or c.kernel is not None or c.n_components != AUTO or not all(
                isinstance(m, Subspace) and m.has_summary for m in models) or (
                c.image_score == "top" and self.cell_index.numel() == 0):
            how = f"n_components={c.n_components!r}" + (f", mode={c.mode!r}" if c.mode != "pca" else "") + (
                f", kernel={c.kernel!r}" if c.kernel is not None else "")
            raise ValueError(f"this model keeps no summary of its training images ({how}; files saved compact or "
                             "before model-file version 4 keep none), so it cannot take new ones: fit it again on all "
                             "the images with n_components='auto' (the default), once; that model can then be "
                             "updated")
        # Data-parallel: rank 0 carries the old summary, the others start empty, so the merge counts it once.
        accs = [SketchAccumulator.from_subspace(m) if rank() == 0 else SketchAccumulator(
            m.n_features, device=self.device, dtype=m.components.dtype) for m in models]
        n_old = self.n_images
        n_score = self.heads["score"].n_models
        sample = CellSample(self.heads["score"].row_dims, rows=self.cell_rows, index=self.cell_index,
                            device=self.device, limit=2 ** 62 if is_distributed() else CELL_SAMPLE_IMAGES)
        first = n_old if rank() == 0 else 0  # data-parallel: positions follow rank 0's old images (_global_sample)
        if first == 0:
            sample = CellSample(sample.dims, device=self.device, limit=sample.limit)
        start = first
        for batch in self._image_batches(data, batch_size):
            feats = self.features(batch)
            for acc, rows in zip(accs, feats):
                acc.update(rows.view(-1, acc.n_features), check_finite=False)
            if c.image_score == "top":
                sample.add(feats[:n_score], start)
            start += batch.shape[0]
        added = int(gather_rows(torch.tensor([start - first])).sum())
        if added == 0:
            raise ValueError("no new images to add; pass a folder or tensor of normal images")
        accs = [reduce_accumulator(acc, c.solver, c.n_components) for acc in accs]
        self._set_models([self._solve(acc) for acc in accs])
        if c.image_score == "top":
            sample = self._global_sample(sample)
            self._fit_cell_statistics(sample.ordered()[0])
            self._keep_sample(sample)
        return self

    def _global_sample(self, sample: CellSample) -> CellSample:
        """Data-parallel: every rank's sampled rows at their global image positions, sampled again (with
        ``n_components='auto'``; identity otherwise)."""
        if not is_distributed():
            return sample
        counts = gather_rows(torch.tensor([sample.index.numel()]))
        offset = int(counts[:rank()].sum())
        rows, index = gather_rows(sample.rows), gather_rows(sample.index + offset)
        out = CellSample(sample.dims, device=self.device,
                         limit=CELL_SAMPLE_IMAGES if self.config.n_components == AUTO else 2 ** 62)
        for start in range(0, index.numel(), CELL_SAMPLE_IMAGES):  # bottom-k of all ranks' rows, batch by batch
            out.extend(rows[start:start + CELL_SAMPLE_IMAGES], index[start:start + CELL_SAMPLE_IMAGES])
        return out

    def _keep_sample(self, sample: CellSample) -> None:
        """Store the cell sample where the fit can take new images (``update``): ``n_components='auto'``."""
        if self.config.n_components == AUTO:
            # A copy: ``sample.rows`` is a view of a store with room to spare, which torch.save would write whole.
            self.cell_rows, self.cell_index = sample.rows.clone(), sample.index.to(self.device)
        else:
            self.cell_rows = torch.empty(0, 0, device=self.device)
            self.cell_index = torch.empty(0, dtype=torch.int64, device=self.device)

    def _fit_cell_statistics(self, rows: Sequence[Tensor],
                             shared: list[tuple[Tensor, Tensor | None] | None] | None = None) -> None:
        """The score head's cells' out-of-fold normal mean and standard deviation (``folds.cell_statistics``) from
        its ``(N, D_s)`` rows of every training image (all ranks')."""
        c = self.config
        self.cell_mean, self.cell_std = cell_statistics(self.heads["score"], rows, n_components=c.n_components,
                                                        solver=c.solver, normalize=c.normalize_scores, shared=shared)

    def fit_subset(self, rows: Sequence[Tensor], keep: Tensor, *,
                   shared: list[tuple[Tensor, Tensor | None] | None] | None = None) -> FREDetector:
        """Fit every head (mode 'pca') on the training rows of the images ``keep`` selects, without the backbone;
        the cell statistics stay as they are. For scoring held-out images once (``fre_torch.jobs.crossfit``): where
        the Gram solver applies the models are ``RowSpanSubspace`` (dual form, not saved in model files).

        Args:
            rows: every subspace's ``(N, D_s)`` rows, as ``features`` gives them.
            keep: ``(N,)`` bool, the images to fit on.
            shared: one slot per subspace for the Gram matrix and float64 copy of all ``N`` images' rows, filled
                on first use: pass the same list to every fold of one set of rows.
        """
        c = self.config
        if c.mode != "pca" or c.kernel is not None:
            raise ValueError(f"fit_subset fits closed-form PCA; got mode={c.mode!r}, kernel={c.kernel!r}")
        if len(rows) != len(c.subspace_dims):
            raise ValueError(f"expected rows for {len(c.subspace_dims)} subspaces, got {len(rows)}")
        shared = shared if shared is not None else [None] * len(rows)
        self._set_models(subset_models(rows, keep.to(rows[0].device), shared, c.subspace_dims, c.n_components,
                                       c.solver))
        return self

    def _tiles_per_subspace(self) -> list[int]:
        return [head.geometry.n_tiles for head in self.heads.values() for _ in head.row_dims]

    def _set_models(self, models: Sequence[nn.Module], residual_models: Sequence[Any] | None = None) -> None:
        """Install fitted models, head after head, with their score scales (from ``residual_models`` where the
        models' own residuals are not subspaces: kernel FRE)."""
        scales = score_scales(residual_models if residual_models is not None else models, self.config.normalize_scores)
        start = 0
        for head in self.heads.values():
            m = head.n_models
            head.set_models(models[start:start + m], scales[start:start + m])
            start += m

    def _fit_kernel(self, data: Any, batch_size: int) -> FREDetector:
        """Kernel mode: the bandwidth (median heuristic) and landmarks come from ALL training vectors, so their rows
        are gathered (``_gather_rows``), then fitted in one shot."""
        models = [self.new_model().fit(r) for r in self._gather_rows(data, batch_size, "kernel mode")]
        self._set_models(models, [m.fitted_subspace() for m in models])
        return self

    def _fit_autoencoder(self, data: Any, batch_size: int, cell_statistics: bool = True) -> FREDetector:
        """Modes 'tae' / 'ae': gradient descent runs over all training rows many times, so they are gathered
        (``_gather_rows``); one autoencoder per subspace, each seeded alike (deterministic). The cell statistics
        come from closed-form fold fits, as in mode 'pca' (the autoencoders converge to the same subspaces)."""
        rows = self._gather_rows(data, batch_size, f"mode={self.config.mode!r}")
        self._set_models([self.new_model().fit(r, seed=0) for r in rows])
        if self.config.image_score == "top" and cell_statistics:
            tiles = self.config.score_head.n_tiles
            n = self.heads["score"].n_models
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

    def new_model(self) -> nn.Module:
        """An unfitted model of this configuration's kind for one subspace: ``Subspace`` (mode 'pca'),
        ``LinearAutoencoder`` ('tae' / 'ae') or ``KernelFRE`` (with a kernel)."""
        c = self.config
        if c.kernel is not None:
            from ..core.kernel import KernelFRE

            return KernelFRE(c.n_components, kernel=c.kernel, method=c.kernel_method,
                             kernel_features=c.kernel_features, device=self.device)
        if c.mode != "pca":
            return LinearAutoencoder(c.n_components, tied=c.mode == "tae", device=self.device)
        return Subspace()

    def _solve(self, acc: Accumulator) -> Subspace:
        stats = acc.gram if isinstance(acc, GramAccumulator) else acc.scatter if isinstance(
            acc, CovarianceAccumulator) else acc.flush().directions
        if not bool(torch.isfinite(stats).all()):
            raise ValueError("the backbone produced NaN or Inf features on the training images; "
                             "check the weights file and the input images")
        return fit_accumulator(acc, self.config.n_components, what="training images")

    # ------------------------------------------------------------------------------------------------ scoring
    def _rows_by_head(self, features: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """``features``' rows split by head role."""
        out, start = {}, 0
        for role, head in self.heads.items():
            out[role] = list(features[start:start + head.n_models])
            start += head.n_models
        return out

    def score_features(self, features: Sequence[Tensor], *, index: Tensor | None = None) -> Tensor:
        """The image score from ``features``' rows -> (B,) float32: with ``image_score='top'`` the mean of the
        largest standardised score-head cells (``score_from_cells``), with 'fre' the score head's
        ``sum_l sum_tiles FRE_l / scale_l``. ``index``: as ``head_maps``'."""
        self._fitted()
        if self.config.image_score == "top":
            return self.score_from_cells(self.head_maps(features, "score", stitched=False, index=index))
        rows = self._rows_by_head(features)["score"]
        return self.heads["score"].fre(rows, index=index, kernel=self.config.kernel is not None)

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
        return top_cells_score(flat, self.cell_mean, self.cell_std, self.config.top_fraction)

    def head_maps(self, features: Sequence[Tensor], head: str = "map", *, stitched: bool = True,
                  index: Tensor | None = None) -> Tensor:
        """Anomaly maps from ``features``' rows: one head's, or the anomaly map that the map heads make together.

        A head's map (``Head.map``): each subspace's squared reconstruction error reshaped to ``(B, T, C, gh, gw)``,
        summed over channels and divided by the subspace's scale, the head's layers summed (they share the grid).
        A vector inside its subspace gives a map of exactly zero up to rounding. The anomaly map ('map') fuses the
        map heads' maps (``fuse_maps``: with a detail head, the geometric mean of the map head's map, upsampled
        bilinear to the detail grid, and the detail head's).

        Args:
            features: rows from ``features``.
            head: 'map' (the anomaly map; the score head's map when there is no map head), 'score', 'coarse' (the
                map head's alone) or 'detail' (the detail head's alone).
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
        rows = self._rows_by_head(features)
        if head == "detail" and "detail" not in self.heads:
            raise ValueError("this detector has no detail head (detail_layers=None)")
        if head != "map":
            role = "map" if head == "coarse" and "map" in self.heads else "score" if head == "coarse" else head
            return self.heads[role].map(rows[role], stitched=stitched, index=index)
        roles = self.config.map_roles
        if len(roles) == 1:
            return self.heads[roles[0]].map(rows[roles[0]], stitched=stitched, index=index)
        # The finest head first, as its untiled cells: the order of operations the exported graphs have always had.
        finest = self.heads[roles[-1]]
        maps = {roles[-1]: finest.map(rows[roles[-1]], index=index, stitched=finest.geometry.n_tiles > 1)}
        maps.update({r: self.heads[r].map(rows[r], index=index) for r in roles[:-1]})
        fused = fuse_maps([maps[r] for r in roles])
        return fused if stitched else fused[:, None]

    def maps_from_features(self, features: Sequence[Tensor]) -> Tensor:
        """The anomaly maps ``(B, GH, GW)`` float32 from ``features``' rows (``head_maps``)."""
        return self.head_maps(features, "map")

    @torch.inference_mode()
    def anomaly_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images ``(B, 3, H, W)`` -> (scores ``(B,)``, maps ``(B, GH, GW)``), both float32 on the device:
        the score from the score head, the map from the map heads, in one backbone pass (two with
        ``map_input_size``).

        Use ``upsample_maps`` to bring the maps to each image's own size.
        """
        feats = self.features(images)
        return self.score_features(feats), self.maps_from_features(feats)

    # ------------------------------------------------------------------------------------------------ threshold
    def calibrate(self, held_out: Any, *, quantile: float = 0.99, batch_size: int = 32,
                  keep: bool = False) -> FREDetector:
        """Set the decision threshold from normal images the subspaces were NOT fitted on.

        The threshold is the ``quantile`` of their scores (linear interpolation, ``torch.quantile``), so about
        ``1 - quantile`` of normal images are flagged; no anomalous example and no test label is used. The sorted
        held-out scores are kept for ``calibrated_score``. In linear mode the same pass sets ``map_scale`` and
        ``map_floor`` (the heatmap colour scale) from the held-out maps.

        ``keep=True`` (after ``update``) adds the held-out scores to the ones it already holds: those were scored
        by the model before the update, on images neither model saw, so the threshold keeps their evidence.
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
        if keep:
            scores = torch.cat([self.calibration_scores.to(scores.device), scores])
        self.calibration_scores = torch.sort(scores).values
        self.threshold = torch.quantile(scores, quantile)
        self.threshold_quantile = float(quantile)
        if maps is not None:
            self.map_scale, self.map_floor = map_levels(maps)
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
        self.map_scale, self.map_floor = map_levels(maps)
        return self

    def threshold_stats(self) -> ThresholdStats:
        """How far the held-out threshold can be trusted: the number of held-out images, the threshold's rank among
        their scores, the false-positive rate on them, and a 95 % interval of the rate on new normal images
        (``fre_torch.detection.threshold``). Read from the stored held-out scores, so a loaded model gives the same."""
        if not self.is_calibrated or self.threshold_quantile is None:
            raise ValueError("this detector has no held-out threshold; fit it with a held-out split (cli.py fit) or "
                             "call calibrate(held_out_normal_images)")
        return threshold_stats(self.calibration_scores, float(self.threshold), self.threshold_quantile)

    def calibrated_score(self, scores: Tensor) -> Tensor:
        """Fraction of held-out normal scores at or above each score, (N,) -> (N,) in [0, 1]: a p-value-like
        number that reads the same for every model (small = unusual)."""
        if not self.is_calibrated:
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
    def save(self, path: str | os.PathLike, *, summary: bool = True) -> Path:
        """Write config + fitted state (not the backbone weights, which are re-created from their source) to
        ``path`` (``model_file``).

        The file loads with ``torch.load(weights_only=True)``: tensors and plain Python values only. It is written
        to a temporary name and renamed, so an interrupted save leaves no half-written file. ``summary=False``
        leaves out what ``update`` needs (the subspaces' summaries beyond their components, the cell sample): a
        smaller file that scores the same and cannot take new images.
        """
        self._fitted()
        return write_model_file(self, path, summary=summary)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
             weights: str | os.PathLike | None = None, compile: bool = False,
             precision: str = "auto") -> FREDetector:
        """Re-create a saved detector on ``device``; it scores identically to the saved one on the same device
        (``compile`` and ``precision`` as in the constructor: run-time choices, not part of the model). Files of
        every version (1 to 4) load (``model_file``).

        Raises:
            FileNotFoundError: no file at ``path``.
            ModelFileError: not a fre_torch model file, an unknown version, or other backbone weights.
        """
        config, payload = read_model_file(path)
        saved_id = str(payload.get("weights_id", ""))
        if weights is None and saved_id.startswith("file:"):
            raise ModelFileError(f"{path} was fitted with a local backbone weights file "
                                 f"({saved_id[5:]}); pass the same file with weights=")
        det = cls(config, device=device, pretrained=bool(payload.get("pretrained", True)), weights=weights,
                  compile=compile, precision=precision)
        load_state(det, payload, path)
        return det


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
