"""Cheap post-processing of the two heads' maps and scores: does any of it lift bottle, magnetic_tile and screw at once?

Decided (BENCHMARKS.md, same section): the image score is the mean of the top 10 % of score-head cells, each
standardised by its out-of-fold normal mean and std (``image_score='top'``); no map post-processing lifted all three
sets, so maps stay plain.

    python -m benchmarks.studies.localisation_postprocess --root_dir /work/shared/data \
        [--sets bottle magnetic_tile screw] [--cache_dir /tmp/fre_localisation_study] \
        [--json benchmarks/results/localisation_postprocess.json] [--table]

Heads (the configurations of ``benchmarks.localisation_study``, on the feature maps it cached; a missing pass is
extracted and cached as there):

- ``det224``: the detection head, efficientnet_lite0 at 224 px, blocks.8 + blocks.14 on a 7 x 7 grid (today's
  default);
- ``map224``: the map head, the same pass, blocks.4 + blocks.8 on a 14 x 14 grid;
- ``map448``: the comparison map head, a second pass at 448 px, blocks.4 + blocks.8 pooled by 4 to 14 x 14.

Each head is one ``FREDetector`` fitted on every training image (``RowsDetector``: the library's own ``fit`` and
``score_and_maps`` on the cached rows). Its normal statistics come from ``fre_torch.jobs.crossfit.cross_fit`` on the
same rows: 5 folds, each training image scored and mapped by the fold model that did not see it (what
``fre_torch.jobs.evaluate`` already computes for its threshold, so the statistics cost no extra backbone pass). No
test image or label shapes any constant. What is measured, per set and head:

1. ``blur_*``: a Gaussian (separable ``conv2d``, reflect padding, truncated at 4 sigma) on the map AFTER upsampling
   to the evaluation size (``fre_torch.jobs.evaluate.evaluation_maps``). ``blur_4px``: sigma 4 px of the evaluation
   image (PatchCore / PaDiM's constant, read literally); ``blur_4px_input``: 4 px of the backbone's input (what
   PatchCore's 4 px at 224 px means here: 0.25 cell of the 224 px 14 x 14 head, 0.125 cell at 448 px);
   ``blur_0.5cell`` / ``blur_1cell``: sigma as a fraction of one grid cell at the evaluation size.
2. Per-cell normalisation with the out-of-fold maps ``(N, g, g)`` of the training images: ``ratio`` = map / the
   cell's mean, ``z`` = (map - the cell's mean) / the cell's standard deviation. Pixel metrics of the normalised
   map, and the image AUROC of its sum over cells.
3. Image-score statistics of a map (raw, ``ratio`` or ``z``): ``sum`` over cells (``det224/raw/sum`` is today's
   score up to rounding), ``max`` cell, ``top10`` = mean of the top 10 % of cells (5 of 49, 20 of 196); and
   ``det+max(map)``: the detection score plus the map head's max cell, each divided by the standard deviation of
   its own out-of-fold values on the training images (no free weight).
4. Two more: ``zmax(det,map)``: the pixelwise max of the two heads' z-maps (the 7 x 7 one
   upsampled with the 14 x 14 one to the evaluation size), its pixel metrics and the image AUROC of its max; and
   ``det+top10(map)``: as ``det+max(map)`` with the top-10 % mean.

Then, for the detection head's statistics: their AUROC under two more fold draws (seeds 1, 2), under a held-out
20 % split instead of cross-fitting (fit on 80 %, statistics from the other 20 %, test scored by the 80 % model), and
at top fractions 5 / 10 / 20 % (``robustness``: reported to show the sensitivity, not to pick a value); and a
stratified paired bootstrap of the AUROC difference to today's score (``bootstrap``). ``comparisons`` sets each
variant against its head's plain figures on every set.

Costs are stated in operations (another process shares this CPU, so nothing is timed): see ``COST``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.studies.localisation_study import (SETS, Candidate, RowsDetector, Store, _all, _candidates, _files_digest,
                                           _machine, _rows, _write, features)
from fre_torch.detection.metrics import auroc, pixel_auroc, pro
from fre_torch.features.images import MVTecCategory
from fre_torch.jobs.crossfit import CROSS_FIT_FOLDS, cross_fit
from fre_torch.jobs.evaluate import evaluation_maps

HEADS = {"det224": "det_l0_224", "map224": "map_l0_224_b4b8_p2", "map448": "map_l0_448_b4b8_p4"}
MAP_HEADS = ("map224", "map448")
NORMS = ("raw", "ratio", "z")
STATS = ("sum", "max", "top10")
TOP_FRACTION = 0.10
BLURS = ("blur_4px", "blur_4px_input", "blur_0.5cell", "blur_1cell")
TRUNCATE = 4.0  # the Gaussian is cut at this many sigmas (scipy.ndimage's default, which PatchCore uses)
HELD_OUT = 0.2  # the held-out alternative's share of the training images
SEEDS = (0, 1, 2)  # fold draws of the robustness check
TOP_FRACTIONS = (0.05, 0.10, 0.20)  # reported around TOP_FRACTION to show its sensitivity, not to pick one
BOOTSTRAP = 2000  # stratified paired resamples of the test images for the AUROC differences

# Targets of the study, for ONE configuration on all three sets: (image AUROC, pixel AUROC, PRO) lower bounds.
TARGETS = {"bottle": (1.0, 0.985, 0.95), "magnetic_tile": (0.986, 0.86, 0.80), "screw": (0.95, 0.985, 0.93)}

COST = {
    "blur": "per evaluation pixel 2 * (2 * ceil(4 sigma) + 1) multiply-adds (sigma in evaluation px): 1 cell on a "
            "1024 px screw image = 1,174 per pixel, ~1.2 G per image, against ~0.4 GFLOP for the whole 224 px "
            "Lite0 backbone; the same blur applied on the 14 x 14 grid before upsampling is ~200 x 10 operations",
    "ratio": "fit: none beyond evaluate's cross-fit (5 fold fits on cached features + scoring the training images "
             "once, already run for the threshold); test: one divide per grid cell; model: g * g floats",
    "z": "as ratio: one subtract and one divide per grid cell; model: 2 * g * g floats",
    "max/top10": "g * g compares (top-k: a partial sort of g * g values) per image",
    "det+max(map)": "two divides and an add per image; two floats (out-of-fold standard deviations)",
    "zmax(det,map)": "both heads' z-maps upsampled: one extra upsample of the 7 x 7 map and a max per pixel",
}


# ----------------------------------------------------------------------------------------------------------------------
# Heads: test maps and out-of-fold maps
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """One head on one set.

    Attributes:
        scores: ``(M,)`` the full model's image scores of the test images.
        maps: ``(M, g, g)`` its grid maps of the test images.
        oof_scores: ``(N,)`` out-of-fold scores of the training images.
        oof_maps: ``(N, g, g)`` out-of-fold grid maps of the training images.
        input_size: the backbone's input side in pixels.
    """

    scores: Tensor
    maps: Tensor
    oof_scores: Tensor
    oof_maps: Tensor
    input_size: int

    @property
    def grid(self) -> int:
        return self.maps.shape[-1]


def fit_head(cand: Candidate, feats: dict[str, dict[str, Tensor]], seed: int = 0) -> Fitted:
    """Fit on all training rows, score and map the test rows, and cross-fit the training rows (5 folds, ``seed``
    draws the folds)."""
    train = _rows(cand, feats["train"])
    n = train[0].shape[0]
    det = RowsDetector(cand.config, train).fit(_all(n), batch_size=4096)
    test = _rows(cand, feats["test"])
    scores, maps = det.use(test).score_and_maps(_all(test[0].shape[0]), batch_size=256)
    oof = cross_fit(RowsDetector(cand.config, train), _all(n), folds=CROSS_FIT_FOLDS, seed=seed, batch_size=512)
    return Fitted(scores.float(), maps.float(), oof.scores.float(), oof.maps.float(), cand.source.input_size)


def fit_held_out(cand: Candidate, feats: dict[str, dict[str, Tensor]], fraction: float = HELD_OUT,
                 seed: int = 0) -> Fitted:
    """The held-out alternative to cross-fitting: fit on a seeded random ``1 - fraction`` of the training rows, take
    the normal statistics from the other ``fraction``, and score the test rows with that smaller model (what a fit
    with a held-out split ships)."""
    train = _rows(cand, feats["train"])
    n = train[0].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:round(fraction * n)], order[round(fraction * n):]
    det = RowsDetector(cand.config, [r[kept] for r in train]).fit(_all(kept.numel()), batch_size=4096)
    normal_scores, normal_maps = det.use([r[held] for r in train]).score_and_maps(_all(held.numel()), batch_size=256)
    test = _rows(cand, feats["test"])
    scores, maps = det.use(test).score_and_maps(_all(test[0].shape[0]), batch_size=256)
    return Fitted(scores.float(), maps.float(), normal_scores.float(), normal_maps.float(), cand.source.input_size)


# ----------------------------------------------------------------------------------------------------------------------
# Post-processing (pure functions of maps; nothing here sees a test label)
# ----------------------------------------------------------------------------------------------------------------------


def normalise(maps: Tensor, normal: Tensor, how: str) -> Tensor:
    """``maps: (M, g, g)`` normalised per cell by ``normal: (N, g, g)`` (out-of-fold maps of normal images).

    ``raw``: unchanged; ``ratio``: divided by the cell's mean; ``z``: minus the cell's mean, over its standard
    deviation (unbiased). Statistics in float64, result float32.
    """
    if how == "raw":
        return maps
    normal = normal.double()
    mean = normal.mean(dim=0)
    if how == "ratio":
        return (maps.double() / mean).float()
    if how == "z":
        return ((maps.double() - mean) / normal.std(dim=0)).float()
    raise ValueError(f"normalisation must be one of {NORMS}, got {how!r}")


def statistic(maps: Tensor, how: str, fraction: float = TOP_FRACTION) -> Tensor:
    """Image scores ``(M,)`` from grid maps ``(M, g, g)``: ``sum``, ``max`` or ``top10`` (the mean of the top
    ``fraction`` of cells, at least one)."""
    flat = maps.flatten(1)
    if how == "sum":
        return flat.sum(dim=1)
    if how == "max":
        return flat.max(dim=1).values
    if how == "top10":
        k = max(1, math.ceil(fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"statistic must be one of {STATS}, got {how!r}")


def gaussian_blur(maps: Tensor, sigma: float, chunk: int = 16) -> Tensor:
    """``maps: (M, H, W)`` -> the same shape, a separable Gaussian of ``sigma`` pixels (cut at ``TRUNCATE`` sigmas,
    reflect padding; the radius is capped at ``min(H, W) - 1``, which reflect padding needs). Processed ``chunk``
    maps at a time; the input is not modified."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    h, w = maps.shape[-2:]
    r = max(1, min(math.ceil(TRUNCATE * sigma), h - 1, w - 1))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).float()
    out = torch.empty_like(maps)
    for start in range(0, maps.shape[0], chunk):
        m = maps[start:start + chunk, None]
        m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        out[start:start + chunk] = m[:, 0]
    return out


