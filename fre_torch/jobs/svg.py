"""Plots as SVG text for the HTML report: axes with ticks, lines, markers, bars and text, no plotting library.

The report's plots are a handful of lines, points and bars. Written as SVG they cost microseconds instead of the
0.4 s import and 0.3 s per category that matplotlib took, render crisply at any zoom, and need no dependency.

A ``Canvas`` is one ``<svg>`` of a fixed pixel size holding ``Panel``s; a panel maps data coordinates to pixels inside
its plot area (``x`` right, ``y`` up) and collects elements. Elements a reader or a test looks for carry a ``class``
and their data coordinates in ``data-*`` attributes (``data-x``, ``data-n``, ...): the SVG says what it shows, not
only where it drew it. Text is escaped; ids are prefixed per canvas, so several plots can sit inline in one page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["Canvas", "Panel", "nice_ticks", "tick_labels"]

FONT_SIZE = 11
_AXIS_COLOUR = "#444444"
_GRID_COLOUR = "#e6e6e6"


def nice_ticks(lo: float, hi: float, target: int = 5, *, integer: bool = False) -> list[float]:
    """Tick values on ``[lo, hi]`` at a step of 1, 2, 2.5 or 5 times a power of ten, about ``target`` of them.

    ``integer`` keeps the step a whole number of 1, 2 or 5 times a power of ten (counts). Values are rounded to the
    step's decimals, so 0.1 + 0.2 is written as 0.3.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"ticks need finite lo < hi, got {lo}, {hi}")
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    steps = (1.0, 2.0, 5.0, 10.0) if integer else (1.0, 2.0, 2.5, 5.0, 10.0)  # no 2.5 between counts
    step = next(m * magnitude for m in steps if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, step)
    exponent = math.floor(math.log10(step) + 1e-9)
    decimals = max(0, -exponent + (1 if round(step / 10.0**exponent, 6) == 2.5 else 0))  # 0.25 needs two
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(i * step, decimals) + 0.0 for i in range(first, last + 1)]  # + 0.0: no "-0"


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels with the decimals the smallest step between ticks needs, the same for every tick of an axis."""
    if len(ticks) < 2:
        return [f"{t:g}" for t in ticks]
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, abs(step)):
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]


def _num(v: float) -> str:
    """A pixel coordinate, to 0.1 px."""
    return f"{v:.1f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def _attrs(cls: str | None, data: dict[str, object] | None) -> str:
    out = f' class="{html.escape(cls)}"' if cls else ""
    for key, value in (data or {}).items():
        out += f' data-{key}="{html.escape(str(value))}"'
    return out


def _text(x: float, y: float, text: str, *, size: float = FONT_SIZE, anchor: str = "middle", colour: str = "#222222",
          rotate: bool = False, bold: bool = False, halo: bool = False, cls: str | None = None) -> str:
    """Multi-line text (``\\n``) whose first line's baseline is at ``y``; ``rotate`` turns it 90 degrees
    counter-clockwise about ``(x, y)`` (a y-axis label); ``halo`` outlines it in white, readable over bars."""
    lines = text.split("\n")
    spans = "".join(f'<tspan x="{_num(x)}" dy="{0 if i == 0 else _num(1.2 * size)}">{html.escape(line)}</tspan>'
                    for i, line in enumerate(lines))
    extra = f' transform="rotate(-90 {_num(x)} {_num(y)})"' if rotate else ""
    extra += ' font-weight="bold"' if bold else ""
    extra += ' stroke="white" stroke-width="3" paint-order="stroke"' if halo else ""
    return (f'<text x="{_num(x)}" y="{_num(y)}" font-size="{_num(size)}" text-anchor="{anchor}" fill="{colour}"'
            f'{extra}{_attrs(cls, None)}>{spans}</text>')


class Panel:
    """A plot area at ``(left, top)`` of ``width`` x ``height`` pixels showing ``xlim`` x ``ylim`` of data.

    Methods add elements in data coordinates; ``frame`` adds the axes, ticks, labels and title around it. In the SVG
    the panel is a ``<g data-panel="name" data-xlim="lo hi" data-ylim="lo hi">``.
    """

    def __init__(self, name: str, left: float, top: float, width: float, height: float,
                 xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        for label, (a, b) in (("xlim", xlim), ("ylim", ylim)):
            if not (math.isfinite(a) and math.isfinite(b)) or b <= a:
                raise ValueError(f"{label} must be finite with lo < hi, got {(a, b)}")
        self.name = name
        self.left, self.top, self.width, self.height = left, top, width, height
        self.xlim, self.ylim = xlim, ylim
        self.parts: list[str] = []

    def px(self, x: float) -> float:
        """Data ``x`` -> pixel column."""
        return self.left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * self.width

    def py(self, y: float) -> float:
        """Data ``y`` -> pixel row (up is smaller)."""
        return self.top + self.height - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * self.height

    def line(self, xs: Sequence[float], ys: Sequence[float], colour: str, *, width: float = 1.5,
             dash: str | None = None, cls: str | None = None) -> None:
        """A polyline through ``(xs[i], ys[i])``."""
        points = " ".join(f"{_num(self.px(x))},{_num(self.py(y))}" for x, y in zip(xs, ys))
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="{_num(width)}"'
                          f' stroke-linejoin="round"{dashes}{_attrs(cls, None)}/>')

    def vline(self, x: float, colour: str, *, width: float = 1.5, dash: str | None = None,
              cls: str | None = None) -> None:
        """A vertical line across the plot area at data ``x``."""
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{_num(self.px(x))}" x2="{_num(self.px(x))}" y1="{_num(self.top)}" '
                          f'y2="{_num(self.top + self.height)}" stroke="{colour}" stroke-width="{_num(width)}"'
                          f'{dashes}{_attrs(cls, {"x": f"{x:.6g}"})}/>')

    def marker(self, x: float, y: float, colour: str, *, shape: str = "o", size: float = 7.0,
               cls: str | None = None, data: dict[str, object] | None = None) -> None:
        """A point at ``(x, y)``: a disc (``"o"``) or a triangle pointing left or right (``"<"``, ``">"``)."""
        cx, cy, r = self.px(x), self.py(y), size / 2
        attrs = _attrs(cls, {"x": f"{x:.6g}", "y": f"{y:.6g}", **(data or {})})
        if shape == "o":
            self.parts.append(f'<circle cx="{_num(cx)}" cy="{_num(cy)}" r="{_num(r)}" fill="{colour}"{attrs}/>')
            return
        if shape not in ("<", ">"):
            raise ValueError(f"marker shape must be 'o', '<' or '>', got {shape!r}")
        tip = -r if shape == "<" else r
        points = f"{_num(cx + tip)},{_num(cy)} {_num(cx - tip)},{_num(cy - r)} {_num(cx - tip)},{_num(cy + r)}"
        self.parts.append(f'<polygon points="{points}" fill="{colour}"{attrs}/>')

    def bar(self, x0: float, x1: float, height: float, colour: str, *, cls: str | None = None,
            data: dict[str, object] | None = None) -> None:
        """A bar from ``y = 0`` (or the axis' bottom) up to ``height`` over ``[x0, x1]``."""
        base = max(0.0, self.ylim[0])
        top, bottom = self.py(height), self.py(base)
        self.parts.append(f'<rect x="{_num(self.px(x0))}" y="{_num(top)}" width="{_num(self.px(x1) - self.px(x0))}" '
                          f'height="{_num(bottom - top)}" fill="{colour}"{_attrs(cls, data)}/>')

    def span(self, x0: float, x1: float, fill: str, *, stroke: str = "none", cls: str | None = None) -> None:
        """A full-height band over ``[x0, x1]`` (``fill`` may be ``url(#pattern)``)."""
        self.parts.append(f'<rect x="{_num(self.px(x0))}" y="{_num(self.top)}" '
                          f'width="{_num(self.px(x1) - self.px(x0))}" height="{_num(self.height)}" fill="{fill}" '
                          f'stroke="{stroke}"{_attrs(cls, {"x0": f"{x0:.6g}", "x1": f"{x1:.6g}"})}/>')

    def text(self, x: float, y: float, text: str, *, above: float | None = None, size: float = FONT_SIZE - 2,
             anchor: str = "middle", cls: str | None = None) -> None:
        """Text at data ``(x, y)`` (its first baseline there, vertically centred for one line), or with its last
        line ``above`` pixels over the point; outlined in white."""
        lines = text.count("\n") + 1
        dy = 0.35 * size if above is None else -above - 1.2 * size * (lines - 1)
        self.parts.append(_text(self.px(x), self.py(y) + dy, text, size=size, anchor=anchor, halo=True, cls=cls))

    def note(self, text: str) -> None:
        """Text in the middle of the plot area (a plot with nothing to draw)."""
        self.parts.append(_text(self.left + self.width / 2, self.top + self.height / 2, text, cls="note"))

    def legend(self, entries: Sequence[tuple[str, str, str]], corner: str = "upper right") -> None:
        """A boxed legend in a corner of the plot area; entries ``(label, colour, kind)``, kind ``"line"``,
        ``"dash"``, ``"marker"`` or ``"patch"``."""
        size, row = FONT_SIZE - 2, FONT_SIZE + 4
        width = 34 + max(len(label) for label, _, _ in entries) * size * 0.56
        height = row * len(entries) + 6
        x = self.left + 6 if "left" in corner else self.left + self.width - width - 6
        y = self.top + 6 if "upper" in corner else self.top + self.height - height - 6
        out = [f'<g class="legend"><rect x="{_num(x)}" y="{_num(y)}" width="{_num(width)}" height="{_num(height)}" '
               'fill="white" fill-opacity="0.85" stroke="#cccccc"/>']
        for i, (label, colour, kind) in enumerate(entries):
            cy = y + 3 + row * (i + 0.5)
            if kind == "marker":
                out.append(f'<circle cx="{_num(x + 15)}" cy="{_num(cy)}" r="3.5" fill="{colour}"/>')
            elif kind == "patch":
                out.append(f'<rect x="{_num(x + 7)}" y="{_num(cy - 5)}" width="16" height="10" fill="{colour}"/>')
            else:
                dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
                out.append(f'<line x1="{_num(x + 5)}" x2="{_num(x + 25)}" y1="{_num(cy)}" y2="{_num(cy)}" '
                           f'stroke="{colour}" stroke-width="1.5"{dash}/>')
            out.append(_text(x + 30, cy + size * 0.35, label, size=size, anchor="start"))
        self.parts.append("".join(out) + "</g>")

    def frame(self, *, title: str = "", xlabel: str = "", ylabel: str = "", xticks: Sequence[float] = (),
              yticks: Sequence[float] = (), xtick_labels: Sequence[str] | None = None, grid: bool = True) -> None:
        """The box, ticks with labels (``tick_labels`` unless given), axis labels and the title; light grid lines
        at the ticks go under what was drawn already."""
        left, top, right, bottom = self.left, self.top, self.left + self.width, self.top + self.height
        xs = [t for t in xticks if self.xlim[0] <= t <= self.xlim[1]]
        ys = [t for t in yticks if self.ylim[0] <= t <= self.ylim[1]]
        grid_lines = []
        if grid:
            grid_lines += [f'<line x1="{_num(self.px(t))}" x2="{_num(self.px(t))}" y1="{_num(top)}" '
                           f'y2="{_num(bottom)}" stroke="{_GRID_COLOUR}"/>' for t in xs]
            grid_lines += [f'<line x1="{_num(left)}" x2="{_num(right)}" y1="{_num(self.py(t))}" '
                           f'y2="{_num(self.py(t))}" stroke="{_GRID_COLOUR}"/>' for t in ys]
        self.parts[:0] = grid_lines
        out = [f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(self.width)}" height="{_num(self.height)}" '
               f'fill="none" stroke="{_AXIS_COLOUR}"/>']
        labels = list(xtick_labels) if xtick_labels is not None else tick_labels(xs)
        for t, label in zip(xs if xtick_labels is None else xticks, labels):
            x = self.px(t)
            out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="{_num(bottom)}" y2="{_num(bottom + 4)}" '
                       f'stroke="{_AXIS_COLOUR}"/>')
            out.append(_text(x, bottom + 5 + FONT_SIZE, label, size=FONT_SIZE - 1, cls="xtick"))
        for t, label in zip(ys, tick_labels(ys)):
            y = self.py(t)
            out.append(f'<line x1="{_num(left - 4)}" x2="{_num(left)}" y1="{_num(y)}" y2="{_num(y)}" '
                       f'stroke="{_AXIS_COLOUR}"/>')
            out.append(_text(left - 6, y + 0.35 * (FONT_SIZE - 1), label, size=FONT_SIZE - 1, anchor="end",
                             cls="ytick"))
        if xlabel:
            rows = max([label.count("\n") + 1 for label in labels] + [1])  # below the tick labels' last line
            out.append(_text((left + right) / 2, bottom + 10 + (rows + 1) * 1.2 * FONT_SIZE, xlabel, cls="xlabel"))
        if ylabel:
            out.append(_text(left - 30, (top + bottom) / 2, ylabel, rotate=True, cls="ylabel"))
        if title:
            out.append(_text((left + right) / 2, top - 8, title, size=FONT_SIZE + 1, bold=True, cls="title"))
        self.parts.extend(out)


