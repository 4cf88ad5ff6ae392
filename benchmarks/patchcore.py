"""PatchCore (Roth et al., CVPR 2022) on fre_torch's EfficientNet-Lite0: a BASELINE for the benchmarks only.

Written for ``benchmarks/run_patchcore.py`` to compare the default detector with a memory-bank method on the same
backbone, the same images and the same metrics. It is not part of the library: nothing in ``fre_torch/`` imports it.

The recipe (one fixed configuration, ``PatchCoreConfig``):

- images decoded and resized by ``fre_torch.features.images`` (PIL, LANCZOS to 224 x 224), normalised with the
  backbone spec's mean / std (Lite0: ``(x - 127) / 128``), run channels_last through
  ``build_feature_extractor("efficientnet_lite0", ["blocks.4", "blocks.10"])``;
- each layer's map averaged over 3 x 3 neighbourhoods (stride 1, zero padding counted), the stride-16 map resized
  bilinear to the stride-8 grid (28 x 28), the two concatenated: one 40 + 112 = 152-dim vector per patch;
- memory bank: a greedy k-center coreset of 1 % of all training patches, chosen on a seeded Gaussian projection of
  the patches to 128 dimensions from a seeded random first patch; the bank keeps the chosen patches at full dimension;
- a patch's score is the Euclidean distance to its nearest bank patch, an image's score the largest patch score; the
  28 x 28 map is resized bilinear to 224 x 224 and blurred with a Gaussian of sigma 4 px.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fre_torch.features.backbones import Normalize, build_feature_extractor, get_backbone_spec

__all__ = ["PatchCore", "PatchCoreConfig", "aggregate", "gaussian_blur", "greedy_coreset", "nearest_distances",
           "random_projection"]

# Bytes one chunk of the nearest-neighbour search may hold for its (rows x bank) distance block.
CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class PatchCoreConfig:
    """The baseline's settings (the defaults are the recipe of the module docstring).

    Attributes:
        backbone: registered backbone name.
        layers: two or more layers, the first setting the patch grid (its stride), the others resized to it.
        input_size: side of the square input image, pixels.
        aggregate: side of the average-pooling neighbourhood of each layer's map.
        coreset_fraction: share of the training patches kept in the memory bank, in (0, 1].
        projection_dim: dimension of the random projection the coreset is chosen on.
        sigma: standard deviation of the map's Gaussian blur, pixels at ``input_size``.
        seed: seeds the projection and the coreset's first patch.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.4", "blocks.10")
    input_size: int = 224
    aggregate: int = 3
    coreset_fraction: float = 0.01
    projection_dim: int = 128
    sigma: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.coreset_fraction <= 1:
            raise ValueError(f"coreset_fraction must be in (0, 1], got {self.coreset_fraction}; e.g. 0.01 for 1 %")
        if self.aggregate < 1 or self.aggregate % 2 == 0:
            raise ValueError(f"aggregate must be an odd size >= 1 (the map keeps its grid), got {self.aggregate}")
        if self.projection_dim < 1 or self.input_size < 1 or self.sigma <= 0:
            raise ValueError(f"projection_dim, input_size and sigma must be positive, got {self.projection_dim}, "
                             f"{self.input_size}, {self.sigma}")


def aggregate(maps: Sequence[Tensor], size: int = 3) -> Tensor:
    """Per-patch feature vectors of several layers on the first layer's grid.

    Args:
        maps: ``[(B, C_l, H_l, W_l)]``, the first the finest.
        size: side of each map's average-pooling neighbourhood (stride 1, zero padding counted in the mean).

    Returns:
        ``(B, H_0, W_0, sum C_l)`` float32: each map pooled, the later ones resized bilinear to ``(H_0, W_0)``,
        concatenated along channels in the order of ``maps``.
    """
    grid = tuple(maps[0].shape[-2:])
    out = []
    for m in maps:
        m = F.avg_pool2d(m.float(), size, stride=1, padding=size // 2)
        if tuple(m.shape[-2:]) != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1).permute(0, 2, 3, 1).contiguous()