def blur_sigma(name: str, head: Fitted, eval_side: int) -> float:
    """Sigma in evaluation pixels of a ``BLURS`` entry for a head evaluated at ``eval_side`` px."""
    cell = eval_side / head.grid
    return {"blur_4px": 4.0, "blur_4px_input": 4.0 * eval_side / head.input_size,
            "blur_0.5cell": 0.5 * cell, "blur_1cell": cell}[name]


def oof_scaled(test: Tensor, oof: Tensor) -> Tensor:
    """``test: (M,)`` divided by the standard deviation of the out-of-fold normal values ``oof: (N,)``."""
    return test / oof.double().std().float()


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def pixel(maps: Tensor, masks: Tensor) -> dict[str, float]:
    """Pixel AUROC and PRO (FPR <= 0.3) of evaluation-size ``maps: (M, H, W)`` against ``masks``."""
    return {"pixel_auroc": float(pixel_auroc(maps, masks)), "pro": float(pro(maps, masks))}


def measure_set(cat: MVTecCategory, heads: dict[str, Fitted], log: Callable[[str, dict[str, float]], None]
                ) -> dict[str, dict[str, float]]:
    """Every variant's figures on one set: ``{variant: {image_auroc?, pixel_auroc?, pro?}}``."""
    labels = cat.test_labels
    out: dict[str, dict[str, float]] = {}

    def put(name: str, figures: dict[str, float]) -> None:
        out[name] = figures
        log(name, figures)

    # 2 + 3: normalisations and image statistics, every head.
    norm = {(h, n): (normalise(f.maps, f.oof_maps, n), normalise(f.oof_maps, f.oof_maps, n))
            for h, f in heads.items() for n in NORMS}
    for (h, n), (maps, _) in norm.items():
        for s in STATS:
            put(f"{h}/{n}/{s}", {"image_auroc": float(auroc(statistic(maps, s), labels))})
    put("det224/score", {"image_auroc": float(auroc(heads["det224"].scores, labels))})
    # 3c + 4b: detection score + the map head's max (top-10 %) cell, each over its out-of-fold standard deviation.
    det = heads["det224"]
    det_term = oof_scaled(det.scores, det.oof_scores)
    for h in MAP_HEADS:
        for n in NORMS:
            maps, oof_maps = norm[(h, n)]
            for s in ("max", "top10"):
                term = oof_scaled(statistic(maps, s), statistic(oof_maps, s))
                put(f"det+{s}({h}/{n})", {"image_auroc": float(auroc(det_term + term, labels))})

    # 1 + 2: pixel metrics of the map heads, plain, blurred and normalised.
    for h in MAP_HEADS:
        f = heads[h]
        plain, masks = evaluation_maps(cat, f.maps)
        eval_side = plain.shape[-1]
        put(f"{h}/raw/map", pixel(plain, masks))
        for b in BLURS:
            put(f"{h}/raw/{b}", pixel(gaussian_blur(plain, blur_sigma(b, f, eval_side)), masks))
        del plain
        for n in NORMS[1:]:
            maps, _ = evaluation_maps(cat, norm[(h, n)][0])
            put(f"{h}/{n}/map", pixel(maps, masks))
            put(f"{h}/{n}/blur_0.5cell", pixel(gaussian_blur(maps, blur_sigma("blur_0.5cell", f, eval_side)), masks))
            del maps

    # 4a: pixelwise max of the detection head's and a map head's z-maps.
    det_z, _ = evaluation_maps(cat, norm[("det224", "z")][0])
    for h in MAP_HEADS:
        map_z, masks = evaluation_maps(cat, norm[(h, "z")][0])
        both = torch.maximum(det_z, map_z)
        del map_z
        put(f"zmax(det224,{h})/map", {"image_auroc": float(auroc(both.flatten(1).max(dim=1).values, labels)),
                                       **pixel(both, masks)})
        del both
    return out


