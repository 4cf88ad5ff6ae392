"""evaluate --report: a static, offline HTML page; a threshold that never sees test labels; rendered in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from fre_torch.jobs.crossfit import cross_fit
from fre_torch.features.images import MVTecCategory, load_image
from fre_torch.detection.detector import MAP_FLOOR_QUANTILE, DetectorConfig, FREDetector
from fre_torch.jobs.evaluate import THRESHOLD_QUANTILE, evaluate_category
from fre_torch.jobs.heatmaps import COLORMAP
from fre_torch.jobs.report import (_HIST_BINS, _PANEL_BOX, NORMAL_COLOUR, _at_threshold, _colorbar_svg, _curves_svg,
                                   write_report)
from fre_torch.jobs.svg import nice_ticks, tick_labels
from fre_torch.features.synthetic import write_synthetic_mvtec

LITE = ["--model", "efficientnet_lite0", "--input_size", "64", "--device", "cpu", "--batch_size", "32"]


class _Images(HTMLParser):
    """Collects ``<img src>`` values and whether any script or external reference appears."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"] or "")
        if tag == "script":
            self.scripts += 1


def _images(html: str) -> _Images:
    parser = _Images()
    parser.feed(html)
    return parser


def _resolve(index: Path, src: str) -> Path:
    parsed = urlparse(src)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    assert not parsed.scheme and not parsed.netloc, src  # a relative file, nothing to fetch
    return index.parent / unquote(parsed.path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, 8 training and 6 test images each (2 good, 2 per defect type)."""
    return write_synthetic_mvtec(tmp_path_factory.mktemp("report") / "ds", n_train=8, n_test_good=2,
                                 n_test_defect=2, size=64)


@pytest.fixture(scope="module")
def report(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report_out")
    argv = ["evaluate", "--dataset_directory", str(dataset), *LITE, "--report", str(out / "report"),
            "--json", str(out / "results.json")]
    assert cli.main(argv) == 0
    return out / "report" / "index.html", json.loads((out / "results.json").read_text())


def test_report_is_a_static_page_whose_images_exist(report: tuple[Path, dict]) -> None:
    index, doc = report
    html = index.read_text(encoding="utf-8")
    parser = _images(html)
    assert parser.scripts == 0 and "http://" not in html and "https://" not in html  # offline, no JS
    for name in ("object", "texture"):
        assert f"<h2>{name}</h2>" in html
        assert "threshold" in doc["categories"][name]
    # per category: the curves and the colour bar inline (SVG, well-formed), and 2 + 4 worst-image panels (PNG files:
    # 2 good, 4 defective test images)
    plots = [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", html, flags=re.S)]
    assert [p.get("aria-label") for p in plots] == ["ROC, precision-recall and score histograms",
                                                    "heatmap colour scale"] * 2
    assert len(parser.srcs) == 2 * (2 + 4)
    for src in parser.srcs:
        path = _resolve(index, src)
        assert path.is_file(), src
        with Image.open(path) as img:
            img.load()  # decodes
            assert img.width > 0 and img.height > 0
    assert not list(index.parent.rglob("*.partial"))


def test_threshold_ignores_test_labels(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64), device="cpu")
    first = evaluate_category(det, dataset, "object", keep_maps=True)
    true_labels = MVTecCategory.load(dataset, "object").test_labels
    permuted = true_labels.roll(1)
    assert not torch.equal(permuted, true_labels)
    monkeypatch.setattr(MVTecCategory, "test_labels", property(lambda self: permuted.clone()))
    second = evaluate_category(det, dataset, "object", keep_maps=True)
    assert second["labels"] == permuted.tolist()  # the permutation took effect ...
    assert second["image_auroc"] != first["image_auroc"]
    assert second["threshold"] == first["threshold"]  # ... the threshold and the colour scale did not move
    assert second["map_scale"] == first["map_scale"] and second["map_floor"] == first["map_floor"]
    # it is the 0.99 quantile of the training images' out-of-fold scores: training images only
    train = torch.stack([load_image(p, 64) for p in MVTecCategory.load(dataset, "object").train])
    in_sample = det.score(train)
    oof = cross_fit(det, train, quantile=THRESHOLD_QUANTILE)
    assert torch.equal(det.score(train), in_sample)  # cross_fit leaves the detector's own fit alone
    assert oof.threshold == pytest.approx(first["threshold"], rel=1e-5)
    assert oof.threshold == pytest.approx(float(torch.quantile(oof.scores, THRESHOLD_QUANTILE)))
    # colour starts at the 0.99 quantile of the out-of-fold maps' values (float64, torch.quantile's)
    assert oof.map_floor == float(torch.quantile(oof.maps.double().flatten(), MAP_FLOOR_QUANTILE))
    assert oof.map_floor == pytest.approx(first["map_floor"], rel=1e-5) and 0 < oof.map_floor < oof.map_scale
    # in-sample training scores would be far lower (the subspace was fitted to them): why it is cross-fitted
    assert float(torch.quantile(in_sample, THRESHOLD_QUANTILE)) < first["threshold"]
    with pytest.raises(ValueError, match="at least 4"):
        cross_fit(det, train[:3])


def test_cross_fit_in_dual_form_equals_the_fold_fits(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold models fitted from blocks of one Gram matrix (``fit_subset``, the default) give the out-of-fold
    scores, maps, threshold and map scale of fold detectors fitted by ``fit`` (the data-parallel path)."""
    import fre_torch.detection.folds as detector_module
    import fre_torch.jobs.crossfit as crossfit

    det = FREDetector(DetectorConfig("efficientnet_lite0", input_size=64), device="cpu")
    train = torch.stack([load_image(p, 64) for p in MVTecCategory.load(dataset, "object").train])
    det.fit(train)
    span_fits = []
    real_fit_row_span = detector_module.fit_row_span
    monkeypatch.setattr(detector_module, "fit_row_span",
                        lambda *a, **k: span_fits.append(1) or real_fit_row_span(*a, **k))
    dual = cross_fit(det, train, quantile=THRESHOLD_QUANTILE)
    assert len(span_fits) == 5 * len(det.config.subspace_dims)  # every fold of every subspace in dual form
    monkeypatch.setattr(crossfit, "is_distributed", lambda: True)  # one process: rank 0 of 1, the fold-fit path
    fits = cross_fit(det, train, quantile=THRESHOLD_QUANTILE)
    assert dual.threshold == pytest.approx(fits.threshold, rel=1e-6)
    assert dual.map_scale == pytest.approx(fits.map_scale, rel=1e-6)
    assert torch.allclose(dual.scores, fits.scores, rtol=1e-4, atol=1e-6 * float(fits.scores.abs().max()))
    assert float((dual.maps - fits.maps).abs().max()) <= 1e-5 * float(fits.maps.abs().max())
    # Beyond the float64 budget (thousands of images) subspaces fall back to a fit per fold: the same results.
    monkeypatch.setattr(crossfit, "is_distributed", lambda: False)
    monkeypatch.setattr(detector_module, "ROW_SPAN_MAX_BYTES", 0)
    spans = []
    monkeypatch.setattr(detector_module, "fit_row_span", lambda *a, **k: spans.append(1))
    capped = cross_fit(det, train, quantile=THRESHOLD_QUANTILE)
    assert not spans and capped.threshold == pytest.approx(fits.threshold, rel=1e-6)
    assert capped.map_scale == pytest.approx(fits.map_scale, rel=1e-6)


def _panel(canvas_svg: str, name: str) -> ET.Element:
    root = ET.fromstring(canvas_svg)
    return next(g for g in root.iter("g") if g.get("data-panel") == name)


def _of_class(element: ET.Element, cls: str, tag: str | None = None) -> list[ET.Element]:
    return [e for e in element.iter() if cls in (e.get("class") or "").split() and tag in (None, e.tag)]


def _lines(text: ET.Element) -> str:
    return "\n".join(span.text or "" for span in text)


def _hist_panel(scores: list[float], labels: list[int], threshold: float) -> ET.Element:
    s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)
    return _panel(_curves_svg(s, y, threshold, _at_threshold(s, y, threshold), prefix="t").to_svg(), "hist")


