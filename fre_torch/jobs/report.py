"""A static HTML report of an evaluation run: ``DIR/index.html``, its heatmap panels' PNG files beside it.

Per category: the metrics table, ROC and precision-recall curves (``fre_torch.detection.metrics``) with the operating point
of the threshold, histograms of the normal and defective test images' scores with the threshold drawn (far
outliers counted at the axis' edge, so one huge score does not squash the rest into one bin), the colour bar of the
heatmaps (where colour starts and where it is full), and the heatmap panels (``fre_torch.jobs.heatmaps``) of the
worst images: the highest-scoring normal ones (false positives when above the threshold) and the lowest-scoring
defective ones (false negatives when at or below it). The page has no script and no external resource, so it opens
offline from the file system.

The threshold is the one ``evaluate_category`` computed from the training images only (never from test scores or
labels); test labels are used here only to draw what happened at it.

The plots are SVG written into the page (``fre_torch.jobs.svg``): no plotting library, a few milliseconds per
category, sharp at any zoom. Only the heatmap panels are files (PNG, in one folder per category).
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch
from torch import Tensor

from ..detection.detector import MAP_FLOOR_QUANTILE, MAP_SCALE_QUANTILE
from .evaluate import THRESHOLD_QUANTILE
from .heatmaps import COLORMAP, OVERLAY_ALPHA, heatmap_names, render_file, write_png
from .svg import Canvas, nice_ticks
from ..detection.metrics import precision_recall_curve, roc_curve
from ..features.files import atomic_write

__all__ = ["DEFECTIVE_COLOUR", "NORMAL_COLOUR", "N_WORST", "write_report"]

N_WORST = 4
"""Worst images shown per category and kind (normal, defective)."""

NORMAL_COLOUR = "#2f6fd0"
"""Colour of normal test images in the plots (opaque, so it appears exactly on screen)."""

DEFECTIVE_COLOUR = "#e0533a"
"""Colour of defective test images in the plots."""

_THRESHOLD_COLOUR = "#222222"
_HIST_BINS = 25
_OUTLIER_FENCE = 3.0  # Tukey's "far out" fences: beyond Q1 - 3 IQR or Q3 + 3 IQR
_PANEL_SIDE = 256  # longest side of one panel in the report's thumbnails (the full-size files are --save_heatmaps)
_SAFE = re.compile(r"[^\w.-]+")
_METRIC_LABELS = (
    ("image_auroc", "image AUROC"), ("image_aupr", "image AUPR"), ("image_f1_max", "image F1-max (oracle)"),
    ("pixel_auroc", "pixel AUROC"), ("pro", "PRO (FPR <= 0.3)"), ("pixel_f1_max", "pixel F1-max (oracle)"),
)
_REQUIRED = ("scores", "labels", "threshold")


def _rgb(colour: Tensor) -> str:
    """``(3,)`` RGB in [0, 255] -> ``#rrggbb``."""
    r, g, b = (int(round(float(v))) for v in colour)
    return f"#{r:02x}{g:02x}{b:02x}"


