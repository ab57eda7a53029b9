"""Capture never raises on input: random bytes, mutated requests, random JSON, random attributes.

Every message yields rows or records, or dead letters, or (logs) is counted as ignored.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.capture.core import Capture, CaptureBatch, RawMessage
from processors.config import CaptureConfig
from tests.unit.test_capture import (
    any_value,
    genai_spans,
    log,
    logs_request,
    openinference_spans,
    otlp_json,
    request,
    span,
    traceloop_spans,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CAPTURE = Capture(CaptureConfig(max_attribute_bytes=512))

SPANS = request(
    genai_spans()
    + [span(20 + i, 1, s.name, {}) for i, s in enumerate(openinference_spans() + traceloop_spans())]
)
VALID = [
    ("otlp_spans", SPANS.SerializeToString()),
    ("otlp_spans", request(openinference_spans()).SerializeToString()),
    ("otlp_spans", request(traceloop_spans()).SerializeToString()),
    (
        "otlp_logs",
        logs_request(
            [
                log("gen_ai.user.message", {"content": "hi"}),
                log("gen_ai.choice", {"message": {"content": "hello"}}),
            ]
        ).SerializeToString(),
    ),
]
VALID_JSON = [
    ("otlp_spans", otlp_json(SPANS)),
    ("otlp_logs", otlp_json(logs_request([log("gen_ai.user.message", {"content": "hi"})]))),
]
TOPICS = st.sampled_from(["otlp_spans", "otlp_logs"])


def check(topic: str, value: bytes) -> CaptureBatch:
    b = CAPTURE.process([RawMessage(topic, 0, 1, None, value)], 1)
    produced = b.span_rows or b.turns or b.deadletters or b.log_records_ignored
    assert produced, "a message vanished without rows, records or a dead letter"
    for d in b.deadletters:
        assert d.reason and d.stage == "capture" and d.topic == topic
        assert not d.reason.startswith("capture failed"), d.detail  # the safety net caught a bug
    json.dumps([b.span_rows, b.turn_rows, b.tool_rows, [t.to_dict() for t in b.turns]])
    return b


@FUZZ
@given(topic=TOPICS, value=st.binary(max_size=2048))
def test_random_bytes(topic: str, value: bytes) -> None:
    check(topic, value)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    topic, value = draw(st.sampled_from(VALID + VALID_JSON))
    data = bytearray(value)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[i : i + draw(st.integers(1, 32))]
    return topic, bytes(data)


@FUZZ
@given(mutated())
def test_mutated_requests(case: tuple[str, bytes]) -> None:
    check(*case)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
OTLP_KEYS = st.sampled_from(
    [
        "resourceSpans",
        "scopeSpans",
        "spans",
        "resourceLogs",
        "scopeLogs",
        "logRecords",
        "traceId",
        "spanId",
        "parentSpanId",
        "name",
        "attributes",
        "events",
        "status",
        "startTimeUnixNano",
        "key",
        "value",
        "stringValue",
        "intValue",
        "body",
        "eventName",
    ]
)
OTLP_LIKE = st.recursive(
    JSON_VALUES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(OTLP_KEYS, inner, max_size=5),
    max_leaves=30,
)


@FUZZ
@given(topic=TOPICS, doc=OTLP_LIKE)
def test_random_json(topic: str, doc: Any) -> None:
    check(topic, json.dumps(doc).encode())


ATTR_KEYS = st.sampled_from(
    [
        "gen_ai.operation.name",
        "gen_ai.conversation.id",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.system_instructions",
        "gen_ai.usage.input_tokens",
        "gen_ai.request.model",
        "gen_ai.tool.name",
        "gen_ai.tool.call.arguments",
        "openinference.span.kind",
        "llm.input_messages.0.message.content",
        "llm.output_messages.1.message.tool_calls.0.tool_call.function.name",
        "gen_ai.prompt.0.role",
        "gen_ai.completion.0.content",
        "traceloop.span.kind",
        "session.id",
        "closeloop.conversation.end",
        "llm.token_count.prompt",
        "input.value",
        "error.type",
        "event.name",
    ]
)
ATTR_VALUES = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=8)
    | st.sampled_from(
        [
            "chat",
            "execute_tool",
            "invoke_agent",
            "LLM",
            "TOOL",
            "tool",
            "[1, 2]",
            '{"a": 1}',
            json.dumps([{"role": "user", "parts": [{"type": "text", "content": "x"}]}]),
            json.dumps([{"role": 5, "parts": [{"type": "tool_call", "arguments": [1]}]}]),
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    attrs=st.dictionaries(ATTR_KEYS, ATTR_VALUES, max_size=8),
    resource=st.dictionaries(ATTR_KEYS, ATTR_VALUES, max_size=3),
    event=st.sampled_from(
        [
            "gen_ai.choice",
            "gen_ai.user.message",
            "gen_ai.client.inference.operation.details",
            "other",
        ]
    ),
    body=ATTR_VALUES,
)
def test_random_attributes(
    attrs: dict[str, Any], resource: dict[str, Any], event: str, body: Any
) -> None:
    sp = span(1, 0, "s", attrs, events=[("gen_ai.content.prompt", attrs)])
    b = check("otlp_spans", request([sp], resource).SerializeToString())
    assert len(b.span_rows) + len(b.deadletters) == 1
    if b.turns:
        assert b.turns[0].conversation_id
    lr = log(event, attrs=attrs)
    lr.body.CopyFrom(any_value(body))
    check("otlp_logs", logs_request([lr], resource).SerializeToString())
