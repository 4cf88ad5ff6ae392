"""Where a head's feature vectors come from and how its maps are laid out: sizes, grids, tiles, stitching.

A head (``DetectorConfig``'s score head or map head) takes some layers of the backbone at one input size, pools
their maps to one grid, and flattens them in C x H x W order (the reference's vector). With tiling, the image is cut
into overlapping tiles of ``tile`` pixels at a ``stride``; each tile goes through the backbone on its own and gives
one vector per layer, and all tiles of an image are concatenated, tile after tile, into the image's row. Maps of
the tiles are placed back on the image's grid (``stitch``), overlaps averaged.

Sizes are ``(height, width)`` in pixels; a square size may be given as one int.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["HeadGeometry", "as_hw", "cut_tiles", "embed", "stitch", "tile_offsets"]


def as_hw(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    """``S`` -> ``(S, S)``; ``(H, W)`` -> ``(H, W)``; anything else is a ``ValueError`` naming ``what``."""
    if isinstance(size, bool):
        raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        return size, size
    if not isinstance(size, (tuple, list)):
        raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
    values = tuple(size)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be an int or (height, width) ints, got {size!r}")
    return values[0], values[1]


def tile_offsets(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Offsets of the tiles along one side: ``0, stride, ..., length - tile`` (the last tile ends at the edge).

    Raises:
        ValueError: a tile longer than the side, a stride < 1, or a stride that does not end on the edge.
    """
    if tile > length:
        raise ValueError(f"tile_size {tile} is larger than the image side {length}; use a smaller tile_size or a "
                         "larger input_size")
    if stride < 1 or (length - tile) % stride:
        raise ValueError(f"tile_stride {stride} does not step from 0 to {length - tile} (= input side {length} - "
                         f"tile {tile}) in whole steps; choose a stride that divides {length - tile}")
    return tuple(range(0, length - tile + 1, stride)) if length > tile else (0,)


@dataclass(frozen=True)
class HeadGeometry:
    """One head's layers and layout.

    Attributes:
        layers / channels / strides: the backbone layers it reads, their channels and strides.
        pass_size: the backbone's input ``(H, W)``: the tile's size when tiled, else the image's.
        image_size: the image the head sees, ``(H, W)`` (its tiles are cut from it).
        pool: average-pooling kernel of the first layer's map: sets ``grid``.
        tiles: ``(top, left)`` pixel offsets of the tiles in the image, row-major; ``((0, 0),)`` untiled.
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    pass_size: tuple[int, int]
    image_size: tuple[int, int]
    pool: int
    tiles: tuple[tuple[int, int], ...] = ((0, 0),)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)`` of one backbone input: the first layer's map (``ceil(side / stride)``) pooled by ``pool``."""
        s = self.strides[0]
        return tuple(-(-side // s) // self.pool for side in self.pass_size)  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def tile_dims(self) -> tuple[int, ...]:
        """D of each layer's vector for one backbone input, ``C * gh * gw``."""
        gh, gw = self.grid
        return tuple(c * gh * gw for c in self.channels)

    @property
    def dims(self) -> tuple[int, ...]:
        """D of each layer's row for one image: all its tiles' vectors, ``n_tiles * C * gh * gw``."""
        return tuple(self.n_tiles * d for d in self.tile_dims)

    @property
    def cell(self) -> tuple[int, int]:
        """Pixels per grid cell of a tile, ``(pass_h / gh, pass_w / gw)`` (whole numbers when tiled)."""
        return tuple(p // g for p, g in zip(self.pass_size, self.grid))  # type: ignore[return-value]

    @property
    def canvas(self) -> tuple[int, int]:
        """``(GH, GW)`` of the image's map: the grid when untiled, the tiles' grids stitched otherwise."""
        if self.n_tiles == 1:
            return self.grid
        return tuple(i // c for i, c in zip(self.image_size, self.cell))  # type: ignore[return-value]

    def check_tiling(self) -> None:
        """Tiles must meet on grid cells: each tile's side a whole number of cells, each offset too."""
        if self.n_tiles == 1:
            return
        for side, g, axis in zip(self.pass_size, self.grid, ("height", "width")):
            if side % g:
                raise ValueError(f"tile {axis} {side} px is not a whole number of the {g} grid cells of "
                                 f"{self.layers[0]}; choose a tile size that is a multiple of {side // g}")
        ch, cw = self.cell
        for top, left in self.tiles:
            if top % ch or left % cw:
                raise ValueError(f"tile offsets must be multiples of a grid cell ({ch} x {cw} px) so that tile maps "
                                 f"meet on the image's grid; got a tile at ({top}, {left}): change tile_stride")


def embed(maps: Sequence[Tensor], grid: int | tuple[int, int]) -> list[Tensor]:
    """Per-input vectors from feature maps, one per layer.

    Args:
        maps: one ``(B, C_l, h_l, w_l)`` map per layer.
        grid: ``(gh, gw)`` (or one int for a square) of the common grid; each map is average-pooled to it (exactly
            ``avg_pool2d`` when its size is a multiple of the grid, as the reference's pool 2; adaptive otherwise).

    Returns:
        ``[(B, C_l * gh * gw)]`` float32 rows in the reference's C x H x W order.
    """
    gh, gw = as_hw(grid, "grid")
    out = []
    for m in maps:
        m = m.float()
        h, w = m.shape[-2:]
        if (h, w) != (gh, gw):
            if h % gh == 0 and w % gw == 0:
                m = F.avg_pool2d(m, (h // gh, w // gw))  # the reference's pooling, exactly
            else:
                m = F.adaptive_avg_pool2d(m, (gh, gw))
        out.append(m.contiguous().flatten(1))  # NCHW order whatever the memory format was
    return out


def cut_tiles(x: Tensor, head: HeadGeometry) -> Tensor:
    """``(B, C, H, W)`` images -> ``(B * T, C, th, tw)`` tiles, image after image, tiles row-major."""
    if head.n_tiles == 1:
        return x
    th, tw = head.pass_size
    tiles = [x[:, :, top:top + th, left:left + tw] for top, left in head.tiles]
    return torch.stack(tiles, dim=1).flatten(0, 1)


def stitch(tile_maps: Tensor, head: HeadGeometry) -> Tensor:
    """``(B, T, gh, gw)`` maps of the tiles -> ``(B, GH, GW)`` on the image's grid, overlaps averaged."""
    if head.n_tiles == 1:
        return tile_maps[:, 0]
    gh, gw = head.grid
    ch, cw = head.cell
    canvas = tile_maps.new_zeros(tile_maps.shape[0], *head.canvas)
    count = tile_maps.new_zeros(head.canvas)
    for t, (top, left) in enumerate(head.tiles):
        r, c = top // ch, left // cw
        canvas[:, r:r + gh, c:c + gw] += tile_maps[:, t]
        count[r:r + gh, c:c + gw] += 1
    return canvas / count