class Canvas:
    """One ``<svg>`` of ``width`` x ``height`` pixels; ``defs`` holds patterns and gradients, named with
    ``ref(name)`` so that ids stay unique among several canvases on one page."""

    def __init__(self, width: int, height: int, *, label: str, prefix: str) -> None:
        self.width, self.height, self.label, self.prefix = width, height, label, prefix
        self.panels: list[Panel] = []
        self.defs: list[str] = []

    def ref(self, name: str) -> str:
        """The page-unique id of ``name``."""
        return f"{self.prefix}-{name}"

    def panel(self, name: str, left: float, top: float, width: float, height: float, xlim: tuple[float, float],
              ylim: tuple[float, float]) -> Panel:
        """A new ``Panel`` on this canvas."""
        self.panels.append(Panel(name, left, top, width, height, xlim, ylim))
        return self.panels[-1]

    def hatch(self, name: str, colour: str = "#999999") -> str:
        """A diagonal-hatch pattern; returns the ``fill`` value that uses it."""
        self.defs.append(f'<pattern id="{self.ref(name)}" width="6" height="6" patternUnits="userSpaceOnUse" '
                         f'patternTransform="rotate(45)"><rect width="6" height="6" fill="white"/>'
                         f'<line x1="0" y1="0" x2="0" y2="6" stroke="{colour}" stroke-width="1.2"/></pattern>')
        return f"url(#{self.ref(name)})"

    def gradient(self, name: str, colours: Sequence[str]) -> str:
        """A left-to-right gradient through evenly spaced ``colours``; returns the ``fill`` value that uses it."""
        n = len(colours)
        stops = "".join(f'<stop offset="{i / (n - 1):.4f}" stop-color="{c}"/>' for i, c in enumerate(colours))
        self.defs.append(f'<linearGradient id="{self.ref(name)}" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient>')
        return f"url(#{self.ref(name)})"

    def to_svg(self, cls: str = "") -> str:
        """The ``<svg>`` element, for inline use in an HTML page."""
        css = f' class="{html.escape(cls)}"' if cls else ""
        body = "".join(
            f'<g data-panel="{html.escape(p.name)}" data-xlim="{p.xlim[0]:.6g} {p.xlim[1]:.6g}" '
            f'data-ylim="{p.ylim[0]:.6g} {p.ylim[1]:.6g}">{"".join(p.parts)}</g>' for p in self.panels)
        defs = f"<defs>{''.join(self.defs)}</defs>" if self.defs else ""
        # No xmlns: inline SVG in HTML needs none, and the page names no URL at all.
        return (f'<svg width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{html.escape(self.label)}"'
                f' font-family="sans-serif"{css}><rect width="100%" height="100%" fill="white"/>{defs}{body}</svg>')
