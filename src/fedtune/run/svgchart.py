"""report.html's per-round chart as inline SVG, drawn without matplotlib.

The report is written at the end of every run; importing matplotlib and rendering a figure to SVG for it
took longer than the rest of a short run's start-up and shutdown together. Three panels, as in
metrics.png (fedtune.run.plot, which still uses matplotlib when ``run.plot`` is on): loss (train and
held-out), held-out accuracy or perplexity, and MB sent per round (down and up).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

W, H = 300, 190  # one panel, in SVG user units
LEFT, RIGHT, TOP, BOTTOM = 46, 8, 22, 28  # margins: tick labels left and below, the panel title above
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c")


def _num(value: float) -> str:
    return f"{value:.3g}"


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _panel(index: int, title: str, series: Sequence[tuple[str, list[tuple[float, float]]]], *, bars: bool) -> str:
    """One panel at column ``index``: lines (or side-by-side bars) of (x, y) points, with min/max ticks."""
    x0 = index * W
    pts = [p for _, s in series for p in s]
    out = [f'<text x="{x0 + W / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>']
    if not pts:
        return "".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs) - (0.5 if bars else 0), max(xs) + (0.5 if bars else 0)
    ylo, yhi = (0.0 if bars else min(ys)), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        ylo, yhi = ylo - 1, yhi + 1

    def sx(x: float) -> float:
        return x0 + LEFT + (x - xlo) / (xhi - xlo) * (W - LEFT - RIGHT)

    def sy(y: float) -> float:
        return TOP + (yhi - y) / (yhi - ylo) * (H - TOP - BOTTOM)

    bottom, right = H - BOTTOM, x0 + W - RIGHT
    out.append(f'<path d="M{x0 + LEFT},{TOP}V{bottom}H{right}" fill="none" stroke="#888"/>')
    for y in (ylo, yhi):
        out.append(f'<text x="{x0 + LEFT - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">{_num(y)}</text>')
    for x in sorted({min(xs), max(xs)}):
        out.append(f'<text x="{sx(x):.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10">{_num(x)}</text>')
    out.append(f'<text x="{x0 + (LEFT + W) / 2}" y="{H - 2}" text-anchor="middle" font-size="10">round</text>')
    width = (W - LEFT - RIGHT) / (xhi - xlo) * 0.4
    for k, (label, points) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if bars:
            for x, y in points:
                left = sx(x) - width + k * width
                out.append(
                    f'<rect x="{left:.1f}" y="{sy(y):.1f}" width="{width:.1f}" height="{bottom - sy(y):.1f}" '
                    f'fill="{colour}"/>'
                )
        elif points:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
        if len(series) > 1:  # a legend line per series, top right
            ty = TOP + 12 * (k + 1)
            out.append(
                f'<text x="{right - 4}" y="{ty}" text-anchor="end" font-size="10" fill="{colour}">'
                f"{html.escape(label)}</text>"
            )
    return "".join(out)


def rounds_svg(rounds: list[dict], *, title: str) -> str:
    """The per-round chart of ``rounds`` (metrics.jsonl's round records) as one ``<svg>`` element."""

    def points(key: str, scale: float = 1.0) -> list[tuple[float, float]]:
        return [(r["round"], r[key] * scale) for r in rounds if _finite(r.get(key))]

    has_acc = any(r.get("eval_accuracy") is not None for r in rounds)
    quality = "eval_accuracy" if has_acc else "eval_perplexity"
    panels = [
        _panel(0, "loss", [("train (clients)", points("train_loss")), ("held-out", points("eval_loss"))], bars=False),
        _panel(1, "held-out " + ("accuracy" if has_acc else "perplexity"), [("", points(quality))], bars=False),
        _panel(
            2, "MB sent per round", [("down", points("bytes_down", 1e-6)), ("up", points("bytes_up", 1e-6))], bars=True
        ),
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {3 * W} {H}" width="{3 * W}" height="{H}" '
        f'font-family="sans-serif" role="img"><title>{html.escape(title)}</title>{"".join(panels)}</svg>'
    )
