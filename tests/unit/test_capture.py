"""Capture core: OTLP in (protobuf and JSON, three attribute dialects, log events), rows out."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processors.capture.core import Capture, CaptureBatch, RawMessage, _hash_version
from processors.config import CaptureConfig
from processors.records import RESPONSE_REF
from tests.ddl import ddl_columns

NOW = 1_900_000_000_000_000_000
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
T0 = 1_731_000_000_000_000_000
SYSTEM = "You are a weather bot."
USER = "What's the weather in Paris?"
ARGS = '{"city": "Paris"}'
RESULT = "sunny, 21C"
ANSWER = "It is sunny in Paris."
CONV = "conv-42"


# ------------------------------------------------------------------ builders


def any_value(x: Any) -> AnyValue:
    v = AnyValue()
    if isinstance(x, bool):
        v.bool_value = x
    elif isinstance(x, int):
        v.int_value = x
    elif isinstance(x, float):
        v.double_value = x
    elif isinstance(x, str):
        v.string_value = x
    elif isinstance(x, bytes):
        v.bytes_value = x
    elif isinstance(x, list):
        v.array_value.values.extend(any_value(y) for y in x)
    elif isinstance(x, dict):
        v.kvlist_value.values.extend(KeyValue(key=k, value=any_value(y)) for k, y in x.items())
    return v


def kvs(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def span(
    n: int,
    parent: int,
    name: str,
    attrs: dict[str, Any],
    *,
    trace: bytes = TRACE,
    events: list[tuple[str, dict[str, Any]]] = (),
    error: str = "",
) -> Span:
    sp = Span(
        trace_id=trace,
        span_id=sid(n),
        parent_span_id=sid(parent) if parent else b"",
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=T0 + n * 1_000_000,
        end_time_unix_nano=T0 + n * 1_000_000 + 500_000,
        attributes=kvs(attrs),
    )
    for i, (ev_name, ev_attrs) in enumerate(events):
        sp.events.add(name=ev_name, time_unix_nano=T0 + n * 1_000_000 + i, attributes=kvs(ev_attrs))
    if error:
        sp.status.code = Status.STATUS_CODE_ERROR
        sp.status.message = error
    return sp


def request(spans: list[Span], resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(kvs(resource or {"service.name": "weather-agent"}))
    ss = rs.scope_spans.add()
    ss.scope.name = "test"
    ss.spans.extend(spans)
    return req


def otlp_json(req: Any) -> bytes:
    """OTLP/JSON as the spec has it: protobuf's JSON mapping with hex trace and span ids."""
    d = json_format.MessageToDict(req, use_integers_for_enums=True)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {
                k: (
                    base64.b64decode(v).hex()
                    if k in ("traceId", "spanId", "parentSpanId")
                    else fix(v)
                )
                for k, v in x.items()
            }
        if isinstance(x, list):
            return [fix(y) for y in x]
        return x

    return json.dumps(fix(d)).encode()


def msg(value: bytes, topic: str = "otlp_spans", offset: int = 0) -> RawMessage:
    return RawMessage(
        topic=topic, partition=0, offset=offset, key=TRACE.hex().encode(), value=value
    )


def run(*values: bytes | RawMessage, cfg: CaptureConfig | None = None) -> CaptureBatch:
    msgs = [v if isinstance(v, RawMessage) else msg(v, offset=i) for i, v in enumerate(values)]
    return Capture(cfg or CaptureConfig()).process(msgs, NOW)


# The same conversation in each dialect: agent root, llm call asking for a tool,
# the tool execution, llm call answering.


def genai_spans() -> list[Span]:
    common = {
        "gen_ai.conversation.id": CONV,
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
    }
    system = json.dumps([{"type": "text", "content": SYSTEM}])
    user = {"role": "user", "parts": [{"type": "text", "content": USER}]}
    call = {
        "role": "assistant",
        "parts": [
            {
                "type": "tool_call",
                "id": "call_1",
                "name": "get_weather",
                "arguments": {"city": "Paris"},
            }
        ],
    }
    resp = {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": "call_1", "response": RESULT}],
    }
    answer = {
        "role": "assistant",
        "parts": [{"type": "text", "content": ANSWER}],
        "finish_reason": "stop",
    }
    return [
        span(
            1,
            0,
            "invoke_agent weather",
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "weather",
                "gen_ai.conversation.id": CONV,
            },
        ),
        span(
            2,
            1,
            "chat gpt-4o-mini",
            {
                **common,
                "gen_ai.operation.name": "chat",
                "gen_ai.usage.input_tokens": 10,
                "gen_ai.usage.output_tokens": 5,
                "gen_ai.system_instructions": system,
                "gen_ai.input.messages": json.dumps([user]),
                "gen_ai.output.messages": json.dumps([call]),
            },
        ),
        span(
            3,
            1,
            "execute_tool get_weather",
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.conversation.id": CONV,
                "gen_ai.tool.name": "get_weather",
                "gen_ai.tool.call.id": "call_1",
                "gen_ai.tool.call.arguments": ARGS,
                "gen_ai.tool.call.result": RESULT,
            },
        ),
        span(
            4,
            1,
            "chat gpt-4o-mini",
            {
                **common,
                "gen_ai.operation.name": "chat",
                "gen_ai.usage.input_tokens": 20,
                "gen_ai.usage.output_tokens": 8,
                "gen_ai.system_instructions": system,
                "gen_ai.input.messages": json.dumps([user, call, resp]),
                "gen_ai.output.messages": json.dumps([answer]),
            },
        ),
    ]


