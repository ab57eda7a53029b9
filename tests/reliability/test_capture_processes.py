"""Capture scaled out: `capture.processes: 2` runs capture in two processes of their own (one
consumer group splitting the OTLP partitions) beside the worker, writing through the store
owner. Every conversation still arrives once, a kill -9 of a capture process loses nothing, and
each writes its heartbeat."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from examples.support_agent import run_cycle
from processors.embedded.broker import committed_offsets
from processors.embedded.stack import wait_for
from processors.heartbeat import last_beat_ns

from .harness import conversation_intents, read_topic, running_loop

N = 120


def test_two_capture_processes_share_the_partitions_and_survive_kill9(tmp_path: Path) -> None:
    with running_loop(tmp_path, {"capture": {"processes": 2}}) as loop:
        assert {"worker", "capture-1", "capture-2"} <= set(loop.stack.children)
        report = run_cycle(loop.repo, loop.endpoint, n=N // 2, seed=3, mode="scripted")
        victim = loop.stack.children["capture-1"]
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        loop.stack.supervise_once()  # what `closeloop up` does every second
        assert victim.alive()
        report.conversations += run_cycle(
            loop.repo, loop.endpoint, n=N // 2, seed=4, mode="scripted"
        ).conversations

        ids = [c.conversation_id for c in report.conversations]
        tags = "SELECT count() FROM conversation_tags FINAL"
        assert loop.wait_count(tags, N) == N, "not every conversation was tagged"
        assert set(conversation_intents(loop.store, ids)) == set(ids)
        # each capture process beats like the worker (the supervisor watches both for a freeze)
        captures = [loop.stack.children[n].pid for n in ("capture-1", "capture-2")]
        assert wait_for(lambda: all(last_beat_ns(loop.cfg, p or 0) for p in captures), 30)
        # every span the agent exported (as the broker holds them) is stored
        exported = set()
        for value in read_topic(loop.stack.bootstrap, loop.cfg.topics.otlp_spans):
            req = ExportTraceServiceRequest.FromString(value)
            exported |= {
                (s.trace_id.hex(), s.span_id.hex())
                for rs in req.resource_spans
                for ss in rs.scope_spans
                for s in ss.spans
            }
        stored = {
            (r["trace_id"], r["span_id"])
            for r in loop.store.query("SELECT trace_id, span_id FROM spans FINAL")
        }
        assert len(exported) > N and stored == exported
        # capture ran in its own consumer group, and only there: the worker's group never read OTLP
        parts = [(loop.cfg.topics.otlp_spans, p) for p in range(loop.cfg.kafka.partitions)]
        assert wait_for(
            lambda: (
                sum(committed_offsets(loop.stack.bootstrap, "closeloop-capture", parts).values())
                > 0
            ),
            30,
        )
        assert all(
            o < 0 for o in committed_offsets(loop.stack.bootstrap, "closeloop", parts).values()
        )
