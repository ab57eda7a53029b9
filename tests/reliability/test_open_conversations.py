"""Open conversations across a clean stop and a crash of the whole tree, memory broker: the
broker's topics (turns, assemble's changelog, conversations) are gone at the restart, the spans
are in the store. Every conversation whose spans were stored is assembled and tagged exactly
once after the restart, rebuilt from the store (table ``turn_records``)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from examples.support_agent import run_cycle
from processors.embedded.stack import EmbeddedStack
from processors.records import Conversation

from .harness import Loop, conversation_intents, read_topic, running_loop

N = 30
STORED = "SELECT uniqExact(conversation_id) FROM turn_records"
CONVERSATIONS = "SELECT count() FROM conversations FINAL"
TAGS = "SELECT count() FROM conversation_tags FINAL"


def kill_tree(loop: Loop) -> None:
    """SIGKILL the broker and every child at once: nothing gets to stop cleanly."""
    procs = [c.proc for c in loop.stack.children.values() if c.proc is not None]
    assert loop.stack.broker is not None and loop.stack.broker.proc is not None
    procs.append(loop.stack.broker.proc)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(30)


@pytest.mark.parametrize("how", ["clean stop", "kill -9 of the tree"])
def test_open_conversations_are_tagged_once_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # first run: nothing closes (no end marker is recognised, an hour of idleness needed)
    monkeypatch.setenv("CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S", "3600")
    monkeypatch.setenv("CLOSELOOP_ASSEMBLE_END_ATTRIBUTE", "test.never.set")
    with running_loop(tmp_path) as loop:
        sent = run_cycle(loop.repo, loop.endpoint, n=N, seed=9, mode="scripted")
        ids = {c.conversation_id for c in sent.conversations}
        assert loop.wait_count(STORED, N) == N
        assert loop.count(CONVERSATIONS) == 0  # all still open when the stack goes
        if how == "clean stop":
            loop.stack.stop()
        else:
            kill_tree(loop)
            loop.stack.stop()  # reaps what is dead, removes the stack file

        # second run on the same home, a new memory broker: the demo's idle timeout again
        monkeypatch.delenv("CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S")
        monkeypatch.delenv("CLOSELOOP_ASSEMBLE_END_ATTRIBUTE")
        loop.stack = EmbeddedStack(loop.cfg, config_file=loop.stack.config_file).start()
        loop.store = loop.stack.sql_store()
        assert loop.wait_count(TAGS, N) == N, "open conversations were lost"
        assert set(conversation_intents(loop.store, list(ids))) == ids
        assert loop.count(CONVERSATIONS) == N

        # exactly once: one message per conversation on the new broker's topics
        topics = loop.cfg.topics
        assembled = read_topic(loop.stack.bootstrap, topics.conversations)
        tagged = read_topic(loop.stack.bootstrap, topics.tags)
        assert (len(assembled), len(tagged)) == (N, N)
        log = (loop.cfg.log_dir() / "worker.log").read_text()
        assert f"{N} conversations rebuilt from the store" in log


def test_a_worker_start_publishes_each_conversation_version_once(tmp_path: Path) -> None:
    # The worker starts while a backlog waits: its first batches fold records of conversations
    # before the first tick of their partition, which indexes the restored table. Each
    # conversation version is published once, not again at that first tick.
    with running_loop(tmp_path) as loop:
        first = run_cycle(loop.repo, loop.endpoint, n=N, seed=11, mode="scripted")
        assert loop.wait_count(TAGS, N) == N
        worker = loop.stack.children["worker"]
        worker.stop()  # quiet: everything tagged, the table holds closed states
        second = run_cycle(loop.repo, loop.endpoint, n=2 * N, seed=12, mode="scripted")
        worker.start()
        assert loop.wait_count(TAGS, 3 * N) == 3 * N

        published = [
            Conversation.from_json(v)
            for v in read_topic(loop.stack.bootstrap, loop.cfg.topics.conversations)
        ]
        versions = Counter((c.conversation_id, c.version) for c in published)
        ids = {c.conversation_id for c in first.conversations + second.conversations}
        assert {cid for cid, _ in versions} == ids
        assert [k for k, n in versions.items() if n > 1] == []
