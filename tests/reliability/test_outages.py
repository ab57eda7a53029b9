"""Outages: the broker, ClickHouse or the LLM goes away under load; nothing acknowledged is lost,
nothing is written twice, the pipeline does not stall."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from examples.support_agent import init_agent_repo, run_cycle
from processors.capture.gateway import Gateway
from processors.config import load_config
from processors.credentials import ensure_sql_credentials
from processors.embedded.broker import EmbeddedBroker, committed_offsets, ensure_topics
from processors.embedded.sqlserver import SQLServer
from processors.embedded.stack import wait_for
from processors.stages import app_id
from processors.store import Store
from tests.integration.pipeline import running_pipeline
from tests.llm_server import FakeLLMServer

from .harness import read_topic

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = float(os.environ.get("RELIABILITY_OUTAGE_S", "30"))
SPANS_PER_S = 200


# -- broker down under an OTel SDK ---------------------------------------------------------------


@dataclass
class Export:
    span_ids: list[int]
    started: float
    ended: float
    ok: bool


@dataclass
class RecordingExporter(SpanExporter):
    """The SDK's OTLP/HTTP exporter, with each export's spans, times and result recorded."""

    inner: OTLPSpanExporter
    exports: list[Export] = field(default_factory=list)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        t0 = time.monotonic()
        result = self.inner.export(spans)
        self.exports.append(
            Export(
                [s.context.span_id for s in spans],
                t0,
                time.monotonic(),
                result == SpanExportResult.SUCCESS,
            )
        )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


def stored_span_ids(bootstrap: str, topic: str) -> set[int]:
    out: set[int] = set()
    for value in read_topic(bootstrap, topic):
        req = ExportTraceServiceRequest.FromString(value)
        out |= {
            int.from_bytes(s.span_id, "big")
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        }
    return out


def test_broker_outage_under_an_sdk_exporter_loses_nothing_acknowledged(
    tmp_path: Path, record_property
) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path / "home")})
    cfg.otlp.grpc_port = cfg.otlp.http_port = 0
    cfg.otlp.ack_timeout_s = (
        2.0  # with Retry-After 2 s: ~24 s of SDK retries (6 attempts) per export
    )
    topics = [cfg.topics.otlp_spans, cfg.topics.otlp_logs]
    broker = EmbeddedBroker(log_dir=tmp_path / "broker").start()
    ensure_topics(broker.bootstrap, topics, 1)
    gw = Gateway(cfg, broker.bootstrap)
    gw.start()
    rec = RecordingExporter(
        OTLPSpanExporter(endpoint=f"http://127.0.0.1:{gw.http_port}/v1/traces", timeout=60)
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "outage"}))
    provider.add_span_processor(
        BatchSpanProcessor(rec, max_queue_size=200_000, schedule_delay_millis=200)
    )
    tracer = provider.get_tracer("reliability")
    stop = threading.Event()
    sent = [0]

    def load() -> None:  # a steady agent: SPANS_PER_S spans a second until told to stop
        while not stop.is_set():
            for _ in range(SPANS_PER_S // 10):
                with tracer.start_as_current_span(
                    "chat", attributes={"gen_ai.conversation.id": f"c{sent[0] // 7}"}
                ):
                    sent[0] += 1
            time.sleep(0.1)

    sender = threading.Thread(target=load, daemon=True)
    try:
        sender.start()
        time.sleep(4)
        t_down = time.monotonic()
        broker.kill()
        time.sleep(OUTAGE_S)
        broker = EmbeddedBroker(port=broker.port, log_dir=tmp_path / "broker2").start()
        ensure_topics(broker.bootstrap, topics, 1)
        t_up = time.monotonic()
        time.sleep(4)
        stop.set()
        sender.join()
        assert provider.force_flush(90_000)
        stored = stored_span_ids(broker.bootstrap, cfg.topics.otlp_spans)
        stats = gw.stats()
    finally:
        stop.set()
        provider.shutdown()
        gw.stop()
        broker.stop()
    acked = [e for e in rec.exports if e.ok]
    after = [e for e in acked if e.ended > t_up]
    # the gateway refused while the broker was away, and acknowledged nothing then
    assert stats["outcome_unavailable"] > 0
    assert not [e for e in acked if t_down + 1.5 < e.ended < t_up], (
        "acknowledged while the broker was down"
    )
    # the SDK retried: exports begun during the outage were acknowledged once the broker was back
    assert [e for e in after if e.started < t_up], "no export survived the outage by retrying"
    # every span acknowledged after the broker returned is stored (before it, memory storage died with it)
    acked_after = {i for e in after for i in e.span_ids}
    assert acked_after and acked_after <= stored, (
        f"{len(acked_after - stored)} acknowledged spans lost"
    )
    record_property("spans_sent", sent[0])
    record_property("spans_acknowledged", sum(len(e.span_ids) for e in acked))
    record_property("spans_acknowledged_after_restart", len(acked_after))
    record_property("spans_stored_of_those", len(acked_after & stored))
    record_property("gateway_503", stats["outcome_unavailable"])


# -- ClickHouse unreachable for the worker ---------------------------------------------------------


class SwitchableProxy:
    """A ClickHouse HTTP endpoint in front of a real one that answers 503 while ``down`` is set."""

    def __init__(self, target_port: int) -> None:
        self.down = threading.Event()
        self.refused = 0
        # what ClickHouse answers while down (a server that cannot take writes: disk full...)
        self.answer = (503, b"Code: 210. DB::Exception: the test switched ClickHouse off\n")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []  # clickhouse-connect streams inserts chunked
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)

            def _forward(self) -> None:
                body = self._body()
                if proxy.down.is_set():
                    proxy.refused += 1
                    status, data = proxy.answer
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower()
                    not in ("host", "connection", "transfer-encoding", "content-length")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def otlp_message(trace: int, spans: int, tag: str) -> bytes:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for k in range(spans):
        s = Span(
            trace_id=trace.to_bytes(16, "big"),
            span_id=(trace * 1000 + k + 1).to_bytes(8, "big"),
            name="chat",
            start_time_unix_nano=time.time_ns(),
            end_time_unix_nano=time.time_ns() + 1000,
        )
        a = s.attributes.add()
        a.key, a.value.string_value = "gen_ai.conversation.id", f"{tag}-{trace}"
        ss.spans.append(s)
    return req.SerializeToString()


@pytest.fixture
def proxied_store(store: Store, tmp_path: Path) -> Iterator[SwitchableProxy]:
    creds = ensure_sql_credentials(tmp_path / "sql-run")
    server = SQLServer(store, creds).start()
    proxy = SwitchableProxy(server.port)
    writer = creds.writer
    proxy.url = proxy.url.replace("://", f"://{writer.user}:{writer.password}@", 1)
    yield proxy
    proxy.close()
    server.stop()


def test_clickhouse_outage_pauses_the_stage_and_every_row_arrives_once(
    tmp_path: Path, store: Store, proxied_store: SwitchableProxy, unique: str
) -> None:
    proxy = proxied_store
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path / "home")})
    per_phase, spans = 20, 10
    count = f"SELECT count() FROM spans WHERE startsWith(conversation_id, '{unique}-')"
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        env = {
            **os.environ,
            "CLOSELOOP_HOME": str(tmp_path / "home"),
            "CLOSELOOP_CLICKHOUSE": proxy.url,
            "PYTHONPATH": str(REPO),
        }
        log = tmp_path / "worker.log"
        with open(log, "ab") as out:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "processors.worker",
                    "--bootstrap",
                    broker.bootstrap,
                    "--stages",
                    "capture",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})

        def produce(first: int) -> None:
            for t in range(first, first + per_phase):
                producer.produce(
                    cfg.topics.otlp_spans,
                    key=f"{t:032x}".encode(),
                    value=otlp_message(t, spans, unique),
                )
            producer.flush()

        try:
            produce(1)
            assert wait_for(lambda: store.scalar(count) == per_phase * spans, 120), log.read_text()[
                -3000:
            ]
            proxy.down.set()
            produce(1 + per_phase)
            assert wait_for(lambda: proxy.refused >= 3, 60)
            time.sleep(4)  # several retries and commit intervals while ClickHouse is away
            parts = [(cfg.topics.otlp_spans, p) for p in range(cfg.kafka.partitions)]
            committed = sum(
                max(o, 0)
                for o in committed_offsets(broker.bootstrap, app_id(("capture",)), parts).values()
            )
            assert store.scalar(count) == per_phase * spans  # nothing written while down
            assert committed <= per_phase, (
                f"offsets committed past unwritten rows: {committed} > {per_phase}"
            )
            assert worker.poll() is None, "the worker died instead of waiting for ClickHouse"
            proxy.down.clear()
            assert wait_for(lambda: store.scalar(count) >= 2 * per_phase * spans, 120)
            time.sleep(2)
            total = store.scalar(count)
            distinct = store.scalar(
                f"SELECT uniqExact(span_id) FROM spans WHERE startsWith(conversation_id, "
                f"'{unique}-')"
            )
        finally:
            worker.terminate()
            worker.wait(30)
    assert total == distinct == 2 * per_phase * spans, (total, distinct)
    assert "retrying" in log.read_text()


STORE_STATES = {  # what a ClickHouse server answers when it cannot take writes
    "disk_full": b"Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)",
    "read_only": b"Code: 242. DB::Exception: Table is in readonly mode. (TABLE_IS_READ_ONLY)",
    "timeout": b"Code: 159. DB::Exception: Timeout exceeded: elapsed 30.1 seconds. (TIMEOUT_EXCEEDED)",
}


@pytest.mark.parametrize("state", sorted(STORE_STATES))
def test_a_store_that_cannot_write_is_waited_for_not_dead_lettered(
    tmp_path: Path, store: Store, proxied_store: SwitchableProxy, unique: str, state: str
) -> None:
    """Disk full, read-only, a timeout: the store's state, not bad data. The stage retries
    with its offsets in place and says why (`closeloop status`); nothing is dead-lettered."""
    from processors.status import store_waits

    proxy = proxied_store
    proxy.answer = (500, STORE_STATES[state])
    home = tmp_path / "home"
    cfg = load_config(None, env={}, overrides={"home": str(home)})
    count = f"SELECT count() FROM spans WHERE startsWith(conversation_id, '{unique}-')"
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        env = {**os.environ, "CLOSELOOP_HOME": str(home), "CLOSELOOP_CLICKHOUSE": proxy.url}
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "processors.worker", "--bootstrap", broker.bootstrap]
            + ["--stages", "capture"],
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
        )
        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})

        def produce(traces: range) -> None:
            for t in traces:
                producer.produce(
                    cfg.topics.otlp_spans,
                    key=f"{t:032x}".encode(),
                    value=otlp_message(t, 5, unique),
                )
            producer.flush()

        try:
            produce(range(1, 2))  # the worker is up and writing
            assert wait_for(lambda: store.scalar(count) == 5, 120), log.read_text()[-3000:]
            proxy.down.set()
            produce(range(2, 11))
            assert wait_for(lambda: proxy.refused >= 6, 120), log.read_text()[-3000:]
            waits = wait_for(lambda: store_waits(cfg), 60)
            assert waits and waits[0]["stage"] == "capture", waits
            assert STORE_STATES[state].split(b".")[0].decode() in waits[0]["why"], waits
            assert worker.poll() is None, "the worker died instead of waiting for the store"
            proxy.down.clear()
            assert wait_for(lambda: store.scalar(count) >= 50, 120), log.read_text()[-3000:]
            assert wait_for(lambda: not store_waits(cfg), 60)  # the wait is over, and says so
        finally:
            worker.terminate()
            worker.wait(30)
    assert (
        store.scalar(
            f"SELECT uniqExact(span_id) FROM spans WHERE startsWith(conversation_id, '{unique}-')"
        )
        == 50
    )
    assert (
        store.scalar(
            "SELECT count() FROM deadletter WHERE stage = 'capture' AND detail LIKE '%Code: 24%'"
        )
        == 0
    )
    assert "dead-lettered" not in log.read_text()


# -- the LLM fails or hangs ------------------------------------------------------------------------


@dataclass
class FlakyLLM:
    mode: str = "error"  # error: HTTP 500 | slow: answers after the client gave up
    seen: dict[str, int] = field(default_factory=lambda: {"error": 0, "slow": 0})

    def __call__(self, body: dict[str, Any]) -> Any:
        self.seen[self.mode] += 1
        if self.mode == "slow":
            time.sleep(2.0)
            return '{"tags": [], "outcome": "resolved"}'
        return 500, {"error": {"message": "the model is down"}}


def test_failing_or_slow_llm_falls_back_without_stalling(tmp_path: Path) -> None:
    flaky = FlakyLLM()
    repo = tmp_path / "repo"
    init_agent_repo(repo)
    n = 60
    with FakeLLMServer(flaky) as llm:
        env = {
            "CLOSELOOP_LLM_BASE_URL": llm.base_url,
            "CLOSELOOP_LLM_TIMEOUT_S": "0.5",
            "CLOSELOOP_LLM_MAX_RETRIES": "0",
            "CLOSELOOP_LLM_JUDGE_RATE": "1.0",
            "CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "3",
        }
        with running_pipeline(tmp_path, stages="capture,assemble,understand", env=env) as pipe:
            endpoint = f"http://127.0.0.1:{pipe.gateway.http_port}"
            for k, mode in enumerate(("error", "slow")):
                flaky.mode = mode
                run_cycle(repo, endpoint, n=n, seed=10 + k, mode="scripted")
                got = pipe.wait_value(
                    "SELECT count() FROM conversation_tags FINAL", (k + 1) * n, timeout_s=150
                )
                assert got == (k + 1) * n, (
                    f"{mode} LLM: {got} of {(k + 1) * n} conversations tagged"
                )
            log = pipe.worker_log()
    assert flaky.seen["error"] >= 1 and flaky.seen["slow"] >= 1, flaky.seen
    assert "Traceback" not in log
