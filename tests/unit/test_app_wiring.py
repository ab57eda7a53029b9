"""The worker's faust app: every stage ends the worker when it raises, rather than letting
faust restart the stage without the batch it held (those events would never be redelivered);
an ordered stage never lets its consumer skip past what its checkpoint covers."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.types import TP

from processors import runtime as runtime_module
from processors.app import build_app
from processors.config import Config
from processors.runtime import EXIT_STAGE_CRASHED, Checkpoint, Pipeline, ReadGuard, exit_on_crash


def test_every_stage_exits_the_worker_when_it_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = Config(home=str(tmp_path))
    cfg.understand.embedder = "hashing"
    agent = tmp_path / "agent"
    subprocess.run(["git", "init", "-q", "-b", "main", str(agent)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(agent),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "start",
        ],
        check=True,
    )
    cfg.act.repo = str(agent)  # the act stage runs only with a target
    codes: list[int] = []
    monkeypatch.setattr(runtime_module.os, "_exit", codes.append)
    app = build_app(Pipeline(cfg, store=None), "127.0.0.1:1")  # nothing connects until started
    assert len(app.agents) == 5
    for agent in app.agents.values():
        # the hook faust calls when an agent raises (faust/agents/agent.py, _execute_actor)
        asyncio.run(agent._on_error(agent, RuntimeError("boom")))
    assert codes == [EXIT_STAGE_CRASHED] * 5


def test_exit_on_crash_ends_the_process_with_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []
    monkeypatch.setattr(runtime_module.os, "_exit", codes.append)
    asyncio.run(exit_on_crash(object(), RuntimeError("boom")))
    assert codes == [EXIT_STAGE_CRASHED]


class Consumer:
    """The two calls rewind_gaps makes of faust's consumer, with a broker holding offsets
    from ``earliest`` on."""

    def __init__(self, earliest: int = 0) -> None:
        self.earliest = earliest
        self.seeks: list[tuple[TP, int]] = []

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return dict.fromkeys(tps, self.earliest)

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def events(partition: int, offsets: range) -> list[SimpleNamespace]:
    tp = TP("closeloop.conversations", partition)
    return [
        SimpleNamespace(
            message=SimpleNamespace(topic=tp.topic, partition=partition, offset=o, tp=tp)
        )
        for o in offsets
    ]


def test_a_partition_that_skips_past_the_checkpoint_is_read_again_from_the_gap() -> None:
    ckpt = Checkpoint("understand", Pipeline(Config(), store=None))
    ckpt.offsets = {"closeloop.conversations:0": 1, "closeloop.conversations:1": 40}
    batch = events(0, range(135, 142)) + events(1, range(30, 45)) + events(2, range(0, 5))
    consumer = Consumer()
    kept = asyncio.run(ckpt.rewind_gaps(consumer, batch))
    # partition 0 jumped from 1 to 135: dropped and rewound; 1 (covered, then contiguous) and 2 kept
    assert consumer.seeks == [(TP("closeloop.conversations", 0), 1)]
    assert [e.message.partition for e in kept] == [1] * 15 + [2] * 5
    # the rewound partition, read again from 1, goes through
    assert asyncio.run(ckpt.rewind_gaps(consumer, events(0, range(1, 142)))) != []
    assert len(consumer.seeks) == 1


def test_offsets_the_broker_no_longer_holds_are_not_a_gap() -> None:
    ckpt = Checkpoint("understand", Pipeline(Config(), store=None))
    consumer = Consumer(earliest=500)  # retention deleted 0..499
    batch = events(0, range(500, 510))
    assert asyncio.run(ckpt.rewind_gaps(consumer, batch)) == batch and consumer.seeks == []


def test_a_hole_inside_a_batch_keeps_what_comes_before_it() -> None:
    # offset 122 missing (a fetch served 123 before 122 was stored): keep up to 121, read again from 122
    guard = ReadGuard("assemble")
    consumer = Consumer()
    batch = events(2, range(100, 122)) + events(2, range(123, 130))
    kept = asyncio.run(guard.contiguous(consumer, batch))
    assert [e.message.offset for e in kept] == list(range(100, 122))
    assert consumer.seeks == [(TP("closeloop.conversations", 2), 122)]
    # the stale rest arrives again before the re-read: rewound again, nothing processed twice
    assert asyncio.run(guard.contiguous(consumer, events(2, range(123, 130)))) == []
    kept = asyncio.run(guard.contiguous(consumer, events(2, range(122, 135))))
    assert [e.message.offset for e in kept] == list(range(122, 135)) and len(consumer.seeks) == 2


def test_a_restarted_workers_first_batch_must_start_at_the_committed_offset() -> None:
    # the group committed 40 on partition 1; the first fetch after the restart served 41 on
    # (40 not stored yet while capture produced it): read again from 40, not trusted
    guard = ReadGuard("assemble")
    consumer = Consumer()
    consumer._committed_offset = {TP("closeloop.conversations", 1): 40}
    assert asyncio.run(guard.contiguous(consumer, events(1, range(41, 50)))) == []
    assert consumer.seeks == [(TP("closeloop.conversations", 1), 40)]
    kept = asyncio.run(guard.contiguous(consumer, events(1, range(40, 50))))
    assert [e.message.offset for e in kept] == list(range(40, 50))
    # a partition with no committed offset starts wherever it starts
    assert len(asyncio.run(guard.contiguous(consumer, events(3, range(7, 9))))) == 2


def test_offsets_of_another_incarnation_of_the_topic_are_reset_to_its_start() -> None:
    from processors.embedded.broker import TopicState
    from processors.runtime import stale_offsets

    offsets = {"t:0": 50, "t:1": 3, "u:0": 7}
    now = TopicState(
        "c", {"t": "id-t", "u": "new-u"}, {"t:0": (0, 10), "t:1": (0, 10), "u:0": (2, 90)}
    )
    stale = stale_offsets(offsets, {"t": "id-t", "u": "old-u"}, now)
    assert stale["t:0"][0] == 0 and "ends at 10" in stale["t:0"][1]  # beyond the end
    assert "t:1" not in stale  # within the same topic: trusted
    assert stale["u:0"][0] == 2 and "new topic" in stale["u:0"][1]  # recreated: from its start
    assert stale_offsets(offsets, {}, TopicState("c", {}, {})) == {
        "t:0": (0, stale["t:0"][1].replace("ends at 10", "ends at 0")),
        "t:1": (0, "the checkpoint covers t:1 up to 3, the topic ends at 0"),
        "u:0": (0, "the checkpoint covers u:0 up to 7, the topic ends at 0"),
    }  # a topic that does not exist (yet): everything from the start