def auroc_difference(a: Tensor, b: Tensor, labels: Tensor, resamples: int = BOOTSTRAP, seed: int = 0
                     ) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same test images, with a stratified paired bootstrap (normal and anomalous images
    resampled separately, with replacement): the difference, its 2.5 / 97.5 % percentiles and the share of
    resamples where ``a`` wins."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(labels).flatten(), torch.nonzero(~labels.bool()).flatten()
    diffs = torch.empty(resamples, dtype=torch.float64)
    for i in range(resamples):
        idx = torch.cat([pos[torch.randint(pos.numel(), (pos.numel(),), generator=g)],
                         neg[torch.randint(neg.numel(), (neg.numel(),), generator=g)]])
        diffs[i] = auroc(a[idx], labels[idx]) - auroc(b[idx], labels[idx])
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"difference": float(auroc(a, labels) - auroc(b, labels)), "ci95": [low, high],
            "wins": float((diffs > 0).double().mean())}


def robustness(cand: Candidate, feats: dict[str, dict[str, Tensor]], labels: Tensor) -> dict[str, Any]:
    """The detection head's image statistics under other draws of what they depend on: the cross-fit folds
    (``SEEDS``), a held-out split instead of cross-fitting, and the top fraction (``TOP_FRACTIONS``)."""
    out: dict[str, Any] = {}
    fits = {f"crossfit_seed{s}": fit_head(cand, feats, seed=s) for s in SEEDS}
    fits["held_out_20pct"] = fit_held_out(cand, feats)
    for name, f in fits.items():
        row = {"score": float(auroc(f.scores, labels))}
        for n in NORMS:
            maps = normalise(f.maps, f.oof_maps, n)
            row[f"{n}/max"] = float(auroc(statistic(maps, "max"), labels))
            for q in TOP_FRACTIONS:
                row[f"{n}/top{round(100 * q)}"] = float(auroc(statistic(maps, "top10", q), labels))
        out[name] = row
    return out


