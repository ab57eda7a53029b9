"""The embedded OTLP gateway: OTel SDK exporters and raw HTTP in, a real tansu broker out."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processors.capture.gateway import (
    JSON,
    LOGS,
    PROTOBUF,
    TRACES,
    Gateway,
    decode_body,
    parse_body,
    parse_json,
    split_request,
)
from processors.config import Config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.errors import InputError, PayloadTooLarge

TraceRequest = trace_service_pb2.ExportTraceServiceRequest
LogsRequest = logs_service_pb2.ExportLogsServiceRequest
READ_TIMEOUT_S = 20.0  # bound on reading back what was acknowledged (not a speed check)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def key(n: int) -> bytes:
    """The record key the collector writes for trace ``tid(n)``: the hex trace id."""
    return tid(n).hex().encode()


def span(trace: int, span_: int, name: str = "chat", parent: int = 0) -> Span:
    attr = KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value=name))
    return Span(
        trace_id=tid(trace),
        span_id=sid(span_),
        name=name,
        kind=Span.SPAN_KIND_CLIENT,
        parent_span_id=sid(parent) if parent else b"",
        attributes=[attr],
    )


def trace_request(*scopes: list[Span], service: str = "agent") -> TraceRequest:
    """One resource, one scope per list of spans."""
    req = TraceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value=service))
    rs.schema_url = "https://opentelemetry.io/schemas/1.30.0"
    for i, spans in enumerate(scopes):
        ss = rs.scope_spans.add()
        ss.scope.name = f"scope-{i}"
        ss.spans.extend(spans)
    return req


def post(
    port: int,
    path: str,
    body: bytes,
    ctype: str = PROTOBUF,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=body if method == "POST" else None,
        headers={"Content-Type": ctype, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def intake(port: int) -> str:
    """What ``GET /healthz`` says of the intake (200 whenever the gateway serves, no credential)."""
    code, headers, body = post(port, "/healthz", b"", method="GET")
    assert code == 200 and headers["Content-Type"] == JSON, (code, body)
    return str(json.loads(body)["status"])


def post_traces(port: int, req: TraceRequest) -> int:
    return post(port, "/v1/traces", req.SerializeToString())[0]


def grpc_traces(port: int, req: TraceRequest) -> trace_service_pb2.ExportTraceServiceResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return trace_service_pb2_grpc.TraceServiceStub(ch).Export(req, timeout=30)


def status_of(body: bytes, ctype: str = PROTOBUF) -> status_pb2.Status:
    if ctype == JSON:
        doc = json.loads(body)
        return status_pb2.Status(code=doc.get("code", 0), message=doc.get("message", ""))
    return status_pb2.Status.FromString(body)


def count_items(value: bytes, signal_: str) -> int:
    if signal_ == "traces":
        r = TraceRequest.FromString(value)
        return sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
    r = LogsRequest.FromString(value)
    return sum(len(sl.log_records) for rl in r.resource_logs for sl in rl.scope_logs)


def read_topic(bootstrap: str, topic: str, *, items: int, signal_: str = "traces") -> list[Message]:
    """Read every partition from the start until ``items`` spans (or log records) arrived."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"t-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[Message] = []
    seen = 0
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while seen < items and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                assert m.error() is None, m.error()
                out.append(m)
                seen += count_items(m.value(), signal_)
    finally:
        c.close()
    return out


