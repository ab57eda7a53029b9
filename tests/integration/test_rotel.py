"""A collector nobody here wrote (rotel, PyPI ``rotel``) and the gateway write the same records.

The same SDK spans go over OTLP/HTTP to rotel (Kafka exporter, protobuf) and to the gateway;
both topics must hold ``ExportTraceServiceRequest`` protobuf with every span, byte for byte the
same spans and resources. Keys differ: rotel 0.0.1a15 writes records with no key (500 spans of
many traces in one record), the gateway keys one trace per record like otelcol-contrib with
``partition_traces_by_id`` — so the capture stage must not rely on the key (it re-keys by
conversation itself).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from processors.capture.gateway import Gateway
from processors.config import Config
from processors.embedded.broker import EmbeddedBroker, free_port
from processors.embedded.procs import stop_process
from tests.integration.test_gateway import conversation, read_topic

READY_TIMEOUT_S = 15.0


def rotel_binary() -> Path | None:
    spec = importlib.util.find_spec("rotel")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "rotel-agent"
    return path if path.exists() else None


ROTEL = rotel_binary()
pytestmark = pytest.mark.skipif(
    ROTEL is None,
    reason="the rotel PyPI package (rotel-agent binary) is not installed: pip install rotel",
)


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rotel exited with {proc.returncode}: {log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"rotel did not listen on {port}: {log.read_text()}")


@pytest.fixture
def rotel(kafka: EmbeddedBroker, topic_factory, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """rotel-agent on loopback, exporting traces to a fresh topic; yields (http port, topic)."""
    assert ROTEL is not None
    topic = topic_factory("rotel-spans", 1)
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "rotel.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(ROTEL),
                "start",
                "--otlp-grpc-endpoint",
                f"127.0.0.1:{grpc_port}",
                "--otlp-http-endpoint",
                f"127.0.0.1:{http_port}",
                "--exporter",
                "kafka",
                "--kafka-exporter-brokers",
                kafka.bootstrap,
                "--kafka-exporter-traces-topic",
                topic,
                "--kafka-exporter-format",
                "protobuf",
                "--pid-file",
                str(tmp_path / "rotel.pid"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_listening(http_port, proc, log)
        yield http_port, topic
    finally:
        stop_process(proc, 10)


def test_rotel_and_the_gateway_write_the_same_spans(
    kafka: EmbeddedBroker, rotel: tuple[int, str], config: Config, topic_factory
) -> None:
    rotel_port, rotel_topic = rotel
    config.otlp.grpc_port = config.otlp.http_port = 0
    config.topics.otlp_spans = topic_factory("gw-spans", 2)
    config.topics.otlp_logs = topic_factory("gw-logs", 1)
    with Gateway(config, kafka.bootstrap) as gw:
        tp = TracerProvider(resource=Resource.create({"service.name": "support-agent"}))
        for port in (rotel_port, gw.http_port):  # the same spans to both collectors
            tp.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"),
                    schedule_delay_millis=100,
                )
            )
        tracer = tp.get_tracer("closeloop.test.agent", "1.0")
        for c in range(4):
            conversation(tracer, f"conv-{c}", turns=2)
        assert tp.force_flush(30_000)
        tp.shutdown()
    n_spans = 4 * (1 + 2 * 2)

    def spans_and_resources(topic: str) -> tuple[list[bytes], set[bytes], list]:
        messages = read_topic(kafka.bootstrap, topic, items=n_spans)
        spans, resources = [], set()
        for m in messages:
            req = ExportTraceServiceRequest.FromString(m.value())  # both are otlp protobuf
            for rs in req.resource_spans:
                resources.add(rs.resource.SerializeToString())
                for ss in rs.scope_spans:
                    assert (ss.scope.name, ss.scope.version) == ("closeloop.test.agent", "1.0")
                    spans += [s.SerializeToString() for s in ss.spans]
        return sorted(spans), resources, messages

    rotel_spans, rotel_resources, rotel_messages = spans_and_resources(rotel_topic)
    gw_spans, gw_resources, gw_messages = spans_and_resources(config.topics.otlp_spans)
    assert len(rotel_spans) == len(gw_spans) == n_spans
    assert rotel_spans == gw_spans  # byte-identical spans
    assert rotel_resources == gw_resources and len(gw_resources) == 1
    assert {m.key() for m in rotel_messages} <= {None, b""}  # rotel: no key
    assert len(gw_messages) == 4  # gateway: one per trace
    assert all(m.key() and len(m.key()) == 32 for m in gw_messages)
