"""The gateway under an absent or a frozen (slow) broker answers 503 with Retry-After inside
the OTel SDKs' export timeout (10 s by default), so SDKs back off instead of timing out."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from processors.capture.gateway import Gateway
from processors.config import load_config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.embedded.stack import wait_for

SDK_EXPORT_TIMEOUT_S = 10.0  # OTEL_EXPORTER_OTLP_TIMEOUT's default in every SDK


def one_span(i: int) -> bytes:
    span = Span(trace_id=i.to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"), name="chat")
    req = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    return req.SerializeToString()


def export(port: int, i: int) -> tuple[int, str | None]:
    """Status and Retry-After of one export, as an SDK with its default timeout sees it (a
    timeout raises: that is the failure this test is about)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/traces",
        data=one_span(i),
        headers={"Content-Type": "application/x-protobuf"},
    )
    try:
        with urllib.request.urlopen(req, timeout=SDK_EXPORT_TIMEOUT_S) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Retry-After")


def test_absent_and_frozen_broker_get_503_inside_the_sdk_timeout(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path / "home")})
    cfg.otlp.grpc_port = cfg.otlp.http_port = 0
    broker = EmbeddedBroker(log_dir=tmp_path / "broker").start()
    topics = [cfg.topics.otlp_spans, cfg.topics.otlp_logs]
    ensure_topics(broker.bootstrap, topics, 1)
    gw = Gateway(cfg, broker.bootstrap)
    gw.start()
    try:
        assert export(gw.http_port, 1) == (200, None)

        # frozen: connections stay open, nothing answers (a broker stalled on its disk)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        for i in range(2, 5):
            status, retry_after = export(gw.http_port, i)  # raises TimeoutError if too slow
            assert status == 503 and retry_after is not None, (status, retry_after)
        os.kill(broker.proc.pid, signal.SIGCONT)
        assert wait_for(lambda: export(gw.http_port, 10)[0] == 200, 60)

        # absent: killed, nothing listens on its port
        broker.kill()
        assert wait_for(lambda: export(gw.http_port, 20)[0] == 503, 60)
        for i in range(21, 30):
            status, retry_after = export(gw.http_port, i)
            assert status == 503 and retry_after is not None, (status, retry_after)

        # back on the same port: the gateway lets requests through again by itself
        broker = EmbeddedBroker(port=broker.port, log_dir=tmp_path / "broker2").start()
        ensure_topics(broker.bootstrap, topics, 1)
        assert wait_for(lambda: export(gw.http_port, 40)[0] == 200, 90)
    finally:
        gw.stop()
        broker.stop()
