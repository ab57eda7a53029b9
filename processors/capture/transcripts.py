"""Transcripts in the OpenAI chat-messages format -> the OTLP an instrumented agent sends.

``closeloop import`` backfills history: each JSONL line is one conversation and becomes one
trace of OTel GenAI spans, as the semantic conventions have them, so capture cannot tell an
import from a live agent:

* ``invoke_agent`` (the root): ``gen_ai.conversation.id``, agent name, prompt version, the
  end marker, the outcome (``closeloop.outcome``) and the score as a
  ``gen_ai.evaluation.result`` span event;
* one ``chat`` span per assistant message: the system instructions, the messages since the
  previous call as input, the assistant message (text and ``tool_calls``) as output;
* one ``execute_tool`` span per tool result: name, call id, arguments, result; an error
  status when the result is marked ``"error": true``.

A line (JSON object)::

    {"id": "conv-1",                       # required: the conversation id
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
                   "tool_calls": [{"id", "function": {"name", "arguments"}}],  # assistant
                   "tool_call_id": ..., "name": ..., "error": false,            # tool
                   "timestamp": 1733500000.5}],                                 # optional
     "system": "...",                      # optional; else the first system message
     "prompt_version": "v3", "model": "gpt-4o", "agent_name": "support",   # optional
     "outcome": "resolved|failed|escalated|abandoned|errored", "outcome_reason": "...",
     "score": 0.0, "label": "fail", "evaluation_name": "reward", "explanation": "...",
     "start_time": 1733500000}             # epoch seconds or ISO 8601; default: the import time

Messages without timestamps are spaced one second apart from ``start_time``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from processors.errors import InputError
from processors.records import (
    EVALUATION_EVENT,
    OUTCOME_ATTRIBUTE,
    OUTCOME_REASON_ATTRIBUTE,
    OUTCOMES,
)

END_ATTRIBUTE = "closeloop.conversation.end"
SERVICE = "closeloop-import"
STEP_NS = 1_000_000_000  # messages without timestamps: one second apart
_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Transcript:
    """One validated line."""

    conversation_id: str
    messages: list[dict[str, Any]]
    system: str
    prompt_version: str
    model: str
    agent_name: str
    outcome: str
    outcome_reason: str
    score: float | None
    label: str
    evaluation_name: str
    explanation: str
    start_ns: int


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise InputError(f"{key!r} must be a string, got {type(v).__name__}")
    return v


def _time_ns(v: Any, key: str) -> int:
    if isinstance(v, bool):
        raise InputError(f"{key!r} must be epoch seconds or ISO 8601")
    if isinstance(v, (int, float)):
        return int(v * 1e9)
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"{key!r} is not ISO 8601: {v[:40]!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return int(t.timestamp() * 1e9)
    raise InputError(f"{key!r} must be epoch seconds or ISO 8601")


def parse_line(line: str, now_ns: int) -> Transcript:
    """Validate one JSONL line; :class:`InputError` says what is wrong with it."""
    try:
        d = json.loads(line)
    except ValueError as e:
        raise InputError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise InputError("a line must be a JSON object")
    cid = d.get("id", d.get("conversation_id"))
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    if not isinstance(cid, str) or not cid.strip():
        raise InputError("'id' (the conversation id) is missing")
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise InputError(f"messages[{i}] needs a role among {', '.join(_ROLES)}")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise InputError(f"messages[{i}].tool_calls must be a list")
    outcome = _str(d, "outcome").strip().lower()
    if outcome and outcome not in OUTCOMES:
        raise InputError(f"'outcome' {outcome!r} is not one of {', '.join(OUTCOMES)}")
    score = d.get("score", d.get("reward"))
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise InputError("'score' must be a number")
    system = _str(d, "system") or "\n".join(
        _content_text(m.get("content")) for m in msgs if m["role"] == "system"
    )
    start = d.get("start_time")
    return Transcript(
        conversation_id=cid,
        messages=[m for m in msgs if m["role"] != "system"],
        system=system,
        prompt_version=_str(d, "prompt_version"),
        model=_str(d, "model"),
        agent_name=_str(d, "agent_name"),
        outcome=outcome,
        outcome_reason=_str(d, "outcome_reason"),
        score=None if score is None else float(score),
        label=_str(d, "label"),
        evaluation_name=_str(d, "evaluation_name") or "score",
        explanation=_str(d, "explanation"),
        start_ns=now_ns if start is None else _time_ns(start, "start_time"),
    )


def _content_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return "" if c is None else json.dumps(c)


def _kv(key: str, value: Any) -> KeyValue:
    v = AnyValue()
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    else:
        v.string_value = str(value)
    return KeyValue(key=key, value=v)


def _id(conversation_id: str, what: str, n: int) -> bytes:
    h = hashlib.sha256(f"{conversation_id}\x1f{what}".encode()).digest()
    return h[:n] if any(h[:n]) else b"\x01" * n


class _Clock:
    """Message times: their own timestamp, else one step after the previous message."""

    def __init__(self, start_ns: int) -> None:
        self.t = start_ns

    def at(self, m: dict[str, Any]) -> int:
        ts = m.get("timestamp")
        self.t = _time_ns(ts, "timestamp") if ts is not None else self.t + STEP_NS
        return self.t


def _openai_message(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m["role"], "content": _content_text(m.get("content"))}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def to_request(tr: Transcript) -> ExportTraceServiceRequest:
    """The trace of one transcript as an OTLP request (deterministic ids: a re-import rewrites)."""
    trace_id = _id(tr.conversation_id, "trace", 16)
    root_id = _id(tr.conversation_id, "root", 8)
    clock = _Clock(tr.start_ns)
    spans: list[Span] = []
    pending: list[dict[str, Any]] = []  # messages since the previous model call
    conv_attr = _kv("gen_ai.conversation.id", tr.conversation_id)
    for i, m in enumerate(tr.messages):
        t = clock.at(m)
        if m["role"] in ("user", "tool"):
            pending.append(_openai_message(m))
        if m["role"] == "tool":
            spans.append(_tool_span(tr, m, i, trace_id, root_id, t, conv_attr))
        if m["role"] == "assistant":
            out = _openai_message(m)
            spans.append(_chat_span(tr, i, trace_id, root_id, t, pending, out))
            pending = [out]
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(_kv("service.name", tr.agent_name or SERVICE))
    ss = rs.scope_spans.add()
    ss.scope.name = "closeloop.import"
    ss.spans.extend([_root_span(tr, trace_id, root_id, clock.t + 1), *spans])
    return req


def _version(tr: Transcript) -> list[KeyValue]:
    return [_kv("gen_ai.prompt.version", tr.prompt_version)] if tr.prompt_version else []


def _chat_span(
    tr: Transcript,
    i: int,
    trace_id: bytes,
    root_id: bytes,
    t: int,
    inputs: list[dict[str, Any]],
    output: dict[str, Any],
) -> Span:
    """The model call that produced assistant message ``i`` from the messages since the last."""
    attrs = [
        _kv("gen_ai.operation.name", "chat"),
        _kv("gen_ai.conversation.id", tr.conversation_id),
        _kv("gen_ai.input.messages", json.dumps(inputs)),
        _kv("gen_ai.output.messages", json.dumps([output])),
        *_version(tr),
    ]
    if tr.system:
        attrs.append(_kv("gen_ai.system_instructions", tr.system))
    if tr.model:
        attrs += [_kv("gen_ai.request.model", tr.model), _kv("gen_ai.response.model", tr.model)]
    return Span(
        trace_id=trace_id,
        span_id=_id(tr.conversation_id, f"chat{i}", 8),
        parent_span_id=root_id,
        name=f"chat {tr.model}".strip(),
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=max(tr.start_ns, t - STEP_NS // 2),
        end_time_unix_nano=t,
        attributes=attrs,
    )


def _root_span(tr: Transcript, trace_id: bytes, root_id: bytes, end_ns: int) -> Span:
    """``invoke_agent``: the conversation's ids, its end, and what was stated about it."""
    root = Span(
        trace_id=trace_id,
        span_id=root_id,
        name=f"invoke_agent {tr.agent_name}".strip(),
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=tr.start_ns,
        end_time_unix_nano=end_ns,
        attributes=[
            _kv("gen_ai.operation.name", "invoke_agent"),
            _kv("gen_ai.conversation.id", tr.conversation_id),
            _kv(END_ATTRIBUTE, True),
            *_version(tr),
            *([_kv("gen_ai.agent.name", tr.agent_name)] if tr.agent_name else []),
            *([_kv(OUTCOME_ATTRIBUTE, tr.outcome)] if tr.outcome else []),
            *([_kv(OUTCOME_REASON_ATTRIBUTE, tr.outcome_reason)] if tr.outcome_reason else []),
        ],
    )
    if tr.score is not None or tr.label:
        ev = root.events.add(name=EVALUATION_EVENT, time_unix_nano=end_ns)
        ev.attributes.append(_kv("gen_ai.evaluation.name", tr.evaluation_name))
        if tr.score is not None:
            ev.attributes.append(_kv("gen_ai.evaluation.score.value", tr.score))
        if tr.label:
            ev.attributes.append(_kv("gen_ai.evaluation.score.label", tr.label))
        if tr.explanation:
            ev.attributes.append(_kv("gen_ai.evaluation.explanation", tr.explanation))
    return root


