"""Layer 1 through the real parts: OTel SDK or rotel -> gateway/tansu -> worker capture -> chDB.

One pipeline for the module (broker, worker process, in-process gateway). Each test sends
its own conversations under its own ids, so the tests do not depend on each other; the
replay and kill -9 tests restart the worker and go last.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from opentelemetry._logs import LogRecord
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span as TraceSpan
from opentelemetry.trace import Status, StatusCode, Tracer

from processors.embedded.broker import free_port
from processors.embedded.procs import stop_process
from tests.reliability.harness import read_topic as read_topic_values

from .pipeline import Pipeline, running_pipeline, wait_for
from .test_rotel import ROTEL, wait_listening

SERVICE = "support-agent"
EXPLICIT_VERSION = "support-v7"
SPANS_PER_CONVERSATION = 5  # invoke_agent, chat, execute_tool x2, chat
FLUSH_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("capture-pipeline")) as p:
        yield p


# ---------------------------------------------------------------------------------------------
# An instrumented support conversation, GenAI semantic conventions, made with the OTel SDK
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """What the agent says and does in one conversation (the canary test plants secrets here)."""

    system: str = "You are Acme's support agent. Answer briefly."
    user: str = "Where is my order A-17?"
    lookup_args: dict[str, Any] = field(default_factory=lambda: {"order_id": "A-17"})
    lookup_result: str = '{"status": "shipped", "carrier": "DHL"}'
    refund_args: dict[str, Any] = field(
        default_factory=lambda: {"order_id": "A-17", "amount": 12.5}
    )
    refund_error: str = "refund service timed out"
    answer: str = "Order A-17 shipped with DHL; refunds are down, please retry later."


def _text(content: str) -> list[dict[str, str]]:
    return [{"type": "text", "content": content}]


def _calls(s: Script) -> list[dict[str, Any]]:
    return [
        {"type": "tool_call", "id": "call_1", "name": "lookup_order", "arguments": s.lookup_args},
        {"type": "tool_call", "id": "call_2", "name": "refund_order", "arguments": s.refund_args},
    ]


def support_conversation(
    tracer: Tracer, conv: str, s: Script = Script(), *, prompt_version: str | None = None
) -> str:
    """One agent invocation: a chat asking for two tools, the tools (one fails), a final chat.
    Returns the trace id (hex)."""

    def chat(
        name: str,
        inputs: list[dict[str, Any]],
        outputs: list[dict[str, Any]],
        tokens: tuple[int, int],
    ) -> None:
        with tracer.start_as_current_span(name) as sp:
            sp.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                    "gen_ai.conversation.id": conv,
                    "gen_ai.usage.input_tokens": tokens[0],
                    "gen_ai.usage.output_tokens": tokens[1],
                    "gen_ai.system_instructions": json.dumps(_text(s.system)),
                    "gen_ai.input.messages": json.dumps(inputs),
                    "gen_ai.output.messages": json.dumps(outputs),
                }
            )
            if prompt_version:
                sp.set_attribute("gen_ai.prompt.version", prompt_version)

    def tool(name: str, call_id: str, args: dict[str, Any]) -> TraceSpan:
        sp = tracer.start_span(f"execute_tool {name}")
        sp.set_attributes(
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id,
                "gen_ai.conversation.id": conv,
                "gen_ai.tool.call.arguments": json.dumps(args),
            }
        )
        return sp

    user = {"role": "user", "parts": _text(s.user)}
    asks = {"role": "assistant", "parts": _calls(s)}
    with tracer.start_as_current_span("invoke_agent support-bot") as root:
        root.set_attributes(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "support-bot",
                "gen_ai.agent.version": "2.3.0",
                "gen_ai.conversation.id": conv,
            }
        )
        chat("chat gpt-4o-mini", [user], [asks], (120, 18))
        lookup = tool("lookup_order", "call_1", s.lookup_args)
        lookup.set_attribute("gen_ai.tool.call.result", s.lookup_result)
        lookup.end()
        refund = tool("refund_order", "call_2", s.refund_args)
        refund.set_attribute("error.type", "TimeoutError")
        refund.record_exception(TimeoutError(s.refund_error))
        refund.set_status(Status(StatusCode.ERROR, s.refund_error))
        refund.end()
        results = {
            "role": "tool",
            "parts": [
                {"type": "tool_call_response", "id": "call_1", "response": s.lookup_result},
                {"type": "tool_call_response", "id": "call_2", "response": s.refund_error},
            ],
        }
        chat(
            "chat gpt-4o-mini",
            [user, asks, results],
            [{"role": "assistant", "parts": _text(s.answer), "finish_reason": "stop"}],
            (260, 31),
        )
        return format(root.get_span_context().trace_id, "032x")


def send(exporter: SpanExporter, conversations: list[tuple[str, str | None]]) -> dict[str, str]:
    """Export ``(conversation id, prompt version)`` conversations; ``{conversation id: trace id}``."""
    tp = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    tp.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    tracer = tp.get_tracer("acme.support", "1.0")
    traces = {c: support_conversation(tracer, c, prompt_version=v) for c, v in conversations}
    assert tp.force_flush(FLUSH_TIMEOUT_MS)
    tp.shutdown()
    return traces


# ---------------------------------------------------------------------------------------------
# What capture must store for such a conversation
# ---------------------------------------------------------------------------------------------


def expected_turns(s: Script, prompt_version: str) -> list[dict[str, Any]]:
    """The ``turns`` rows in start order (messages without their timestamps)."""
    args = json.dumps(s.lookup_args), json.dumps(s.refund_args)
    user = {"role": "user", "content": s.user}
    asks = [
        {
            "role": "assistant",
            "content": "",
            "tool_name": "lookup_order",
            "tool_call_id": "call_1",
            "tool_arguments": args[0],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_name": "refund_order",
            "tool_call_id": "call_2",
            "tool_arguments": args[1],
        },
    ]
    results = [
        {"role": "tool", "content": s.lookup_result, "tool_call_id": "call_1"},
        {"role": "tool", "content": s.refund_error, "tool_call_id": "call_2"},
    ]
    llm = dict(
        span_kind="llm",
        operation="chat",
        provider="openai",
        request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        agent_name="",
        agent_version="",
        prompt_version=prompt_version,
        system_instructions=s.system,
        status="ok",
        error_type="",
        error_message="",
    )
    tool = dict(
        llm,
        span_kind="tool",
        operation="execute_tool",
        provider="",
        request_model="",
        response_model="",
        prompt_version="",
        system_instructions="",
        input_messages=[],
        output_messages=[],
        input_tokens=0,
        output_tokens=0,
    )
    return [
        dict(
            tool,
            span_kind="agent",
            operation="invoke_agent",
            agent_name="support-bot",
            agent_version="2.3.0",
        ),
        dict(llm, input_messages=[user], output_messages=asks, input_tokens=120, output_tokens=18),
        tool,
        dict(tool, status="error", error_type="TimeoutError", error_message=s.refund_error),
        dict(
            llm,
            input_messages=[user, *asks, *results],
            output_messages=[{"role": "assistant", "content": s.answer}],
            input_tokens=260,
            output_tokens=31,
        ),
    ]


def expected_tool_calls(s: Script) -> list[dict[str, Any]]:
    return [
        dict(
            call_id="call_1",
            name="lookup_order",
            arguments=json.dumps(s.lookup_args),
            result=s.lookup_result,
            error_type="",
            error_message="",
        ),
        dict(
            call_id="call_2",
            name="refund_order",
            arguments=json.dumps(s.refund_args),
            result="",
            error_type="TimeoutError",
            error_message=s.refund_error,
        ),
    ]


TURN_COLUMNS = (
    "span_kind, operation, provider, request_model, response_model, agent_name, "
    "agent_version, prompt_version, system_instructions, input_messages, "
    "output_messages, input_tokens, output_tokens, status, error_type, error_message"
)


def stored_turns(pipe: Pipeline, conv: str) -> list[dict[str, Any]]:
    rows = pipe.wait_rows(
        f"SELECT {TURN_COLUMNS} FROM turns FINAL WHERE conversation_id = {{c:String}} "
        "ORDER BY start_ns, span_id",
        SPANS_PER_CONVERSATION,
        {"c": conv},
    )
    for r in rows:
        for k in ("input_messages", "output_messages"):
            r[k] = [{f: v for f, v in m.items() if f != "ts_ns"} for m in json.loads(r[k])]
    return rows


def stored_tool_calls(pipe: Pipeline, conv: str) -> list[dict[str, Any]]:
    return pipe.wait_rows(
        "SELECT call_id, name, arguments, result, error_type, error_message "
        "FROM tool_calls FINAL WHERE conversation_id = {c:String} ORDER BY call_id",
        2,
        {"c": conv},
    )


def stored_spans(pipe: Pipeline, trace_id: str) -> list[dict[str, Any]]:
    return pipe.wait_rows(
        "SELECT * FROM spans FINAL WHERE trace_id = {t:String} ORDER BY start_ns, span_id",
        SPANS_PER_CONVERSATION,
        {"t": trace_id},
    )


def hash_version(system: str) -> str:
    """The fallback prompt version: 12 hex digits of sha256 of the system instructions."""
    return hashlib.sha256(system.encode()).hexdigest()[:12]


def assert_captured(
    pipe: Pipeline, conv: str, trace_id: str, prompt_version: str, s: Script = Script()
) -> None:
    spans = stored_spans(pipe, trace_id)
    assert len(spans) == SPANS_PER_CONVERSATION
    assert {r["conversation_id"] for r in spans} == {conv}
    assert [r["name"] for r in spans] == [
        "invoke_agent support-bot",
        "chat gpt-4o-mini",
        "execute_tool lookup_order",
        "execute_tool refund_order",
        "chat gpt-4o-mini",
    ]
    refund = spans[3]
    assert (refund["status_code"], refund["status_message"]) == ("ERROR", s.refund_error)
    assert [e["name"] for e in json.loads(refund["events"])] == ["exception"]
    assert spans[0]["resource_attributes"]["service.name"] == SERVICE
    assert spans[1]["attributes"]["gen_ai.usage.input_tokens"] == "120"
    assert stored_turns(pipe, conv) == expected_turns(s, prompt_version)
    assert stored_tool_calls(pipe, conv) == expected_tool_calls(s)


# ---------------------------------------------------------------------------------------------
# 1. OTel SDK over OTLP/gRPC and OTLP/HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_sdk_conversations_are_captured(pipe: Pipeline, transport: str) -> None:
    exporter = (
        GrpcSpanExporter(endpoint=pipe.grpc_endpoint, insecure=True)
        if transport == "grpc"
        else HttpSpanExporter(endpoint=pipe.http_url())
    )
    u = uuid.uuid4().hex[:8]
    explicit, hashed = f"conv-{transport}-explicit-{u}", f"conv-{transport}-hashed-{u}"
    traces = send(exporter, [(explicit, EXPLICIT_VERSION), (hashed, None)])
    assert_captured(pipe, explicit, traces[explicit], EXPLICIT_VERSION)
    assert_captured(pipe, hashed, traces[hashed], hash_version(Script().system))


# ---------------------------------------------------------------------------------------------
# 2. rotel (a collector nobody here wrote) -> its Kafka exporter -> the same rows
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def rotel_http_port(pipe: Pipeline, tmp_path: Path) -> Iterator[int]:
    """rotel-agent exporting traces into the pipeline's ``otlp_spans`` topic."""
    if ROTEL is None:
        pytest.skip(
            "the rotel PyPI package (rotel-agent binary) is not installed: pip install rotel"
        )
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
                pipe.broker.bootstrap,
                "--kafka-exporter-traces-topic",
                pipe.cfg.topics.otlp_spans,
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
        yield http_port
    finally:
        stop_process(proc, 10)