def spans_in(value: bytes) -> list[Span]:
    r = TraceRequest.FromString(value)
    return [s for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def conversation(tracer, conv: str, turns: int) -> None:
    """GenAI semconv spans: an agent invocation with a chat and a tool call per turn."""
    with tracer.start_as_current_span("invoke_agent support-bot") as root:
        root.set_attribute("gen_ai.operation.name", "invoke_agent")
        root.set_attribute("gen_ai.agent.name", "support-bot")
        root.set_attribute("gen_ai.conversation.id", conv)
        for t in range(turns):
            with tracer.start_as_current_span("chat gpt-4o-mini") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.provider.name", "openai")
                chat.set_attribute("gen_ai.request.model", "gpt-4o-mini")
                chat.set_attribute("gen_ai.usage.input_tokens", 120 + t)
                chat.set_attribute("gen_ai.usage.output_tokens", 30)
                chat.set_attribute("gen_ai.conversation.id", conv)
                chat.set_attribute(
                    "gen_ai.input.messages",
                    json.dumps(
                        [
                            {
                                "role": "user",
                                "parts": [
                                    {"type": "text", "content": f"turn {t}: where is my order?"}
                                ],
                            }
                        ]
                    ),
                )
            with tracer.start_as_current_span("execute_tool lookup_order") as tool:
                tool.set_attribute("gen_ai.operation.name", "execute_tool")
                tool.set_attribute("gen_ai.tool.name", "lookup_order")
                tool.set_attribute("gen_ai.tool.call.arguments", json.dumps({"order": 42 + t}))


def span_ids_one_trace_per_message(messages: list[Message]) -> set[bytes]:
    """Assert every record holds one trace, keyed by its hex trace id; return all span ids."""
    span_ids: set[bytes] = set()
    for m in messages:
        spans = spans_in(m.value())
        assert spans
        assert {s.trace_id for s in spans} == {spans[0].trace_id}
        assert m.key() == spans[0].trace_id.hex().encode()
        span_ids |= {s.span_id for s in spans}
    return span_ids


def gateway_config(config: Config, spans: str, logs: str, **otlp: object) -> Config:
    config.otlp.grpc_port = 0
    config.otlp.http_port = 0
    for k, v in otlp.items():
        setattr(config.otlp, k, v)
    config.topics.otlp_spans = spans
    config.topics.otlp_logs = logs
    return config


def tracer_provider(exporter: SpanExporter, service: str) -> TracerProvider:
    tp = TracerProvider(resource=Resource.create({"service.name": service}))
    tp.add_span_processor(
        BatchSpanProcessor(exporter, max_export_batch_size=64, schedule_delay_millis=100)
    )
    return tp


@pytest.fixture
def topics(topic_factory) -> tuple[str, str]:
    return topic_factory("spans", 3), topic_factory("logs", 2)


@pytest.fixture
def gateway(kafka: EmbeddedBroker, config: Config, topics: tuple[str, str]) -> Iterator[Gateway]:
    with Gateway(gateway_config(config, *topics), kafka.bootstrap) as gw:
        yield gw


# ---------------------------------------------------------------------------------------------
# the pure core
# ---------------------------------------------------------------------------------------------


def test_split_is_one_message_per_resource_scope_and_trace() -> None:
    req = trace_request([span(1, 1), span(2, 2), span(1, 3, parent=1)], [span(1, 4)])
    split = split_request(req, TRACES)
    assert [k for k, _ in split.messages] == [key(1), key(2), key(1)]
    first = TraceRequest.FromString(split.messages[0][1]).resource_spans[0]
    assert [s.span_id for s in first.scope_spans[0].spans] == [sid(1), sid(3)]
    assert first.resource == req.resource_spans[0].resource
    assert first.schema_url == req.resource_spans[0].schema_url
    third = TraceRequest.FromString(split.messages[2][1]).resource_spans[0]
    assert third.scope_spans[0].scope.name == "scope-1"
    assert (split.accepted, split.rejected, split.error) == (4, 0, "")
    assert not split.response(TRACES).HasField("partial_success")


@pytest.mark.parametrize(
    "bad",
    [
        Span(trace_id=b"\x01" * 3, span_id=sid(9)),
        Span(trace_id=bytes(16), span_id=sid(9)),
        Span(trace_id=tid(1), span_id=b"\x01"),
        Span(trace_id=tid(1), span_id=sid(9), parent_span_id=b"\x01\x02"),
    ],
)
def test_split_rejects_spans_with_invalid_ids(bad: Span) -> None:
    split = split_request(trace_request([span(1, 1), bad]), TRACES)
    assert (split.accepted, split.rejected) == (1, 1)
    resp = split.response(TRACES)
    assert resp.partial_success.rejected_spans == 1
    assert "1 spans rejected" in resp.partial_success.error_message


def test_split_logs_keys_by_trace_id_and_leaves_records_without_one_unkeyed() -> None:
    req = LogsRequest()
    sl = req.resource_logs.add().scope_logs.add()
    sl.log_records.extend(
        [LogRecord(trace_id=tid(7), span_id=sid(1)), LogRecord(), LogRecord(trace_id=b"\x01\x02")]
    )
    split = split_request(req, LOGS)
    assert [k for k, _ in split.messages] == [key(7), None]
    assert (split.accepted, split.rejected) == (2, 1)
    assert split.response(LOGS).partial_success.rejected_log_records == 1


def test_decode_body_limits_the_decompressed_size() -> None:
    data = b"x" * 5000
    assert decode_body(gzip.compress(data), "gzip", 5000) == data
    assert decode_body(data, "", 5000) == data
    with pytest.raises(PayloadTooLarge):
        decode_body(gzip.compress(b"\0" * 10_000_000), "gzip", 1_000_000)  # a 10 KB gzip bomb
    with pytest.raises(PayloadTooLarge):
        decode_body(data, "identity", 4999)
    with pytest.raises(InputError, match="truncated"):
        decode_body(gzip.compress(data)[:-12], "gzip", 10_000)
    with pytest.raises(InputError, match="not valid gzip"):
        decode_body(b"plain", "gzip", 10_000)
    with pytest.raises(InputError, match="Content-Encoding"):
        decode_body(data, "br", 10_000)


def test_json_ids_are_hex_and_give_the_same_protobuf() -> None:
    req = trace_request([span(1, 1), span(1, 2, parent=1)])
    req.resource_spans[0].scope_spans[0].spans[1].links.add(trace_id=tid(5), span_id=sid(6))
    attrs = [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "agent"}}]
                },
                "schemaUrl": "https://opentelemetry.io/schemas/1.30.0",
                "scopeSpans": [
                    {
                        "scope": {"name": "scope-0"},
                        "spans": [
                            {
                                "traceId": tid(1).hex(),
                                "spanId": sid(1).hex(),
                                "name": "chat",
                                "kind": 3,
                                "attributes": attrs,
                            },
                            {
                                "traceId": tid(1).hex(),
                                "spanId": sid(2).hex(),
                                "parentSpanId": sid(1).hex(),
                                "name": "chat",
                                "kind": "SPAN_KIND_CLIENT",
                                "unknownField": 1,
                                "attributes": attrs,
                                "links": [{"traceId": tid(5).hex(), "spanId": sid(6).hex()}],
                            },
                        ],
                    }
                ],
            }
        ]
    }
    assert parse_json(json.dumps(doc).encode(), TRACES) == req
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "zz" * 16
    with pytest.raises(InputError, match=r"spans\[0\]\.traceId is not hex"):
        parse_json(json.dumps(doc).encode(), TRACES)
    with pytest.raises(InputError, match="not JSON"):
        parse_json(b"{nope", TRACES)
    with pytest.raises(InputError, match="not a protobuf"):
        parse_body(b"\xff\xff\xff", PROTOBUF, TRACES)