def _tool_span(
    tr: Transcript,
    m: dict[str, Any],
    i: int,
    trace_id: bytes,
    root_id: bytes,
    t: int,
    conv_attr: KeyValue,
) -> Span:
    call_id = str(m.get("tool_call_id") or "")
    name = str(m.get("name") or "")
    arguments = ""
    for prev in reversed(tr.messages[:i]):  # the assistant's request for this call
        for tc in prev.get("tool_calls") or []:
            if isinstance(tc, dict) and tc.get("id") == call_id:
                fn = tc.get("function") or {}
                name = name or str(fn.get("name") or "")
                arguments = fn.get("arguments") or ""
                arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        if arguments:
            break
    sp = Span(
        trace_id=trace_id,
        span_id=_id(tr.conversation_id, f"tool{i}", 8),
        parent_span_id=root_id,
        name=f"execute_tool {name}".strip(),
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=max(tr.start_ns, t - STEP_NS // 4),
        end_time_unix_nano=t,
        attributes=[
            _kv("gen_ai.operation.name", "execute_tool"),
            conv_attr,
            _kv("gen_ai.tool.name", name),
            _kv("gen_ai.tool.call.id", call_id),
            _kv("gen_ai.tool.call.arguments", arguments),
            _kv("gen_ai.tool.call.result", _content_text(m.get("content"))),
        ],
    )
    if m.get("error") is True:
        sp.status.code = Status.STATUS_CODE_ERROR
        sp.status.message = _content_text(m.get("content"))[:1000]
    return sp


def read_lines(lines: Iterator[str], now_ns: int) -> Iterator[tuple[int, Transcript | str]]:
    """``(line number, transcript or why the line is bad)`` for every non-blank line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, parse_line(line, now_ns)
        except InputError as e:
            yield n, str(e)