_PER_ROUTE = {
    "trace_id",
    "span_id",
    "parent_span_id",
    "conversation_id",
    "start_ns",
    "end_ns",
    "duration_ms",
    "ingested_ns",
}


def _route_free(row: dict[str, Any]) -> dict[str, Any]:
    """A ``spans`` row without what differs between two sends of the same conversation."""
    out = {k: v for k, v in row.items() if k not in _PER_ROUTE}
    out["attributes"] = {
        k: v for k, v in row["attributes"].items() if k != "gen_ai.conversation.id"
    }
    out["events"] = [
        {k: v for k, v in e.items() if k != "time_ns"} for e in json.loads(row["events"])
    ]
    return out


def test_rotel_kafka_exporter_gives_the_same_rows(pipe: Pipeline, rotel_http_port: int) -> None:
    u = uuid.uuid4().hex[:8]
    via_rotel, via_gateway = f"conv-rotel-{u}", f"conv-gateway-{u}"
    rotel = send(
        HttpSpanExporter(endpoint=f"http://127.0.0.1:{rotel_http_port}/v1/traces"),
        [(via_rotel, EXPLICIT_VERSION)],
    )
    gateway = send(HttpSpanExporter(endpoint=pipe.http_url()), [(via_gateway, EXPLICIT_VERSION)])
    assert_captured(pipe, via_rotel, rotel[via_rotel], EXPLICIT_VERSION)
    assert [_route_free(r) for r in stored_spans(pipe, rotel[via_rotel])] == [
        _route_free(r) for r in stored_spans(pipe, gateway[via_gateway])
    ]
    assert stored_turns(pipe, via_rotel) == stored_turns(pipe, via_gateway)
    assert stored_tool_calls(pipe, via_rotel) == stored_tool_calls(pipe, via_gateway)