def genai_structured_spans() -> list[Span]:
    """GenAI spans whose messages are structured attribute values (AnyValue lists and maps), not JSON text."""
    spans = genai_spans()
    for sp in spans:
        for kv in sp.attributes:
            if kv.key in (
                "gen_ai.input.messages",
                "gen_ai.output.messages",
                "gen_ai.system_instructions",
            ):
                kv.value.CopyFrom(any_value(json.loads(kv.value.string_value)))
    return spans


def openinference_spans() -> list[Span]:
    common = {
        "openinference.span.kind": "LLM",
        "session.id": CONV,
        "llm.provider": "openai",
        "llm.model_name": "gpt-4o-mini",
    }

    def inp(i: int, role: str, content: str | None = None, **extra: str) -> dict[str, str]:
        d = {f"llm.input_messages.{i}.message.role": role}
        if content is not None:
            d[f"llm.input_messages.{i}.message.content"] = content
        d.update({f"llm.input_messages.{i}.message.{k}": v for k, v in extra.items()})
        return d

    call = {
        "message.tool_calls.0.tool_call.id": "call_1",
        "message.tool_calls.0.tool_call.function.name": "get_weather",
        "message.tool_calls.0.tool_call.function.arguments": ARGS,
    }
    return [
        span(
            1,
            0,
            "weather",
            {"openinference.span.kind": "AGENT", "session.id": CONV, "agent.name": "weather"},
        ),
        span(
            2,
            1,
            "ChatCompletion",
            {
                **common,
                "llm.token_count.prompt": 10,
                "llm.token_count.completion": 5,
                **inp(0, "system", SYSTEM),
                **inp(1, "user", USER),
                "llm.output_messages.0.message.role": "assistant",
                **{f"llm.output_messages.0.{k}": v for k, v in call.items()},
            },
        ),
        span(
            3,
            1,
            "get_weather",
            {
                "openinference.span.kind": "TOOL",
                "session.id": CONV,
                "tool.name": "get_weather",
                "tool_call.id": "call_1",
                "input.value": ARGS,
                "output.value": RESULT,
            },
        ),
        span(
            4,
            1,
            "ChatCompletion",
            {
                **common,
                "llm.token_count.prompt": 20,
                "llm.token_count.completion": 8,
                **inp(0, "system", SYSTEM),
                **inp(1, "user", USER),
                **inp(2, "assistant", **{k.removeprefix("message."): v for k, v in call.items()}),
                **inp(3, "tool", RESULT, tool_call_id="call_1"),
                "llm.output_messages.0.message.role": "assistant",
                "llm.output_messages.0.message.content": ANSWER,
            },
        ),
    ]


def traceloop_spans() -> list[Span]:
    common = {
        "llm.request.type": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "traceloop.association.properties.session_id": CONV,
    }
    call = {
        "tool_calls.0.id": "call_1",
        "tool_calls.0.name": "get_weather",
        "tool_calls.0.arguments": ARGS,
    }
    return [
        span(
            1,
            0,
            "weather.workflow",
            {
                "traceloop.span.kind": "workflow",
                "traceloop.entity.name": "weather",
                "traceloop.association.properties.session_id": CONV,
            },
        ),
        span(
            2,
            1,
            "openai.chat",
            {
                **common,
                "gen_ai.usage.prompt_tokens": 10,
                "gen_ai.usage.completion_tokens": 5,
                "gen_ai.prompt.0.role": "system",
                "gen_ai.prompt.0.content": SYSTEM,
                "gen_ai.prompt.1.role": "user",
                "gen_ai.prompt.1.content": USER,
                "gen_ai.completion.0.role": "assistant",
                "gen_ai.completion.0.finish_reason": "tool_calls",
                **{f"gen_ai.completion.0.{k}": v for k, v in call.items()},
            },
        ),
        span(
            3,
            1,
            "get_weather.tool",
            {
                "traceloop.span.kind": "tool",
                "traceloop.entity.name": "get_weather",
                "traceloop.association.properties.session_id": CONV,
                "traceloop.entity.input": ARGS,
                "traceloop.entity.output": RESULT,
            },
        ),
        span(
            4,
            1,
            "openai.chat",
            {
                **common,
                "gen_ai.usage.prompt_tokens": 20,
                "gen_ai.usage.completion_tokens": 8,
                "gen_ai.prompt.0.role": "system",
                "gen_ai.prompt.0.content": SYSTEM,
                "gen_ai.prompt.1.role": "user",
                "gen_ai.prompt.1.content": USER,
                "gen_ai.prompt.2.role": "assistant",
                **{f"gen_ai.prompt.2.{k}": v for k, v in call.items()},
                "gen_ai.prompt.3.role": "tool",
                "gen_ai.prompt.3.content": RESULT,
                "gen_ai.prompt.3.tool_call_id": "call_1",
                "gen_ai.completion.0.role": "assistant",
                "gen_ai.completion.0.content": ANSWER,
            },
        ),
    ]


