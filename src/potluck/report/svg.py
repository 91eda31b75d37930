"""Line charts as SVG text, in plain Python: a run's report needs no plotting library (importing
and driving matplotlib took a second, a third of a small run's end-to-end time).

Example:
    >>> svg = panels("demo", [Panel("loss", {"train_loss": ([1, 2, 3], [0.9, 0.5, 0.4])})])
    >>> svg.startswith("<svg") and "train_loss" in svg and "<polyline" in svg
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
WIDTH, HEIGHT = 540, 360  # one panel
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44
Series = tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class Panel:
    """One chart: a y-axis label and named series of (x, y) points."""

    ylabel: str
    series: Mapping[str, Series]
    xlabel: str = "round"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi].

    Example:
        >>> nice_ticks(0.13, 0.92)
        [0.2, 0.4, 0.6, 0.8]
    """
    if not hi > lo:
        return [lo]
    power = 10 ** math.floor(math.log10((hi - lo) / max(count - 1, 1)))
    candidates = [m * p for p in (power / 10, power) for m in (1, 2, 5)] + [10 * power]
    best: list[float] = [lo]
    for step in candidates:  # ascending: keep the largest step with enough ticks
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        ticks = [round(k * step, 12) for k in range(first, last + 1)]
        if len(ticks) >= max(2, count - 2):
            best = ticks
    return best


def panels(title: str, charts: Sequence[Panel]) -> str:
    """The charts side by side under ``title``, as one ``<svg>`` element."""
    width, height = WIDTH * max(len(charts), 1), HEIGHT + 28
    body = [
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="15">{escape(title)}</text>'
    ]
    for i, chart in enumerate(charts):
        body.append(f'<g transform="translate({i * WIDTH},28)">{_chart(chart)}</g>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'
        + "".join(body)
        + "</svg>"
    )


def _chart(chart: Panel) -> str:
    points = [(x, y) for xs, ys in chart.series.values() for x, y in zip(xs, ys, strict=True)]
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    out.append(_label(LEFT + w / 2, HEIGHT - 8, chart.xlabel))
    out.append(
        f'<text transform="translate(14,{TOP + h / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(chart.ylabel)}</text>"
    )
    if not points:
        out.append(_label(LEFT + w / 2, TOP + h / 2, f"no {chart.ylabel} metrics"))
        return "".join(out)
    (x0, x1), (y0, y1) = _span([p[0] for p in points]), _span([p[1] for p in points], pad=0.05)

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return TOP + h - (y - y0) / (y1 - y0) * h

    for t in nice_ticks(x0, x1):
        out.append(_tick(sx(t), TOP, sx(t), TOP + h) + _label(sx(t), TOP + h + 15, _num(t)))
    for t in nice_ticks(y0, y1):
        out.append(_tick(LEFT, sy(t), LEFT + w, sy(t)))
        out.append(_label(LEFT - 6, sy(t) + 4, _num(t), anchor="end"))
    for k, (name, (xs, ys)) in enumerate(chart.series.items()):
        color = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(xs) <= 30:
            out.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.4" fill="{color}"/>'
                for x, y in zip(xs, ys, strict=True)
            )
        ly = TOP + 14 + 15 * k
        out.append(
            f'<line x1="{LEFT + w - 150}" y1="{ly - 4}" x2="{LEFT + w - 130}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"/>'
            + _label(LEFT + w - 125, ly, name, anchor="start")
        )
    return "".join(out)


def _span(values: Sequence[float], pad: float = 0.0) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return lo - 0.5, hi + 0.5
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _tick(x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#e4e4e4"/>'


def _label(x: float, y: float, text: str, anchor: str = "middle") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(text)}</text>'


def _num(v: float) -> str:
    return f"{v:.4g}"
