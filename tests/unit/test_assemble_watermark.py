"""Closing by event time: a conversation closes when its partition's watermark (the newest
span time capture delivered) passes its last span by the idle timeout, not by wall time;
wall time counts only once the partition has been quiet for that long. A fake clock."""

from __future__ import annotations

import random
from typing import Any

from processors.config import AssembleConfig
from processors.records import Message, TurnRecord
from processors.understand import assemble

S = 1_000_000_000
IDLE = 30 * S
CFG = AssembleConfig(idle_timeout_s=30)


def span(cid: str, sid: str, end_ns: int) -> dict[str, Any]:
    return TurnRecord(
        conversation_id=cid,
        trace_id="t" + cid,
        span_id=sid,
        span_kind="llm",
        start_ns=end_ns - S // 2,
        end_ns=end_ns,
        input_messages=[Message(role="user", content=f"{cid} {sid}")],
    ).to_dict()


class Partition:
    """What the assemble agent does with one partition's messages, on a fake clock."""

    def __init__(self) -> None:
        self.table: dict[str, Any] = {}
        self.deadlines = assemble.Deadlines(CFG)
        self.closed: dict[str, list[assemble.Closed]] = {}

    def deliver(self, cid: str, turns: list[dict[str, Any]], now: int) -> None:
        self.deadlines.delivered(0, turns, now)
        watermark = self.deadlines.watermark(0, now)
        state = assemble.add_turns(self.table.get(cid), turns, now, watermark)
        state["p"] = 0
        self.table[cid] = state
        self.deadlines.push(cid, state)

    def progress(self, **newest: int) -> None:
        """Capture's progress per OTLP partition (``q0=...`` is ``otlp_spans:0``)."""
        self.deadlines.watermarks.progressed(
            0, {f"otlp_spans:{q[1:]}": ns for q, ns in newest.items()}
        )

    def tick(self, now: int, *lagging: int) -> list[str]:
        """A tick; ``lagging``: the OTLP partitions where capture has input left."""
        behind = frozenset(f"otlp_spans:{q}" for q in lagging)
        done = self.deadlines.close_due(self.table, 0, now, behind)
        for c in done:  # as publish does
            self.table[c.conversation_id] = c.state
            self.deadlines.push(c.conversation_id, c.state)
            self.closed.setdefault(c.conversation_id, []).append(c)
        return [c.conversation_id for c in done]


def test_lagging_capture_closes_nothing_early_however_much_wall_time_passes() -> None:
    rng = random.Random(20)
    part = Partition()
    # "a" was active at event time 0..5 s; capture then works through a backlog of "b",
    # delivering an old span every few wall seconds, each only 0.5 s newer than the last
    for i in range(6):
        part.deliver("a", [span("a", f"a{i}", i * S)], now=1000 * S)
    wall, event = 1000 * S, 5 * S
    for i in range(58):  # event time reaches 34 s: under a's last span + idle (35 s)
        wall += rng.randint(1, 20) * S  # never quiet for the idle timeout
        event += S // 2
        part.deliver("b", [span("b", f"b{i}", event)], now=wall)
        assert part.tick(wall) == [], f"closed at wall {wall}, watermark {event}"
        assert part.tick(wall + rng.randint(0, 29) * S) == []  # ticks between deliveries
    assert wall - 1000 * S > 10 * IDLE  # far more wall time than the idle timeout passed
    part.deliver("b", [span("b", "b-last", 35 * S)], now=wall + S)
    assert part.tick(wall + S) == ["a"]  # the watermark passed a's last span by the timeout
    assert part.closed["a"][0].conversation is not None
    assert part.closed["a"][0].conversation.version == 6  # from all its spans
    assert part.closed["a"][0].conversation.closed_reason == "idle"


def test_quiet_partition_closes_after_the_idle_timeout_of_wall_time() -> None:
    part = Partition()
    part.deliver("a", [span("a", "a0", 7 * S)], now=500 * S)  # span clock unrelated to wall
    part.deliver("a", [span("a", "a1", 8 * S)], now=501 * S)
    for t in range(501, 531):
        assert part.tick(t * S) == []
    assert part.tick(531 * S) == ["a"]  # quiet for 30 s of wall time since the last message


def test_capture_stuck_with_input_left_holds_the_wall_clock_back() -> None:
    part = Partition()
    part.deliver("a", [span("a", "a0", 7 * S)], now=0)
    for t in range(1, 300):  # capture is stuck on a backlog for five minutes: nothing closes
        assert part.tick(t * S, 0) == []
    for t in range(300, 329):  # caught up: a full quiet period from its last backlog
        assert part.tick(t * S) == []
    assert part.tick(329 * S) == ["a"]


def test_ticks_do_not_count_as_capture_progress() -> None:
    part = Partition()
    part.deliver("a", [span("a", "a0", S)], now=0)
    part.deliver("b", [span("b", "b0", S)], now=20 * S)
    assert part.tick(45 * S) == []  # 45 s of ticks, but the last message is 25 s old
    assert sorted(part.tick(50 * S)) == ["a", "b"]