def run(root: Path, sets: Sequence[str], store: Store, document: dict[str, Any], out: Path) -> dict[str, Any]:
    """Measure ``sets``, merging into ``document`` and writing it to ``out`` after each set."""
    cands = {c.name: c for c in _candidates()}
    document.setdefault("results", {})
    document["heads"] = {h: {"candidate": name, **cands[name].describe()} for h, name in HEADS.items()}
    for name in sets:
        folder, category = SETS[name]
        cat = MVTecCategory.load(root / folder, category)
        digest = _files_digest(cat)
        heads: dict[str, Fitted] = {}
        for source in dict.fromkeys(cands[c].source for c in HEADS.values()):  # each cached pass read once
            feats, _ = features(source, cat, store, digest, torch.get_num_threads())
            for h, cname in HEADS.items():
                if cands[cname].source == source:
                    heads[h] = fit_head(cands[cname], feats)
            if cands[HEADS["det224"]].source == source:
                document.setdefault("robustness", {})[name] = robustness(cands[HEADS["det224"]], feats,
                                                                         cat.test_labels)
            del feats

        def log(variant: str, figures: dict[str, float]) -> None:
            print(f"{name:14s} {variant:34s} " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)

        document["results"][name] = measure_set(cat, heads, log)
        det = heads["det224"]
        z = normalise(det.maps, det.oof_maps, "z")
        document.setdefault("bootstrap", {})[name] = {
            f"{v} - det224/score": auroc_difference(scores, det.scores, cat.test_labels)
            for v, scores in (("det224/z/top10", statistic(z, "top10")),
                              ("det224/raw/top10", statistic(det.maps, "top10")))}
        print(f"{name:14s} robustness {json.dumps(document['robustness'][name])}\n"
              f"{name:14s} bootstrap {json.dumps(document['bootstrap'][name])}", flush=True)
        _write(out, document)
    return document