def normalized(batch: CaptureBatch) -> list[tuple[Any, ...]]:
    """What must not depend on the dialect."""

    def msgs(ms: list[Any]) -> list[tuple[str, ...]]:
        return [(m.role, m.content, m.tool_name, m.tool_call_id, m.tool_arguments) for m in ms]

    return [
        (
            t.span_kind,
            t.operation,
            t.conversation_id,
            t.provider,
            t.request_model,
            t.response_model,
            t.input_tokens,
            t.output_tokens,
            t.system_instructions,
            t.prompt_version,
            msgs(t.input_messages),
            msgs(t.output_messages),
            (t.tool.name, t.tool.arguments, t.tool.result) if t.tool else None,
            t.status,
        )
        for t in sorted(batch.turns, key=lambda t: t.start_ns)
    ]


# --------------------------------------------------------------------- tests


def test_genai_conversation_is_normalized() -> None:
    b = run(request(genai_spans()).SerializeToString())
    assert not b.deadletters
    assert [t.span_kind for t in b.turns] == ["agent", "llm", "tool", "llm"]
    agent, llm1, tool, llm2 = b.turns
    assert {t.conversation_id for t in b.turns} == {CONV}
    assert agent.agent_name == "weather"
    assert llm1.system_instructions == SYSTEM
    assert llm1.prompt_version == _hash_version(SYSTEM) and len(llm1.prompt_version) == 12
    assert [(m.role, m.content) for m in llm1.input_messages] == [("user", USER)]
    (req,) = llm1.output_messages
    assert (req.role, req.tool_name, req.tool_call_id, json.loads(req.tool_arguments)) == (
        "assistant",
        "get_weather",
        "call_1",
        {"city": "Paris"},
    )
    assert (llm1.input_tokens, llm1.output_tokens, llm1.provider, llm1.request_model) == (
        10,
        5,
        "openai",
        "gpt-4o-mini",
    )
    assert tool.tool is not None
    assert (tool.tool.name, tool.tool.call_id, tool.tool.arguments, tool.tool.result) == (
        "get_weather",
        "call_1",
        ARGS,
        RESULT,
    )
    assert [m.role for m in llm2.input_messages] == ["user", "assistant", "tool"]
    assert (
        llm2.input_messages[2].content == RESULT and llm2.input_messages[2].tool_call_id == "call_1"
    )
    assert [(m.role, m.content) for m in llm2.output_messages] == [("assistant", ANSWER)]
    assert all(m.span_id == llm2.span_id and m.trace_id == TRACE.hex() for m in llm2.input_messages)
    assert len(b.span_rows) == 4 and len(b.turn_rows) == 4 and len(b.tool_rows) == 1
    assert b.tool_rows[0]["name"] == "get_weather" and b.tool_rows[0]["conversation_id"] == CONV


@pytest.mark.parametrize("dialect", [genai_structured_spans, openinference_spans, traceloop_spans])
def test_dialects_normalize_to_the_same_turns(dialect: Any) -> None:
    expected = normalized(run(request(genai_spans()).SerializeToString()))
    assert normalized(run(request(dialect()).SerializeToString())) == expected


def test_json_and_protobuf_give_the_same_rows() -> None:
    req = request(genai_spans() + traceloop_spans()[1:2] + openinference_spans()[2:3])
    # the dialect lists reuse span ids: give the extra spans their own
    req.resource_spans[0].scope_spans[0].spans[4].span_id = sid(14)
    req.resource_spans[0].scope_spans[0].spans[5].span_id = sid(15)
    proto, js = run(req.SerializeToString()), run(otlp_json(req))
    assert not proto.deadletters and not js.deadletters and len(proto.span_rows) == 6
    assert js.span_rows == proto.span_rows
    assert js.turn_rows == proto.turn_rows
    assert js.tool_rows == proto.tool_rows
    assert [t.to_dict() for t in js.turns] == [t.to_dict() for t in proto.turns]
    logs = logs_request(
        [
            log("gen_ai.user.message", {"content": USER}),
            log("gen_ai.choice", {"index": 0, "message": {"content": ANSWER}}),
        ]
    )
    proto = run(msg(logs.SerializeToString(), topic="otlp_logs"))
    js = run(msg(otlp_json(logs), topic="otlp_logs"))
    assert len(proto.turns) == 1 and [t.to_dict() for t in js.turns] == [
        t.to_dict() for t in proto.turns
    ]


def test_rows_have_exactly_the_table_columns() -> None:
    b = run(request(genai_spans()).SerializeToString())
    for table, rows in (
        ("spans", b.span_rows),
        ("turns", b.turn_rows),
        ("tool_calls", b.tool_rows),
    ):
        assert rows and all(list(r) == ddl_columns(table) for r in rows), table