# ---------------------------------------------------------------------------------------------
# 4. Redaction canaries never reach ClickHouse, the turns topic or the worker's log
# ---------------------------------------------------------------------------------------------

KEY = "sk-proj-Zq8vN3kT5wY1rB7mC2xL9pD4hF6jG0sA"
EMAIL = "leak.canary@example.org"
CARD = "5555 5555 5555 4444"  # Luhn-valid (a Mastercard test number)
PHONE = "+1 415 555 0132"
CANARIES = [
    KEY,
    KEY.removeprefix("sk-proj-"),
    EMAIL,
    "leak.canary",
    CARD,
    CARD.replace(" ", ""),
    "5555-5555-5555-4444",
    PHONE,
    "415 555 0132",
]
CANARY_SCRIPT = Script(
    system="You are Acme's support agent.",
    user=f"My key is {KEY}, mail {EMAIL} or call {PHONE}; card {CARD}.",
    lookup_args={"order_id": "A-17", "email": EMAIL, "card": CARD.replace(" ", "")},
    lookup_result=json.dumps({"status": "shipped", "contact": PHONE, "api_key": KEY}),
    refund_args={"card": CARD.replace(" ", "-"), "note": f"ask {EMAIL}"},
    refund_error=f"card {CARD} declined; call {PHONE} or write to {EMAIL} (key {KEY})",
    answer="Your order shipped.",
)


