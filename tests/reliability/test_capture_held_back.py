"""Capture held back while assemble's idle timer runs (real broker, real chDB): no
conversation is closed before all its spans have arrived.

The worker runs assemble only, so capture is "stuck": an OTLP request waits unprocessed on
its topic (capture's lag, which the ticks report), and the turns capture would deliver are
sent here, with span times that lag far behind the wall clock. Wall time passes several idle
timeouts; the conversations close only once later spans show them idle, from all their spans.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processors.embedded.broker import consumer_lag
from processors.records import Conversation, Message, TurnRecord
from processors.runtime import partition_of
from processors.stages import CAPTURE_ONLY, app_id
from tests.integration.pipeline import Pipeline, running_pipeline

from .harness import read_topic

S = 1_000_000_000
IDLE_S = 2
T0 = 1_600_000_000 * S  # span times years behind the wall clock: a capture far behind


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    env = {"CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": str(IDLE_S)}
    with running_pipeline(tmp_path_factory.mktemp("held"), stages="assemble", env=env) as p:
        yield p


def turn(cid: str, sid: str, end_ns: int) -> dict[str, object]:
    return TurnRecord(
        conversation_id=cid,
        trace_id="t" + cid,
        span_id=sid,
        span_kind="llm",
        start_ns=end_ns - S // 10,
        end_ns=end_ns,
        input_messages=[Message(role="user", content=f"step {sid}")],
        output_messages=[Message(role="assistant", content=f"done {sid}")],
    ).to_dict()


def an_otlp_request() -> bytes:
    kv = [KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat"))]
    span = Span(
        trace_id=b"\x01" * 16,
        span_id=b"\x02" * 8,
        name="chat",
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 1,
        attributes=kv,
    )
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.extend([span])
    return req.SerializeToString()


def published(pipe: Pipeline, cid: str) -> list[Conversation]:
    values = read_topic(pipe.broker.bootstrap, pipe.cfg.topics.conversations, idle_s=1.0)
    convs = [Conversation.from_json(v) for v in values]
    return [c for c in convs if c.conversation_id == cid]


def test_no_conversation_closes_before_all_its_spans_arrived(pipe: Pipeline) -> None:
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
    parts = pipe.cfg.kafka.partitions
    b = next(f"held-b{i}" for i in range(1000) if partition_of(f"held-b{i}", parts) == 0)
    c = next(f"held-c{i}" for i in range(1000) if partition_of(f"held-c{i}", parts) == 0)
    a = next(f"held-a{i}" for i in range(1000) if partition_of(f"held-a{i}", parts) == 0)

    def deliver(cid: str, turns: list[dict[str, object]]) -> None:
        """As capture does: the turns, then its progress (on every OTLP partition alike)."""
        producer.produce(pipe.cfg.topics.turns, json.dumps(turns).encode(), cid, partition=0)
        newest = max(int(str(t["end_ns"])) for t in turns)
        otlp = [pipe.cfg.topics.otlp_spans, pipe.cfg.topics.otlp_logs]
        progress = {f"{t}:{q}": newest for t in otlp for q in range(parts)}
        producer.produce(pipe.cfg.topics.turns, json.dumps({"progress": progress}), partition=0)
        producer.flush(30)

    # capture has input it has not processed: an OTLP request nobody consumes
    req = urllib.request.Request(
        pipe.http_url(), an_otlp_request(), {"Content-Type": "application/x-protobuf"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    assert (
        consumer_lag(
            pipe.broker.bootstrap,
            app_id(CAPTURE_ONLY),
            [pipe.cfg.topics.otlp_spans, pipe.cfg.topics.otlp_logs],
        )
        > 0
    )

    deliver(a, [turn(a, "a1", T0), turn(a, "a2", T0 + S)])
    # a backlog delivered slowly: b's span times creep forward, never IDLE_S past a's
    started = time.monotonic()
    for k in range(16):
        deliver(b, [turn(b, f"b{k}", T0 + S + k * S // 10)])
        time.sleep(0.5)
    # then capture delivers nothing for several idle timeouts (it is stuck, input left)
    time.sleep(4 * IDLE_S)
    assert time.monotonic() - started > 5 * IDLE_S  # the wall clock alone would have closed a
    assert published(pipe, a) == [] and published(pipe, b) == []

    # capture catches up: a's last span, then spans that show a and b idle
    deliver(a, [turn(a, "a3", T0 + 2 * S)])
    deliver(c, [turn(c, "c1", T0 + 10 * S)])
    sql = "SELECT version FROM conversations FINAL WHERE conversation_id = {cid:String}"
    rows = pipe.wait_rows(sql, 1, {"cid": a})
    assert [r["version"] for r in rows] == [3]  # closed once, from all three of its spans
    convs = published(pipe, a)
    assert [(x.version, x.closed_reason) for x in convs] == [(3, "idle")]
    assert [m.content for m in convs[0].messages if m.role == "assistant"] == [
        "done a1",
        "done a2",
        "done a3",
    ]
    assert [x.version for x in published(pipe, b)] == [16]