def _bin_counts(hist: ET.Element) -> np.ndarray:
    counts = np.zeros(_HIST_BINS, dtype=int)
    for bar in _of_class(hist, "bar"):
        counts[int(bar.get("data-bin"))] += int(bar.get("data-n"))
    return counts


def test_histogram_stays_readable_with_a_100x_outlier() -> None:
    g = torch.Generator().manual_seed(0)
    normal = (1.0 + torch.rand(30, generator=g, dtype=torch.float64)).tolist()  # in [1, 2)
    defective = (2.5 + torch.rand(15, generator=g, dtype=torch.float64)).tolist()  # in [2.5, 3.5)
    others = normal + defective
    outlier = 100 * max(others)
    hist = _hist_panel(others + [outlier], [0] * 30 + [1] * 16, 2.2)
    counts = _bin_counts(hist)
    assert counts.sum() == len(others)  # every other score in a bin, the outlier not
    assert (counts > 0).sum() >= 0.6 * _HIST_BINS  # spread over most of the bins, not squashed into the first
    # the bins are numpy's on the drawn range: the same counts per class
    lo, hi = min(others), max(others)
    for cls, values in (("normal", normal), ("defective", defective)):
        got = np.zeros(_HIST_BINS, dtype=int)
        for bar in _of_class(hist, cls):
            got[int(bar.get("data-bin"))] = int(bar.get("data-n"))
        assert got.tolist() == np.histogram(values, bins=_HIST_BINS, range=(lo, hi))[0].tolist()
    # each bar is drawn as tall as its count: pixels per image the same for all of them
    y0, y1 = map(float, hist.get("data-ylim").split())
    for bar in _of_class(hist, "bar"):
        assert float(bar.get("height")) == pytest.approx(int(bar.get("data-n")) * _PANEL_BOX[1] / (y1 - y0), abs=0.2)
    x0, x1 = map(float, hist.get("data-xlim").split())
    assert x0 < min(others) and max(others) < x1 < 1.2 * max(others)  # the axis ends near them, not at 100x
    markers = _of_class(hist, "clipped", "polygon")
    assert len(markers) == 1 and float(markers[0].get("data-y")) == 1
    assert max(others) < float(markers[0].get("data-x")) < x1
    assert [_lines(t) for t in _of_class(hist, "clipped", "text")] == [f"1 above\n(to {outlier:.3g})"]
    assert float(_of_class(hist, "threshold")[0].get("data-x")) == 2.2
    # without an outlier nothing is clipped: the axis spans every score
    hist = _hist_panel(others, [0] * 30 + [1] * 15, 2.2)
    assert _bin_counts(hist).sum() == len(others) and not _of_class(hist, "clipped")


