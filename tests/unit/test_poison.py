"""Poison batches: the same failure twice on overlapping input marks the overlap as poison."""

from __future__ import annotations

from pathlib import Path

from processors.poison import PoisonLog, failure_reason


def test_the_same_failure_twice_on_overlapping_input_is_poison(tmp_path: Path) -> None:
    log = PoisonLog.of(tmp_path, "understand")
    assert log.record_crash("TypeError: x", [("t", 0, 10, 20)]) == []
    assert log.record_crash("KeyError: y", [("t", 0, 10, 20)]) == []  # another failure: not yet
    assert log.record_crash("KeyError: y", [("t", 1, 10, 20)]) == []  # other input: not yet
    assert log.record_crash("KeyError: y", [("t", 1, 15, 30), ("t", 2, 0, 5)]) == [("t", 1, 15, 20)]
    fresh = PoisonLog.of(tmp_path, "understand")  # what the next worker reads
    assert fresh.why("t", 1, 17) == "KeyError: y"
    assert fresh.why("t", 1, 21) is None and fresh.why("t", 0, 15) is None


def test_the_reason_is_redacted() -> None:
    reason = failure_reason(
        ValueError("bad key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6 from bob@example.com")
    )
    assert reason.startswith("ValueError: ") and "sk-proj" not in reason and "bob@" not in reason
