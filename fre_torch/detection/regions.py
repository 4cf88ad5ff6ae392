"""Connected components of binary masks in pure torch, for region-based segmentation metrics (PRO).

Connectivity is 8 (a pixel touches the 8 pixels around it, diagonals included), as in the MVTec AD evaluation code,
which labels ground-truth masks with ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))``. Two defects that meet
only at a corner are therefore one region.

Method: the foreground pixels are listed once (``nonzero``); each is linked to its foreground neighbours to the right
and in the row below (one ``searchsorted`` in the sorted pixel list, so the cost follows the foreground, not the
image); then parallel union-find runs on these edges: every root is hooked onto the smallest root it touches
(``scatter_reduce`` with ``amin``) and the forest is flattened by pointer jumping, until no edge joins two roots.
Each root ends as the first pixel of its component in raster order, so components are numbered in raster order of
their first pixel over the batch: the labels equal ``scipy.ndimage.label`` of each image plus the number of
components in the images before it. Cost: one pass over the masks, then O(F log F) time and O(F) memory for the F
foreground pixels (a few rounds in practice, each with O(log) pointer jumps); ``label_components`` adds the dense
int64 output.
"""

from __future__ import annotations

import torch

__all__ = ["label_components", "foreground_components"]


def _check_masks(masks: torch.Tensor) -> torch.Tensor:
    """Validates ``masks: (N, H, W)`` and returns it as bool."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}; wrap it with torch.as_tensor")
    if masks.ndim != 3:
        raise ValueError(
            f"masks must have shape (N, H, W), got {tuple(masks.shape)}; "
            "add a batch dimension with masks[None] or drop a channel dimension with masks.squeeze(1)"
        )
    if masks.is_floating_point() or masks.is_complex():
        raise TypeError(f"masks must be bool or integer (nonzero = foreground), got dtype {masks.dtype}")
    return masks if masks.dtype == torch.bool else masks != 0


def foreground_components(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sparse connected components: the foreground pixels and the component of each.

    Args:
        masks: (N, H, W) bool or integer; nonzero = foreground.

    Returns:
        ``(pixels, components, n)``: ``pixels`` (F,) int64 flat indices into ``masks`` in increasing (raster) order;
        ``components`` (F,) int64 in ``[0, n)``, numbered in raster order of each component's first pixel;
        ``n`` the number of components over the batch.
    """
    masks = _check_masks(masks)
    _, h, w = masks.shape
    pixels = masks.reshape(-1).nonzero().squeeze(1)  # (F,) increasing
    f = pixels.numel()
    if f == 0:
        return pixels, pixels.clone(), 0
    x = pixels % w
    has_row_below = (pixels // w) % h != h - 1
    # Right neighbour: the next foreground pixel in raster order, when it is adjacent in the same row.
    right = ((pixels[1:] == pixels[:-1] + 1) & (x[:-1] != w - 1)).nonzero().squeeze(1)
    src, dst = [right], [right + 1]
    # Row below: one search for the pixel straight below (index j: the first pixel at or after it). When that pixel
    # is foreground the diagonal ones join through it, so they are linked only when it is background: below-left
    # is then just before j, below-right at j. Index f of `padded` is a sentinel that matches nothing.
    padded = torch.cat([pixels, pixels.new_full((1,), -1)])
    below = pixels + w
    j = torch.searchsorted(pixels, below)  # (F,) in [0, f]
    at_j = padded.index_select(0, j)
    before_j = (j - 1).remainder_(f + 1)  # j = 0 -> the sentinel
    straight = at_j == below
    for hit, target in (
        (straight, j),
        ((padded.index_select(0, before_j) == below - 1) & (x != 0) & ~straight, before_j),
        ((at_j == below + 1) & (x != w - 1), j),
    ):
        hit = (hit & has_row_below).nonzero().squeeze(1)
        src.append(hit)
        dst.append(target.index_select(0, hit))
    u, v = torch.cat(src), torch.cat(dst)  # u < v: every such neighbour comes later in raster order
    del src, dst, x, has_row_below, padded, below, j, at_j, before_j, straight

    parent = torch.arange(f, device=pixels.device)
    while u.numel():
        ru, rv = parent.index_select(0, u), parent.index_select(0, v)  # roots: parent is flat after every round
        # Edges inside one component stay inside it: keep only the others for the next rounds.
        apart = (ru != rv).nonzero().squeeze(1)
        if apart.numel() == 0:
            break
        u, v, ru, rv = (t.index_select(0, apart) for t in (u, v, ru, rv))
        # Hook each larger root onto the smallest root it touches; pointers only decrease, so no cycle forms.
        parent.scatter_reduce_(0, torch.maximum(ru, rv), torch.minimum(ru, rv), reduce="amin")
        while True:  # pointer jumping until every pixel points at its root
            grand = parent.index_select(0, parent)
            if torch.equal(grand, parent):
                break
            parent = grand
    is_root = parent == torch.arange(f, device=pixels.device)
    ids = torch.cumsum(is_root, 0) - 1  # root -> its rank in raster order
    n = int(ids[-1]) + 1
    return pixels, ids.index_select(0, parent), n


def label_components(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels the 8-connected components of a batch of binary masks.

    Args:
        masks: (N, H, W) bool or integer; nonzero = foreground. Images are labelled independently (no component
            crosses from one image to the next).

    Returns:
        ``(labels, n)``: ``labels`` (N, H, W) int64 on the input device, 0 on background and ``1..n`` on the
        components, ids unique across the batch and assigned in raster order of each component's first pixel
        (image by image, so ``labels[i]`` equals ``scipy.ndimage.label(masks[i], np.ones((3, 3)))[0]`` shifted by
        the number of components in the images before ``i``); ``n`` the number of components.

    Raises:
        ValueError: ``masks`` is not 3-D.
        TypeError: ``masks`` is not a bool or integer tensor.
    """
    masks = _check_masks(masks)
    pixels, components, n = foreground_components(masks)
    labels = torch.zeros(masks.numel(), dtype=torch.int64, device=masks.device)
    labels[pixels] = components + 1
    return labels.view(masks.shape), n