def _leaks(text: str) -> list[str]:
    return [c for c in CANARIES if c in text]


def test_canaries_never_stored_or_logged(pipe: Pipeline) -> None:
    conv = f"conv-canary-{uuid.uuid4().hex[:8]}"
    s = CANARY_SCRIPT
    resource = Resource.create({"service.name": SERVICE, "enduser.email": EMAIL})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(
        BatchSpanProcessor(HttpSpanExporter(endpoint=pipe.http_url()), schedule_delay_millis=50)
    )
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(
        BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=pipe.http_url("/v1/logs")), schedule_delay_millis=50
        )
    )
    tracer = tp.get_tracer("acme.support", "1.0")
    with tracer.start_as_current_span("chat gpt-4o-mini") as content_span:
        # message content on the logs signal too, as instrumentations emit it
        lp.get_logger("acme.support").emit(
            LogRecord(
                event_name="gen_ai.client.inference.operation.details",
                attributes={
                    "gen_ai.conversation.id": conv,
                    "gen_ai.input.messages": json.dumps([{"role": "user", "parts": _text(s.user)}]),
                    "gen_ai.output.messages": json.dumps(
                        [{"role": "assistant", "parts": _text(f"I mailed {EMAIL}")}]
                    ),
                },
            )
        )
    content_span_id = format(content_span.get_span_context().span_id, "016x")
    trace_id = support_conversation(tracer, conv, s)
    assert tp.force_flush(FLUSH_TIMEOUT_MS) and lp.force_flush(FLUSH_TIMEOUT_MS)
    tp.shutdown()
    lp.shutdown()

    turns = stored_turns(pipe, conv)
    tools = stored_tool_calls(pipe, conv)
    assert len(stored_spans(pipe, trace_id)) == SPANS_PER_CONVERSATION
    # the rows are there, with the canaries replaced
    assert "[REDACTED:secret]" in turns[1]["input_messages"][0]["content"]
    assert "[REDACTED:email]" in turns[1]["input_messages"][0]["content"]
    assert "[REDACTED:card]" in tools[0]["arguments"] and "[REDACTED:phone]" in tools[0]["result"]
    assert "[REDACTED:card]" in tools[1]["error_message"]
    assert (
        pipe.store.scalar(
            "SELECT sum(redactions) FROM spans FINAL WHERE conversation_id = {c:String}",
            {"c": conv},
        )
        > 0
    )
    # the log event's content record went on too (it has no row; it is on the turns topic)
    records = wait_for(
        lambda: [r for r in pipe.turn_records() if r["span_id"] == content_span_id], 60
    )
    assert records and records[0]["span_kind"] == "content"
    assert "[REDACTED:email]" in records[0]["output_messages"][0]["content"]

    assert pipe.store.scalar("SELECT count() FROM deadletter") == 0  # originals are kept there
    tables = pipe.all_rows_json()
    assert conv in tables and _leaks(tables) == []
    turn_topic = json.dumps(pipe.turn_records(), ensure_ascii=False)
    assert conv in turn_topic and _leaks(turn_topic) == []
    assert _leaks(pipe.worker_log()) == []


