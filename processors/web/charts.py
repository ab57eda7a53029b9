"""Charts of the review page: inline SVG drawn on the server (the page runs no JavaScript).

The geometry is computed here and drawn by the templates ``sparkline.svg`` and
``failure_rate.svg`` (autoescaped like every page). :func:`failure_rate_chart` is an intent's
failure rate over time, with axes, the conversation volume behind it and the moments a new
prompt version first answered marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from markupsafe import Markup

from processors.web.templating import duration_text, render

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 48, 22, 36  # margins: y labels left and right, version labels on top
X_TICKS = 6
Y_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
_NO_DATA = Markup('<span class="muted">no data</span>')
_NO_CONVERSATIONS = Markup('<p class="muted">No conversations tagged with this intent yet.</p>')


def sparkline(series: Sequence[Sequence[int]], width: int = 144, height: int = 30) -> Markup:
    """Inline SVG: conversation volume per bucket (grey bars, scaled to the busiest bucket) and
    failure rate (red line, 0–100%, drawn only through buckets that have conversations).

    >>> 'polyline' in sparkline([[2, 1], [4, 0], [0, 0]])
    True
    """
    n = len(series)
    if not n or not any(v for v, _ in series):
        return _NO_DATA
    top = max(v for v, _ in series)
    slot = width / n
    bars = [
        (
            round(i * slot, 1),
            round(height - v / top * height, 1),
            round(max(slot - 1, 1), 1),
            round(v / top * height, 1),
        )
        for i, (v, _) in enumerate(series)
        if v
    ]
    points = " ".join(
        f"{round((i + 0.5) * slot, 1)},{round((height - 1) - f / v * (height - 2), 1)}"
        for i, (v, f) in enumerate(series)
        if v
    )
    total, fails = sum(v for v, _ in series), sum(f for _, f in series)
    title = f"{total} conversations, {fails} failed; busiest bucket {top}"
    return render(
        "sparkline.svg", width=width, height=height, title=title, bars=bars, points=points
    )


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    n: int
    failed: int


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    n: int
    failed: int


@dataclass(frozen=True)
class Version:
    x: float
    label: str


@dataclass
class ChartGeometry:
    """Where everything of :func:`failure_rate_chart` goes, in SVG user units."""

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM
    rate_ticks: list[tuple[str, float]] = field(default_factory=list)
    count_ticks: list[tuple[int, float]] = field(default_factory=list)
    time_ticks: list[tuple[str, float]] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    versions: list[Version] = field(default_factory=list)


def _stamp(ns: int, width_ns: int) -> str:
    fmt = "%m-%d %H:%M" if width_ns * X_TICKS < 4 * 86400e9 else "%Y-%m-%d"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime(fmt)


def failure_rate_chart(
    series: Sequence[Sequence[int]],
    from_ns: int,
    width_ns: int,
    versions: Sequence[tuple[int, str]] = (),
) -> Markup:
    """``series``: ``[conversations, failures]`` per bucket of ``width_ns`` from ``from_ns``;
    ``versions``: ``(first seen ns, prompt version)`` of each version after the first.

    >>> svg = failure_rate_chart([[4, 1], [0, 0], [2, 2]], 0, 3_600_000_000_000, [(3.7e12, "p-2")])
    >>> "100%" in svg and "p-2" in svg and svg.count("<circle") == 2
    True
    """
    n = len(series)
    if not n or not any(v for v, _ in series):
        return _NO_CONVERSATIONS
    g = ChartGeometry()
    plot_w, plot_h = g.right - g.left, g.bottom - g.top
    slot = plot_w / n
    top = max(v for v, _ in series)

    def y(rate: float) -> float:
        return round(TOP + plot_h * (1 - rate), 1)

    g.rate_ticks = [(f"{r:.0%}", y(r)) for r in Y_TICKS]
    counts = sorted({0, top, *([top // 2] if top >= 4 else [])})  # whole conversations only
    g.count_ticks = [(c, y(c / top)) for c in counts]
    step = max(1, n // (X_TICKS - 1))
    g.time_ticks = [
        (_stamp(from_ns + i * width_ns, width_ns), round(LEFT + i / n * plot_w, 1))
        for i in range(0, n + 1, step)
    ]
    g.bars = [
        Bar(
            round(LEFT + i * slot + 0.5, 1),
            y(v / top),
            round(max(slot - 1, 1), 1),
            round(plot_h * v / top, 1),
            v,
            f,
        )
        for i, (v, f) in enumerate(series)
        if v
    ]
    g.points = [
        Point(round(LEFT + (i + 0.5) * slot, 1), y(f / v), v, f)
        for i, (v, f) in enumerate(series)
        if v
    ]
    for ns, version in versions:
        vx = round(LEFT + (ns - from_ns) / (width_ns * n) * plot_w, 1)
        if g.left <= vx <= g.right:
            g.versions.append(Version(vx, version[:24]))
    total, fails = sum(v for v, _ in series), sum(f for _, f in series)
    title = (
        f"Failure rate over time: {fails} of {total} conversations failed; "
        f"{n} buckets of {duration_text(width_ns)}"
    )
    return render("failure_rate.svg", g=g, title=title, bucket=duration_text(width_ns))
