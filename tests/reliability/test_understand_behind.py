"""A worker restart while understand is far behind (real broker, real chDB): each conversation
version is published once, however long ago its conversation closed.

The first worker runs capture and assemble only, so understand is as far behind as it gets:
every conversation closes, is published on ``closeloop.conversations``, and leaves assemble's
table after ``assemble.linger_s``. The worker restarts on the same broker and home, first still
without understand, then with it: understand reads the backlog from the topic, and assemble's
start (which rebuilds from the store what no tag covers) must not publish those conversations
again.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processors.embedded.stack import wait_for
from processors.records import Conversation, TagRecord
from tests.integration.pipeline import running_pipeline

from .harness import read_topic

N = 8
IDLE_S = 1
LINGER_S = 2
ENV = {
    "CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": str(IDLE_S),
    "CLOSELOOP_ASSEMBLE_LINGER_S": str(LINGER_S),
}
STARTS = "SELECT seq FROM checkpoints FINAL WHERE name = 'assemble'"  # one row per start
CHANGELOG = "closeloop-open_conversations-changelog"  # assemble's table (app id "closeloop")


def conversation_request(n: int) -> bytes:
    """One conversation of two chat spans, as an agent exports it."""
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    now = time.time_ns()
    for k in range(2):
        s = Span(
            trace_id=(n + 1).to_bytes(16, "big"),
            span_id=(n * 10 + k + 1).to_bytes(8, "big"),
            name="chat",
            start_time_unix_nano=now + k * 1000,
            end_time_unix_nano=now + k * 1000 + 500,
        )
        for key, value in (
            ("gen_ai.conversation.id", f"behind-{n}"),
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.input.messages", json.dumps([{"role": "user", "content": f"ask {n}.{k}"}])),
            ("gen_ai.output.messages", json.dumps([{"role": "assistant", "content": "ok"}])),
        ):
            a = s.attributes.add()
            a.key, a.value.string_value = key, value
        ss.spans.append(s)
    return req.SerializeToString()


def left_the_table(bootstrap: str) -> set[str]:
    """Conversation ids whose newest record in assemble's changelog is a deletion."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "behind-reader"})
    parts = c.list_topics(CHANGELOG, timeout=10).topics[CHANGELOG].partitions
    c.assign([TopicPartition(CHANGELOG, p, OFFSET_BEGINNING) for p in parts])
    last: dict[str, bytes | None] = {}
    try:
        while (m := c.poll(1.0)) is not None:
            if not m.error():
                last[json.loads(m.key())] = m.value()
    finally:
        c.close()
    return {cid for cid, value in last.items() if value is None}


def test_a_restart_with_understand_far_behind_publishes_each_version_once(tmp_path: Path) -> None:
    with running_pipeline(tmp_path, stages="capture,assemble", env=ENV) as pipe:
        for n in range(N):
            req = urllib.request.Request(
                pipe.http_url(), conversation_request(n), {"Content-Type": "application/x-protobuf"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 200
        ids = {f"behind-{n}" for n in range(N)}
        topics = pipe.cfg.topics
        pipe.wait_rows("SELECT conversation_id FROM conversations FINAL", N)
        # closed, published, and gone from assemble's table: understand is more than a linger behind
        assert wait_for(lambda: left_the_table(pipe.broker.bootstrap) >= ids, timeout_s=90)

        # a restart with understand still not running, then one with it: nothing twice
        for seq, stages in ((2, "capture,assemble"), (3, "capture,assemble,understand")):
            pipe.stop_worker()
            pipe.worker.stages = stages
            pipe.start_worker()
            # assemble's start has looked at the store (it records the topic it publishes to)
            assert wait_for(
                lambda s=seq: [r["seq"] for r in pipe.rows(STARTS)] == [s], timeout_s=60
            )
            time.sleep(8 * IDLE_S)  # what it had rebuilt would have closed and been published
            assembled = Counter(
                (c.conversation_id, c.version)
                for c in map(
                    Conversation.from_json, read_topic(pipe.broker.bootstrap, topics.conversations)
                )
            )
            assert {cid for cid, _ in assembled} == ids
            assert set(assembled.values()) == {1}, assembled

        pipe.wait_rows("SELECT conversation_id FROM conversation_tags FINAL", N)
        tagged = Counter(
            (t.conversation_id, t.conversation_version)
            for t in map(TagRecord.from_json, read_topic(pipe.broker.bootstrap, topics.tags))
        )
        assert set(tagged) == set(assembled) and set(tagged.values()) == {1}, tagged
