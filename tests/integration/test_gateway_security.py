"""The OTLP gateway as an attacker tries it: the real gateway (HTTP and gRPC) and a real broker.

Bearer-token authentication when configured (the OTel SDK's exporters with
OTEL_EXPORTER_OTLP_HEADERS still get through), nesting depth bounded with a clean 400 (no
RecursionError, no silence), undecodable gRPC requests answered INVALID_ARGUMENT, unsupported
encodings 415; and valid requests still accepted.
"""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processors.capture.gateway import JSON, MAX_JSON_DEPTH, PROTOBUF, Gateway, json_depth
from processors.config import Config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from tests.reliability.test_bad_input import too_deep

from .test_gateway import span, status_of, trace_request

TOKEN = "otlp-token-" + "9" * 24


@pytest.fixture(scope="module")
def topics(kafka: EmbeddedBroker) -> Config:
    cfg = Config()
    cfg.otlp.grpc_port = cfg.otlp.http_port = 0
    ensure_topics(kafka.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
    return cfg


@pytest.fixture(scope="module")
def open_gw(kafka: EmbeddedBroker, topics: Config) -> Iterator[Gateway]:
    with Gateway(topics, kafka.bootstrap) as gw:
        yield gw


@pytest.fixture(scope="module")
def locked_gw(kafka: EmbeddedBroker) -> Iterator[Gateway]:
    cfg = Config()
    cfg.otlp.grpc_port = cfg.otlp.http_port = 0
    cfg.otlp.bearer_token = TOKEN
    with Gateway(cfg, kafka.bootstrap) as gw:
        yield gw


def post(
    gw: Gateway, body: bytes, ctype: str = PROTOBUF, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/traces", body=body, headers={"Content-Type": ctype, **(headers or {})}
        )
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def valid() -> bytes:
    return trace_request([span(1, 1)]).SerializeToString()


# -- bearer token ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer"],
)
def test_http_without_the_token_gets_401(locked_gw: Gateway, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    status, body = post(locked_gw, valid(), headers=headers)
    assert status == 401
    assert status_of(body).code == 16  # UNAUTHENTICATED
    assert post(locked_gw, valid(), headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_grpc_without_the_token_is_unauthenticated(locked_gw: Gateway) -> None:
    req = trace_request([span(2, 1)])
    with grpc.insecure_channel(f"127.0.0.1:{locked_gw.grpc_port}") as ch:
        stub = trace_service_pb2_grpc.TraceServiceStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Export(req, timeout=30, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Export(req, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert isinstance(ok, trace_service_pb2.ExportTraceServiceResponse)
    assert locked_gw.stats()["outcome_unauthorized"] >= 2


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_sdk_exporters_with_the_documented_header_get_through(
    locked_gw: Gateway, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What docs/agent-authors.md tells an agent to set: OTEL_EXPORTER_OTLP_HEADERS."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"authorization=Bearer {TOKEN}")
    exporter = (
        HttpSpanExporter(endpoint=f"http://127.0.0.1:{locked_gw.http_port}/v1/traces")
        if transport == "http"
        else GrpcSpanExporter(endpoint=f"127.0.0.1:{locked_gw.grpc_port}", insecure=True)
    )
    memory = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(memory))
    with tp.get_tracer("t").start_as_current_span("chat"):
        pass
    assert exporter.export(memory.get_finished_spans()).name == "SUCCESS"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer wrong")
    wrong = (
        HttpSpanExporter(endpoint=f"http://127.0.0.1:{locked_gw.http_port}/v1/traces")
        if transport == "http"
        else GrpcSpanExporter(endpoint=f"127.0.0.1:{locked_gw.grpc_port}", insecure=True)
    )
    assert wrong.export(memory.get_finished_spans()).name == "FAILURE"
    tp.shutdown()


# -- nesting depth ------------------------------------------------------------------------------


def test_deep_json_gets_a_clean_400(open_gw: Gateway) -> None:
    for body in (
        b"[" * 50_000,
        b"{" * 50_000,
        json.dumps({"resourceSpans": [{"x": 0}]}).encode().replace(b"0", b"[" * 5000 + b"]" * 5000),
        b'{"resourceSpans": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ):
        status, reply = post(open_gw, body, JSON)
        assert status == 400, (status, reply[:200])
        assert "nested" in json.loads(reply)["message"]
    assert json_depth(b'{"a": "[[[[[[", "b": [1, {"c": []}]}') == 4  # brackets in strings ignored
    ok = json.dumps(
        {
            "resourceSpans": [
                {
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": "0" * 31 + "1",
                                    "spanId": "0" * 15 + "1",
                                    "name": "chat",
                                }
                            ]
                        }
                    ]
                }
            ]
        }
    ).encode()
    assert json_depth(ok) < MAX_JSON_DEPTH
    assert post(open_gw, ok, JSON)[0] == 200


def test_deep_protobuf_gets_a_clean_400(open_gw: Gateway) -> None:
    status, body = post(open_gw, too_deep(0xB1, 5000))
    assert status == 400 and status_of(body).code == 3  # INVALID_ARGUMENT


# -- undecodable gRPC, unsupported encodings ----------------------------------------------------


def test_undecodable_grpc_request_is_invalid_argument(open_gw: Gateway) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{open_gw.grpc_port}") as ch:
        raw = ch.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        for garbage in (b"\x07\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05abc"):
            with pytest.raises(grpc.RpcError) as e:
                raw(garbage, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert isinstance(raw(valid(), timeout=30), trace_service_pb2.ExportTraceServiceResponse)


@pytest.mark.parametrize("encoding", ["br", "zstd", "deflate", "compress"])
def test_unsupported_content_encoding_is_415(open_gw: Gateway, encoding: str) -> None:
    status, body = post(open_gw, valid(), headers={"Content-Encoding": encoding})
    assert status == 415 and "Content-Encoding" in status_of(body).message
    assert post(open_gw, gzip.compress(valid()), headers={"Content-Encoding": "gzip"})[0] == 200