JWT = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsZWFrLWNhbmFyeSJ9.Qm3XkZ9pL2vR8tY4wB7nC1dF5gH0jA6sE2uI8oP4kL0"
)
PASSWORD = "hunter2single"
DEAD_CANARIES = [*CANARIES, JWT, JWT.rsplit(".", 1)[1], PASSWORD]


def test_a_dead_letter_keeps_no_secret_of_its_request(pipe: Pipeline) -> None:
    """One malformed span in a request whose other spans carry an API key, an email, a card, a
    JWT and a password: the request is dead-lettered (for the bad span) without any of them,
    the good spans are stored redacted."""
    conv = f"conv-dead-{uuid.uuid4().hex[:8]}"
    trace = uuid.uuid4().bytes
    attrs = {
        "gen_ai.conversation.id": conv,
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "lookup",
        "gen_ai.tool.call.arguments": json.dumps(
            {"email": EMAIL, "card": CARD, "auth": {"password": PASSWORD}, "key": KEY}
        ),
        "gen_ai.tool.call.result": f"token {JWT} for {EMAIL}",
        "http.request.header.authorization": PASSWORD,
    }
    spans = []
    for i in range(4):
        sp = Span(
            trace_id=trace if i < 3 else trace[:15],  # the last span's trace id is malformed
            span_id=(i + 1).to_bytes(8, "big"),
            name="execute_tool lookup",
            start_time_unix_nano=time.time_ns(),
            end_time_unix_nano=time.time_ns() + 1000,
        )
        sp.attributes.extend(
            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attrs.items()
        )
        spans.append(sp)
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=SERVICE))
    )
    rs.scope_spans.add().spans.extend(spans)
    # straight onto the span topic, as a collector's kafka exporter writes it (the gateway
    # would refuse the bad span itself, with a partial success)
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
    producer.produce(
        pipe.cfg.topics.otlp_spans, key=trace.hex().encode(), value=req.SerializeToString()
    )
    assert producer.flush(30) == 0

    rows = pipe.wait_rows(
        "SELECT reason, original_b64 FROM deadletter FINAL WHERE stage = 'capture' "
        "AND position(base64Decode(original_b64), {c:String}) > 0",
        1,
        {"c": conv},
    )
    assert [r["reason"] for r in rows] == ["invalid trace_id (15 bytes)"]
    original = base64.b64decode(rows[0]["original_b64"]).decode()
    doc = json.loads(original)  # the request as OTLP/JSON, whole but redacted
    assert len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 4
    assert "[REDACTED:email]" in original and "[REDACTED:card]" in original
    assert [c for c in DEAD_CANARIES if c in original] == []
    # the good spans went on, as redacted as the dead letter
    assert (
        len(
            pipe.wait_rows(
                "SELECT span_id FROM spans FINAL WHERE conversation_id = {c:String}", 3, {"c": conv}
            )
        )
        == 3
    )
    tables = pipe.all_rows_json()
    assert conv in tables and [c for c in DEAD_CANARIES if c in tables] == []
    letters = [
        json.loads(v) for v in read_topic_values(pipe.broker.bootstrap, pipe.cfg.topics.deadletter)
    ]
    mine = [d for d in letters if conv in base64.b64decode(d["original_b64"]).decode()]
    assert mine and [c for c in DEAD_CANARIES if c in json.dumps(mine)] == []


# ---------------------------------------------------------------------------------------------
# 5. Replay: the worker's group rewound to the start rewrites the same rows, no more
# ---------------------------------------------------------------------------------------------

COUNTS = """SELECT
    (SELECT count() FROM spans FINAL) AS spans,
    (SELECT uniqExact(trace_id, span_id) FROM spans) AS span_ids,
    (SELECT count() FROM turns FINAL) AS turns,
    (SELECT count() FROM tool_calls FINAL) AS tool_calls"""