def test_late_span_reopens_and_closes_again_with_a_newer_version() -> None:
    part = Partition()
    part.deliver("a", [span("a", "a0", 10 * S)], now=0)
    part.deliver("b", [span("b", "b0", 41 * S)], now=S)
    assert part.tick(29 * S) == []  # idle by the watermark, not yet by 30 s of wall time
    assert part.tick(30 * S) == ["a"]
    part.deliver("a", [span("a", "a-late", 9 * S)], now=31 * S)  # behind the watermark
    assert part.table["a"]["closed_ns"] == 0  # reopened
    # idle from the watermark it arrived at (41 s), not from its own old span time
    part.deliver("b", [span("b", "b1", 70 * S)], now=50 * S)
    assert part.tick(61 * S) == []
    part.deliver("c", [span("c", "c1", 71 * S)], now=62 * S)
    assert part.tick(62 * S) == ["a"]
    first, second = part.closed["a"]
    assert first.conversation is not None and second.conversation is not None
    assert second.conversation.version > first.conversation.version
    part.tick(63 * S + 2 * int(CFG.linger_s * S))
    assert "a" not in part.table  # past its linger: it leaves the state


def test_spans_out_of_time_order_across_conversations_close_nothing_early() -> None:
    # a replay plays conversations one after another: the later one's spans come first
    part = Partition()
    part.deliver("late", [span("late", f"l{i}", (60 + i) * S) for i in range(3)], now=0)
    part.deliver("early", [span("early", "e0", 2 * S)], now=S)
    assert part.tick(29 * S) == []  # its span is 60 s behind the watermark, but it just arrived
    part.deliver("early", [span("early", "e1", 20 * S)], now=29 * S)
    part.deliver("next", [span("next", "n0", 93 * S)], now=30 * S)
    assert part.tick(30 * S) == ["late"]
    assert part.tick(59 * S) == ["early"]
    assert part.closed["early"][0].conversation is not None
    assert part.closed["early"][0].conversation.version == 2  # both its spans


def test_restored_state_of_the_old_format_closes_by_its_span_times() -> None:
    part = Partition()
    part.deliver("a", [span("a", "a0", 3 * S), span("a", "a1", 4 * S)], now=0)
    old = dict(part.table["a"])
    del old["heard_ns"]  # saved before the field existed
    restarted = Partition()
    restarted.table["a"] = old
    assert restarted.tick(100 * S) == []  # after a restart capture gets a quiet period first
    restarted.deliver("b", [span("b", "b0", 34 * S)], now=101 * S)
    assert restarted.tick(101 * S) == ["a"]  # 34 s >= a's 4 s + 30 s


def test_a_batch_of_ticks_closes_each_conversation_once_before_it_is_published() -> None:
    # A batch holds several ticks of a partition; the table keeps the open state until the
    # batch's closings are published. "e" closes at its end marker, then its idle deadline
    # passes in a later tick of the same batch: it must not be handed out again.
    part = Partition()
    end_span = {**span("e", "s1", 10 * S), "end_of_conversation": True}
    part.deliver("e", [end_span], 10 * S)
    batch: list[str] = []
    for t in range(11, 60):
        part.deliver("x", [span("x", f"s{t}", t * S)], t * S)  # moves the watermark on
        batch += [c.conversation_id for c in part.deadlines.close_due(part.table, 0, t * S)]
    assert batch.count("e") == 1


def test_a_start_indexes_the_restored_table_before_new_records_without_duplicates() -> None:
    # restored from the changelog: "r" open; then a record of "n" arrives before the first tick
    part = Partition()
    state = assemble.add_turns(None, [span("r", "s1", 5 * S)], 5 * S)
    state["p"] = 0
    part.table["r"] = state
    part.deadlines.index(part.table, 0, 6 * S)
    part.deliver("n", [span("n", "s1", 6 * S)], 6 * S)
    part.deadlines.index(part.table, 0, 6 * S)  # the first tick: nothing pushed twice
    for heap in (part.deadlines._idle[0], part.deadlines._wall[0]):
        assert sorted(heap) == sorted(set(heap))
    closed = [cid for t in range(7, 200) for cid in part.tick(t * S)]
    assert sorted(closed) == ["n", "r"]


def test_an_otlp_partition_capture_lags_on_holds_the_watermark_back() -> None:
    part = Partition()
    # "a" has a trace on OTLP partition 1 (delivered) and its next one waits there
    part.deliver("a", [span("a", "a0", 10 * S)], now=0)
    part.progress(q1=10 * S)
    # capture races through partition 0: minutes of span time and of wall time
    for t in range(1, 300):
        part.deliver("b", [span("b", f"b{t}", (10 + t) * S)], now=t * S)
        part.progress(q0=(10 + t) * S)
        assert part.tick(t * S, 1) == []  # partition 1 has input left: "a" stays open
    assert part.deadlines.watermark(0, 300 * S) == 10 * S
    # capture reaches a's next span on partition 1, then moves on there
    part.deliver("a", [span("a", "a1", 15 * S)], now=300 * S)
    part.progress(q1=15 * S)
    assert part.tick(340 * S, 1) == []  # 15 s of span time: not idle yet
    part.progress(q1=60 * S)
    assert part.tick(341 * S, 1) == ["a"]
    assert part.closed["a"][0].conversation is not None
    assert part.closed["a"][0].conversation.version == 2  # from both its spans


def test_a_lagging_otlp_partition_not_heard_of_holds_the_watermark_where_it_started() -> None:
    part = Partition()
    assert part.tick(0) == []  # the worker's start: the watermark starts at 0
    part.deliver("a", [span("a", "a0", 10 * S)], now=0)
    part.deliver("b", [span("b", "b0", 500 * S)], now=S)
    part.progress(q0=500 * S)
    assert part.tick(100 * S, 0, 3) == []  # nothing told of partition 3: held at the start
    assert part.deadlines.watermark(0, 100 * S) == 0
    assert part.tick(101 * S) == ["a"]  # nothing left anywhere: partition 3 holds nothing back
