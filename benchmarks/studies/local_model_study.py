"""Local models for the anomaly map (#21 item 3): measured against the default map head on bottle, magnetic_tile, screw.

Decided (BENCHMARKS.md, "Detail head"): the detail head (``blocks.2`` pooled by 2 + ``blocks.3`` + ``blocks.4`` on
28 x 28, geometric mean with the map head's map) joined the default; local models (shared, per-position, clustered
subspaces of cell vectors) were not adopted.

    python -m benchmarks.studies.local_model_study --root_dir /work/shared/data [--sets ...] [--cache_dir DIR] \
        [--json benchmarks/results/local_model_study.json]

The default map head fits one subspace per layer to whole-map vectors (``blocks.3`` + ``blocks.4`` + ``blocks.8`` on
a 14 x 14 grid, 224 px): a defect in one region moves the projection of the whole vector, so its error leaks into
other regions (the far-leak measured on magnetic_tile). A *local* model scores each cell from that cell's
neighbourhood alone. Candidates, all on the same cached Lite0 224 px features (``localisation_study``'s cache):

- ``global``: the default map head (``FREDetector`` on whole-map rows), the reference of every comparison.
- ``shared_gG_aA``: one subspace per layer shared by every position. A cell's vector is the layer's channels after
  an A x A neighbourhood mean, on a G x G grid (stride-16 layers upsampled bilinear to it); PCA(0.97) on all
  training cells of all images (N * G * G rows), error divided by the layer's residual variance, summed over layers.
- ``position_gG_aA``: a subspace per grid position and layer, fitted on that position's cell vectors and its
  neighbours' (3 x 3 positions, 9 N samples): local, and position-aware.
- ``cluster_gG_aA``: k-means (16 clusters) on each layer's cell vectors, shared by all positions, a PCA(0.97) per
  cluster; a cell's error is its smallest over clusters, in units of that cluster's residual variance.
- ``global_gG_aA``: the default head's whole-map subspaces on the finer grid G (pool 1): A = 0 all three map
  layers, A = 1 only the stride-8 ``blocks.3`` + ``blocks.4``, A = 2 those and ``blocks.2`` pooled by 2. Not
  local: a finer global model.
- ``<model>+sum|geo|max``: the default map and the model's map combined cell by cell after dividing each by its
  normal level (the mean of its out-of-fold maps on the training images, 5 folds, so neither is judged on the images
  it was fitted on): ``sum`` (the mean of the two), ``geo`` (their geometric mean, which needs no level: a cell is
  high only where both models agree, so one model's false alarms are damped by the other), ``max``.
  ``global_g28_a2+geo`` became the detail head (``DetectorConfig.detail_layers``).

Candidates are given as ``KIND:GRIDxAGG`` (``--locals shared:28x3 position:28x1 global:28x1 ...``). Maps are scored
as ``localisation_study`` scores them (pixel AUROC and PRO at the images' own size, image AUROC of
each candidate's own score: the map's top 10 % cells). No test label is used to choose anything here: every figure
of every candidate is reported.
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
from torch import Tensor

from benchmarks.studies.localisation_study import (L0, SETS, Pass, RowsDetector, Store, _all, _files_digest, _write,
                                           features, metrics)
from fre_torch.detection.detector import DetectorConfig, embed
from fre_torch.features.images import MVTecCategory

PASS = Pass(L0, 224, ("blocks.2", "blocks.3", "blocks.4", "blocks.8"))
MAP_LAYERS = ("blocks.3", "blocks.4", "blocks.8")
FOLDS = 5
TOP = 0.1


def _on_grid(m: Tensor, g: int) -> Tensor:
    """``(N, C, h, w)`` -> ``(N, C, g, g)``: average-pooled when finer, bilinear when coarser."""
    if m.shape[-1] == g:
        return m
    if m.shape[-1] > g:
        return F.adaptive_avg_pool2d(m, g)
    return F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False)


def _cells(m: Tensor, g: int, a: int) -> Tensor:
    """Cell vectors ``(N * g * g, C)`` float64 of a layer's maps, A x A neighbourhood mean on the g x g grid."""
    x = _on_grid(m.float(), g)
    if a > 1:
        x = F.avg_pool2d(x, a, stride=1, padding=a // 2, count_include_pad=False)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


class SharedLocal:
    """PCA(0.97) per layer on cell vectors shared by all positions; map = sum of layer errors / residual variance."""

    def __init__(self, g: int, a: int, fraction: float = 0.97) -> None:
        self.g, self.a, self.fraction = g, a, fraction

    def fit(self, maps: Sequence[Tensor]) -> SharedLocal:
        self.models = []
        for m in maps:
            x = _cells(m, self.g, self.a)
            mean = x.mean(0)
            xc = x - mean
            cov = xc.T @ xc / (x.shape[0] - 1)
            val, vec = torch.linalg.eigh(cov)
            val, vec = val.flip(0).clamp_min(0), vec.flip(1)
            ratio = val.cumsum(0) / val.sum()
            k = int((ratio < self.fraction).sum()) + 1
            residual = val[k:].sum().clamp_min(val.sum() * 1e-6)
            self.models.append((mean, vec[:, :k], residual))
        return self

    def maps(self, maps: Sequence[Tensor]) -> Tensor:
        n = maps[0].shape[0]
        total = torch.zeros(n * self.g * self.g, dtype=torch.float64)
        for m, (mean, comp, residual) in zip(maps, self.models):
            for start in range(0, n, 64):
                x = _cells(m[start:start + 64], self.g, self.a) - mean
                err = (x * x).sum(1) - ((x @ comp) ** 2).sum(1)
                total[start * self.g ** 2:(start + x.shape[0] // self.g ** 2) * self.g ** 2] += err / residual
        return total.view(n, self.g, self.g).float()


class PositionLocal:
    """A subspace per grid position, fitted on that position's cell vectors and its neighbours' within ``r`` cells
    (``(2r+1)^2 N`` samples), one per layer; map = sum of layer errors / that position's residual variance."""

    def __init__(self, g: int, a: int, r: int = 1, fraction: float = 0.97) -> None:
        self.g, self.a, self.r, self.fraction = g, a, r, fraction

    def _grid(self, m: Tensor) -> Tensor:
        n, c = m.shape[0], m.shape[1]
        return _cells(m, self.g, self.a).view(n, self.g, self.g, c)

    def fit(self, maps: Sequence[Tensor]) -> PositionLocal:
        self.models = []
        g, r = self.g, self.r
        for m in maps:
            x = self._grid(m)  # (N, g, g, C)
            c = x.shape[-1]
            s1 = torch.zeros(g, g, c, dtype=torch.float64)
            s2 = torch.zeros(g, g, c, c, dtype=torch.float64)
            cnt = torch.zeros(g, g, 1, dtype=torch.float64)
            xs1 = x.sum(0)
            xs2 = torch.einsum("nhwc,nhwd->hwcd", x, x)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    ys = slice(max(0, -dy), g - max(0, dy))
                    yt = slice(max(0, dy), g - max(0, -dy))
                    xs = slice(max(0, -dx), g - max(0, dx))
                    xt = slice(max(0, dx), g - max(0, -dx))
                    s1[ys, xs] += xs1[yt, xt]
                    s2[ys, xs] += xs2[yt, xt]
                    cnt[ys, xs] += x.shape[0]
            mean = s1 / cnt
            cov = s2 / cnt[..., None] - mean[..., :, None] * mean[..., None, :]
            val, vec = torch.linalg.eigh(cov)
            val, vec = val.flip(-1).clamp_min(0), vec.flip(-1)
            ratio = val.cumsum(-1) / val.sum(-1, keepdim=True)
            keep = (ratio < self.fraction).roll(1, -1)
            keep[..., 0] = True
            residual = (val * ~keep).sum(-1).clamp_min(val.sum(-1) * 1e-6)
            self.models.append((mean, vec * keep[..., None, :], residual))
        return self

    def maps(self, maps: Sequence[Tensor]) -> Tensor:
        total = 0
        for m, (mean, comp, residual) in zip(maps, self.models):
            x = self._grid(m) - mean
            proj = torch.einsum("nhwc,hwck->nhwk", x, comp)
            err = (x * x).sum(-1) - (proj * proj).sum(-1)
            total = total + err / residual
        return total.float()


class ClusterLocal:
    """K-means on each layer's cell vectors (shared by all positions), a PCA(0.97) per cluster; a cell's error is the
    smallest over clusters of its residual divided by that cluster's residual variance."""

    def __init__(self, g: int, a: int, k: int = 16, fraction: float = 0.97, iters: int = 15) -> None:
        self.g, self.a, self.k, self.fraction, self.iters = g, a, k, fraction, iters

    def fit(self, maps: Sequence[Tensor]) -> ClusterLocal:
        self.models = []
        gen = torch.Generator().manual_seed(0)
        for m in maps:
            x = _cells(m, self.g, self.a).float()
            centers = x[torch.randperm(x.shape[0], generator=gen)[:self.k]].clone()
            for _ in range(self.iters):
                assign = torch.cdist(x, centers).argmin(1)
                for j in range(self.k):
                    sel = x[assign == j]
                    if sel.shape[0]:
                        centers[j] = sel.mean(0)
            assign = torch.cdist(x, centers).argmin(1)
            parts = []
            for j in range(self.k):
                sel = x[assign == j].double()
                if sel.shape[0] < 2:
                    continue
                mean = sel.mean(0)
                xc = sel - mean
                val, vec = torch.linalg.eigh(xc.T @ xc / (sel.shape[0] - 1))
                val, vec = val.flip(0).clamp_min(0), vec.flip(1)
                ratio = val.cumsum(0) / val.sum()
                kk = int((ratio < self.fraction).sum()) + 1
                parts.append((mean, vec[:, :kk], val[kk:].sum().clamp_min(val.sum() * 1e-6)))
            self.models.append(parts)
        return self

    def maps(self, maps: Sequence[Tensor]) -> Tensor:
        n = maps[0].shape[0]
        total = 0
        for m, parts in zip(maps, self.models):
            x = _cells(m, self.g, self.a)
            best = None
            for mean, comp, residual in parts:
                xc = x - mean
                err = ((xc * xc).sum(1) - ((xc @ comp) ** 2).sum(1)) / residual
                best = err if best is None else torch.minimum(best, err)
            total = total + best
        return total.view(n, self.g, self.g).float()


class GlobalGrid:
    """The default head's whole-map subspaces on a finer grid: ``a`` = 0 takes all three map layers, 1 only the
    stride-8 ``blocks.3`` + ``blocks.4`` (pool 1 at g = 28), 2 the stride-4 ``blocks.2`` (pooled by 2) with them."""

    def __init__(self, g: int, a: int) -> None:
        self.g, self.a = g, a

    def _sel(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return list(maps[:3]) if self.a == 0 else list(maps[:2]) if self.a == 1 else [maps[3], *maps[:2]]

    def fit(self, maps: Sequence[Tensor]) -> GlobalGrid:
        layers = MAP_LAYERS if self.a == 0 else MAP_LAYERS[:2] if self.a == 1 else ("blocks.2", *MAP_LAYERS[:2])
        pool = 28 // self.g * (2 if self.a == 2 else 1)
        self.config = DetectorConfig(L0, layers=layers, input_size=224, pool=pool, map_layers=None, image_score="fre")
        self.det = RowsDetector(self.config, embed(self._sel(maps), self.config.map_grid))
        self.det.fit(_all(maps[0].shape[0]), batch_size=4096, cell_statistics=False)
        return self

    def maps(self, maps: Sequence[Tensor]) -> Tensor:
        rows = embed(self._sel(maps), self.config.map_grid)
        _, m = self.det.use(rows).score_and_maps(_all(rows[0].shape[0]), batch_size=256)
        return m.float()


LOCALS = {"global": GlobalGrid, "shared": SharedLocal, "position": PositionLocal, "cluster": ClusterLocal}


def global_maps(train: Sequence[Tensor], test: Sequence[Tensor]) -> Tensor:
    """The default map head's maps ``(M, 14, 14)`` of ``test`` after fitting on ``train`` (per-layer maps)."""
    config = DetectorConfig(L0, layers=MAP_LAYERS, input_size=224, pool=2, map_layers=None, image_score="fre")
    det = RowsDetector(config, embed(list(train), config.map_grid))
    det.fit(_all(train[0].shape[0]), batch_size=4096, cell_statistics=False)
    rows = embed(list(test), config.map_grid)
    _, maps = det.use(rows).score_and_maps(_all(rows[0].shape[0]), batch_size=256)
    return maps.float()


def out_of_fold_level(fit_and_map: Any, train: Sequence[Tensor], seed: int = 0) -> float:
    """Mean of the out-of-fold maps of the training images (``FOLDS`` folds): the model's normal level."""
    n = train[0].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    total, count = 0.0, 0
    for f in range(FOLDS):
        held = order[f::FOLDS]
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        m = fit_and_map([t[keep] for t in train], [t[held] for t in train])
        total += float(m.double().sum())
        count += m.numel()
    return total / count


def _up(m: Tensor, g: int) -> Tensor:
    return F.interpolate(m[:, None], size=(g, g), mode="bilinear", align_corners=False)[:, 0]


def top_score(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    k = max(1, int(round(TOP * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def run_set(name: str, root: Path, store: Store, threads: int, locals_: Sequence[tuple[int, int]]
            ) -> dict[str, dict[str, Any]]:
    folder, category = SETS[name]
    cat = MVTecCategory.load(root / folder, category)
    feats, _ = features(PASS, cat, store, _files_digest(cat), threads)
    # The map layers, then blocks.2 (read only by the global:G x 2 candidate; the others take the first three).
    train = [feats["train"][layer] for layer in (*MAP_LAYERS, "blocks.2")]
    test = [feats["test"][layer] for layer in (*MAP_LAYERS, "blocks.2")]
    out: dict[str, dict[str, Any]] = {}

    def record(cand: str, maps: Tensor, seconds: float) -> None:
        r = {**metrics(cat, top_score(maps), maps), "seconds": seconds}
        out[cand] = r
        print(f"{name:14s} {cand:24s} image {r['image_auroc']:.4f}  pixel {r['pixel_auroc']:.4f}  PRO {r['pro']:.4f}"
              f"  {seconds:.1f}s", flush=True)

    t0 = time.perf_counter()
    g_maps = global_maps(train[:3], test[:3])
    record("global", g_maps, time.perf_counter() - t0)
    g_level = out_of_fold_level(global_maps, train[:3])
    for kind, grid, agg in locals_:
        cls = LOCALS[kind]
        n = 4 if kind == "global" else 3
        t0 = time.perf_counter()
        model = cls(grid, agg).fit(train[:n])
        l_maps = model.maps(test[:n])
        tag = f"{kind}_g{grid}_a{agg}"
        record(tag, l_maps, time.perf_counter() - t0)
        l_level = out_of_fold_level(lambda tr, te: cls(grid, agg).fit(tr).maps(te), train[:n])
        g = _up(g_maps, grid) / g_level
        loc = l_maps / l_level
        record(f"{tag}+sum", (g + loc) / 2, 0.0)
        record(f"{tag}+geo", (g.clamp_min(0) * loc.clamp_min(0)).sqrt(), 0.0)
        record(f"{tag}+max", torch.maximum(g, loc), 0.0)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_dir", default="../shared/data")
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    p.add_argument("--cache_dir", default="/tmp/fre_localisation_study")
    p.add_argument("--json", default="benchmarks/results/local_model_study.json")
    p.add_argument("--locals", nargs="*", default=["shared:28x3", "shared:14x3", "shared:28x1"],
                   help="KIND:GRIDxAGG local models (KIND: shared, position, cluster)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    locals_ = [(s.split(":")[0], *(int(v) for v in s.split(":")[1].split("x"))) for s in args.locals]
    out = Path(args.json)
    document: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    document.setdefault("results", {})
    store = Store(Path(args.cache_dir))
    for name in args.sets:
        document["results"].setdefault(name, {}).update(run_set(name, Path(args.root_dir), store, args.threads,
                                                                locals_))
        _write(out, document)


if __name__ == "__main__":
    main()
