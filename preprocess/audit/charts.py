"""Line charts for the report as plain data (pixel coordinates, ticks, labels); the
template `templates/macros.html.j2` draws them as inline SVG. Inline SVG keeps the page one
self-contained, crisp, searchable file at no cost (a few kB a chart); a plotting library
would add a heavy dependency to draw three kinds of line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class Series:
    label: str
    xs: np.ndarray
    ys: np.ndarray
    colour: str
    dashed: bool = False


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    w: int = 560
    h: int = 300
    margins: tuple = (56, 16, 28, 44)   # left, right, top, bottom
    xticks: list = field(default_factory=list)   # [(px, label)]
    yticks: list = field(default_factory=list)
    vlines: list = field(default_factory=list)   # [(px, label)]
    lines: list = field(default_factory=list)    # [{points, colour, dashed, label, legend_x}]
    note: str | None = None


def chart(series: list[Series], xlabel: str, ylabel: str, title: str, xlim=None, ylim=None,
          vlines=(), note: str | None = None, w: int = 560, h: int = 300) -> Chart:
    """Scale `series` into a w x h frame; `vlines` = [(x, label)] dashed markers."""
    c = Chart(title, xlabel, ylabel, w, h, note=note)
    ml, mr, mt, mb = c.margins
    xs_all = np.concatenate([np.asarray(s.xs, float) for s in series]) if series else np.zeros(1)
    ys_all = np.concatenate([np.asarray(s.ys, float) for s in series]) if series else np.zeros(1)
    x0, x1 = xlim or (float(np.nanmin(xs_all)), float(np.nanmax(xs_all)))
    y0, y1 = ylim or (0.0, 1.1 * float(np.nanmax(ys_all)) or 1.0)
    x1 = x1 if x1 > x0 else x0 + 1e-3
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x):
        return ml + (x - x0) / (x1 - x0) * (w - ml - mr)

    def sy(y):
        return h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)

    c.xticks = [(round(sx(t), 1), f"{t:g}") for t in ticks(x0, x1)]
    c.yticks = [(round(sy(t), 1), f"{t:g}") for t in ticks(y0, y1)]
    c.vlines = [(round(sx(x), 1), label) for x, label in vlines if x0 <= x <= x1]
    for i, s in enumerate(series):
        c.lines.append({"points": " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(s.xs, s.ys)),
                        "colour": s.colour, "dashed": s.dashed, "label": s.label[:14],
                        "legend_x": w - mr - 110 * (len(series) - i)})  # top margin, clear of data
    return c


def ecdf(values: np.ndarray, max_points: int = 400):
    v = np.sort(values)
    y = np.arange(1, len(v) + 1) / len(v)
    if len(v) > max_points:
        idx = np.linspace(0, len(v) - 1, max_points).round().astype(int)
        v, y = v[idx], y[idx]
    return np.concatenate([[v[0]], v]), np.concatenate([[0.0], y])


def step_hist(counts: np.ndarray, bins: np.ndarray):
    """Histogram as a step line, normalised to the fraction per bin."""
    frac = counts / max(1, counts.sum())
    xs = np.repeat(bins, 2)[1:-1]
    return xs, np.repeat(frac, 2)