def test_span_row_flattens_attributes() -> None:
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "n": 3,
        "ok": True,
        "x": 1.5,
        "tags": ["a", "b"],
        "m": {"k": "v"},
    }
    b = run(
        request(
            [
                span(
                    1,
                    0,
                    "chat m",
                    attrs,
                    events=[("exception", {"exception.type": "Boom", "exception.message": "bad"})],
                )
            ],
            {"service.name": "svc", "service.version": 7},
        ).SerializeToString()
    )
    (row,) = b.span_rows
    assert row["attributes"] == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "n": "3",
        "ok": "true",
        "x": "1.5",
        "tags": '["a", "b"]',
        "m": '{"k": "v"}',
    }
    assert row["resource_attributes"] == {"service.name": "svc", "service.version": "7"}
    assert (row["service_name"], row["scope_name"], row["span_kind"]) == ("svc", "test", "llm")
    assert (row["trace_id"], row["span_id"], row["parent_span_id"]) == (
        TRACE.hex(),
        sid(1).hex(),
        "",
    )
    assert row["conversation_id"] == TRACE.hex()  # no conversation attribute: the trace id
    assert json.loads(row["events"]) == [
        {
            "name": "exception",
            "time_ns": T0 + 1_000_000,
            "attributes": {"exception.type": "Boom", "exception.message": "bad"},
        }
    ]
    assert row["ingested_ns"] == NOW and row["duration_ms"] == 0.5
    (turn,) = b.turns
    assert (turn.status, turn.error_type, turn.error_message) == ("error", "Boom", "bad")


def test_long_values_are_truncated_with_a_marker() -> None:
    cfg = CaptureConfig(max_attribute_bytes=100)
    b = run(
        request([span(1, 0, "s", {"big": "é" * 300, "small": "ok"})]).SerializeToString(), cfg=cfg
    )
    big = b.span_rows[0]["attributes"]["big"]
    assert big.startswith("é" * 50) and big.endswith("[truncated 500 bytes]")
    assert b.span_rows[0]["attributes"]["small"] == "ok" and b.truncated == 1


def test_conversation_id_from_resource_and_from_the_trace() -> None:
    other = bytes.fromhex("11" * 16)
    spans = [
        span(1, 0, "root", {"session.id": "s-1"}),
        span(2, 1, "chat", {"gen_ai.operation.name": "chat"}),
        span(3, 0, "chat", {"gen_ai.operation.name": "chat"}, trace=other),
    ]
    b = run(request(spans).SerializeToString())
    assert [r["conversation_id"] for r in b.span_rows] == ["s-1", "s-1", other.hex()]
    b = run(
        request(
            [span(1, 0, "chat", {"gen_ai.operation.name": "chat"})],
            {"gen_ai.conversation.id": "from-resource", "closeloop.prompt.version": "v7"},
        ).SerializeToString()
    )
    assert (b.turns[0].conversation_id, b.turns[0].prompt_version) == ("from-resource", "v7")


def test_end_of_conversation_marker() -> None:
    b = run(
        request(
            [
                span(
                    1,
                    0,
                    "root",
                    {"gen_ai.operation.name": "invoke_agent", "closeloop.conversation.end": True},
                ),
                span(
                    2,
                    1,
                    "chat",
                    {"gen_ai.operation.name": "chat", "closeloop.conversation.end": "false"},
                ),
            ]
        ).SerializeToString()
    )
    assert [t.end_of_conversation for t in b.turns] == [True, False]


def test_other_spans_get_only_a_span_row() -> None:
    b = run(
        request(
            [span(1, 0, "GET /", {"http.method": "GET"}), span(2, 1, "db", {})]
        ).SerializeToString()
    )
    assert len(b.span_rows) == 2 and not b.turns and not b.turn_rows
    assert {r["span_kind"] for r in b.span_rows} == {"other"}