def test_sdk_request_bytes_split_losslessly() -> None:
    """The SDK's own encoder (used by both its exporters) gives requests the core keeps whole."""
    memory = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(memory))
    conversation(tp.get_tracer("t"), "conv-x", turns=1)
    req = encode_spans(memory.get_finished_spans())
    split = split_request(TraceRequest.FromString(req.SerializeToString()), TRACES)
    assert len(split.messages) == 1 and split.accepted == 3
    assert spans_in(split.messages[0][1]) == [
        s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]


# ---------------------------------------------------------------------------------------------
# real SDK exporters and raw requests -> gateway -> tansu
# ---------------------------------------------------------------------------------------------


def test_sdk_grpc_and_http_exporters_deliver_every_span(
    kafka: EmbeddedBroker, gateway: Gateway, topics: tuple[str, str]
) -> None:
    providers = [
        tracer_provider(
            GrpcSpanExporter(
                endpoint=f"127.0.0.1:{gateway.grpc_port}",
                insecure=True,
                compression=grpc.Compression.Gzip,
            ),
            "agent-grpc",
        ),
        tracer_provider(
            HttpSpanExporter(endpoint=f"http://127.0.0.1:{gateway.http_port}/v1/traces"),
            "agent-http",
        ),
    ]
    sent: set[bytes] = set()
    for i, tp in enumerate(providers):
        memory = InMemorySpanExporter()  # what was sent, to compare with what arrived
        tp.add_span_processor(SimpleSpanProcessor(memory))
        for c in range(3):
            conversation(tp.get_tracer("closeloop.test.agent"), f"conv-{i}-{c}", turns=2 + c)
        assert tp.force_flush(30_000)
        sent |= {s.context.span_id.to_bytes(8, "big") for s in memory.get_finished_spans()}
        tp.shutdown()
    assert len(sent) == 2 * (3 + 2 * (2 + 3 + 4))

    messages = read_topic(kafka.bootstrap, topics[0], items=len(sent))
    assert span_ids_one_trace_per_message(messages) == sent
    assert sum(count_items(m.value(), "traces") for m in messages) == len(sent)  # no duplicate
    services = {
        a.value.string_value
        for m in messages
        for a in TraceRequest.FromString(m.value()).resource_spans[0].resource.attributes
        if a.key == "service.name"
    }
    assert services == {"agent-grpc", "agent-http"}
    assert len({m.key() for m in messages}) == 6  # six conversations
    stats = gateway.stats()
    assert stats["spans"] == len(sent) and stats["rejected_spans"] == 0
    assert stats["messages"] == len(messages)


