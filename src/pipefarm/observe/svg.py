"""Tiny inline-SVG charts for the static HTML report: horizontal bars, a histogram, a time
line and Gantt lanes.

Plain string building, no JavaScript and nothing fetched: each function returns one ``<svg>``
element that a browser draws offline. Every label is HTML-escaped here (task keys, worker
names and error text come from users), so callers pass raw text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

#: font used by every chart (a system font: nothing to download)
FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:11px"
#: colour of bars that have no colour of their own
DEFAULT_COLOR = "#4c78a8"
#: axis and grid colours
_AXIS = "#666"
_GRID = "#e4e4e4"


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _n(x: float) -> str:
    """A coordinate with at most one decimal (keeps big charts small)."""
    r = round(x, 1)
    return str(int(r)) if r == int(r) else str(r)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 times 10^k)."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    t = first
    while t <= hi + step * 1e-9:
        out.append(round(t, 12))
        t += step
    return out


def fmt_seconds(s: float) -> str:
    """A duration for an axis or a table: ``850 ms``, ``12.5 s``, ``3.2 min``, ``1.5 h``."""
    if s is None or not math.isfinite(s):
        return "-"
    a = abs(s)
    if a == 0:
        return "0 s"
    if a < 1:
        return f"{s * 1000:.3g} ms"
    if a < 120:
        return f"{s:.3g} s"
    if a < 7200:
        return f"{s / 60:.3g} min"
    if a < 172800:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} d"


def fmt_count(x: float) -> str:
    """A count for an axis: ``950``, ``12k``, ``1.2M``."""
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.3g}M"
    if a >= 1e4:
        return f"{x / 1e3:.3g}k"
    return f"{x:.4g}"


def _open_svg(width: float, height: float, label: str) -> str:
    # no xmlns: inline in HTML5 an <svg> is SVG already, and the file names no URL at all
    return (f'<svg width="{_n(width)}" height="{_n(height)}"'
            f' viewBox="0 0 {_n(width)} {_n(height)}" role="img" aria-label="{_e(label)}"'
            f' style="{FONT}">')


def empty(label: str, width: float = 640, height: float = 40) -> str:
    """A placeholder chart that says there is nothing to draw."""
    return (_open_svg(width, height, label)
            + f'<text x="8" y="{_n(height / 2 + 4)}" fill="{_AXIS}">{_e(label)}: nothing to show</text></svg>')


def bars(items: Sequence[tuple[str, float]], *, label: str, colors: Sequence[str] | None = None,
         width: float = 640, bar_h: float = 18, fmt: Callable[[float], str] = fmt_count,
         max_value: float | None = None, notes: Sequence[str] | None = None) -> str:
    """Horizontal bars, one row per ``(name, value)``; the value is printed after its bar.

    ``max_value`` fixes the scale (1.0 for fractions); ``notes`` add text after each value.
    """
    if not items:
        return empty(label, width)
    name_w = min(220.0, 12 + 6.5 * max(len(n) for n, _ in items))
    val_w = 140.0
    plot_w = max(60.0, width - name_w - val_w)
    top = max_value if max_value is not None else max(v for _, v in items)
    top = top if top > 0 else 1.0
    height = bar_h * len(items) + 6
    out = [_open_svg(width, height, label)]
    for i, (name, v) in enumerate(items):
        y = 3 + i * bar_h
        w = plot_w * max(0.0, min(v, top)) / top
        color = colors[i % len(colors)] if colors else DEFAULT_COLOR
        shown = name if len(name) <= 34 else name[:33] + "…"
        note = f" {notes[i]}" if notes else ""
        out.append(
            f'<text x="{_n(name_w - 6)}" y="{_n(y + bar_h * 0.7)}" text-anchor="end">'
            f"<title>{_e(name)}</title>{_e(shown)}</text>"
            f'<rect x="{_n(name_w)}" y="{_n(y + 2)}" width="{_n(max(w, 0.5 if v else 0))}"'
            f' height="{_n(bar_h - 4)}" fill="{color}"/>'
            f'<text x="{_n(name_w + w + 4)}" y="{_n(y + bar_h * 0.7)}">{_e(fmt(v))}{_e(note)}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram(edges: Sequence[float], counts: Sequence[int], *, label: str, width: float = 640,
              height: float = 180, fmt: Callable[[float], str] = fmt_seconds) -> str:
    """Vertical bars, one per bin ``[edges[i], edges[i+1])``, drawn evenly wide (so log-spaced
    bins read as a log axis), with the bin edges under them."""
    if not counts or len(edges) != len(counts) + 1 or not any(counts):
        return empty(label, width)
    left, bottom, top_pad = 48.0, 34.0, 8.0
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    top = max(counts)
    bw = plot_w / len(counts)
    out = [_open_svg(width, height, label)]
    for t in nice_ticks(0, top, 4):
        y = top_pad + plot_h * (1 - t / top)
        out.append(f'<line x1="{_n(left)}" x2="{_n(width - 8)}" y1="{_n(y)}" y2="{_n(y)}" stroke="{_GRID}"/>'
                   f'<text x="{_n(left - 4)}" y="{_n(y + 4)}" text-anchor="end">{_e(fmt_count(t))}</text>')
    for i, c in enumerate(counts):
        h = plot_h * c / top
        x = left + i * bw
        out.append(f'<rect x="{_n(x + 0.5)}" y="{_n(top_pad + plot_h - h)}" width="{_n(max(bw - 1, 0.5))}"'
                   f' height="{_n(h)}" fill="{DEFAULT_COLOR}"><title>{_e(fmt(edges[i]))} – '
                   f"{_e(fmt(edges[i + 1]))}: {c:,}</title></rect>")
    every = max(1, math.ceil(len(edges) / max(1, plot_w // 56)))  # ~56 px per edge label
    for i in range(0, len(edges), every):
        x = left + i * bw
        anchor = "end" if i == len(edges) - 1 else "start" if i == 0 else "middle"  # stay inside
        out.append(f'<text x="{_n(x)}" y="{_n(height - bottom + 14)}" text-anchor="{anchor}">{_e(fmt(edges[i]))}</text>')
    out.append(f'<line x1="{_n(left)}" x2="{_n(width - 8)}" y1="{_n(top_pad + plot_h)}" '
               f'y2="{_n(top_pad + plot_h)}" stroke="{_AXIS}"/>'
               f'<text x="{_n(left + plot_w / 2)}" y="{_n(height - 4)}" text-anchor="middle" fill="{_AXIS}">'
               f"{_e(label)}</text></svg>")
    return "".join(out)


#: round steps for a time axis, in seconds (beyond the last: whole days)
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400)


def time_ticks(span: float, n: int = 6) -> list[float]:
    """About ``n`` ticks over ``[0, span]`` seconds at round clock steps (30 s, 5 min, 1 h...)."""
    raw = span / max(1, n)
    if raw < 1:
        return nice_ticks(0, span, n)
    step = next((s for s in _TIME_STEPS if s >= raw), 86400 * math.ceil(raw / 86400))
    return [i * step for i in range(int(span // step) + 1)]


def _time_axis(out: list[str], t0: float, t1: float, left: float, plot_w: float, y: float) -> None:
    span = max(t1 - t0, 1e-9)
    for t in time_ticks(span, 6):
        x = left + plot_w * t / span
        out.append(f'<line x1="{_n(x)}" x2="{_n(x)}" y1="{_n(y)}" y2="{_n(y + 4)}" stroke="{_AXIS}"/>'
                   f'<text x="{_n(x)}" y="{_n(y + 15)}" text-anchor="middle">+{_e(fmt_seconds(t))}</text>')


def timeline(points: Sequence[tuple[float, float]], *, label: str, step: float | None = None,
             width: float = 640, height: float = 180,
             fmt: Callable[[float], str] = fmt_count) -> str:
    """Columns over time: ``(bucket start epoch s, value)``, each bucket ``step`` seconds wide
    (default: the distance between the first two points); the axis is time since the first."""
    if not points or not any(v for _, v in points):
        return empty(label, width)
    pts = sorted(points)
    if step is None:
        step = (pts[1][0] - pts[0][0]) if len(pts) > 1 else 1.0
    step = step if step > 0 else 1.0
    t0, t1 = pts[0][0], pts[-1][0] + step
    left, bottom, top_pad = 48.0, 34.0, 8.0
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    top = max(v for _, v in pts) or 1.0
    out = [_open_svg(width, height, label)]
    for t in nice_ticks(0, top, 4):
        y = top_pad + plot_h * (1 - t / top)
        out.append(f'<line x1="{_n(left)}" x2="{_n(width - 8)}" y1="{_n(y)}" y2="{_n(y)}" stroke="{_GRID}"/>'
                   f'<text x="{_n(left - 4)}" y="{_n(y + 4)}" text-anchor="end">{_e(fmt(t))}</text>')
    scale = plot_w / (t1 - t0)
    for t, v in pts:
        h = plot_h * v / top
        out.append(f'<rect x="{_n(left + (t - t0) * scale)}" y="{_n(top_pad + plot_h - h)}"'
                   f' width="{_n(max(step * scale - 0.5, 0.5))}" height="{_n(h)}" fill="{DEFAULT_COLOR}">'
                   f"<title>+{_e(fmt_seconds(t - t0))}: {_e(fmt(v))}</title></rect>")
    out.append(f'<line x1="{_n(left)}" x2="{_n(width - 8)}" y1="{_n(top_pad + plot_h)}" '
               f'y2="{_n(top_pad + plot_h)}" stroke="{_AXIS}"/>')
    _time_axis(out, t0, t1, left, plot_w, top_pad + plot_h)
    out.append("</svg>")
    return "".join(out)


def gantt(lanes: Sequence[tuple[str, Sequence[tuple[float, float, str, str]]]], *, label: str,
          t0: float, t1: float, colors: Mapping[str, str], width: float = 900,
          lane_h: float = 14) -> str:
    """One lane per ``(name, [(start, end, colour key, tooltip), ...])`` over ``[t0, t1]``;
    each bar is coloured by ``colors[key]`` and a legend of the keys used heads the chart."""
    if not lanes or not any(b for _, b in lanes):
        return empty(label, width)
    name_w = min(200.0, 12 + 6.5 * max(len(n) for n, _ in lanes))
    legend_h, bottom = 18.0, 22.0
    plot_w = width - name_w - 8
    height = legend_h + lane_h * len(lanes) + bottom
    span = max(t1 - t0, 1e-9)
    scale = plot_w / span
    used = sorted({k for _, bs in lanes for _, _, k, _ in bs})
    out = [_open_svg(width, height, label)]
    x = name_w
    for k in used:
        out.append(f'<rect x="{_n(x)}" y="4" width="10" height="10" fill="{colors.get(k, DEFAULT_COLOR)}"/>'
                   f'<text x="{_n(x + 14)}" y="13">{_e(k)}</text>')
        x += 24 + 6.5 * len(k)
    for i, (name, bs) in enumerate(lanes):
        y = legend_h + i * lane_h
        shown = name if len(name) <= 30 else name[:29] + "…"
        if i % 2:
            out.append(f'<rect x="{_n(name_w)}" y="{_n(y)}" width="{_n(plot_w)}" height="{_n(lane_h)}" fill="#f6f6f6"/>')
        out.append(f'<text x="{_n(name_w - 6)}" y="{_n(y + lane_h * 0.75)}" text-anchor="end">'
                   f"<title>{_e(name)}</title>{_e(shown)}</text>")
        for s, e, k, tip in bs:
            bx = name_w + (max(s, t0) - t0) * scale
            bw = max((min(e, t1) - max(s, t0)) * scale, 1.0)  # a short attempt stays visible
            title = f"<title>{_e(tip)}</title>" if tip else ""
            out.append(f'<rect x="{_n(bx)}" y="{_n(y + 1)}" width="{_n(bw)}" height="{_n(lane_h - 2)}"'
                       f' fill="{colors.get(k, DEFAULT_COLOR)}">{title}</rect>')
    _time_axis(out, t0, t1, name_w, plot_w, legend_h + lane_h * len(lanes))
    out.append("</svg>")
    return "".join(out)
