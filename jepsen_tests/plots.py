"""The latency-over-time plot of a run, fault windows shaded.

With matplotlib installed it draws a PNG; without it, a small self-contained SVG (no
dependency), so every run has a picture. Points: one per completed operation, at its completion
time, coloured by outcome (ok green, fail red, info orange); y is latency in ms on a log scale.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_latency"]

_COLOURS = {"ok": "#2a9d4b", "fail": "#d62828", "info": "#f4a261"}


def plot_latency(
    points: Sequence[tuple[int, float, str]],
    windows: Sequence[tuple[str, int, int]],
    path_stem: Path,
    title: str,
) -> Path:
    """points: (completion ns, latency ms, type); windows: (kind, start ns, end ns). Returns the
    file written: <stem>.png with matplotlib, else <stem>.svg."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return _svg(points, windows, path_stem.with_suffix(".svg"), title)
    fig, ax = plt.subplots(figsize=(10, 4))
    for kind, a, b in windows:
        ax.axvspan(a / 1e9, b / 1e9, color="grey", alpha=0.2)
        ax.text(a / 1e9, 1, kind, fontsize=7, va="bottom")
    for typ, colour in _COLOURS.items():
        xs = [t / 1e9 for t, _, ty in points if ty == typ]
        ys = [max(lat, 0.1) for _, lat, ty in points if ty == typ]
        ax.scatter(xs, ys, s=3, color=colour, label=typ)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    out = path_stem.with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _svg(
    points: Sequence[tuple[int, float, str]],
    windows: Sequence[tuple[str, int, int]],
    out: Path,
    title: str,
) -> Path:
    w, h, left, bottom, top = 900, 320, 60, 40, 30
    t_max = max([t for t, _, _ in points] + [b for _, _, b in windows] + [1]) / 1e9
    lat = [max(x, 0.1) for _, x, _ in points] or [1.0]
    lo, hi = math.log10(min(lat)), math.log10(max(lat)) + 1e-9
    if hi - lo < 1:
        hi = lo + 1

    def x(t_s: float) -> float:
        return left + (w - left - 10) * t_s / t_max

    def y(ms: float) -> float:
        return h - bottom - (h - bottom - top) * (math.log10(max(ms, 0.1)) - lo) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11" '
        'font-family="sans-serif">',
        f'<text x="{left}" y="18">{_esc(title)}</text>',
    ]
    for kind, a, b in windows:
        parts.append(
            f'<rect x="{x(a / 1e9):.1f}" y="{top}" width="{max(x(b / 1e9) - x(a / 1e9), 1):.1f}" '
            f'height="{h - bottom - top}" fill="#999" fill-opacity="0.25"/>'
            f'<text x="{x(a / 1e9):.1f}" y="{top - 2}" font-size="9">{_esc(kind)}</text>'
        )
    for t, ms, typ in points:
        parts.append(
            f'<circle cx="{x(t / 1e9):.1f}" cy="{y(ms):.1f}" r="1.6" '
            f'fill="{_COLOURS.get(typ, "#333")}"/>'
        )
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        ms = 10.0**e
        if lo <= e <= hi:
            parts.append(
                f'<line x1="{left}" x2="{w - 10}" y1="{y(ms):.1f}" y2="{y(ms):.1f}" '
                'stroke="#ddd"/>'
                f'<text x="4" y="{y(ms) + 4:.1f}">{ms:g} ms</text>'
            )
    for s in range(0, int(t_max) + 1, max(1, int(t_max) // 10 or 1)):
        parts.append(f'<text x="{x(s):.1f}" y="{h - bottom + 16}">{s}s</text>')
    parts.append(
        f'<text x="{w - 260}" y="{h - 6}">ok green, fail red, info orange; grey: faults</text>'
    )
    parts.append("</svg>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