def test_colour_bar_shows_where_colour_starts() -> None:
    svg = _colorbar_svg(2.0, 0.8, prefix="t").to_svg()
    bar = _panel(svg, "bar")
    assert bar.get("data-xlim") == "0 2"
    assert [_lines(t) for t in _of_class(bar, "xtick")] == ["0", "0.8\nmap_floor", "2\nmap_scale"]
    (plain,), (ramp,) = _of_class(bar, "plain"), _of_class(bar, "ramp")
    assert (plain.get("data-x0"), plain.get("data-x1"), ramp.get("data-x0"), ramp.get("data-x1")) == \
        ("0", "0.8", "0.8", "2")  # plain up to the floor, the colour ramp from the floor to the scale
    assert float(plain.get("width")) / float(ramp.get("width")) == pytest.approx(0.8 / 1.2, abs=0.01)
    # the ramp is the heatmaps' colour map, end to end
    stops = [s.get("stop-color") for s in ET.fromstring(svg).iter("stop")]
    assert stops[0] == "#%02x%02x%02x" % tuple(round(float(v)) for v in COLORMAP[0])
    assert stops[-1] == "#%02x%02x%02x" % tuple(round(float(v)) for v in COLORMAP[-1])
    bar = _panel(_colorbar_svg(2.0, 0.0, prefix="t").to_svg(), "bar")  # no floor (older results): colour from 0
    assert not _of_class(bar, "plain") and _of_class(bar, "ramp")[0].get("data-x0") == "0"


def test_svg_ticks_and_text() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.1, 0.35) == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]  # no 0.15000000000000002
    assert nice_ticks(-0.07, 1.07) == [0.0, 0.25, 0.5, 0.75, 1.0]  # a step of 0.228 rounds up to 0.25
    assert nice_ticks(0.0, 1.3, integer=True) == [0.0, 1.0] and nice_ticks(0.0, 14.5, integer=True) == [0, 5, 10]
    assert nice_ticks(0.0, 11.0, integer=True) == [0, 5, 10]  # not 0, 3, 6, 9 (2.5 rounded up)
    assert nice_ticks(1e6, 3e6) == [1e6, 1.5e6, 2e6, 2.5e6, 3e6]
    assert tick_labels([0.0, 0.25, 0.5]) == ["0.00", "0.25", "0.50"] and tick_labels([0.0, 2.0]) == ["0", "2"]
    with pytest.raises(ValueError, match="lo < hi"):
        nice_ticks(1.0, 1.0)
    # text is escaped: a category called "<a & b>" still gives well-formed SVG
    s, y = torch.tensor([0.1, 0.9], dtype=torch.float64), torch.tensor([0, 1])
    svg = _curves_svg(s, y, 0.5, _at_threshold(s, y, 0.5), prefix="<a & b>").to_svg()
    assert ET.fromstring(svg).get("aria-label")