def test_content_in_span_events_and_references() -> None:
    prompt = json.dumps([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
    completion = json.dumps([{"role": "assistant", "content": ANSWER}])
    b = run(
        request(
            [
                span(
                    1,
                    0,
                    "chat",
                    {"gen_ai.operation.name": "chat"},
                    events=[
                        ("gen_ai.content.prompt", {"gen_ai.prompt": prompt}),
                        ("gen_ai.content.completion", {"gen_ai.completion": completion}),
                    ],
                ),
                span(
                    2,
                    0,
                    "chat",
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.input.messages": "s3://bucket/conv/1/input.json",
                    },
                ),
            ]
        ).SerializeToString()
    )
    ev, ref = b.turns
    assert ev.system_instructions == SYSTEM
    assert [(m.role, m.content) for m in ev.input_messages + ev.output_messages] == [
        ("user", USER),
        ("assistant", ANSWER),
    ]
    assert ref.input_messages == []
    assert b.span_rows[1]["attributes"]["gen_ai.input.messages"] == "s3://bucket/conv/1/input.json"


def logs_request(
    records: list[LogRecord], resource: dict[str, Any] | None = None
) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend(kvs(resource or {"service.name": "weather-agent"}))
    rl.scope_logs.add().log_records.extend(records)
    return req


def log(
    event: str,
    body: Any = None,
    attrs: dict[str, Any] | None = None,
    span_n: int = 2,
    in_attr: bool = False,
) -> LogRecord:
    lr = LogRecord(
        time_unix_nano=T0 + span_n * 1_000_000,
        trace_id=TRACE,
        span_id=sid(span_n),
        attributes=kvs({**(attrs or {}), **({"event.name": event} if in_attr else {})}),
    )
    if not in_attr:
        lr.event_name = event
    if body is not None:
        lr.body.CopyFrom(any_value(body))
    return lr


def test_log_events_become_content_records_joined_by_span_id() -> None:
    records = [
        log("gen_ai.system.message", {"content": SYSTEM}),
        log("gen_ai.user.message", {"content": USER}, in_attr=True),
        log(
            "gen_ai.choice",
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ARGS},
                        }
                    ],
                },
            },
        ),
        log("app.log", "not a GenAI event"),
        log(
            "gen_ai.client.inference.operation.details",
            attrs={
                "gen_ai.conversation.id": CONV,
                "gen_ai.input.messages": json.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": USER}]}]
                ),
                "gen_ai.output.messages": json.dumps(
                    [{"role": "assistant", "parts": [{"type": "text", "content": ANSWER}]}]
                ),
            },
            span_n=4,
        ),
    ]
    b = run(msg(logs_request(records).SerializeToString(), topic="otlp_logs"))
    assert not b.deadletters and b.log_records_ignored == 1 and b.log_records_in == 5
    c2, c4 = b.turns
    # span 2's events name no conversation: it is borrowed from span 4's, same trace
    assert (c2.span_kind, c2.span_id, c2.trace_id, c2.conversation_id) == (
        "content",
        sid(2).hex(),
        TRACE.hex(),
        CONV,
    )
    assert c2.system_instructions == SYSTEM and c2.prompt_version == _hash_version(SYSTEM)
    assert [(m.role, m.content) for m in c2.input_messages] == [("user", USER)]
    assert [(m.role, m.tool_name, m.tool_arguments) for m in c2.output_messages] == [
        ("assistant", "get_weather", ARGS)
    ]
    assert (c4.conversation_id, [m.content for m in c4.input_messages + c4.output_messages]) == (
        CONV,
        [USER, ANSWER],
    )
    assert not b.turn_rows and not b.span_rows
    alone = run(msg(logs_request(records[:3]).SerializeToString(), topic="otlp_logs"))
    assert [t.conversation_id for t in alone.turns] == [TRACE.hex()]  # unknown: the trace id
    # the span the content belongs to carries the same ids
    spans = run(request(genai_spans()).SerializeToString())
    assert {(t.trace_id, t.span_id) for t in b.turns} <= {
        (t.trace_id, t.span_id) for t in spans.turns
    }


def test_sdk_produced_spans_and_logs() -> None:
    """Genuine requests from the OpenTelemetry SDK (in-memory exporters + the OTLP encoders)."""
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    resource = Resource.create({"service.name": "sdk-agent", "gen_ai.agent.version": "1.2.0"})
    spans_out, logs_out = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(SimpleSpanProcessor(spans_out))
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(SimpleLogRecordProcessor(logs_out))
    tracer, logger = tp.get_tracer("agent"), lp.get_logger("agent")
    root = {"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": CONV}
    llm = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
    }
    with (
        tracer.start_as_current_span("invoke_agent", attributes=root),
        tracer.start_as_current_span("chat gpt-4o-mini", attributes=llm) as chat,
    ):
        logger.emit(event_name="gen_ai.user.message", body={"content": USER})
        logger.emit(event_name="gen_ai.choice", body={"index": 0, "message": {"content": ANSWER}})
        sc = chat.get_span_context()
        chat_ids = (format(sc.trace_id, "032x"), format(sc.span_id, "016x"))
    traces = encode_spans(spans_out.get_finished_spans()).SerializeToString()
    logs = encode_logs(logs_out.get_finished_logs()).SerializeToString()
    b = run(msg(traces), msg(logs, topic="otlp_logs", offset=1))
    assert not b.deadletters
    chat_turn = next(t for t in b.turns if t.span_kind == "llm")
    content = next(t for t in b.turns if t.span_kind == "content")
    assert (
        (chat_turn.trace_id, chat_turn.span_id) == chat_ids == (content.trace_id, content.span_id)
    )
    assert chat_turn.conversation_id == CONV and chat_turn.agent_version == "1.2.0"
    assert (chat_turn.input_tokens, chat_turn.output_tokens) == (12, 3)
    assert [(m.role, m.content) for m in content.input_messages + content.output_messages] == [
        ("user", USER),
        ("assistant", ANSWER),
    ]


CANARIES = {
    "secret": "sk-proj-CANARYq7Xv2Lp9Rt4Wz8Nb3Kd6Mf1",
    "email": "canary.person@example.org",
    "card": "4111 1111 1111 1111",
    "phone": "+1 (555) 010-9999",
    "aws": "AKIACANARY1234567XYZ",
}


