"""Charts of the review page: inline SVG drawn on the server (the page runs no JavaScript).

:func:`failure_rate_chart` is an intent's failure rate over time, with axes, the conversation
volume behind it and the moments a new prompt version first answered marked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from processors.web.pages import duration_text, h

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 48, 22, 36  # margins: y labels left and right, version labels on top
X_TICKS = 6
Y_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _stamp(ns: int, width_ns: int) -> str:
    fmt = "%m-%d %H:%M" if width_ns * X_TICKS < 4 * 86400e9 else "%Y-%m-%d"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime(fmt)


def failure_rate_chart(
    series: Sequence[Sequence[int]],
    from_ns: int,
    width_ns: int,
    versions: Sequence[tuple[int, str]] = (),
) -> str:
    """``series``: ``[conversations, failures]`` per bucket of ``width_ns`` from ``from_ns``;
    ``versions``: ``(first seen ns, prompt version)`` of each version after the first.

    >>> svg = failure_rate_chart([[4, 1], [0, 0], [2, 2]], 0, 3_600_000_000_000, [(3.7e12, "p-2")])
    >>> "100%" in svg and "p-2" in svg and svg.count("<circle") == 2
    True
    """
    n = len(series)
    if not n or not any(v for v, _ in series):
        return '<p class="muted">No conversations tagged with this intent yet.</p>'
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / n
    top = max(v for v, _ in series)

    def y(rate: float) -> float:
        return round(TOP + plot_h * (1 - rate), 1)

    def x(ns: float) -> float:
        return round(LEFT + (ns - from_ns) / (width_ns * n) * plot_w, 1)

    parts = [_axes(n, from_ns, width_ns, top, y)]
    parts.append(
        '<g class="volume" fill="#e2e8f0">'
        + "".join(
            f'<rect x="{round(LEFT + i * slot + 0.5, 1)}" y="{round(TOP + plot_h * (1 - v / top), 1)}" '
            f'width="{round(max(slot - 1, 1), 1)}" height="{round(plot_h * v / top, 1)}">'
            f"<title>{v} conversations, {f} failed</title></rect>"
            for i, (v, f) in enumerate(series)
            if v
        )
        + "</g>"
    )
    points = [
        (round(LEFT + (i + 0.5) * slot, 1), y(f / v), v, f) for i, (v, f) in enumerate(series) if v
    ]
    parts.append(
        f'<polyline class="rate" points="{" ".join(f"{px},{py}" for px, py, _, _ in points)}" '
        'fill="none" stroke="#dc2626" stroke-width="2"/>'
        + "".join(
            f'<circle cx="{px}" cy="{py}" r="3" fill="#dc2626"><title>{f}/{v} failed</title></circle>'
            for px, py, v, f in points
        )
    )
    for ns, version in versions:
        vx = x(ns)
        if LEFT <= vx <= WIDTH - RIGHT:
            parts.append(
                f'<g class="version"><line x1="{vx}" x2="{vx}" y1="{TOP}" y2="{TOP + plot_h}" '
                f'stroke="#2563eb" stroke-dasharray="4 3"/><text x="{vx}" y="{TOP - 6}" '
                f'text-anchor="middle" fill="#1d4ed8">{h(version[:24])}</text></g>'
            )
    total, fails = sum(v for v, _ in series), sum(f for _, f in series)
    title = (
        f"Failure rate over time: {fails} of {total} conversations failed; "
        f"{n} buckets of {duration_text(width_ns)}"
    )
    return (
        f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" font-size="11" font-family="system-ui,sans-serif"><title>{h(title)}</title>'
        + "".join(parts)
        + "</svg>"
    )


def _axes(n: int, from_ns: int, width_ns: int, top: int, y: Callable[[float], float]) -> str:
    """Left axis: failure rate 0-100 %; right axis: conversations per bucket; bottom: time."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = ['<g class="axes" fill="#475569" stroke-width="1">']
    for r in Y_TICKS:
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(r)}" y2="{y(r)}" stroke="#e2e8f0"/>'
            f'<text x="{LEFT - 6}" y="{y(r) + 4}" text-anchor="end">{r:.0%}</text>'
        )
    counts = sorted({0, top, *([top // 2] if top >= 4 else [])})  # whole conversations only
    for c in counts:
        out.append(f'<text x="{WIDTH - RIGHT + 6}" y="{y(c / top) + 4}">{c}</text>')
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#94a3b8"/>'
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#94a3b8"/>'
    )
    step = max(1, n // (X_TICKS - 1))
    for i in range(0, n + 1, step):
        tx = round(LEFT + i / n * plot_w, 1)
        out.append(
            f'<line x1="{tx}" x2="{tx}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 4}" stroke="#94a3b8"/>'
            f'<text x="{tx}" y="{TOP + plot_h + 16}" text-anchor="middle">'
            f"{_stamp(from_ns + i * width_ns, width_ns)}</text>"
        )
    out.append(
        f'<text x="{LEFT}" y="{HEIGHT - 4}">failure rate (red, left) · conversations per '
        f"{h(duration_text(width_ns))} (grey, right) · new prompt version (blue)</text></g>"
    )
    return "".join(out)