def test_json_gzip_and_partial_success_over_http(
    kafka: EmbeddedBroker, gateway: Gateway, topics: tuple[str, str]
) -> None:
    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {"traceId": tid(11).hex(), "spanId": sid(1).hex(), "name": "chat"},
                            {"traceId": "abcd", "spanId": sid(2).hex(), "name": "bad id"},
                        ]
                    }
                ]
            }
        ]
    }
    code, headers, body = post(gateway.http_port, "/v1/traces", json.dumps(doc).encode(), JSON)
    assert code == 200 and headers["Content-Type"] == JSON
    partial = json.loads(body)["partialSuccess"]
    assert partial["rejectedSpans"] == "1"  # proto3 JSON: int64 as a string
    assert "trace_id must be 16 bytes" in partial["errorMessage"]

    proto = trace_request([span(12, 1), span(12, 2, parent=1)]).SerializeToString()
    code, headers, body = post(
        gateway.http_port, "/v1/traces", gzip.compress(proto), headers={"Content-Encoding": "gzip"}
    )
    assert code == 200 and headers["Content-Type"] == PROTOBUF
    resp = trace_service_pb2.ExportTraceServiceResponse.FromString(body)
    assert not resp.HasField("partial_success")

    gz_json = gzip.compress(
        json.dumps(
            {
                "resourceSpans": [
                    {
                        "scopeSpans": [
                            {
                                "spans": [
                                    {
                                        "traceId": tid(13).hex(),
                                        "spanId": sid(3).hex(),
                                        "name": "tool",
                                    }
                                ]
                            }
                        ]
                    }
                ]
            }
        ).encode()
    )
    code, _, body = post(
        gateway.http_port,
        "/v1/traces",
        gz_json,
        f"{JSON}; charset=utf-8",
        headers={"Content-Encoding": "gzip"},
    )
    assert code == 200 and json.loads(body) == {}

    messages = read_topic(kafka.bootstrap, topics[0], items=4)
    by_key = {m.key(): spans_in(m.value()) for m in messages}
    assert set(by_key) == {key(11), key(12), key(13)}
    assert [s.span_id for s in by_key[key(11)]] == [sid(1)]
    assert [s.parent_span_id for s in by_key[key(12)]] == [b"", sid(1)]