def test_redaction_canaries_never_appear_in_any_output() -> None:
    c = CANARIES
    text = f"my key is {c['secret']}, mail {c['email']}, card {c['card']}, call {c['phone']}"
    user = {"role": "user", "parts": [{"type": "text", "content": text}]}
    spans = [
        span(
            1,
            0,
            f"chat for {c['email']}",
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.conversation.id": CONV,
                "gen_ai.input.messages": json.dumps([user]),
                "gen_ai.output.messages": json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [
                                {
                                    "type": "tool_call",
                                    "id": "c1",
                                    "name": "lookup",
                                    "arguments": {"card": c["card"]},
                                }
                            ],
                        }
                    ]
                ),
                "gen_ai.system_instructions": f"Use key {c['aws']}",
                "nested": [{"deep": f"line\n{c['secret']}"}],
                "json_text": json.dumps({"log": f"line\n{c['secret']}\t{c['aws']}"}),
                "plain": f"Authorization: Bearer {c['secret']}",
            },
            events=[("exception", {"exception.message": f"failed for {c['email']}"})],
            error=f"call {c['phone']}",
        ),
        span(
            2,
            1,
            "execute_tool lookup",
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "lookup",
                "gen_ai.tool.call.arguments": json.dumps({"email": c["email"]}),
                "gen_ai.tool.call.result": f"owner phone {c['phone']}",
            },
        ),
        span(3, 1, "other", {"note": c["aws"]}),
    ]
    logs = logs_request(
        [
            log("gen_ai.user.message", {"content": text}),
            log(
                "gen_ai.client.inference.operation.details",
                attrs={"gen_ai.input.messages": json.dumps([user])},
            ),
        ],
        {"service.name": "svc", "user.email": c["email"]},
    )
    req = request(spans, {"service.name": "svc", "owner": c["email"]})
    b = run(
        msg(req.SerializeToString()),
        msg(otlp_json(req), offset=1),
        msg(logs.SerializeToString(), topic="otlp_logs", offset=2),
    )
    assert not b.deadletters
    dump = json.dumps(
        [b.span_rows, b.turn_rows, b.tool_rows, [t.to_dict() for t in b.turns]], ensure_ascii=False
    )
    for kind, canary in c.items():
        for variant in {canary, canary.replace(" ", ""), json.dumps(canary)[1:-1]}:
            assert variant not in dump, kind
    assert "[REDACTED:email]" in dump and "[REDACTED:card]" in dump and "[REDACTED:phone]" in dump
    assert b.redactions > 0 and all(r["redactions"] > 0 for r in b.span_rows)
    assert (
        b.turns[0]
        .input_messages[0]
        .content.startswith("my key is [REDACTED:secret], mail [REDACTED:email]")
    )


def test_extra_patterns_and_disabled_kinds() -> None:
    cfg = CaptureConfig(redact=["emails"], extra_patterns=[r"ACME-\d{6}"])
    b = run(
        request(
            [span(1, 0, "s", {"a": "ticket ACME-123456 by x@y.com", "b": CANARIES["card"]})]
        ).SerializeToString(),
        cfg=cfg,
    )
    attrs = b.span_rows[0]["attributes"]
    assert attrs == {"a": "ticket [REDACTED:custom] by [REDACTED:email]", "b": CANARIES["card"]}
    assert b.span_rows[0]["redactions"] == 2


def test_replay_is_deterministic() -> None:
    raw = request(genai_spans()).SerializeToString()
    a, b = run(raw), run(raw)
    assert a.span_rows == b.span_rows and a.turn_rows == b.turn_rows and a.tool_rows == b.tool_rows
    assert [t.to_json() for t in a.turns] == [t.to_json() for t in b.turns]


# --------------------------------------------------------------- dead letters


def _bad_ids() -> bytes:
    good = genai_spans()
    bad = span(9, 0, "bad", {"gen_ai.operation.name": "chat"})
    bad.trace_id = b"\x01" * 15
    zero = span(10, 0, "zero", {})
    zero.span_id = bytes(8)
    return request(good + [bad, zero]).SerializeToString()


@pytest.mark.parametrize(
    "value, reason, original",
    [
        (b"\x00\x01garbage\xff\xff", "not an OTLP protobuf request", b""),
        (request(genai_spans()).SerializeToString()[:57], "not an OTLP protobuf request", b""),
        (b'{"resourceSpans": [', "invalid JSON", b""),
        (b'{"hello": "world"}', "JSON is not an OTLP request", b'{"hello": "world"}'),
        (b'{"resourceLogs": []}', "JSON is not an OTLP request", b'{"resourceLogs": []}'),
        (b"{}", "request holds no spans", b"{}"),
        (b"[1, 2]", "not an OTLP protobuf request", b""),
        (
            b'{"resourceSpans": {"x": 1}}',
            "JSON is not an OTLP request",
            b'{"resourceSpans": {"x": 1}}',
        ),
        (b"", "request holds no spans", b"{}"),
    ],
)
def test_undecodable_messages_are_dead_lettered(value: bytes, reason: str, original: bytes) -> None:
    """The original is kept as redacted OTLP/JSON when it parses, else only as its place in
    the topic (raw bytes could hide a secret from redaction)."""
    b = run(msg(value, offset=7))
    (d,) = b.deadletters
    assert (d.stage, d.reason, d.topic, d.partition, d.offset) == (
        "capture",
        reason,
        "otlp_spans",
        0,
        7,
    )
    assert base64.b64decode(d.original_b64) == original and d.ts_ns == NOW and d.key == TRACE.hex()
    assert not b.span_rows and not b.turns


def test_one_bad_span_dead_letters_only_itself() -> None:
    b = run(_bad_ids())
    assert len(b.span_rows) == 4 and len(b.turns) == 4
    assert sorted(d.reason for d in b.deadletters) == [
        "invalid span_id (zero)",
        "invalid trace_id (15 bytes)",
    ]
    assert "spans[4]" in next(d.detail for d in b.deadletters if "trace_id" in d.reason)


