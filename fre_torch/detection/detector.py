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
from ..core.distributed import gather_rows, reduce_accumulator
from ..features.files import atomic_write
from .threshold import ThresholdStats, threshold_stats
from ..core.precision import autocast, backbone_dtype, check_device, check_precision
from ..core.subspace import (
    check_features,
    CovarianceAccumulator,
    GramAccumulator,
    Subspace,
    fit_accumulator,
    resolve_solver,
    select_n_components,
)

if TYPE_CHECKING:  # the cache does file I/O; the detector only calls its key / get / put
    from ..features.images import FeatureCache

__all__ = ["DEFAULT_LAYERS", "DetectorConfig", "FREDetector", "MAP_SCALE_QUANTILE", "MODES", "ModelFileError",
           "embed", "upsample_maps"]

_FORMAT = "fre_torch.detector"
_VERSION = 1
_MIN_RESIDUAL_FRACTION = 1e-6  # floor of a layer's score scale, as a fraction of its total variance
# Fitting modes: closed-form PCA, or a linear autoencoder trained by gradient descent, tied or untied.
MODES = ("pca", "tae", "ae")


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or not a fre_torch detector."""


# Default layers per backbone: the reference layer plus the end of the deepest spatial stage. Anomalies range from
# local texture flaws (mid-level features) to structural ones (deep features); two depths cover both, and their
# maps share the reference's grid (stride-16 map pooled by 2 = stride-32 map).
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


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector, validated on construction.

    Args:
        backbone: a name from ``fre_torch.list_backbones()``.
        layers: layer names of that backbone; empty = ``DEFAULT_LAYERS`` (else the backbone's default layer).
        input_size: square input side in pixels; 0 = the backbone's default.
        pool: average-pooling kernel of the first layer's map; it sets the common grid (the reference uses 2).
        n_components: int, float in (0, 1) (explained-variance fraction, scikit-learn's rule) or None.
        solver: 'auto', 'gram' or 'covariance' (see ``fre_torch.core.subspace``).
        normalization: 'native' (the mean/std the backbone's weights were trained with) or 'imagenet' (the
            reference pipeline's ImageNet mean/std, whatever the backbone).
        normalize_scores: divide each layer's FRE by its training residual variance before summing.
        fusion: 'sum' (one subspace per layer, scores summed) or 'concat' (one subspace on the concatenation).
        kernel: None (linear FRE) or 'rbf' / 'laplacian': FRE in a kernel feature space (``fre_torch.core.kernel``),
            bandwidth by the median heuristic on the training vectors. Image scores only: maps need linear mode.
        kernel_features: M, the number of explicit kernel features (random Fourier features or landmarks).
        kernel_method: 'rff' (random Fourier features) or 'nystroem' (M k-center landmarks; needs N >= M).
        mode: 'pca' (closed-form float64 subspace, the default), 'tae' (tied linear autoencoder) or 'ae' (untied),
            trained with Adam on the device (``fre_torch.core.autoencoder``; the reference's trained alternatives), at the
            k PCA would keep. Linear only: not with ``kernel``.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ()
    input_size: int = 0
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

    def __post_init__(self) -> None:
        spec = get_backbone_spec(self.backbone)  # ValueError naming the known backbones
        layers = tuple(self.layers) if self.layers else DEFAULT_LAYERS.get(self.backbone, spec.default_layers)
        unknown = [name for name in layers if name not in spec.layers]
        if unknown:
            raise ValueError(f"{self.backbone} has no layer(s) {unknown}; choose from {', '.join(spec.layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {list(layers)}")
        object.__setattr__(self, "layers", layers)
        if not self.input_size:
            object.__setattr__(self, "input_size", spec.input_size)
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 32:
            raise ValueError(f"input_size must be an int >= 32 pixels, got {self.input_size!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {self.pool!r}")
        first = -(-self.input_size // spec.layers[layers[0]].stride)
        if self.pool > first:
            raise ValueError(f"pool={self.pool} is larger than the {first}x{first} map of {layers[0]} at "
                             f"{self.input_size} px; use a smaller pool or a larger input_size")
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

    @property
    def spec(self) -> BackboneSpec:
        """The backbone spec, with the ImageNet mean/std when ``normalization='imagenet'``."""
        spec = get_backbone_spec(self.backbone)
        if self.normalization == "imagenet":
            spec = dataclasses.replace(spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return spec

    @property
    def grid(self) -> int:
        """Side of the common feature grid: the first layer's map pooled by ``pool``."""
        return -(-self.input_size // self.spec.layers[self.layers[0]].stride) // self.pool

    @property
    def layer_dims(self) -> tuple[int, ...]:
        """D of each layer's embedded vector, C x grid x grid, before any fusion."""
        return tuple(self.spec.layers[name].channels * self.grid * self.grid for name in self.layers)

    @property
    def layer_features(self) -> tuple[int, ...]:
        """D of each fitted subspace's vectors (``layer_dims``, or their sum with 'concat')."""
        dims = self.layer_dims
        return (sum(dims),) if self.fusion == "concat" else dims

    @classmethod
    def reference(cls, backbone: str = "efficientnet_b5") -> DetectorConfig:
        """The reference run_mvtec.py configuration: the backbone's one default layer, pool 2, ImageNet
        normalisation, PCA(0.97) with scikit-learn's rule, the plain FRE as score."""
        spec = get_backbone_spec(backbone)
        return cls(backbone=backbone, layers=tuple(spec.default_layers), input_size=spec.input_size, pool=2,
                   n_components=0.97, solver="auto", normalization="imagenet", normalize_scores=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown detector settings {sorted(extra)}")
        return cls(**{**d, "layers": tuple(d.get("layers", ()))})


def embed(maps: Sequence[Tensor], grid: int) -> list[Tensor]:
    """Per-image vectors from feature maps, one per layer.

    Args:
        maps: one ``(B, C_l, h_l, w_l)`` map per layer.
        grid: side of the common grid; each map is adaptive-average-pooled to ``grid x grid`` (for the reference
            layer at pool 2 this is exactly ``avg_pool2d(kernel=2)``).

    Returns:
        ``[(B, C_l * grid * grid)]`` float32 rows in the reference's C x H x W order.
    """
    out = []
    for m in maps:
        m = m.float()
        if m.shape[-2:] != (grid, grid):
            h, w = m.shape[-2:]
            if h % grid == 0 and w % grid == 0:
                m = F.avg_pool2d(m, (h // grid, w // grid))  # the reference's pooling, exactly
            else:
                m = F.adaptive_avg_pool2d(m, grid)
        out.append(m.contiguous().flatten(1))  # NCHW order whatever the memory format was
    return out


def _batches(data: Any, batch_size: int) -> Iterator[Tensor]:
    """uint8 image batches ``(B, 3, H, W)`` from a tensor, a sequence of tensors, or a loader of dicts/tensors."""
    if isinstance(data, Tensor):
        if data.ndim == 3:
            data = data.unsqueeze(0)
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size]
        return
    for item in data:
        if isinstance(item, dict):
            item = item["image"]
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
        extractor = build_feature_extractor(self.config.backbone, list(self.config.layers),
                                            pretrained=pretrained, weights=weights)
        self.extractor: FeatureExtractor = extractor.to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalize(self.config.spec.mean, self.config.spec.std).to(self.device)
        # torch.compile (opt-in): the backbone and the embedding as one graph, shapes kept static (dynamic=False) by
        # padding a short last batch up to the largest batch seen, so one compiled graph serves the whole run.
        # It pays on CUDA (fused kernels, fewer launches); on a CPU the ~30 s compile is rarely won back.
        self.precision = check_precision(precision)  # the backbone's (fre_torch.core.precision); fits stay float64
        self.compiled = bool(compile)
        self._backbone = torch.compile(self._extract_embed, dynamic=False) if compile else self._extract_embed
        self._static_batch = 0
        self.subspaces = nn.ModuleList()
        self.register_buffer("scales", torch.ones(0, dtype=torch.float64, device=self.device))
        # Calibration on held-out normal images (see ``calibrate``): their sorted scores and the threshold.
        self.register_buffer("calibration_scores", torch.empty(0, dtype=torch.float32, device=self.device))
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self.threshold_quantile: float | None = None
        # Heatmap colour scale: a high quantile of normal images' grid-map values (``set_map_scale``), so a heatmap's
        # colours mean the same thing on every image and are never set from test scores.
        self.register_buffer("map_scale", torch.full((), float("nan"), dtype=torch.float32, device=self.device))
        self._weights_id = _weights_identity(self.config.backbone, pretrained, weights)
        if isinstance(feature_cache, (str, os.PathLike)):
            from ..features.images import FeatureCache

            feature_cache = FeatureCache(feature_cache)
        self.feature_cache: FeatureCache | None = feature_cache
        self._feature_settings: str | None = None

    @property
    def is_fitted(self) -> bool:
        return len(self.subspaces) == len(self.config.layer_features)

    # ------------------------------------------------------------------------------------------------ features
    @torch.inference_mode()
    def features(self, images: Tensor) -> list[Tensor]:
        """uint8 images ``(B, 3, H, W)`` (any device) -> per-layer float32 vectors ``[(B, D_l)]`` on the device.

        Images not at ``input_size`` are resized on the device (bilinear, antialiased); the data reader already
        delivers the reference's LANCZOS-resized squares, so this only matters for raw tensors.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        rows = self._layer_rows(images) if self.feature_cache is None else self._cached_layer_rows(images)
        return [torch.cat(rows, dim=1)] if self.config.fusion == "concat" and len(rows) > 1 else rows

    def _layer_rows(self, images: Tensor) -> list[Tensor]:
        """uint8 images -> per-layer rows ``[(B, C_l * g * g)]`` through the backbone (before any concat fusion)."""
        x = self.normalize(images.to(self.device, non_blocking=True))
        size = self.config.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        if self.compiled:
            self._static_batch = max(self._static_batch, b)
            if b < self._static_batch:  # pad with zeros (cheap, finite); the padded rows are dropped below
                x = torch.cat([x, x.new_zeros(self._static_batch - b, *x.shape[1:])])
        return [r[:b] for r in self._backbone(x)]

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
        a SHA-256 of the backbone's weights as loaded, the layers, input size, grid, normalisation, compute dtype,
        device type, compilation and the torch version. Computed once per detector."""
        if self._feature_settings is None:
            h = hashlib.sha256()
            for name, t in self.extractor.state_dict().items():
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
                h.update(t.view(torch.uint8).numpy().data)
            c, spec = self.config, self.config.spec
            self._feature_settings = (
                f"{c.backbone}|weights={h.hexdigest()}|layers={','.join(c.layers)}|size={c.input_size}|"
                f"grid={c.grid}|mean={spec.mean}|std={spec.std}|"
                f"dtype={backbone_dtype(self.device, self.precision)}|device={self.device.type}|"
                f"compiled={self.compiled}|torch={torch.__version__}")
        return self._feature_settings

    def _extract_embed(self, x: Tensor) -> list[Tensor]:
        """Normalised float images ``(B, 3, S, S)`` -> per-layer embedded rows ``[(B, D_l)]`` (the compiled step)."""
        with autocast(self.device, self.precision):
            maps = self.extractor(x)
        return embed(list(maps.values()), self.config.grid)

    @torch.inference_mode()
    def warmup(self, batch_size: int) -> FREDetector:
        """Run one batch of zeros through the feature path, so compilation (``compile=True``) and one-time
        allocations happen before a timed run and fix the static batch size."""
        s = self.config.input_size
        self.features(torch.zeros(batch_size, 3, s, s, dtype=torch.uint8, device=self.device))
        return self

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, data: Any, *, batch_size: int = 32) -> FREDetector:
        """Fit one subspace per layer on normal images.

        Args:
            data: uint8 images ``(N, 3, H, W)``, or an iterable (e.g. ``make_loader``) of such batches or of dicts
                with an ``"image"`` entry.
            batch_size: batch size when ``data`` is a tensor.

        In data-parallel mode (``fre_torch.core.distributed.init_from_env``) ``data`` is this rank's shard: the
        statistics of all ranks are merged exactly and every rank ends with the same fit (as do ``calibrate``'s
        quantiles).
        """
        if self.config.kernel is not None:
            return self._fit_kernel(data, batch_size)
        if self.config.mode != "pca":
            return self._fit_autoencoder(data, batch_size)
        n = _length(data)
        accs: list[GramAccumulator | CovarianceAccumulator] = []
        for d in self.config.layer_features:
            solver = resolve_solver(self.config.solver, n if n is not None else d, d)
            accs.append(GramAccumulator(d, device=self.device) if solver == "gram"
                        else CovarianceAccumulator(d, device=self.device))
        for batch in _batches(data, batch_size):
            # No per-batch host sync: finiteness is checked once, on the accumulated statistics.
            for acc, rows in zip(accs, self.features(batch)):
                acc.update(rows, check_finite=False)
        # Data-parallel (fre_torch.core.distributed): ``data`` was this rank's shard; merge all ranks' statistics exactly.
        # The identity otherwise.
        accs = [reduce_accumulator(acc, self.config.solver) for acc in accs]
        subspaces = [self._solve(acc) for acc in accs]
        self.subspaces = nn.ModuleList(subspaces)
        self.scales = self._scales(subspaces)
        return self

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
        self.subspaces = nn.ModuleList(models)
        self.scales = self._scales([m.fitted_subspace() for m in models])
        return self

    def _fit_autoencoder(self, data: Any, batch_size: int) -> FREDetector:
        """Modes 'tae' / 'ae': gradient descent runs over all training rows many times, so they are gathered
        (``_gather_rows``); one autoencoder per layer, each seeded alike (deterministic)."""
        models = [self._autoencoder_model().fit(r, seed=0)
                  for r in self._gather_rows(data, batch_size, f"mode={self.config.mode!r}")]
        self.subspaces = nn.ModuleList(models)
        self.scales = self._scales(models)
        return self

    def _gather_rows(self, data: Any, batch_size: int, what: str) -> list[Tensor]:
        """All training rows, one preallocated ``(N, D_l)`` float32 tensor per layer on the device (data-parallel:
        every rank's rows, in order), checked finite once per layer after the loop."""
        n = _length(data)
        if n is None:
            raise ValueError(f"{what} needs a sized training set (a tensor, a list or a DataLoader)")
        rows = [torch.empty(n, d, device=self.device) for d in self.config.layer_features]
        start = 0
        for batch in _batches(data, batch_size):
            if start + batch.shape[0] > n:
                raise ValueError(f"the training loader yielded more than the {n} images it reports")
            for buf, r in zip(rows, self.features(batch)):
                buf[start:start + r.shape[0]] = r
            start += batch.shape[0]
        # Fewer than reported: a loader that drops unreadable images (``fre_torch.jobs.predict.fit_folder``).
        rows = [r[:start] for r in rows]
        rows = [gather_rows(r) for r in rows]  # data-parallel: every rank's rows, in order (identity otherwise)
        for r in rows:
            check_features(r, name="training features")  # one sync per layer, after the loop
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
    def score_features(self, features: Sequence[Tensor]) -> Tensor:
        """Fused score ``sum_l FRE_l / scale_l`` from per-layer vectors ``[(B, D_l)]`` -> (B,) float32."""
        self._fitted()
        total = None
        kernel = self.config.kernel is not None
        for model, rows, scale in zip(self.subspaces, features, self.scales):
            fre = (model.score(rows) if kernel else model.fre(rows)) / scale.to(rows.dtype)
            total = fre if total is None else total + fre
        return total

    def maps_from_features(self, features: Sequence[Tensor]) -> Tensor:
        """Anomaly maps on the feature grid from per-layer vectors ``[(B, D_l)]`` -> ``(B, grid, grid)`` float32.

        Each layer's squared reconstruction error is reshaped to ``(B, C_l, grid, grid)``, summed over channels and
        divided by the layer's scale; layers are summed (they share the grid). The sum of a map over its grid is
        the image's score (up to rounding: scores use the one-product FRE, maps the explicit residual). A feature
        vector inside the fitted subspace gives a map of exactly zero up to rounding.
        """
        self._fitted()
        if self.config.kernel is not None:
            raise ValueError("anomaly maps need the linear mode: kernel FRE is computed on whole-image vectors, whose "
                             "kernel features have no spatial layout; fit with kernel=None for maps")
        g = self.config.grid
        total = None
        for sub, rows, scale in zip(self.subspaces, features, self.scales):
            err = sub.error_map(rows).view(rows.shape[0], -1, g, g).sum(dim=1) / scale.to(rows.dtype)
            total = err if total is None else total + err
        return total

    @torch.inference_mode()
    def anomaly_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images ``(B, 3, H, W)`` -> (scores ``(B,)``, maps ``(B, grid, grid)``), both float32 on the device.

        Use ``upsample_maps`` to bring the maps to each image's own size.
        """
        feats = self.features(images)
        return self.score_features(feats), self.maps_from_features(feats)

    # ------------------------------------------------------------------------------------------------ threshold
    def calibrate(self, held_out: Any, *, quantile: float = 0.99, batch_size: int = 32) -> FREDetector:
        """Set the decision threshold from normal images the subspaces were NOT fitted on.

        The threshold is the ``quantile`` of their scores (linear interpolation, ``torch.quantile``), so about
        ``1 - quantile`` of normal images are flagged; no anomalous example and no test label is used. The sorted
        held-out scores are kept for ``calibrated_score``. In linear mode the same pass sets ``map_scale`` (the
        heatmap colour scale) from the held-out maps.
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
            self.map_scale = _map_quantile(maps)
        return self

    @torch.inference_mode()
    def set_map_scale(self, normal: Any, *, batch_size: int = 32) -> FREDetector:
        """Set ``map_scale``, the value shown as full colour in heatmaps, from normal images: the
        ``MAP_SCALE_QUANTILE`` of their grid-map values. Prefer images the subspaces were not fitted on (``calibrate``
        does this with the held-out split, ``fre_torch.jobs.crossfit`` with out-of-fold maps); the training images' own
        residuals are far smaller (17x on MVTec bottle), which would make every test heatmap saturate."""
        _, maps = self.score_and_maps(normal, batch_size=batch_size)
        self.map_scale = _map_quantile(gather_rows(maps))  # data-parallel: every rank's maps (identity otherwise)
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
        """Scores ``(N,)`` and grid maps ``(N, grid, grid)`` for a tensor or loader of images, in one pass."""
        self._fitted()
        scores, maps = zip(*(self.anomaly_maps(batch) for batch in _batches(data, batch_size)))
        return torch.cat(scores), torch.cat(maps)

    @torch.inference_mode()
    def score(self, data: Any, *, batch_size: int = 32) -> Tensor:
        """Image anomaly scores ``(N,)`` float32 on ``self.device`` (higher = more anomalous)."""
        self._fitted()
        # One small (B,) tensor per batch, joined at the end: no host sync inside the loop.
        return torch.cat([self.score_features(self.features(batch)) for batch in _batches(data, batch_size)])

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
            "calibration_scores": self.calibration_scores.detach().cpu(),
            "threshold": self.threshold.detach().cpu(),
            "threshold_quantile": self.threshold_quantile,
            "map_scale": self.map_scale.detach().cpu(),
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
        if payload.get("version") != _VERSION:
            raise ModelFileError(f"{path} has model-file version {payload.get('version')}; this fre_torch reads "
                                 f"version {_VERSION}")
        config = DetectorConfig.from_dict(payload["config"])
        saved_id = str(payload.get("weights_id", ""))
        if weights is None and saved_id.startswith("file:"):
            raise ModelFileError(f"{path} was fitted with a local backbone weights file "
                                 f"({saved_id[5:]}); pass the same file with weights=")
        det = cls(config, device=device, pretrained=bool(payload.get("pretrained", True)), weights=weights,
                  compile=compile, precision=precision)
        if det._weights_id != saved_id:
            raise ModelFileError(f"{path} was fitted with backbone weights {saved_id!r}, "
                                 f"but these are {det._weights_id!r}")
        subspaces = []
        for state, d in zip(payload["subspaces"], config.layer_features):
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
        if len(subspaces) != len(config.layer_features):
            raise ModelFileError(f"{path}: {len(subspaces)} subspaces where the config implies "
                                 f"{len(config.layer_features)}")
        det.subspaces = nn.ModuleList(subspaces)
        det.scales = payload["scales"].to(det.device)
        if "calibration_scores" in payload:
            det.calibration_scores = payload["calibration_scores"].to(det.device)
            det.threshold = payload["threshold"].to(det.device)
            det.threshold_quantile = payload.get("threshold_quantile")
        if "map_scale" in payload:
            det.map_scale = payload["map_scale"].to(det.device)
        return det


MAP_SCALE_QUANTILE = 0.999


def _map_quantile(maps: Tensor) -> Tensor:
    """The ``MAP_SCALE_QUANTILE`` of all values of grid maps ``(N, g, g)`` -> 0-dim float32 (exact, via kthvalue;
    torch.quantile refuses more than 16M elements)."""
    flat = maps.detach().float().flatten()
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot set the heatmap scale: no maps, or NaN/Inf in the normal images' maps")
    k = max(1, min(flat.numel(), int(round(MAP_SCALE_QUANTILE * flat.numel()))))
    return flat.kthvalue(k).values.clamp_min(torch.finfo(torch.float32).tiny)


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