def test_logs_over_grpc_and_http(
    kafka: EmbeddedBroker, gateway: Gateway, topics: tuple[str, str]
) -> None:
    req = LogsRequest()
    sl = req.resource_logs.add().scope_logs.add()
    sl.log_records.extend(
        [
            LogRecord(
                trace_id=tid(21),
                span_id=sid(1),
                body=AnyValue(string_value="hello"),
                event_name="gen_ai.client.inference.operation.details",
            ),
            LogRecord(trace_id=tid(22), span_id=sid(2), event_name="gen_ai.user.message"),
            LogRecord(body=AnyValue(string_value="not tied to a span")),
            LogRecord(trace_id=b"\x01", event_name="broken"),
        ]
    )
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as ch:
        resp = logs_service_pb2_grpc.LogsServiceStub(ch).Export(req, timeout=30)
    assert resp.partial_success.rejected_log_records == 1
    code, _, body = post(gateway.http_port, "/v1/logs", req.SerializeToString())
    assert code == 200
    resp = logs_service_pb2.ExportLogsServiceResponse.FromString(body)
    assert resp.partial_success.rejected_log_records == 1

    messages = read_topic(kafka.bootstrap, topics[1], items=6, signal_="logs")
    assert sorted(m.key() or b"" for m in messages) == sorted([b"", key(21), key(22)] * 2)
    for m in messages:
        rec = LogsRequest.FromString(m.value()).resource_logs[0].scope_logs[0].log_records
        assert m.key() == (rec[0].trace_id.hex().encode() if rec[0].trace_id else None)
    assert gateway.stats()["log_records"] == 6


def test_metrics_are_accepted_counted_and_dropped(gateway: Gateway) -> None:
    """What `opentelemetry-instrument` sends by default: the SDK's own metric exporters, over
    HTTP and gRPC, get success (no export errors logged); nothing reaches Kafka."""
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetricExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("agent")
    meter.create_counter("gen_ai.requests").add(3)
    meter.create_histogram("gen_ai.client.operation.duration").record(0.4)
    data = reader.get_metrics_data()
    assert data is not None
    exporters = [
        HttpMetricExporter(endpoint=f"http://127.0.0.1:{gateway.http_port}/v1/metrics"),
        GrpcMetricExporter(endpoint=f"127.0.0.1:{gateway.grpc_port}", insecure=True),
    ]
    for exporter in exporters:
        assert exporter.export(data) == MetricExportResult.SUCCESS
        exporter.shutdown()
    code, headers, body = post(gateway.http_port, "/v1/metrics", b'{"resourceMetrics": []}', JSON)
    assert code == 200 and headers["Content-Type"] == JSON
    code, _, body = post(gateway.http_port, "/v1/metrics", b"\x0a\xff\xff\xff\x0f garbage")
    assert code == 400 and "ExportMetricsServiceRequest" in status_of(body).message
    stats = gateway.stats()
    assert stats["metrics_requests"] == 3
    assert stats["metrics_dropped"] == 4  # two metrics, from each exporter
    assert stats.get("messages", 0) == 0