def test_wrong_attribute_types() -> None:
    b = run(
        request(
            [
                span(
                    1,
                    0,
                    "chat",
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.usage.input_tokens": "12",
                        "gen_ai.usage.output_tokens": 2.0,
                    },
                ),
                span(
                    2,
                    0,
                    "chat",
                    {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": "lots"},
                ),
                span(
                    3,
                    0,
                    "chat",
                    {"gen_ai.operation.name": "chat", "gen_ai.request.model": ["a", "b"]},
                ),
                span(
                    4,
                    0,
                    "chat",
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.input.messages": 5,
                        "gen_ai.output.messages": {"not": "a list"},
                    },
                ),
            ]
        ).SerializeToString()
    )
    assert [(t.input_tokens, t.output_tokens) for t in b.turns] == [(12, 2), (0, 0)]
    assert sorted(d.reason for d in b.deadletters) == [
        "attribute gen_ai.request.model: expected a string, got list",
        "attribute gen_ai.usage.input_tokens: expected an integer, got 'lots'",
    ]


def test_json_span_with_bad_fields_is_dead_lettered_alone() -> None:
    doc = json.loads(otlp_json(request(genai_spans())))
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[1]["startTimeUnixNano"] = "not a number"
    spans[2]["traceId"] = "xyz"
    spans.append("not an object")
    b = run(json.dumps(doc).encode())
    assert [r["span_id"] for r in b.span_rows] == [sid(1).hex(), sid(4).hex()]
    assert len(b.deadletters) == 3 and all(d.reason for d in b.deadletters)


def test_absurd_sizes_are_dead_lettered() -> None:
    cfg = CaptureConfig(max_spans_per_request=3)
    (d,) = run(request(genai_spans()).SerializeToString(), cfg=cfg).deadletters
    assert d.reason == "too many spans in one request"
    cfg = CaptureConfig(max_message_bytes=100)
    (d,) = run(request(genai_spans()).SerializeToString(), cfg=cfg).deadletters
    assert d.reason == "message too large"


def test_deeply_nested_json_value_is_dead_lettered() -> None:
    deep = "[" * 5000 + "]" * 5000
    b = run(
        request(
            [span(1, 0, "s", {"gen_ai.input.messages": deep}), span(2, 0, "ok", {})]
        ).SerializeToString()
    )
    assert [r["span_id"] for r in b.span_rows] == [sid(2).hex()]
    assert [d.reason for d in b.deadletters] == ["values nested too deeply"]


def test_logs_without_span_ids_are_dead_lettered() -> None:
    lr = log("gen_ai.user.message", {"content": USER})
    lr.span_id = b""
    b = run(
        msg(
            logs_request([lr, log("gen_ai.user.message", {"content": USER})]).SerializeToString(),
            topic="otlp_logs",
        )
    )
    assert len(b.turns) == 1 and [d.reason for d in b.deadletters] == ["invalid span_id (0 bytes)"]


def _assembled(*batches: CaptureBatch) -> Any:
    from processors.understand.assemble import build_conversation

    turns = [t.to_dict() for b in batches for t in b.turns]
    return build_conversation("c", turns, "end")


def test_evaluation_span_events_and_outcome_attribute_become_evaluations() -> None:
    spans = genai_spans()
    root = span(
        9,
        0,
        "grader",
        {"gen_ai.conversation.id": "c", "closeloop.outcome": "Escalated",
         "closeloop.outcome.reason": "customer asked for a manager"},
        events=[(
            "gen_ai.evaluation.result",
            {"gen_ai.evaluation.name": "task_success", "gen_ai.evaluation.score.value": 0.0,
             "gen_ai.evaluation.score.label": "FAIL",
             "gen_ai.evaluation.explanation": "refund sent to jane@example.com"},
        )],
    )  # fmt: skip
    b = run(request([*spans, root]).SerializeToString())
    conv = _assembled(b)
    evs = {(e.name, e.label, e.score, e.source) for e in conv.evaluations}
    assert evs == {
        ("task_success", "fail", 0.0, "event"),
        ("closeloop.outcome", "escalated", None, "attribute"),
    }
    (task,) = [e for e in conv.evaluations if e.name == "task_success"]
    assert "jane@example.com" not in task.explanation  # redacted like everything else
    assert task.span_id == sid(9).hex() and task.trace_id == TRACE.hex()