# ----------------------------------------------------------------------------------------------------------------------
# Reading the results
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(r: dict[str, float] | None) -> str:
    if r is None:
        return ""
    return " / ".join(f"{r[k]:.3f}" if k in r else "-" for k in ("image_auroc", "pixel_auroc", "pro"))


def table(document: dict[str, Any]) -> str:
    """Markdown: one row per variant, per set image AUROC / pixel AUROC / PRO ('-' where not measured)."""
    results = document.get("results", {})
    sets = [s for s in SETS if s in results]
    variants = list(dict.fromkeys(v for s in sets for v in results[s]))
    lines = ["| variant | " + " | ".join(f"{s} img / px / PRO" for s in sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_fmt(results[s].get(v)) for s in sets) + " |")
    return "\n".join(lines)


def comparisons(document: dict[str, Any]) -> dict[str, Any]:
    """Each variant against its baseline (``det224/score`` for image AUROC, ``<head>/raw/map`` for pixel figures,
    ``map224/raw/map`` for the combined map): the per-set differences, ``no_loss_anywhere`` (no difference below
    zero) and ``lifts_all`` (no loss, and a gain on every set and metric whose baseline is below 1)."""
    results = document["results"]
    sets = [s for s in SETS if s in results]
    out: dict[str, Any] = {}
    for v in dict.fromkeys(v for s in sets for v in results[s]):
        base = {"image_auroc": "det224/score"}
        head = v.split("/")[0]
        if head in MAP_HEADS:
            base.update(pixel_auroc=f"{head}/raw/map", pro=f"{head}/raw/map")
        elif head.startswith("zmax"):
            base.update(pixel_auroc="map224/raw/map", pro="map224/raw/map")
        deltas = {s: {k: results[s][v][k] - results[s][b][k] for k, b in base.items() if k in results[s].get(v, {})}
                  for s in sets}
        flat = [(d, results[s][base[k]][k]) for s in sets for k, d in deltas[s].items()]
        no_loss = bool(flat) and min(d for d, _ in flat) >= 0.0
        out[v] = {"deltas": deltas, "no_loss_anywhere": no_loss,
                  "lifts_all": no_loss and all(d > 0.0 for d, b in flat if b < 1.0)}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_dir", default="../shared/data", help="folder holding mvtec_bottle, magnetic_tile, ...")
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    p.add_argument("--cache_dir", default="/tmp/fre_localisation_study", help="localisation_study's feature cache")
    p.add_argument("--json", default="benchmarks/results/localisation_postprocess.json")
    p.add_argument("--table", action="store_true", help="print the table of --json and exit")
    args = p.parse_args(argv)
    out = Path(args.json)
    document = json.loads(out.read_text()) if out.is_file() else {}
    if not args.table:
        document["machine"] = _machine()
        document["command"] = ("python -m benchmarks.studies.localisation_postprocess "
                               + " ".join(argv if argv is not None else sys.argv[1:]))
        document["protocol"] = {"normal_statistics": f"{CROSS_FIT_FOLDS}-fold cross-fitting of the training images "
                                                     "(fre_torch.jobs.crossfit.cross_fit), seed 0",
                                "top_fraction": TOP_FRACTION, "blur_truncate_sigmas": TRUNCATE,
                                "targets": TARGETS, "cost": COST}
        run(Path(args.root_dir), args.sets, Store(Path(args.cache_dir)), document, out)
        document["comparisons"] = comparisons(document)
        _write(out, document)
    print(table(document))


if __name__ == "__main__":
    main()
