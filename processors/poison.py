"""Poison batches: a stage that raises on the same input twice must not crash-loop on it.

A stage that raises ends the worker (:func:`processors.runtime.exit_on_crash`) so that its
batch is redelivered. Each crash is remembered in ``<home>/run/failed-<stage>.json`` with its
reason and the input offsets of the batch. When the same reason ends the worker again on input
that overlaps the first batch, the overlap is poison: the next worker dead-letters those
records (their topic, partition and offset, where re-inject finds them; a redacted reason, not
their content) and the stage moves on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from processors.redact import Redactor

log = logging.getLogger("closeloop.worker")

Range = tuple[str, int, int, int]  # topic, partition, first offset, last offset


def failure_reason(exc: BaseException) -> str:
    """What identifies "the same failure": the exception type and its first line, redacted."""
    first = (str(exc).splitlines() or [""])[0][:300]
    return Redactor().redact(f"{type(exc).__name__}: {first}")[0]


def overlap(a: list[Range], b: list[Range]) -> list[Range]:
    out = []
    for t, p, lo, hi in a:
        for t2, p2, lo2, hi2 in b:
            if (t, p) == (t2, p2) and max(lo, lo2) <= min(hi, hi2):
                out.append((t, p, max(lo, lo2), min(hi, hi2)))
    return out


@dataclass
class PoisonLog:
    """The crashes of one stage and the input ranges found to be poison."""

    path: Path

    @classmethod
    def of(cls, run_dir: Path, stage: str) -> PoisonLog:
        return cls(run_dir / f"failed-{stage}.json")

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"last": None, "poison": []}

    def record_crash(self, reason: str, sources: list[Range]) -> list[Range]:
        """Remember a crash on ``sources``; the ranges that became poison by it (the overlap
        with the previous crash, when it had the same reason)."""
        state = self._load()
        last = state.get("last")
        found = overlap([tuple(r) for r in last["sources"]], sources) if last else []
        if last and last["reason"] == reason and found:
            state["poison"] += [[*r, reason] for r in found]
            state["last"] = None
        else:
            found, state["last"] = [], {"reason": reason, "sources": sources}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(state))
        return found

    @cached_property
    def poison(self) -> list[tuple[str, int, int, int, str]]:
        """The poison ranges known when this process started (only a crash adds one)."""
        return [tuple(r) for r in self._load().get("poison", [])]

    def why(self, topic: str, partition: int, offset: int) -> str | None:
        """The reason a record is poison, or None."""
        for t, p, lo, hi, reason in self.poison:
            if (t, p) == (topic, partition) and lo <= offset <= hi:
                return reason
        return None