def test_grpc_partial_success(gateway: Gateway) -> None:
    resp = grpc_traces(
        gateway.grpc_port, trace_request([span(31, 1), Span(trace_id=tid(31), span_id=b"")])
    )
    assert resp.partial_success.rejected_spans == 1
    assert "span_id must be 8 bytes" in resp.partial_success.error_message


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(gateway: Gateway) -> None:
    port = gateway.http_port
    code, _, body = post(port, "/v1/traces", b"\x0a\xff\xff\xff\x0f garbage")
    assert code == 400 and status_of(body).code == code_pb2.INVALID_ARGUMENT
    assert "not a protobuf ExportTraceServiceRequest" in status_of(body).message

    code, headers, body = post(port, "/v1/traces", b'{"resourceSpans": [', JSON)
    assert code == 400 and headers["Content-Type"] == JSON
    assert "not JSON" in status_of(body, JSON).message

    code, _, body = post(port, "/v1/traces", b'{"resourceSpans": 5}', JSON)
    assert code == 400 and "OTLP/JSON" in status_of(body, JSON).message

    code, _, body = post(port, "/v1/traces", b"x", headers={"Content-Encoding": "gzip"})
    assert code == 400 and "gzip" in status_of(body).message

    assert post(port, "/v1/traces", b"{}", "text/plain")[0] == 415
    code, headers, _ = post(port, "/v1/traces", b"", method="GET")
    assert code == 405 and headers["Allow"] == "POST"
    assert post(port, "/v1/profiles", b"")[0] == 404
    assert post(port, "/", b"", method="GET")[0] == 404

    assert post_traces(port, trace_request([span(41, 1)])) == 200
    stats = gateway.stats()
    assert stats["outcome_bad_request"] == 4 and stats["outcome_ok"] == 1


def test_size_limits(kafka: EmbeddedBroker, config: Config, topics: tuple[str, str]) -> None:
    limit = 64 * 1024
    with Gateway(gateway_config(config, *topics, max_request_bytes=limit), kafka.bootstrap) as gw:
        big = trace_request([span(51, i + 1, name="x" * 1000) for i in range(100)])
        assert big.ByteSize() > limit
        code, _, body = post(gw.http_port, "/v1/traces", big.SerializeToString())
        assert code == 413 and status_of(body).code == code_pb2.RESOURCE_EXHAUSTED
        assert f"the limit is {limit}" in status_of(body).message

        compressed = gzip.compress(big.SerializeToString())
        assert len(compressed) < limit
        code, _, body = post(
            gw.http_port, "/v1/traces", compressed, headers={"Content-Encoding": "gzip"}
        )
        assert code == 413 and "decompressed" in status_of(body).message

        with pytest.raises(grpc.RpcError) as e:
            grpc_traces(gw.grpc_port, big)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        assert post_traces(gw.http_port, trace_request([span(52, 1)])) == 200
        assert gw.stats()["outcome_too_large"] == 2


# ---------------------------------------------------------------------------------------------
# broker slow or down: 503 / UNAVAILABLE, never accept-and-drop
# ---------------------------------------------------------------------------------------------


def test_broker_down_gives_retryable_errors_then_recovers(config: Config, tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_dir=tmp_path / "broker").start()
    topics = ["otlp_spans", "otlp_logs"]
    ensure_topics(broker.bootstrap, topics, 1)
    cfg = gateway_config(config, *topics, ack_timeout_s=2.0, max_inflight_bytes=1)
    req = trace_request([span(61, 1)])
    try:
        with Gateway(cfg, broker.bootstrap) as gw:
            assert post_traces(gw.http_port, req) == 200
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGSTOP)  # frozen: connected, answering nothing

            # one request waits for an ack that cannot come; meanwhile the budget is used up
            first: list[tuple[int, dict[str, str], bytes]] = []
            body = req.SerializeToString()
            waiter = threading.Thread(
                target=lambda: first.append(post(gw.http_port, "/v1/traces", body))
            )
            waiter.start()
            while gw.stats()["inflight_bytes"] == 0 and waiter.is_alive():
                time.sleep(0.01)
            code, headers, resp = post(gw.http_port, "/v1/traces", body)
            assert code == 503 and headers["Retry-After"] == "2"
            assert "buffer full" in status_of(resp).message
            waiter.join()
            code, headers, resp = first[0]
            assert code == 503 and headers["Retry-After"] == "2"
            assert status_of(resp).code == code_pb2.UNAVAILABLE

            with pytest.raises(grpc.RpcError) as e:
                grpc_traces(gw.grpc_port, trace_request([span(62, 1)]))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            trailers = dict(e.value.trailing_metadata())
            details = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            retry = error_details_pb2.RetryInfo()
            assert details.details[0].Unpack(retry) and retry.retry_delay.seconds == 2
            assert (
                error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
                == retry
            )
            assert gw.stats()["outcome_unavailable"] == 3

            # gone: a known-down broker is answered at once, without waiting for an ack
            broker.kill()
            code, headers, resp = post(gw.http_port, "/v1/traces", body)
            assert code == 503 and headers["Retry-After"] == "2"
            assert intake(gw.http_port) == "broker unavailable"  # alive, and says why it refuses

            # a new broker on the same port (memory storage: the old data is gone, that is fine)
            broker = EmbeddedBroker(port=broker.port, log_dir=tmp_path / "broker2").start()
            ensure_topics(broker.bootstrap, topics, 1)
            codes = []
            for _ in range(20):  # what an SDK does: retry after Retry-After
                codes.append(post_traces(gw.http_port, trace_request([span(63, 1)])))
                if codes[-1] == 200:
                    break
                time.sleep(1)
            assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
            assert key(63) in {m.key() for m in read_topic(broker.bootstrap, topics[0], items=1)}
            assert intake(gw.http_port) == "accepting"
    finally:
        broker.stop()