def random_projection(dim: int, out_dim: int, seed: int) -> Tensor:
    """``(dim, out_dim)`` float32 Gaussian matrix scaled by ``1 / sqrt(out_dim)`` (distances kept in expectation),
    the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=g) / math.sqrt(out_dim)


def greedy_coreset(x: Tensor, n: int, start: int) -> Tensor:
    """Greedy k-center selection: from ``x[start]``, repeatedly take the row farthest from those taken so far.

    Args:
        x: ``(N, d)`` rows (not modified).
        n: rows to take, ``1 <= n <= N``.
        start: index of the first row.

    Returns:
        ``(n,)`` int64 indices in the order taken (the first is ``start``; a tie takes the lowest index).
    """
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be in [1, {x.shape[0]}] (the number of rows), got {n}")
    # Centred so the squared distances ||x||^2 - 2 x.c + ||c||^2 do not cancel on features with a large mean.
    # Held column-major, (d, N) in memory: the matrix-vector product then streams the rows at memory bandwidth
    # (about 3x faster on one CPU thread than on the row-major (N, d) layout).
    xt = (x - x.mean(dim=0)).float().T.contiguous()
    norms = xt.square().sum(dim=0)
    nearest = torch.full_like(norms, math.inf)  # squared distance of each row to its nearest taken row
    chosen = torch.empty(n, dtype=torch.int64)
    index = torch.tensor(start, dtype=torch.int64)
    for i in range(n):
        chosen[i] = index
        c = xt[:, index]
        d = torch.addmv(norms, xt.T, c, alpha=-2.0).add_(c.dot(c))  # (N,) ||x - c||^2
        torch.minimum(nearest, d, out=nearest)
        nearest[index] = 0.0  # exact for the taken row (rounding may leave a tiny positive value)
        index = torch.argmax(nearest)
    return chosen


def nearest_distances(queries: Tensor, bank: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Euclidean distance of each query row to its nearest bank row.

    The nearest row is found with the matrix-product form of the squared distance, a chunk of queries at a time
    (``chunk_bytes`` bounds each chunk's distance block); its distance is then recomputed from the difference, so
    the result does not suffer the product form's cancellation.

    Args:
        queries: ``(M, D)``; bank: ``(K, D)`` (neither is modified).

    Returns:
        ``(M,)`` float32.
    """
    center = bank.float().mean(dim=0)
    b = bank.float() - center
    b_norms = b.square().sum(dim=1)
    rows = max(1, chunk_bytes // (4 * b.shape[0]))
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    for lo in range(0, queries.shape[0], rows):
        q = queries[lo:lo + rows].float() - center
        nearest = torch.addmm(b_norms, q, b.T, alpha=-2.0).argmin(dim=1)  # ||q||^2 left out: same argmin
        out[lo:lo + rows] = torch.linalg.vector_norm(q - b[nearest], dim=1)
    return out


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur ``(N, H, W)`` maps with a Gaussian of ``sigma`` pixels: a separable kernel of radius
    ``round(4 sigma)``, normalised to sum 1, edges reflected. Returns ``(N, H, W)`` float32."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).float()
    x = F.pad(maps.float()[:, None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x[:, 0]


class PatchCore(nn.Module):
    """The baseline model: a frozen feature extractor and, once fitted, the memory bank (a buffer).

    Args:
        config: the recipe.
        pretrained: load the backbone's pretrained weights (False: random weights, for tests).
    """

    memory_bank: Tensor

    def __init__(self, config: PatchCoreConfig = PatchCoreConfig(), *, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        spec = get_backbone_spec(config.backbone)
        self.extractor = build_feature_extractor(config.backbone, list(config.layers), pretrained=pretrained)
        self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.normalize = Normalize(spec.mean, spec.std)
        self.grid = math.ceil(config.input_size / self.extractor.strides[0])
        self.dim = sum(self.extractor.channels)
        self.register_buffer("memory_bank", torch.empty(0, self.dim))

    @torch.inference_mode()
    def embed(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 3, S, S)`` images at ``config.input_size`` -> patch features ``(B, G, G, D)`` float32."""
        size = self.config.input_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected uint8 images (B, 3, {size}, {size}), got {images.dtype} {tuple(images.shape)}")
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        maps = self.extractor(x)
        return aggregate([maps[name] for name in self.config.layers], self.config.aggregate)

    @torch.inference_mode()
    def patches(self, batches: Iterable[Tensor], n_images: int) -> Tensor:
        """All patch features of ``n_images`` uint8 image batches, ``(n_images * G * G, D)``, filled batch by batch."""
        per_image = self.grid * self.grid
        out = torch.empty(n_images * per_image, self.dim)
        lo = 0
        for images in batches:
            rows = self.embed(images).view(-1, self.dim)
            out[lo:lo + rows.shape[0]] = rows
            lo += rows.shape[0]
        if lo != out.shape[0]:
            raise ValueError(f"got {lo // per_image} images, expected {n_images}")
        return out

    @torch.inference_mode()
    def build_bank(self, patches: Tensor) -> PatchCore:
        """Keep the coreset of the training patches ``(N, D)`` as the memory bank."""
        c = self.config
        n = max(1, round(c.coreset_fraction * patches.shape[0]))
        projected = patches @ random_projection(self.dim, c.projection_dim, c.seed)
        start = int(torch.randint(patches.shape[0], (1,), generator=torch.Generator().manual_seed(c.seed)))
        self.memory_bank = patches[greedy_coreset(projected, n, start)]
        return self

    def fit(self, batches: Iterable[Tensor], n_images: int) -> PatchCore:
        """Build the memory bank from the training images (uint8 batches, ``n_images`` in all)."""
        return self.build_bank(self.patches(batches, n_images))

    @torch.inference_mode()
    def score_and_maps(self, batches: Iterable[Tensor], n_images: int) -> tuple[Tensor, Tensor]:
        """Image scores ``(N,)`` and blurred maps ``(N, S, S)`` at ``config.input_size``, float32."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCore is not fitted: call fit on the training images first")
        g, size = self.grid, self.config.input_size
        scores = torch.empty(n_images)
        maps = torch.empty(n_images, size, size)
        lo = 0
        for images in batches:
            patches = self.embed(images)
            b = patches.shape[0]
            grid_maps = nearest_distances(patches.view(-1, self.dim), self.memory_bank).view(b, g, g)
            scores[lo:lo + b] = grid_maps.amax(dim=(1, 2))
            up = F.interpolate(grid_maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            maps[lo:lo + b] = gaussian_blur(up, self.config.sigma)
            lo += b
        if lo != n_images:
            raise ValueError(f"got {lo} images, expected {n_images}")
        return scores, maps
