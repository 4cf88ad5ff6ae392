"""A static HTML report of an evaluation run: ``DIR/index.html`` with its PNG files beside it.

Per category: the metrics table, ROC and precision-recall curves (``fre_torch.detection.metrics``) with the operating point
of the threshold, histograms of the normal and defective test images' scores with the threshold drawn (far
outliers counted at the axis' edge, so one huge score does not squash the rest into one bin), the colour bar of the
heatmaps (where colour starts and where it is full), and the heatmap panels (``fre_torch.jobs.heatmaps``) of the
worst images: the highest-scoring normal ones (false positives when above the threshold) and the lowest-scoring
defective ones (false negatives when at or below it). The page has no script and no external resource, so it opens
offline from the file system.

The threshold is the one ``evaluate_category`` computed from the training images only (never from test scores or
labels); test labels are used here only to draw what happened at it.

Plots need matplotlib (``pip install -e .[report]``), imported only when a report is written and used through its
object-oriented API with the Agg canvas: no pyplot, no global backend switch.
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
from .heatmaps import COLORMAP, OVERLAY_ALPHA, PNG_COMPRESS_LEVEL, heatmap_names, render_file
from ..detection.metrics import precision_recall_curve, roc_curve
from ..features.files import atomic_write

__all__ = ["DEFECTIVE_COLOUR", "NORMAL_COLOUR", "N_WORST", "check_report_dependencies", "write_report"]

N_WORST = 4
"""Worst images shown per category and kind (normal, defective)."""

NORMAL_COLOUR = "#2f6fd0"
"""Colour of normal test images in the plots (opaque, so it appears exactly in the PNGs)."""

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


def check_report_dependencies() -> None:
    """Raise ``ValueError`` naming the fix when matplotlib (the report's only extra dependency) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ValueError("the HTML report needs matplotlib: pip install -e .[report] (or pip install matplotlib)") \
            from err


def _figure(width: float, height: float, margins: Mapping[str, float]) -> Any:
    """A matplotlib Figure that renders with Agg, without touching pyplot's global state.

    ``margins``: ``Figure.subplots_adjust`` fractions, fixed per plot: matplotlib's constrained layout would find
    them itself but measures every text first, which doubled the report's plotting time.
    """
    check_report_dependencies()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(**margins)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", facecolor="white", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})


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
    stays on the axis. Scores outside ``(lo, hi)`` are counted at the edge (``_curves_figure``).
    """
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype)).tolist()
    fence_lo, fence_hi = q1 - _OUTLIER_FENCE * (q3 - q1), q3 + _OUTLIER_FENCE * (q3 - q1)
    inside = scores[(scores >= fence_lo) & (scores <= fence_hi)]  # never empty: Q1..Q3 lie inside
    lo = min(float(inside.min()), threshold)
    hi = max(float(inside.max()), threshold)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _curves_figure(scores: Tensor, labels: Tensor, threshold: float, at: Mapping[str, float]) -> Any:
    """ROC, precision-recall and score histograms side by side, threshold marked (a Figure of 1200 x 360 px)."""
    fig = _figure(12.0, 3.6, {"left": 0.05, "right": 0.975, "bottom": 0.14, "top": 0.91, "wspace": 0.22})
    roc_ax, pr_ax, hist_ax = fig.subplots(1, 3)
    both = at["n_pos"] > 0 and at["n_neg"] > 0
    if both:
        fpr, tpr, _ = roc_curve(scores, labels)
        roc_ax.plot(fpr.numpy(), tpr.numpy(), color=DEFECTIVE_COLOUR, lw=2)
        roc_ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls=":")
        roc_ax.plot([at["fpr"]], [at["tpr"]], "o", color=_THRESHOLD_COLOUR, label="at the threshold")
        roc_ax.legend(loc="lower right", fontsize=8)
    else:
        roc_ax.text(0.5, 0.5, "needs normal and\ndefective test images", ha="center", va="center")
    roc_ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate",
               title="ROC")
    if at["n_pos"] > 0:
        precision, recall, _ = precision_recall_curve(scores, labels)
        pr_ax.plot(recall.numpy(), precision.numpy(), color=DEFECTIVE_COLOUR, lw=2)
        if not math.isnan(at["precision"]):
            pr_ax.plot([at["tpr"]], [at["precision"]], "o", color=_THRESHOLD_COLOUR, label="at the threshold")
            pr_ax.legend(loc="lower left", fontsize=8)
    else:
        pr_ax.text(0.5, 0.5, "no defective test image", ha="center", va="center")
    pr_ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall", ylabel="precision", title="precision-recall")
    lo, hi = _histogram_range(scores, threshold)
    edges = torch.linspace(lo, hi, _HIST_BINS + 1, dtype=torch.float64).tolist()  # float32 edges could drop the max
    shown = (scores >= lo) & (scores <= hi)
    groups = [(scores[(labels == 0) & shown].tolist(), NORMAL_COLOUR, "normal"),
              (scores[(labels == 1) & shown].tolist(), DEFECTIVE_COLOUR, "defective")]
    groups = [g for g in groups if g[0]]
    if groups:
        # Side-by-side opaque bars: each class keeps its exact colour (no blending where they overlap).
        hist_ax.hist([g[0] for g in groups], bins=edges, color=[g[1] for g in groups], label=[g[2] for g in groups])
    hist_ax.axvline(threshold, color=_THRESHOLD_COLOUR, lw=1.5, ls="--", label="threshold")
    # Clipped scores: a triangle per class just beyond the edge they lie past, at the height of their count, and
    # above them the count and the farthest score, so nothing is hidden.
    pad = 0.03 * (hi - lo)
    for side, beyond, x, marker, ha in (("below", scores < lo, lo - pad, "<", "left"),
                                        ("above", scores > hi, hi + pad, ">", "right")):
        if not bool(beyond.any()):
            continue
        counts = [(int((beyond & (labels == kind)).sum()), colour)
                  for kind, colour in ((0, NORMAL_COLOUR), (1, DEFECTIVE_COLOUR))]
        for n, colour in counts:
            if n:
                hist_ax.plot([x], [n], marker=marker, ms=9, ls="none", color=colour, clip_on=False, gid="clipped")
        far = float(scores[beyond].min() if side == "below" else scores[beyond].max())
        hist_ax.annotate(f"{int(beyond.sum())} {side}\n(to {far:.3g})", xy=(x, max(n for n, _ in counts)),
                         xytext=(0, 8), textcoords="offset points", ha=ha, va="bottom", fontsize=7, gid="clipped")
    hist_ax.set(xlabel="image score", ylabel="test images", title="test scores")
    hist_ax.margins(y=0.15)  # room for the clipped scores' count
    hist_ax.yaxis.get_major_locator().set_params(integer=True)  # counts
    hist_ax.legend(fontsize=8)
    return fig


def _plot_curves(path: Path, scores: Tensor, labels: Tensor, threshold: float, at: Mapping[str, float]) -> None:
    """``_curves_figure`` as one PNG (1200 x 360 px)."""
    _save_figure(_curves_figure(scores, labels, threshold, at), path)


def _plot_colorbar(path: Path, scale: float, floor: float = 0.0) -> None:
    """The heatmap colour scale, 0 .. ``scale``: plain (no colour) up to ``floor``, then the colour map up to
    ``scale`` (values above are drawn as ``scale``); one PNG (600 x 110 px)."""
    _save_figure(_colorbar_figure(scale, floor), path)


def _colorbar_figure(scale: float, floor: float) -> Any:
    from matplotlib.colors import ListedColormap

    fig = _figure(6.0, 1.1, {"left": 0.02, "right": 0.95, "bottom": 0.62, "top": 0.95})
    ax = fig.subplots()
    ramp = torch.linspace(0.0, 1.0, COLORMAP.shape[0])[None].numpy()
    ax.imshow(ramp, aspect="auto", cmap=ListedColormap((COLORMAP / 255).numpy()), extent=(floor, scale, 0.0, 1.0))
    ax.set_xlim(0.0, scale)
    if floor > 0:
        # The uncoloured stretch, hatched, so the bar shows where colour starts.
        ax.axvspan(0.0, floor, facecolor="white", edgecolor="#999999", hatch="//", lw=0.0, gid="plain")
        ax.axvline(floor, color=_THRESHOLD_COLOUR, lw=1.0)
        if floor > 0.2 * scale:
            ax.text(floor / 2, 0.5, "no colour", ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_xticks([0.0, floor, scale], ["0", f"{floor:.4g}\nmap_floor", f"{scale:.4g}\nmap_scale"])
    else:
        ax.set_xticks([0.0, scale], ["0", f"{scale:.4g}\nmap_scale"])
    ax.set_yticks([])
    ax.set_xlabel(f"anomaly map value (colour and opacity, up to {OVERLAY_ALPHA:g}, rise from "
                  f"{'map_floor' if floor > 0 else '0'} to map_scale)", fontsize=8)
    ax.tick_params(labelsize=8)
    return fig


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
    _plot_curves(out / folder / "curves.png", scores, labels, threshold, at)
    q = r.get("threshold_quantile")
    rows: list[tuple[str, Any]] = [(label, r[k]) for k, label in _METRIC_LABELS if k in r]
    rows += [("training / test images", f"{r.get('n_train', '?')} / {len(scores)}"),
             ("threshold" + (f" ({q:g} quantile of out-of-fold training scores)" if q is not None else ""),
              threshold),
             ("false positives at the threshold", f"{at['fp']} of {at['n_neg']} normal (FPR {_fmt(at['fpr'])})"),
             ("false negatives at the threshold", f"{at['fn']} of {at['n_pos']} defective (TPR {_fmt(at['tpr'])})")]
    parts = [f'<section id="{html.escape(folder)}"><h2>{html.escape(name)}</h2>', _table(rows),
             _img(f"{folder}/curves.png", f"{name}: ROC, precision-recall and score histograms", "wide")]
    grid_maps, scale = r.get("grid_maps"), r.get("map_scale")
    floor = float(r.get("map_floor") or 0.0)  # results from before the colour floor: colour from 0
    have_maps = grid_maps is not None and scale is not None and "paths" in r
    if have_maps:
        _plot_colorbar(out / folder / "colorbar.png", float(scale), floor)
        parts.append(_img(f"{folder}/colorbar.png", f"{name}: heatmap colour scale", "bar"))
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
                with atomic_write(out / src) as tmp:
                    picture.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
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
img.wide { width: 100%; max-width: 1200px; display: block; }
img.bar { width: 600px; max-width: 100%; display: block; }
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
        ValueError: no results, a result without the required keys, or matplotlib is missing (with the fix).
    """
    check_report_dependencies()
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