def _at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Counts and rates when flagging ``score > threshold`` (as ``cli.py predict``), from (N,) scores and labels."""
    flagged = scores > threshold
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    tp, fp = int((flagged & pos).sum()), int((flagged & ~pos).sum())
    return {"tp": tp, "fp": fp, "fn": n_pos - tp, "tn": n_neg - fp, "n_pos": n_pos, "n_neg": n_neg,
            "tpr": tp / n_pos if n_pos else math.nan, "fpr": fp / n_neg if n_neg else math.nan,
            "precision": tp / (tp + fp) if tp + fp else math.nan}


def _histogram_range(scores: Tensor, threshold: float) -> tuple[float, float]:
    """The score histogram's x range ``(lo, hi)``: the scores and the threshold, far outliers left out.

    Clipped rather than drawn on a log axis: scores may be 0 or negative (``image_score='top'`` averages z-scores),
    where a log axis has no place, and a log axis would also squeeze the region around the threshold that the plot
    is for. The cut is Tukey's far-out fence, ``Q1 - 3 IQR`` / ``Q3 + 3 IQR`` of the test scores: unlike a fixed
    quantile it cuts nothing when no score is far out (a well separated defective cluster widens the IQR with it),
    and one score 100 times the others no longer squashes them into the first of the bins. The threshold always
    stays on the axis. Scores outside ``(lo, hi)`` are counted at the edge (``_curves_svg``).
    """
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype)).tolist()
    fence_lo, fence_hi = q1 - _OUTLIER_FENCE * (q3 - q1), q3 + _OUTLIER_FENCE * (q3 - q1)
    inside = scores[(scores >= fence_lo) & (scores <= fence_hi)]  # never empty: Q1..Q3 lie inside
    lo = min(float(inside.min()), threshold)
    hi = max(float(inside.max()), threshold)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _histogram_counts(values: Tensor, edges: Tensor) -> list[int]:
    """Counts of ``values`` in the bins ``[e_i, e_i+1)``, the last bin closed (numpy's convention)."""
    index = torch.bucketize(values, edges[1:-1], right=True)
    return torch.bincount(index, minlength=len(edges) - 1).tolist()


# The curves plot: three panels in a 1200 x 360 px SVG, room on the left of each for the y ticks and label.
_CURVES_SIZE = (1200, 360)
_PANEL_BOX = (320, 262)  # width, height of each plot area
_PANEL_LEFTS = (62, 462, 862)
_PANEL_TOP = 30


def _curves_svg(scores: Tensor, labels: Tensor, threshold: float, at: Mapping[str, float], prefix: str) -> Canvas:
    """ROC, precision-recall and score histograms side by side, threshold marked: a 1200 x 360 px ``Canvas`` whose
    panels are named ``roc``, ``pr`` and ``hist``; ``prefix`` makes its ids unique on the page."""
    canvas = Canvas(*_CURVES_SIZE, label="ROC, precision-recall and score histograms", prefix=prefix)
    w, h = _PANEL_BOX
    unit, unit_ticks = (-0.02, 1.02), nice_ticks(0.0, 1.0)
    roc = canvas.panel("roc", _PANEL_LEFTS[0], _PANEL_TOP, w, h, unit, unit)
    if at["n_pos"] > 0 and at["n_neg"] > 0:
        fpr, tpr, _ = roc_curve(scores, labels)
        roc.line([0.0, 1.0], [0.0, 1.0], "#999999", width=1.0, dash="2 3")
        roc.line(fpr.tolist(), tpr.tolist(), DEFECTIVE_COLOUR, width=2.0, cls="curve")
        roc.marker(at["fpr"], at["tpr"], _THRESHOLD_COLOUR, cls="operating")
        roc.legend([("at the threshold", _THRESHOLD_COLOUR, "marker")], "lower right")
    else:
        roc.note("needs normal and\ndefective test images")
    roc.frame(title="ROC", xlabel="false positive rate", ylabel="true positive rate", xticks=unit_ticks,
              yticks=unit_ticks)
    pr = canvas.panel("pr", _PANEL_LEFTS[1], _PANEL_TOP, w, h, unit, unit)
    if at["n_pos"] > 0:
        precision, recall, _ = precision_recall_curve(scores, labels)
        pr.line(recall.tolist(), precision.tolist(), DEFECTIVE_COLOUR, width=2.0, cls="curve")
        if not math.isnan(at["precision"]):
            pr.marker(at["tpr"], at["precision"], _THRESHOLD_COLOUR, cls="operating")
            pr.legend([("at the threshold", _THRESHOLD_COLOUR, "marker")], "lower left")
    else:
        pr.note("no defective test image")
    pr.frame(title="precision-recall", xlabel="recall", ylabel="precision", xticks=unit_ticks, yticks=unit_ticks)
    _histogram_panel(canvas, scores, labels, threshold)
    return canvas


def _histogram_panel(canvas: Canvas, scores: Tensor, labels: Tensor, threshold: float) -> None:
    """The test scores' histograms, normal and defective bars side by side in each bin (each keeps its exact
    colour), the threshold dashed, and scores beyond ``_histogram_range`` counted at the edge they lie past."""
    lo, hi = _histogram_range(scores, threshold)
    edges = torch.linspace(lo, hi, _HIST_BINS + 1, dtype=torch.float64)  # float32 edges could drop the max
    shown = (scores >= lo) & (scores <= hi)
    groups = [(_histogram_counts(scores[(labels == kind) & shown], edges), colour, name)
              for kind, colour, name in ((0, NORMAL_COLOUR, "normal"), (1, DEFECTIVE_COLOUR, "defective"))
              if bool(((labels == kind) & shown).any())]
    beyond = [(side, mask, x) for side, mask, x in (("below", scores < lo, lo - 0.03 * (hi - lo)),
                                                    ("above", scores > hi, hi + 0.03 * (hi - lo)))
              if bool(mask.any())]
    tallest = max([max(c) for c, _, _ in groups] + [int(m.sum()) for _, m, _ in beyond] + [1])
    pad = (0.07 if beyond else 0.02) * (hi - lo)  # room for the clipped scores' triangles
    # Headroom above the tallest bar for the legend and the clipped scores' counts.
    panel = canvas.panel("hist", _PANEL_LEFTS[2], _PANEL_TOP, *_PANEL_BOX, (lo - pad, hi + pad),
                         (0.0, tallest * 1.45))
    step = (hi - lo) / _HIST_BINS
    for g, (counts, colour, name) in enumerate(groups):
        width = 0.8 * step / len(groups)
        for b, n in enumerate(counts):
            if n:
                x0 = lo + b * step + 0.1 * step + g * width
                panel.bar(x0, x0 + width, n, colour, cls=f"bar {name}", data={"bin": b, "n": n})
    panel.vline(threshold, _THRESHOLD_COLOUR, dash="5 3", cls="threshold")
    for side, mask, x in beyond:
        counts = [(int((mask & (labels == kind)).sum()), colour)
                  for kind, colour in ((0, NORMAL_COLOUR), (1, DEFECTIVE_COLOUR))]
        for n, colour in counts:
            if n:
                panel.marker(x, n, colour, shape="<" if side == "below" else ">", size=9, cls="clipped")
        far = float(scores[mask].min() if side == "below" else scores[mask].max())
        panel.text(x, max(n for n, _ in counts), f"{int(mask.sum())} {side}\n(to {far:.3g})", above=10,
                   anchor="start" if side == "below" else "end", cls="clipped")
    entries = [(name, colour, "patch") for _, colour, name in groups] + [("threshold", _THRESHOLD_COLOUR, "dash")]
    # The legend goes to the side whose bins are lower (defective scores mostly sit on the right).
    half = _HIST_BINS // 2
    left_mass = sum(sum(c[:half]) for c, _, _ in groups)
    right_mass = sum(sum(c[half:]) for c, _, _ in groups)
    panel.legend(entries, "upper left" if left_mass < right_mass else "upper right")
    panel.frame(title="test scores", xlabel="image score", ylabel="test images",
                xticks=nice_ticks(lo - pad, hi + pad), yticks=nice_ticks(0.0, tallest * 1.45, integer=True))


def _colorbar_svg(scale: float, floor: float, prefix: str) -> Canvas:
    """The heatmap colour scale, 0 .. ``scale``: plain (no colour, hatched) up to ``floor``, then the colour map up to
    ``scale`` (values above are drawn as ``scale``): a 600 x 110 px ``Canvas`` with one panel, ``bar``."""
    canvas = Canvas(600, 110, label="heatmap colour scale", prefix=prefix)
    panel = canvas.panel("bar", 12, 8, 558, 32, (0.0, scale), (0.0, 1.0))
    ramp = canvas.gradient("ramp", [_rgb(c) for c in COLORMAP[::8]] + [_rgb(COLORMAP[-1])])
    panel.span(floor, scale, ramp, cls="ramp")
    if floor > 0:
        panel.span(0.0, floor, canvas.hatch("plain"), cls="plain")
        panel.vline(floor, _THRESHOLD_COLOUR, width=1.0)
        if floor > 0.2 * scale:
            panel.text(floor / 2, 0.5, "no colour", size=9)
        ticks, names = [0.0, floor, scale], ["0", f"{floor:.4g}\nmap_floor", f"{scale:.4g}\nmap_scale"]
    else:
        ticks, names = [0.0, scale], ["0", f"{scale:.4g}\nmap_scale"]
    panel.frame(xticks=ticks, xtick_labels=names, grid=False,
                xlabel=f"anomaly map value (colour and opacity, up to {OVERLAY_ALPHA:g}, rise from "
                       f"{'map_floor' if floor > 0 else '0'} to map_scale)")
    return canvas


def _worst(scores: Tensor, labels: Tensor, kind: int, n: int) -> list[int]:
    """Indices of the ``n`` worst images of one class: normal (0) by highest score, defective (1) by lowest; ties by
    test order."""
    idx = [i for i, v in enumerate(labels.tolist()) if v == kind]
    values = scores.tolist()
    return sorted(idx, key=lambda i: (-values[i] if kind == 0 else values[i], i))[:n]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _img(src: str, alt: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<img src="{html.escape(quote(src))}" alt="{html.escape(alt)}"{cls}>'


def _category_section(out: Path, folder: str, name: str, r: Mapping[str, Any], n_worst: int) -> str:
    missing = [k for k in _REQUIRED if k not in r]
    if missing:
        raise ValueError(f"category {name}: the results lack {missing}; run evaluate_category(..., keep_maps=True)")
    scores = torch.as_tensor(r["scores"], dtype=torch.float64)
    labels = torch.as_tensor(r["labels"], dtype=torch.int64)
    threshold = float(r["threshold"])
    at = _at_threshold(scores, labels, threshold)
    (out / folder).mkdir(parents=True, exist_ok=True)
    q = r.get("threshold_quantile")
    rows: list[tuple[str, Any]] = [(label, r[k]) for k, label in _METRIC_LABELS if k in r]
    rows += [("training / test images", f"{r.get('n_train', '?')} / {len(scores)}"),
             ("threshold" + (f" ({q:g} quantile of out-of-fold training scores)" if q is not None else ""),
              threshold),
             ("false positives at the threshold", f"{at['fp']} of {at['n_neg']} normal (FPR {_fmt(at['fpr'])})"),
             ("false negatives at the threshold", f"{at['fn']} of {at['n_pos']} defective (TPR {_fmt(at['tpr'])})")]
    parts = [f'<section id="{html.escape(folder)}"><h2>{html.escape(name)}</h2>', _table(rows),
             _curves_svg(scores, labels, threshold, at, prefix=folder).to_svg("wide")]
    grid_maps, scale = r.get("grid_maps"), r.get("map_scale")
    floor = float(r.get("map_floor") or 0.0)  # results from before the colour floor: colour from 0
    have_maps = grid_maps is not None and scale is not None and "paths" in r
    if have_maps:
        parts.append(_colorbar_svg(float(scale), floor, prefix=folder).to_svg("bar"))
    elif "paths" not in r:
        parts.append("<p>No per-image panels: the results carry no paths (keep_maps=False).</p>")
    else:
        parts.append("<p>No heatmap panels: kernel FRE gives image scores only, no maps.</p>")
    paths = r.get("paths")
    masks = r.get("mask_paths") or [None] * len(scores)
    for kind, heading in ((0, "Highest-scoring normal test images"), (1, "Lowest-scoring defective test images")):
        chosen = _worst(scores, labels, kind, n_worst)
        if not chosen or paths is None:
            continue
        names = heatmap_names([paths[i] for i in chosen])
        parts.append(f"<h3>{heading}</h3><div class=\"panels\">")
        for i, file_name in zip(chosen, names):
            s = float(scores[i])
            wrong = (s > threshold) if kind == 0 else (s <= threshold)
            verdict = ("false positive" if kind == 0 else "false negative") if wrong else \
                ("below the threshold" if kind == 0 else "detected")
            label = f"{Path(paths[i]).parent.name}/{Path(paths[i]).name}"
            caption = (f"<figcaption><b class=\"{'bad' if wrong else 'ok'}\">{verdict}</b> "
                       f"{html.escape(label)}, score {s:.4g}</figcaption>")
            if have_maps:
                src = f"{folder}/{'normal' if kind == 0 else 'defective'}_{file_name}"
                picture = render_file(paths[i], grid_maps[i], float(scale), mask=masks[i], normal=kind == 0,
                                      max_side=_PANEL_SIDE, floor=floor)
                write_png(picture, out / src)
                parts.append(f"<figure>{_img(src, label)}{caption}</figure>")
            else:
                parts.append(f"<figure>{caption}</figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1250px; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td { font-variant-numeric: tabular-nums; }
svg.wide { width: 100%; max-width: 1200px; height: auto; display: block; }
svg.bar { width: 600px; max-width: 100%; height: auto; display: block; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 0.8em; }
figure { margin: 0; }
figure img { width: 100%; image-rendering: auto; display: block; }
figcaption { font-size: 0.85em; }
b.bad { color: #b3261e; } b.ok { color: #1e7b34; }
p.note { font-size: 0.9em; color: #444; }
"""


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Mapping[str, Any]], *,
                 title: str = "fre_torch evaluation", config: Mapping[str, Any] | None = None,
                 n_worst: int = N_WORST) -> Path:
    """Write ``out_dir/index.html`` and its PNGs (one folder per category) for ``evaluate_category`` results.

    Args:
        out_dir: the report folder (created; files of an earlier report there are overwritten).
        results: category name -> the dict ``evaluate_category(..., keep_maps=True)`` returned: it needs
            ``"scores"``, ``"labels"`` and ``"threshold"``; ``"paths"``, ``"mask_paths"``, ``"grid_maps"`` ``(N, g,
            g)`` and ``"map_scale"`` add the heatmap panels (``"map_floor"``, default 0, where their colour
            starts); metric keys present are tabulated.
        title: the page title.
        config: settings shown at the top (e.g. ``DetectorConfig.to_dict()`` plus the device).
        n_worst: panels per category and kind.

    Returns:
        The path of ``index.html`` (written last, atomically: an interrupted run leaves no page pointing at missing
        files).

    Raises:
        ValueError: no results, or a result without the required keys.
    """
    if not results:
        raise ValueError("no categories to report; evaluate at least one")
    if n_worst < 0:
        raise ValueError(f"n_worst must be >= 0, got {n_worst}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A numbered folder per category: unique and safe whatever the category's name.
    folders = {name: f"{i:02d}_{_SAFE.sub('_', name)}" for i, name in enumerate(results)}
    sections = [_category_section(out, folders[name], name, r, n_worst) for name, r in results.items()]

    summary_keys = [(k, label) for k, label in _METRIC_LABELS if any(k in r for r in results.values())]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in summary_keys)
    body = []
    for name, r in results.items():
        cells = "".join(f"<td>{_fmt(r[k]) if k in r else ''}</td>" for k, _ in summary_keys)
        body.append(f'<tr><th><a href="#{html.escape(folders[name])}">{html.escape(name)}</a></th>{cells}'
                    f"<td>{_fmt(float(r['threshold'])) if 'threshold' in r else ''}</td></tr>")
    summary = f"<table><tr><th>category</th>{head}<th>threshold</th></tr>{''.join(body)}</table>"
    settings = _table([(str(k), v) for k, v in (config or {}).items()]) if config else ""
    note = (
        f'<p class="note"><b>Threshold</b>: the {THRESHOLD_QUANTILE:g} quantile of the training images\' '
        "<i>out-of-fold</i> scores: evaluate has no held-out split, so the training images are cross-fitted (5 "
        "folds; each is scored by a model fitted to the other 4) and the threshold is set as on unseen normal "
        "images. It never sees a test image or label. Images scoring above it are flagged. F1-max is an oracle "
        "(best threshold chosen with the test labels): reported, not used.<br><b>Heatmaps</b>: image | anomaly "
        "map over the image | ground-truth outline (green, drawn just inside the mask). The colour scale is fixed "
        "per category, from the out-of-fold training maps' values: up to <code>map_floor</code>, their "
        f"{MAP_FLOOR_QUANTILE:g} quantile (the level normal images stay under), the image is left untouched; "
        f"<code>map_scale</code>, their {MAP_SCALE_QUANTILE:g} quantile, and above get the full colour (see the "
        "colour bar); nothing is normalised per image.</p>"
    )
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{settings}\n{note}\n{summary}\n"
            + "\n".join(sections) + "\n</body></html>\n")
    index = out / "index.html"
    with atomic_write(index) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return index