def test_report_without_maps_and_bad_input(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kernel mode carries no maps: curves and captions, no panels
    results = {"k": {"scores": [0.1, 0.2, 0.9, 0.3], "labels": [0, 0, 1, 1], "threshold": 0.35,
                     "threshold_quantile": 0.99, "image_auroc": 1.0, "n_train": 5,
                     "paths": [str(p) for p in sorted((dataset / "object" / "test" / "scratch").glob("*.png"))] * 2,
                     "mask_paths": [None] * 4, "grid_maps": None}}
    index = write_report(tmp_path / "r", results)
    html = index.read_text(encoding="utf-8")
    assert "kernel FRE" in html and "<b class=\"bad\">false negative</b> scratch/001.png" in html
    assert "<b class=\"bad\">false positive" not in html and "1 of 2 defective" in html
    assert not _images(html).srcs and html.count("<svg") == 1  # the curves, no colour bar, no panel
    with pytest.raises(ValueError, match="keep_maps=True"):
        write_report(tmp_path / "r2", {"k": {"scores": [0.1], "labels": [0]}})
    # no plotting library needed: the same page with matplotlib made unimportable
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_report(tmp_path / "r3", results).read_text(encoding="utf-8") == html.replace(
        str(tmp_path / "r"), str(tmp_path / "r3"))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install chromium); the report is not rendered")
def test_report_renders_in_headless_chromium(report: tuple[Path, dict], tmp_path: Path) -> None:
    index, _ = report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = index.resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   capture_output=True, timeout=180, check=True)
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                         check=True).stdout
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 2000, len(colours)  # plots and image panels, not a blank or text-only page
    # The histogram bars' colour exists only in the plots (no CSS uses it): seeing it proves they were drawn.
    target = np.array([int(NORMAL_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    assert int((np.abs(pixels.astype(int) - target).max(axis=2) <= 6).sum()) > 50
    # The browser's DOM holds every image of the page, each pointing at a file that decodes.
    srcs = _images(dom).srcs
    assert len(srcs) == len(_images(index.read_text(encoding="utf-8")).srcs) > 0
    for src in srcs:
        with Image.open(_resolve(index, src)) as img:
            img.load()


def test_fit_keeping_rows_is_the_fit_and_feeds_cross_fit(dataset: Path) -> None:
    """evaluate's --report path: one extraction serves the fit and the cross-fit; the same fit as ``fit(images)``
    (scores identical) and the same out-of-fold results as cross-fitting the images."""
    from fre_torch.jobs.crossfit import fit_keeping_rows

    train = torch.stack([load_image(p, 64) for p in MVTecCategory.load(dataset, "object").train])
    config = DetectorConfig("efficientnet_lite0", input_size=64)
    plain = FREDetector(config, device="cpu").fit(train, batch_size=8)
    kept = FREDetector(config, device="cpu")
    rows = fit_keeping_rows(kept, train, batch_size=8)
    assert "features" not in vars(kept)  # the stand-in is gone: the detector reads images again
    assert [tuple(r.shape) for r in rows] == [(len(train), d) for d in kept.config.layer_features]
    torch.testing.assert_close(kept.score(train), plain.score(train), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept.cell_std, plain.cell_std, rtol=1e-6, atol=0)
    # The fit's Gram matrices come along (every subspace here is Gram-solved) and seed the fold fits: the same bits
    # as the Gram matrices the cross-fit forms itself from images.
    assert len(rows.grams) == len(rows) and all(g.shape == (len(train), len(train)) for g in rows.grams)
    a, b = cross_fit(kept, rows=rows), cross_fit(plain, train)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps) and a.threshold == b.threshold
    with pytest.raises(ValueError, match="one of the two"):
        cross_fit(kept, train, rows=rows)
