"""Streaming statistics: one intent's bounded window of conversations (:class:`IntentStats`)."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from river import drift

from processors.diagnose.shapes import argument_shape, call_failed, shape_key
from processors.records import TagRecord
from processors.stats import fisher_exact, two_proportion_z

VERSION_DIMS = ("prompt_version", "model", "agent_version")


def p_greater(n_hi: int, x_hi: int, n_lo: int, x_lo: int) -> float:
    """p-value that the rate ``x_hi/n_hi`` exceeds ``x_lo/n_lo``: the larger of the one-sided
    pooled z-test and the two-sided Fisher exact test.

    The z-test alone is far too eager on the small samples a new version starts with (8 of 19
    against 15% gives z-test p=0.0005, exact p~0.005), and the diagnoser looks again at every
    failure, so it needs the conservative one.
    """
    z, p_two = two_proportion_z(n_lo, x_lo, n_hi, x_hi)
    if z <= 0:
        return 1.0 - p_two / 2
    return max(p_two / 2, fisher_exact(n_lo, x_lo, n_hi, x_hi))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])


@dataclass(frozen=True)
class _Row:
    """What the window keeps of one conversation (small and fixed: no text)."""

    ts_ns: int
    failed: bool
    outcome: str
    outcome_turn: int
    signals: tuple[str, ...]
    versions: tuple[str, str, str]  # prompt_version, model, agent_version
    latency_ms: float
    tokens: int
    tools: tuple[tuple[str, str, bool], ...]  # (tool, argument shape key, errored)
    conversation_id: str = ""


def _row(tag: TagRecord) -> _Row:
    conv = tag.conversation
    tools: tuple[tuple[str, str, bool], ...] = ()
    if conv is not None:
        tools = tuple(
            (c.name, shape_key(argument_shape(c.arguments)), call_failed(c))
            for c in conv.tool_calls
        )
    return _Row(
        ts_ns=tag.ts_ns,
        failed=bool(tag.failed),
        outcome=tag.outcome,
        outcome_turn=tag.outcome_turn,
        signals=tuple(sorted(set(tag.signals))),
        versions=(tag.prompt_version, tag.model, tag.agent_version),
        latency_ms=conv.latency_ms if conv else 0.0,
        tokens=(conv.input_tokens + conv.output_tokens) if conv else 0,
        tools=tools,
        conversation_id=tag.conversation_id,
    )


def _bump(counter: Counter[Any], key: Any, delta: int) -> None:
    """Add ``delta``; a zero count is deleted, so memory follows the window, not history."""
    v = counter[key] + delta
    if v > 0:
        counter[key] = v
    else:
        del counter[key]


class IntentStats:
    """Streaming statistics of one intent, bounded in memory.

    Counts over the last ``window`` conversations are kept incrementally (added on arrival,
    subtracted on eviction); per-version totals are cumulative (one entry per version, so a
    new version is compared with everything before it); ``failing`` and ``healthy`` keep the
    last ``evidence_size`` conversations of each kind for evidence.
    """

    def __init__(self, intent_id: str, window: int, evidence_size: int, adwin_delta: float) -> None:
        self.intent_id = intent_id
        self.intent_name = intent_id
        self.rows: deque[_Row] = deque()
        self.window = window
        self.failing: deque[TagRecord] = deque(maxlen=evidence_size)
        self.healthy: deque[TagRecord] = deque(maxlen=evidence_size)
        self.n = 0
        self.failures = 0
        self.outcomes: Counter[str] = Counter()
        self.signals: Counter[str] = Counter()
        self.abandon_turns: Counter[int] = Counter()
        self.window_versions: Counter[tuple[str, str, bool]] = Counter()  # (dim, value, failed)
        self.tool_calls: Counter[tuple[str, str]] = Counter()  # (tool, shape)
        self.tool_errors: Counter[tuple[str, str]] = Counter()
        self._ids: Counter[str] = Counter()  # conversation ids in the window (for replacement)
        # (dim, value) -> [n, failures, first_seq], cumulative
        self.versions: dict[tuple[str, str], list[int]] = {}
        self.total = 0
        self.total_failures = 0
        self.first_seq = 0
        self.adwin = drift.ADWIN(delta=adwin_delta)
        self.drift_up = False  # ADWIN saw the failure rate rise and no fall since
        self.last_emit_failures = 0  # total_failures when this intent last emitted

    @property
    def rate(self) -> float:
        return self.failures / self.n if self.n else 0.0

    def add(self, tag: TagRecord, seq: int) -> None:
        """Fold one tagged conversation in (``seq``: its position in the whole stream).

        A newer version of a conversation still in the window (late feedback, a late span)
        replaces the older one instead of counting twice."""
        if self._replace(tag):
            return
        if not self.total:
            self.first_seq = seq
        self.intent_name = tag.intent_name or self.intent_name
        self.total += 1
        self.total_failures += bool(tag.failed)
        row = _row(tag)
        self.rows.append(row)
        self._count(row, +1)
        in_window = self._in_window()
        in_window[row.conversation_id] += 1
        if len(self.rows) > self.window:
            old = self.rows.popleft()
            self._count(old, -1)
            _bump(in_window, old.conversation_id, -1)
        for dim, value in zip(VERSION_DIMS, row.versions):
            entry = self.versions.setdefault((dim, value), [0, 0, seq])
            entry[0] += 1
            entry[1] += row.failed
        if tag.conversation is not None:
            (self.failing if row.failed else self.healthy).append(tag)
        before = self.adwin.estimation
        self.adwin.update(1.0 if row.failed else 0.0)
        if self.adwin.drift_detected:
            self.drift_up = self.adwin.estimation > before

    def _in_window(self) -> Counter[str]:
        """Conversation ids in the window (absent from snapshots of older releases: rebuilt)."""
        ids: Counter[str] | None = self.__dict__.get("_ids")
        if ids is None:
            ids = self._ids = Counter(r.conversation_id for r in self.rows)
        return ids

    def _replace(self, tag: TagRecord) -> bool:
        cid = tag.conversation_id
        if not cid or not self._in_window()[cid]:
            return False
        at = next(i for i, r in enumerate(self.rows) if r.conversation_id == cid)
        old, new = self.rows[at], _row(tag)
        self._count(old, -1)
        self.rows[at] = new
        self._count(new, +1)
        self.total_failures += new.failed - old.failed
        for row, sign in ((old, -1), (new, +1)):
            for dim, value in zip(VERSION_DIMS, row.versions):
                entry = self.versions.setdefault((dim, value), [0, 0, 0])
                entry[0] += sign
                entry[1] += sign * row.failed
        for q in (self.failing, self.healthy):
            for t in [t for t in q if t.conversation_id == cid]:
                q.remove(t)
        if tag.conversation is not None:
            (self.failing if new.failed else self.healthy).append(tag)
        return True

    def _count(self, row: _Row, sign: int) -> None:
        self.n += sign
        self.failures += sign * row.failed
        _bump(self.outcomes, row.outcome, sign)
        for s in row.signals:
            _bump(self.signals, s, sign)
        if row.failed:
            _bump(self.abandon_turns, row.outcome_turn, sign)
        for dim, value in zip(VERSION_DIMS, row.versions):
            _bump(self.window_versions, (dim, value, row.failed), sign)
        for tool, shape, errored in row.tools:
            _bump(self.tool_calls, (tool, shape), sign)
            if errored:
                _bump(self.tool_errors, (tool, shape), sign)

    def window_bounds(self) -> tuple[int, int]:
        return (self.rows[0].ts_ns, self.rows[-1].ts_ns) if self.rows else (0, 0)

    def newest_version(self, dim: str) -> tuple[str, list[int]] | None:
        """The most recently first-seen value of ``dim`` with its cumulative counts."""
        mine = [(v, e) for (d, v), e in self.versions.items() if d == dim]
        return max(mine, key=lambda ve: ve[1][2]) if mine else None

    def previous_versions(self, dim: str, value: str) -> tuple[int, int, list[str]]:
        """Pooled ``(n, failures, values)`` of the versions of ``dim`` seen before ``value``."""
        first = self.versions[(dim, value)][2]
        prev = [(v, e) for (d, v), e in self.versions.items() if d == dim and e[2] < first]
        return sum(e[0] for _, e in prev), sum(e[1] for _, e in prev), sorted(v for v, _ in prev)

    def version_rates(self, dim: str) -> list[dict[str, Any]]:
        """Window rates per value of ``dim``, most failures first."""
        values = {v for (d, v, _f) in self.window_versions if d == dim}
        out = []
        for v in values:
            n = self.window_versions[(dim, v, True)] + self.window_versions[(dim, v, False)]
            f = self.window_versions[(dim, v, True)]
            out.append({"version": v, "n": n, "failures": f, "rate": round(f / n, 4) if n else 0.0})
        return sorted(out, key=lambda r: (-r["failures"], r["version"]))

    def percentiles(self, attr: str) -> dict[str, float]:
        values = [getattr(r, attr) for r in self.rows]
        return {f"p{q}": round(percentile(values, q), 2) for q in (50, 90, 99)}