def test_a_paused_intake_answers_503_until_resumed_on_a_new_broker(
    config: Config, tmp_path: Path
) -> None:
    # the stack's broker rotation: pause, replace the broker, resume
    broker = EmbeddedBroker(log_dir=tmp_path / "broker").start()
    topics = ["otlp_spans", "otlp_logs"]
    ensure_topics(broker.bootstrap, topics, 1)
    try:
        with Gateway(gateway_config(config, *topics), broker.bootstrap) as gw:
            assert post_traces(gw.http_port, trace_request([span(71, 1)])) == 200
            assert intake(gw.http_port) == "accepting"
            gw.pause(True)
            assert gw.paused_idle()  # nothing it accepted waits for an acknowledgement
            assert intake(gw.http_port) == "paused"
            body = trace_request([span(72, 1)]).SerializeToString()
            code, headers, resp = post(gw.http_port, "/v1/traces", body)
            assert code == 503 and headers["Retry-After"] == "2"
            assert "intake paused" in status_of(resp).message
            with pytest.raises(grpc.RpcError) as e:
                grpc_traces(gw.grpc_port, trace_request([span(72, 1)]))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

            broker.kill()
            broker = EmbeddedBroker(port=broker.port, log_dir=tmp_path / "broker2").start()
            ensure_topics(broker.bootstrap, topics, 1)
            gw.pause(False)
            assert not gw.paused_idle()
            codes = []
            for _ in range(10):  # an SDK retries after Retry-After
                codes.append(post_traces(gw.http_port, trace_request([span(73, 1)])))
                if codes[-1] == 200:
                    break
                time.sleep(1)
            assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
            assert key(73) in {m.key() for m in read_topic(broker.bootstrap, topics[0], items=1)}
    finally:
        broker.stop()


# ---------------------------------------------------------------------------------------------
# as a process, the way `closeloop up` starts it
# ---------------------------------------------------------------------------------------------


def test_runs_as_a_process_and_stops_on_sigterm(
    kafka: EmbeddedBroker, topics: tuple[str, str], tmp_path: Path
) -> None:
    cfg_file = tmp_path / "closeloop.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"topics": {"otlp_spans": topics[0], "otlp_logs": topics[1]}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "processors.capture.gateway",
            "--config",
            str(cfg_file),
            "--bootstrap",
            kafka.bootstrap,
            "--grpc-port",
            "0",
            "--http-port",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("gateway ready "), line
        http_port = int(line.split("http=")[1].rsplit(":", 1)[1])
        assert post_traces(http_port, trace_request([span(71, 1)])) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "OTLP gateway stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_topic(kafka.bootstrap, topics[0], items=1)[0].key() == key(71)
