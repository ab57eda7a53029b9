"""A clean stop on memory storage loses nothing acknowledged: the gateway has acknowledged spans
capture has not stored yet (the worker was frozen while they came), and the stack is stopped at
once. The stop waits for capture to store them before the topics die with the broker; a restart
on the same home then assembles and tags every conversation (rebuilt from the store)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from examples.support_agent import run_cycle
from processors.embedded.broker import consumer_lag
from processors.embedded.stack import EmbeddedStack
from processors.stages import ALL_STAGES, app_id

from .harness import running_loop

N = 60
CONVERSATIONS_STORED = "SELECT uniqExact(conversation_id) FROM spans"
TAGS = "SELECT count() FROM conversation_tags FINAL"


def test_a_clean_stop_stores_every_acknowledged_span_first(tmp_path: Path) -> None:
    with running_loop(tmp_path) as loop:
        worker = loop.stack.children["worker"]
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGSTOP)  # capture runs in the worker: it stores nothing
        try:
            sent = run_cycle(loop.repo, loop.endpoint, n=N, seed=13, mode="scripted")
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        ids = {c.conversation_id for c in sent.conversations}
        topics = [loop.cfg.topics.otlp_spans, loop.cfg.topics.otlp_logs]
        assert (
            consumer_lag(loop.stack.bootstrap, app_id(ALL_STAGES), topics) > 0
        )  # acknowledged, not stored
        loop.stack.stop()

        # the same home, a new memory broker: only what the store holds is left
        loop.stack = EmbeddedStack(loop.cfg, config_file=loop.stack.config_file).start()
        loop.store = loop.stack.sql_store()
        assert loop.count(CONVERSATIONS_STORED) == len(ids), "acknowledged spans were lost"
        assert loop.wait_count(TAGS, len(ids)) == len(ids)