def test_evaluation_log_records_join_their_span_or_their_conversation() -> None:
    on_span = log(
        "gen_ai.evaluation.result",
        attrs={"gen_ai.evaluation.name": "reward", "gen_ai.evaluation.score.value": 1,
               "gen_ai.response.id": "chatcmpl-1"},
    )  # fmt: skip
    no_context = LogRecord(
        time_unix_nano=T0 + 99,
        event_name="gen_ai.evaluation.result",
        attributes=kvs({"gen_ai.conversation.id": "c", "gen_ai.evaluation.name": "thumbs",
                        "gen_ai.evaluation.score.label": "thumbs_down"}),
    )  # fmt: skip
    orphan = LogRecord(
        event_name="gen_ai.evaluation.result", attributes=kvs({"gen_ai.evaluation.name": "x"})
    )
    logs = run(msg(logs_request([on_span, no_context, orphan]).SerializeToString(), "otlp_logs"))
    assert [d.reason for d in logs.deadletters] == [
        "evaluation event without trace context, gen_ai.conversation.id or gen_ai.response.id"
    ]
    spans = run(request(genai_spans()).SerializeToString())
    conv = _assembled(spans, logs)
    got = sorted((e.name, e.score, e.label, e.response_id, e.source) for e in conv.evaluations)
    assert got == [
        ("reward", 1.0, "", "chatcmpl-1", "log"),
        ("thumbs", None, "thumbs_down", "", "log"),
    ]
    # the span the reward is parented to keeps its content
    assert [m.content for m in conv.messages if m.role == "user"] == [USER]


def test_messages_on_agent_spans_reach_the_transcript() -> None:
    agent_only = span(
        1,
        0,
        "invoke_agent",
        {"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "c",
         "gen_ai.input.messages": json.dumps([{"role": "user", "content": "where is my parcel"}]),
         "gen_ai.output.messages": json.dumps([{"role": "assistant", "content": "On its way."}])},
    )  # fmt: skip
    conv = _assembled(run(request([agent_only]).SerializeToString()))
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "where is my parcel"),
        ("assistant", "On its way."),
    ]
    # beside model calls carrying the same messages, nothing is doubled
    conv = _assembled(run(request(genai_spans()).SerializeToString()))
    assert [m.content for m in conv.messages if m.role == "user"] == [USER]
    assert [m.content for m in conv.messages if m.role == "assistant" and m.content][-1] == ANSWER


def test_log_records_borrow_the_conversation_id_of_their_trace_seen_earlier() -> None:
    cap = Capture(CaptureConfig())
    cap.process([msg(request(genai_spans()).SerializeToString())], NOW)
    ev = log("gen_ai.evaluation.result", attrs={"gen_ai.evaluation.name": "r",
                                                "gen_ai.evaluation.score.value": 0.0})  # fmt: skip
    b = cap.process([msg(logs_request([ev]).SerializeToString(), "otlp_logs", 1)], NOW)
    (t,) = b.turns
    conv_ids = {tr.conversation_id for tr in run(request(genai_spans()).SerializeToString()).turns}
    assert {t.conversation_id} == conv_ids and t.conversation_id != TRACE.hex()
    # a fresh capture process has not seen the trace: the record keeps the trace id
    (alone,) = run(msg(logs_request([ev]).SerializeToString(), "otlp_logs")).turns
    assert alone.conversation_id == TRACE.hex()


def test_an_evaluation_finds_its_conversation_by_the_response_id_it_judges() -> None:
    cap = Capture(CaptureConfig())
    spans = genai_spans()
    llm = next(sp for sp in spans if any(kv.key == "gen_ai.request.model" for kv in sp.attributes))
    llm.attributes.extend(kvs({"gen_ai.response.id": "chatcmpl-42"}))
    (conv_id,) = {
        t.conversation_id for t in cap.process([msg(request(spans).SerializeToString())], NOW).turns
    }
    grade = LogRecord(
        time_unix_nano=T0 + 5,
        event_name="gen_ai.evaluation.result",
        attributes=kvs({"gen_ai.response.id": "chatcmpl-42", "gen_ai.evaluation.name": "judge",
                        "gen_ai.evaluation.score.label": "incorrect"}),
    )  # fmt: skip
    b = cap.process([msg(logs_request([grade]).SerializeToString(), "otlp_logs", 1)], NOW)
    assert b.deadletters == []
    (t,) = b.turns
    assert t.conversation_id == conv_id and t.trace_id == ""  # no trace of its own
    assert [(e.name, e.label, e.response_id) for e in t.evaluations] == [
        ("judge", "incorrect", "chatcmpl-42")
    ]
    # another capture process, which did not see the answer, names it for understand to find
    other = Capture(CaptureConfig())
    b = other.process([msg(logs_request([grade]).SerializeToString(), "otlp_logs", 1)], NOW)
    assert b.deadletters == []
    (t,) = b.turns
    assert t.conversation_id == RESPONSE_REF + "chatcmpl-42" and t.evaluations


def test_progress_is_the_newest_turn_per_input_partition() -> None:
    chat = {"gen_ai.operation.name": "chat", "gen_ai.conversation.id": "c"}
    first, second = (request([span(n, 0, "chat", chat)]).SerializeToString() for n in (1, 5))
    other = request([span(9, 0, "GET /", {})]).SerializeToString()
    b = run(
        RawMessage("otlp_spans", 0, 0, None, second),
        RawMessage("otlp_spans", 0, 1, None, first),
        RawMessage("otlp_spans", 1, 0, None, first),
        RawMessage("otlp_spans", 2, 0, None, other),  # no turn: no progress to tell
        RawMessage("otlp_spans", 3, 0, None, b"not otlp"),  # dead-lettered
    )
    assert b.progress == {
        "otlp_spans:0": T0 + 5 * 1_000_000 + 500_000,
        "otlp_spans:1": T0 + 1 * 1_000_000 + 500_000,
    }