def test_replay_from_the_start_changes_no_count(pipe: Pipeline) -> None:
    conv = f"conv-replay-{uuid.uuid4().hex[:8]}"
    traces = send(HttpSpanExporter(endpoint=pipe.http_url()), [(conv, None)])
    assert_captured(pipe, conv, traces[conv], hash_version(Script().system))
    before = pipe.rows(COUNTS)[0]
    assert before["spans"] == before["span_ids"] >= SPANS_PER_CONVERSATION

    pipe.stop_worker()
    pipe.rewind_consumer_group([pipe.cfg.topics.otlp_spans, pipe.cfg.topics.otlp_logs])
    replay_start = time.time_ns()
    pipe.start_worker()
    # ReplacingMergeTree(ingested_ns) keeps the newest copy: once the oldest kept row is newer
    # than the rewind, every span was processed again
    pipe.wait_value(f"SELECT min(ingested_ns) > {replay_start} FROM spans FINAL", 1)
    assert pipe.store.scalar("SELECT min(ingested_ns) FROM spans FINAL") > replay_start
    assert pipe.rows(COUNTS)[0] == before


# ---------------------------------------------------------------------------------------------
# 6. kill -9 mid-stream: every acknowledged span is stored, once
# ---------------------------------------------------------------------------------------------

KILL_REQUESTS = 60
KILL_SPANS_PER_REQUEST = 20
KILL_AFTER_REQUESTS = 15
KILL_COUNTS = """SELECT
    (SELECT count() FROM spans FINAL WHERE service_name = {s:String}) AS stored,
    (SELECT count() FROM spans WHERE service_name = {s:String}) AS rows,
    (SELECT uniqExact(trace_id, span_id) FROM spans WHERE service_name = {s:String}) AS ids,
    (SELECT count() FROM turns FINAL
     WHERE trace_id IN (SELECT trace_id FROM spans WHERE service_name = {s:String})) AS turns"""


def _chat_request(service: str, trace_id: bytes, n: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value=service))
    ss = rs.scope_spans.add()
    ss.scope.name = "acme.load"
    now = time.time_ns()
    for i in range(n):
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.input.messages": json.dumps(
                [{"role": "user", "parts": _text(f"question {i}")}]
            ),
        }
        ss.spans.append(
            Span(
                trace_id=trace_id,
                span_id=(i + 1).to_bytes(8, "big"),
                name="chat gpt-4o-mini",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=now + i,
                end_time_unix_nano=now + i + 10**6,
                attributes=[
                    KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attrs.items()
                ],
            )
        )
    return req.SerializeToString()


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except OSError as e:  # HTTPError (a status) or no answer at all (0)
        return getattr(e, "code", 0)


def test_kill9_mid_stream_loses_nothing(pipe: Pipeline) -> None:
    service = f"load-{uuid.uuid4().hex[:8]}"
    acked: list[str] = []  # trace ids of requests answered 200
    refused: list[int] = []

    def post_one() -> None:
        trace_id = uuid.uuid4().bytes
        status = _post(pipe.http_url(), _chat_request(service, trace_id, KILL_SPANS_PER_REQUEST))
        if status == 200:
            acked.append(trace_id.hex())
        else:
            refused.append(status)

    def produce() -> None:
        for _ in range(KILL_REQUESTS - 1):
            post_one()
            time.sleep(0.05)

    by_service = "SELECT count() FROM spans FINAL WHERE service_name = {s:String}"
    post_one()  # the worker is consuming before the stream starts (its group join is slow)
    pipe.wait_value(by_service, KILL_SPANS_PER_REQUEST, {"s": service})
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_for(lambda: len(acked) >= KILL_AFTER_REQUESTS, 60, 0.02)
    acked_at_kill = len(acked)
    stored_at_kill = pipe.store.scalar(by_service, {"s": service})
    pipe.stop_worker(kill=True)
    pipe.start_worker()
    producer.join(120)
    assert not producer.is_alive()
    assert acked_at_kill < KILL_REQUESTS, "the kill came after the producer had finished"
    assert refused == []  # the gateway does not depend on the worker

    want = len(acked) * KILL_SPANS_PER_REQUEST
    expected = {"stored": want, "ids": want, "turns": want}

    def counts() -> dict[str, int]:
        return pipe.rows(KILL_COUNTS, {"s": service})[0]

    wait_for(lambda: {k: v for k, v in counts().items() if k in expected} == expected, 90)
    got = counts()
    print(
        f"kill -9: {KILL_REQUESTS * KILL_SPANS_PER_REQUEST} spans sent, {want} acknowledged, "
        f"{got['stored']} stored (FINAL), {got['rows']} rows before deduplication; killed after "
        f"{acked_at_kill} of {KILL_REQUESTS} requests with {stored_at_kill} spans stored"
    )
    assert {k: got[k] for k in expected} == expected
