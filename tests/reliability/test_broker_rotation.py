"""Broker rotation (``kafka.rotate_memory_mb``) on the real tansu broker and chDB: a tiny limit
makes the supervisor replace the memory broker while the agent sends conversations, some of
them open across the rotation. Nothing acknowledged is lost and nothing is tagged twice: every
conversation sent is stored and tagged, none tagged before the rotation is assembled again on
the new broker, and the new broker assembles each of the others once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from examples.support_agent import run_cycle
from examples.support_agent.run import CycleReport
from processors.records import Conversation
from processors.status import format_process, process_health

from .harness import conversation_intents, read_topic, running_loop

N = 20
BATCHES_AFTER = 6  # the sender goes on until at least this many batches of 5 were sent
TAGS = "SELECT count() FROM conversation_tags FINAL"
STORED = "SELECT uniqExact(conversation_id) FROM turn_records"
SPANS_STORED = "SELECT uniqExact(conversation_id) FROM spans"


def test_a_rotation_loses_nothing_and_tags_each_conversation_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # conversations close only by idleness, so those sent around the rotation are open across it
    monkeypatch.setenv("CLOSELOOP_ASSEMBLE_END_ATTRIBUTE", "test.never.set")
    monkeypatch.setenv("CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S", "15")
    with running_loop(tmp_path, {"kafka": {"rotate_memory_mb": 1}}) as loop:
        stack = loop.stack
        first = run_cycle(loop.repo, loop.endpoint, n=N, seed=21, mode="scripted")
        assert loop.wait_count(TAGS, N) == N
        tagged_before = set(
            conversation_intents(loop.store, [c.conversation_id for c in first.conversations])
        )

        # more batches, sent until after the rotation (the SDK retries the gateway's 503s)
        sent: list[CycleReport] = []
        rotated = threading.Event()

        def send() -> None:
            while not rotated.is_set() or len(sent) < BATCHES_AFTER:
                seed = 100 + len(sent)
                sent.append(run_cycle(loop.repo, loop.endpoint, n=5, seed=seed, mode="scripted"))

        sender = threading.Thread(target=send)
        sender.start()
        assert loop.wait_count(STORED, N + 10, stall_s=60) >= N + 10
        assert stack.broker is not None
        old_pid, before = stack.broker.pid, len(sent)
        stack.supervise_once()  # the broker's RSS is far over 1 MB: it is rotated
        rotated.set()
        sender.join(180)
        assert not sender.is_alive() and len(sent) > before

        assert stack.rotations.count == 1, stack.rotations.put_off_reason
        assert stack.broker.pid != old_pid
        ids = {c.conversation_id for r in [first, *sent] for c in r.conversations}
        total = N + 5 * len(sent)
        assert len(ids) == total
        assert loop.wait_count(TAGS, total) == total, "conversations were lost"
        assert set(conversation_intents(loop.store, list(ids))) == ids
        assert loop.count(SPANS_STORED) == total

        # exactly once: none tagged before is assembled again, each of the others once
        assembled = Counter(
            Conversation.from_json(v).conversation_id
            for v in read_topic(stack.bootstrap, loop.cfg.topics.conversations)
        )
        assert [c for c, n in assembled.items() if n > 1] == []
        assert set(assembled) & tagged_before == set()
        assert len(set(assembled) - tagged_before) > 0  # open across the rotation
        # `closeloop status` says it happened, and why
        now = time.time_ns()
        broker = process_health(json.loads((loop.cfg.run_dir() / "stack.json").read_text()), now)
        said = format_process("broker", broker["broker"], now)
        assert any("rotations 1, the last" in ln and "rotate_memory_mb 1;" in ln for ln in said)
