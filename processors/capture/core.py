"""Layer 1, capture: OTLP spans and GenAI log events -> redacted rows and turn records.

The pure core. :meth:`Capture.process` takes raw Kafka messages from ``otlp_spans``
(``ExportTraceServiceRequest``) and ``otlp_logs`` (``ExportLogsServiceRequest``),
protobuf or OTLP/JSON, and returns a :class:`CaptureBatch`:

- one ``spans`` row per span: resource and span attributes flattened to strings
  (non-strings JSON-encoded, nothing dropped, values longer than
  ``max_attribute_bytes`` truncated with a marker), events as JSON text;
- one ``turns`` row and one :class:`TurnRecord` per ``llm``, ``tool`` and
  ``agent`` span, normalised from the three attribute dialects (OTel GenAI
  semantic conventions, OpenInference, OpenLLMetry/traceloop); other spans only
  get their ``spans`` row;
- one ``tool_calls`` row per executed tool span (tool calls the model merely
  requested stay in its output messages);
- dead letters for what cannot be read.

Redaction comes first: every attribute value, span name, event, status message,
log body and every string inside JSON values goes through the :class:`Redactor`
before any row or record is built, and JSON values are redacted leaf by leaf
(redacting JSON text would miss secrets behind escapes like ``\\n``); JSON text that
:meth:`Redactor.json_is_clean` clears as a whole is parsed once and kept as it is.

Conversation id: ``gen_ai.conversation.id``, else ``session.id``, else
``traceloop.association.properties.session_id`` (span first, then resource), else
one found on another span of the same trace in the same request, else the trace
id. Kafka messages are replayed whole, so the result does not depend on batching.

System-prompt version: ``gen_ai.prompt.version`` or ``closeloop.prompt.version``,
else the first 12 hex digits of sha256 of the (redacted) system instructions
text, else empty.

Log events: message content recorded on the logs signal
(``gen_ai.client.inference.operation.details``, or the older
``gen_ai.system.message``/``user``/``assistant``/``tool``/``choice`` events of
``opentelemetry-instrumentation-openai-v2``) becomes a TurnRecord with
``span_kind="content"`` carrying only messages, system instructions and prompt
version, under the trace and span id of the span it belongs to (one record per
span and Kafka message). The assembler merges records by span id, whichever
comes first. Its conversation id comes from the log record's attributes when
present, else from a span of the same trace seen earlier by this capture process
(the last ``TRACES_REMEMBERED`` traces; both topics are keyed by trace id, so a trace's
spans and logs reach the same process), else it is the trace id. A log record exported
before any span of its trace therefore needs ``gen_ai.conversation.id`` when the spans
carry an explicit conversation id. Content records have no
``turns`` row. Content kept elsewhere and referenced (``gen_ai.input.messages.ref``
and the like, or a messages attribute that is a URI rather than JSON) stays in
the ``spans`` row's attributes as the reference string; no message is invented.

Errors are data: an undecodable message, a JSON document that is not OTLP, or a
request with too many spans becomes one :class:`DeadLetter`; a bad span or log
record (invalid ids, an attribute of the wrong type) is skipped and reported in
one dead letter per message and reason, the rest of the request goes through.
Output is deterministic: the same messages give the same rows (``ingested_ns``
is ``now_ns``), so a replay rewrites the same ReplacingMergeTree keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processors.capture.otlp import Problem, any_value, decode_logs, decode_traces, is_json
from processors.config import CaptureConfig
from processors.errors import ConfigError, InputError, PayloadTooLarge
from processors.records import (
    EVALUATION_EVENT,
    OUTCOME_ATTRIBUTE,
    OUTCOME_REASON_ATTRIBUTE,
    RESPONSE_REF,
    DeadLetter,
    Evaluation,
    Message,
    ToolCall,
    TurnRecord,
)
from processors.redact import Redactor

STAGE = "capture"
DEFAULT_END_ATTRIBUTE = "closeloop.conversation.end"
DEADLETTER_ORIGINAL_BYTES = 64 * 1024
TRUNCATED_MARKER = "…[truncated {} bytes]"
_UINT32_MAX = 2**32 - 1
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_TOO_DEEP = "values nested too deeply"
_DETACHED = "eval-"  # span id prefix of an evaluation sent without trace context
TRACES_REMEMBERED = 100_000  # trace -> conversation ids kept for log records (oldest dropped)
_JSON_OPEN = ("{", "[")
_JSON_CLOSE = ("}", "]")
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}

_CONVERSATION_KEYS = (
    "gen_ai.conversation.id",
    "session.id",
    "traceloop.association.properties.session_id",
)
_PROMPT_VERSION_KEYS = ("gen_ai.prompt.version", "closeloop.prompt.version")
_LLM_OPS = {"chat", "text_completion", "generate_content", "embeddings", "completion"}
_AGENT_OPS = {"invoke_agent", "create_agent", "invoke_workflow"}
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "system": "system",
    "developer": "system",
}
_CONTENT_EVENTS = {
    "gen_ai.client.inference.operation.details",
    "gen_ai.content.prompt",
    "gen_ai.content.completion",
    "gen_ai.system.message",
    "gen_ai.user.message",
    "gen_ai.assistant.message",
    "gen_ai.tool.message",
    "gen_ai.choice",
}
_MESSAGE_EXTRA = ("tool_name", "tool_call_id", "tool_arguments", "error")
_INDEXED = ("gen_ai.prompt.", "gen_ai.completion.", "llm.input_messages.", "llm.output_messages.")


@dataclass
class RawMessage:
    """One Kafka message as consumed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass
class CaptureBatch:
    """What :meth:`Capture.process` produces from a list of messages."""

    span_rows: list[dict[str, Any]] = field(default_factory=list)  # table spans
    turn_rows: list[dict[str, Any]] = field(default_factory=list)  # table turns
    tool_rows: list[dict[str, Any]] = field(default_factory=list)  # table tool_calls
    turns: list[TurnRecord] = field(default_factory=list)  # topic closeloop.turns
    deadletters: list[DeadLetter] = field(default_factory=list)  # topic closeloop.deadletter
    messages_in: int = 0
    spans_in: int = 0
    log_records_in: int = 0
    log_records_ignored: int = 0  # log records that are not GenAI content events
    redactions: int = 0
    truncated: int = 0  # values cut at max_attribute_bytes
    # capture's progress: per input ``topic:partition``, the newest span time of its turns
    progress: dict[str, int] = field(default_factory=dict)


@dataclass
class _Out(CaptureBatch):
    """The output of one Kafka message, merged into the batch only when the message is done."""

    problems: list[Problem] = field(default_factory=list)

    def merge_into(self, batch: CaptureBatch, source: str) -> None:
        """Add this output to ``batch``; ``source`` (``topic:partition``) progressed to its
        newest turn."""
        for f in fields(CaptureBatch):
            if f.name != "progress":
                setattr(batch, f.name, getattr(batch, f.name) + getattr(self, f.name))
        newest = max((max(t.start_ns, t.end_ns) for t in self.turns), default=0)
        if newest:
            batch.progress[source] = max(batch.progress.get(source, 0), newest)


class Capture:
    """The capture core: ``process(messages, now_ns) -> CaptureBatch``. No I/O, no clock."""

    def __init__(
        self,
        cfg: CaptureConfig,
        redactor: Redactor | None = None,
        *,
        end_attribute: str = DEFAULT_END_ATTRIBUTE,
        logs_topic: str = "otlp_logs",
    ) -> None:
        self.cfg = cfg
        if redactor is None:
            try:
                redactor = Redactor(cfg.redact, cfg.extra_patterns)
            except ValueError as e:
                raise ConfigError("capture.extra_patterns", str(e)) from None
        self.redactor = redactor
        self.end_attribute = end_attribute
        self.logs_topic = logs_topic
        self._redact = self.redactor.redact
        self._is_secret_key = self.redactor.is_secret_key
        # per-span counters, reset by the span/log loops
        self._red = 0
        self._trunc = 0
        # conversation ids spans gave their traces, for log records that carry only trace
        # context (a GenAI content or evaluation event emitted under the span); bounded
        self._trace_conv: dict[str, str] = {}
        self._responses: dict[str, str] = {}  # gen_ai.response.id -> conversation id

    # ---------------------------------------------------------------- messages

    def process(self, messages: list[RawMessage], now_ns: int) -> CaptureBatch:
        """Turn raw Kafka messages into rows, turn records and dead letters. Never raises on input."""
        batch = CaptureBatch()
        # spans before log records: a log record tied only by trace context takes the
        # conversation id its trace's spans give, whichever topic the consumer read first
        for m in sorted(messages, key=lambda m: m.topic == self.logs_topic):
            batch.messages_in += 1
            out = _Out()
            try:
                if len(m.value) > self.cfg.max_message_bytes:
                    raise PayloadTooLarge(
                        "message too large",
                        detail=f"{len(m.value)} > {self.cfg.max_message_bytes} bytes",
                    )
                if m.topic == self.logs_topic:
                    self._logs(m, out)
                else:
                    self._traces(m, out, now_ns)
            except InputError as e:
                batch.deadletters.append(self._dead(m, e.reason, e.detail, now_ns))
                continue
            except RecursionError:
                batch.deadletters.append(self._dead(m, _TOO_DEEP, "", now_ns))
                continue
            except Exception as e:
                batch.deadletters.append(
                    self._dead(m, f"capture failed: {type(e).__name__}", str(e)[:300], now_ns)
                )
                continue
            by_reason: dict[str, list[str]] = {}
            for where, reason in out.problems:
                by_reason.setdefault(reason, []).append(where)
            # one dead letter per (message, reason): that is the deadletter table's key
            for reason, wheres in by_reason.items():
                detail = f"{len(wheres)} item(s): {', '.join(wheres[:20])}"
                out.deadletters.append(self._dead(m, reason, detail, now_ns))
            out.merge_into(batch, f"{m.topic}:{m.partition}")
        return batch

    def _learn_traces(self, trace_conv: dict[str, str]) -> None:
        _remember(self._trace_conv, trace_conv)

    def _learn_responses(self, rows: list[dict[str, Any]]) -> None:
        _remember(
            self._responses,
            {
                r["attributes"]["gen_ai.response.id"]: r["conversation_id"]
                for r in rows
                if r["attributes"].get("gen_ai.response.id")
            },
        )

    def _check_count(self, n: int, what: str, problems: Any) -> None:
        """A request must hold something, and not more than the configured limit."""
        if n > self.cfg.max_spans_per_request:
            raise PayloadTooLarge(
                f"too many {what} in one request", detail=f"{n} > {self.cfg.max_spans_per_request}"
            )
        if n == 0 and not problems:
            raise InputError(f"request holds no {what}")

    def _traces(self, m: RawMessage, out: _Out, now_ns: int) -> None:
        req, problems = decode_traces(m.value)
        out.problems += problems
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        self._check_count(n, "spans", problems)
        out.spans_in += n
        done: list[tuple[dict[str, Any], TurnRecord | None, dict[str, Any] | None, bool]] = []
        trace_conv: dict[str, str] = {}
        for i, rs in enumerate(req.resource_spans):
            self._red = self._trunc = 0
            res_strs, res_vals = self._attributes(rs.resource.attributes)
            res_red, res_trunc = self._red, self._trunc
            res_row = self._cap_all(res_strs)
            service = str(res_vals.get("service.name", ""))
            for j, ss in enumerate(rs.scope_spans):
                scope = ss.scope.name
                for k, sp in enumerate(ss.spans):
                    self._red, self._trunc = res_red, res_trunc
                    try:
                        row, turn, tool_row, explicit = self._span(
                            sp, res_row, res_vals, service, scope, now_ns
                        )
                    except InputError as e:
                        out.problems.append(
                            (f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]", e.reason)
                        )
                        continue
                    except RecursionError:
                        out.problems.append(
                            (f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]", _TOO_DEEP)
                        )
                        continue
                    out.redactions += self._red
                    out.truncated += self._trunc
                    if explicit:
                        trace_conv.setdefault(row["trace_id"], row["conversation_id"])
                    done.append((row, turn, tool_row, explicit))
        self._learn_traces(trace_conv)
        for row, turn, tool_row, explicit in done:
            if not explicit:  # borrow the trace's conversation id, else keep the trace id
                row["conversation_id"] = trace_conv.get(row["trace_id"], row["trace_id"])
            out.span_rows.append(row)
            if turn is not None:
                turn.conversation_id = row["conversation_id"]
                out.turns.append(turn)
                out.turn_rows.append(_turn_row(turn))
                if tool_row is not None:
                    tool_row["conversation_id"] = turn.conversation_id
                    out.tool_rows.append(tool_row)
        self._learn_responses(out.span_rows)

    # ------------------------------------------------------------------ spans

    def _span(
        self,
        sp: Span,
        res_row: dict[str, str],
        res_vals: dict[str, Any],
        service: str,
        scope: str,
        now_ns: int,
    ) -> tuple[dict[str, Any], TurnRecord | None, dict[str, Any] | None, bool]:
        trace_id, span_id, parent_id = _ids(sp.trace_id, sp.span_id, sp.parent_span_id)
        strs, vals = self._attributes(sp.attributes)
        a = _Attrs(vals, res_vals)
        name = self._text(sp.name)
        status_code = _STATUS.get(sp.status.code, "UNSET")
        status_message = self._cap(self._text(sp.status.message))
        events, ev_vals = self._span_events(sp)
        start_ns, end_ns = sp.start_time_unix_nano, sp.end_time_unix_nano
        duration_ms = max(0, end_ns - start_ns) / 1e6
        conv, explicit = a.conversation(trace_id)
        kind = _kind(a, parent_id)
        evaluations = self._span_evaluations(a, ev_vals, trace_id, span_id, end_ns)
        if kind == "other" and evaluations:
            kind = "content"  # a span of no GenAI kind that states an outcome: keep the outcome
        row = {
            "trace_id": trace_id,
            "span_id": span_id,
            "parent_span_id": parent_id,
            "conversation_id": conv,
            "name": name,
            "span_kind": kind,
            "service_name": service,
            "scope_name": scope,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "duration_ms": duration_ms,
            "status_code": status_code,
            "status_message": status_message,
            "resource_attributes": res_row,
            "attributes": self._cap_all(strs),
            "events": json.dumps(events, ensure_ascii=False) if events else "[]",
            "redactions": 0,
            "ingested_ns": now_ns,
        }
        if kind == "other":
            row["redactions"] = self._red
            return row, None, None, explicit
        if kind == "content":
            turn = TurnRecord(
                conversation_id=conv,
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent_id,
                span_kind="content",
                name=name,
                start_ns=start_ns,
                end_ns=end_ns,
                evaluations=evaluations,
            )
        else:
            turn = self._genai_turn(a, row, ev_vals, evaluations)
        # read last: every text of the span has been redacted by now
        turn.redactions = row["redactions"] = self._red
        return row, turn, _tool_row(turn), explicit

    def _span_events(
        self, sp: Span
    ) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
        """The span's events as stored (capped attribute strings) and as values (for reading)."""
        events = []
        ev_vals = []
        for ev in sp.events:
            ev_strs, ev_v = self._attributes(ev.attributes)
            ev_name = self._text(ev.name)
            events.append(
                {
                    "name": ev_name,
                    "time_ns": ev.time_unix_nano,
                    "attributes": self._cap_all(ev_strs),
                }
            )
            ev_vals.append((ev_name, ev_v))
        return events, ev_vals

    def _span_error(
        self,
        a: _Attrs,
        status_code: str,
        status_message: str,
        ev_vals: list[tuple[str, dict[str, Any]]],
    ) -> tuple[str, str]:
        """``(error_type, error_message)`` of a failed span (``error.type``, an ERROR status or an
        ``exception`` event), ``("", "")`` for one that did not fail."""
        error_type = a.str("error.type")
        error_message = status_message
        for ev_name, ev_v in ev_vals:
            if ev_name == "exception":
                error_type = error_type or _as_text(ev_v.get("exception.type", ""))
                error_message = error_message or self._cap(
                    _as_text(ev_v.get("exception.message", ""))
                )
        if status_code != "ERROR" and not error_type:
            return "", ""
        return error_type or "error", error_message

    def _genai_turn(
        self,
        a: _Attrs,
        row: dict[str, Any],
        ev_vals: list[tuple[str, dict[str, Any]]],
        evaluations: list[Evaluation],
    ) -> TurnRecord:
        """The turn of an LLM, tool or agent span: its messages or tool call, model, tokens and
        error, from whichever dialect the span speaks."""
        kind, name, trace_id, span_id = (
            row["span_kind"],
            row["name"],
            row["trace_id"],
            row["span_id"],
        )
        start_ns, end_ns = row["start_ns"], row["end_ns"]
        error_type, error_message = self._span_error(
            a, row["status_code"], row["status_message"], ev_vals
        )
        system = ""
        inputs: list[Message] = []
        outputs: list[Message] = []
        tool = None
        if kind == "tool":
            tool = self._tool(
                a, name, trace_id, span_id, start_ns, row["duration_ms"], error_type, error_message
            )
        else:
            system, inputs, outputs = self._span_messages(a, ev_vals, kind)
        for msg in inputs:
            msg.trace_id, msg.span_id, msg.ts_ns = trace_id, span_id, start_ns
        for msg in outputs:
            msg.trace_id, msg.span_id, msg.ts_ns = trace_id, span_id, end_ns
        return TurnRecord(
            conversation_id=row["conversation_id"],
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=row["parent_span_id"],
            span_kind=kind,
            name=name,
            operation=a.str("gen_ai.operation.name") or _default_operation(kind, a),
            provider=a.str("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"),
            request_model=a.str("gen_ai.request.model", "llm.model_name"),
            response_model=a.str("gen_ai.response.model", "llm.model_name"),
            agent_name=a.str("gen_ai.agent.name", "agent.name")
            or (a.str("traceloop.entity.name") if kind == "agent" else ""),
            agent_version=a.str("gen_ai.agent.version"),
            prompt_version=a.prompt_version(system),
            system_instructions=system,
            input_messages=inputs,
            output_messages=outputs,
            tool=tool,
            input_tokens=a.int(
                "gen_ai.usage.input_tokens",
                "gen_ai.usage.prompt_tokens",
                "llm.token_count.prompt",
                "llm.usage.prompt_tokens",
            ),
            output_tokens=a.int(
                "gen_ai.usage.output_tokens",
                "gen_ai.usage.completion_tokens",
                "llm.token_count.completion",
                "llm.usage.completion_tokens",
            ),
            start_ns=start_ns,
            end_ns=end_ns,
            status="error" if error_type else "ok",
            error_type=error_type,
            error_message=error_message,
            end_of_conversation=_truthy(a.get(self.end_attribute)),
            evaluations=evaluations,
        )

    def _span_evaluations(
        self,
        a: _Attrs,
        ev_vals: list[tuple[str, dict[str, Any]]],
        trace_id: str,
        span_id: str,
        end_ns: int,
    ) -> list[Evaluation]:
        """Outcomes the span states: ``gen_ai.evaluation.result`` span events and the
        ``closeloop.outcome`` attribute."""
        out = [
            _evaluation(ev, "event", trace_id, span_id, end_ns)
            for name, ev in ev_vals
            if name == EVALUATION_EVENT
        ]
        stated = a.vals.get(OUTCOME_ATTRIBUTE)
        if isinstance(stated, str) and stated:
            out.append(
                Evaluation(
                    name=OUTCOME_ATTRIBUTE,
                    label=stated.strip().lower(),
                    explanation=self._cap(_as_text(a.vals.get(OUTCOME_REASON_ATTRIBUTE) or "")),
                    source="attribute",
                    span_id=span_id,
                    trace_id=trace_id,
                    ts_ns=end_ns,
                )
            )
        return out

    def _tool(
        self,
        a: _Attrs,
        span_name: str,
        trace_id: str,
        span_id: str,
        start_ns: int,
        duration_ms: float,
        error_type: str,
        error_message: str,
    ) -> ToolCall:
        name = a.str(
            "gen_ai.tool.name", "tool.name", "tool_call.function.name", "traceloop.entity.name"
        )
        if not name:
            name = span_name.removeprefix("execute_tool").strip()
        return ToolCall(
            name=name,
            call_id=a.str("gen_ai.tool.call.id", "tool_call.id"),
            arguments=self._cap(
                _as_text(
                    a.first(
                        "gen_ai.tool.call.arguments",
                        "tool_call.function.arguments",
                        "input.value",
                        "tool.parameters",
                        "traceloop.entity.input",
                    )
                )
            ),
            result=self._cap(
                _as_text(
                    a.first("gen_ai.tool.call.result", "output.value", "traceloop.entity.output")
                )
            ),
            error_type=error_type,
            error_message=error_message,
            span_id=span_id,
            trace_id=trace_id,
            start_ns=start_ns,
            duration_ms=duration_ms,
        )

    def _span_messages(
        self, a: _Attrs, ev_vals: list[tuple[str, dict[str, Any]]], kind: str
    ) -> tuple[str, list[Message], list[Message]]:
        """Messages from the first dialect that has them: GenAI attributes, OpenLLMetry indexed
        attributes, OpenInference indexed attributes, span events, OpenInference input/output values."""
        v = a.vals
        sys_raw = v.get("gen_ai.system_instructions")
        if "gen_ai.input.messages" in v or "gen_ai.output.messages" in v:
            ins, outs = v.get("gen_ai.input.messages"), v.get("gen_ai.output.messages")
        elif any(k.startswith(_INDEXED) for k in v):
            ins = _indexed(v, "gen_ai.prompt.", _traceloop_message) or _indexed(
                v, "llm.input_messages.", _openinference_message
            )
            outs = _indexed(v, "gen_ai.completion.", _traceloop_message) or _indexed(
                v, "llm.output_messages.", _openinference_message
            )
        else:
            ins, outs = [], []
            for name, ev in ev_vals:
                if name in _CONTENT_EVENTS:
                    s, i, o = _event_content(name, ev, ev)
                    sys_raw = sys_raw or s
                    ins += i
                    outs += o
            if not ins and not outs and kind == "llm":
                ins = _openinference_value(v.get("input.value"), "messages")
                outs = _openinference_value(v.get("output.value"), "choices")
        system, inputs = self._messages(ins, "user")
        _, outputs = self._messages(outs, "assistant")
        sys_text = self._cap(_parts_text(sys_raw)) if sys_raw else system
        return sys_text, inputs, outputs

    def _messages(self, raw: Any, default_role: str) -> tuple[str, list[Message]]:
        """Normalise a message list (GenAI ``parts``, OpenAI-style ``content``/``tool_calls``, or
        plain text) to Messages; system messages are returned apart as text."""
        if isinstance(raw, (str, dict)):
            raw = [raw]
        elif not isinstance(raw, list):
            return "", []
        system: list[str] = []
        out: list[Message] = []
        for m in raw:
            if isinstance(m, str) and m and not _is_ref(m):
                m = {"role": default_role, "content": m}
            if not isinstance(m, dict):
                continue
            if isinstance(m.get("message"), dict):  # an OpenAI choice / gen_ai.choice body
                m = m["message"]
            role = _ROLES.get(str(m.get("role") or "").lower(), default_role)
            texts: list[str] = []
            calls: list[Message] = []
            parts = m.get("parts")
            if isinstance(parts, list):
                for p in parts:
                    if not isinstance(p, dict):
                        continue
                    t = p.get("type")
                    if t == "text":
                        texts.append(_as_text(p.get("content", p.get("text", ""))))
                    elif t == "tool_call":
                        calls.append(
                            Message(
                                role="assistant",
                                tool_name=_as_text(p.get("name", "")),
                                tool_call_id=_as_text(p.get("id", "")),
                                tool_arguments=self._cap(_as_text(p.get("arguments", ""))),
                            )
                        )
                    elif t == "tool_call_response":
                        calls.append(
                            Message(
                                role="tool",
                                tool_call_id=_as_text(p.get("id", "")),
                                content=self._cap(_as_text(p.get("response", p.get("result", "")))),
                            )
                        )
            else:
                content = m.get("content")
                if content is not None:
                    texts.append(_parts_text(content))
                for c in m.get("tool_calls") or []:
                    if isinstance(c, dict):
                        function = c.get("function")
                        fn = function if isinstance(function, dict) else c
                        calls.append(
                            Message(
                                role="assistant",
                                tool_name=_as_text(fn.get("name", "")),
                                tool_call_id=_as_text(c.get("id", "")),
                                tool_arguments=self._cap(_as_text(fn.get("arguments", ""))),
                            )
                        )
            text = "\n".join(t for t in texts if t)
            if role == "system":
                if text:
                    system.append(text)
                continue
            if role == "tool" and not calls:
                out.append(
                    Message(
                        role="tool",
                        content=self._cap(text),
                        tool_call_id=_as_text(m.get("tool_call_id", m.get("id", ""))),
                        tool_name=_as_text(m.get("name", "")),
                    )
                )
                continue
            if text or not calls:
                out.append(Message(role=role, content=self._cap(text)))
            out += calls
        return self._cap("\n".join(system)), out

    # ------------------------------------------------------------------- logs

    def _logs(self, m: RawMessage, out: _Out) -> None:
        req, problems = decode_logs(m.value)
        out.problems += problems
        n = sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
        self._check_count(n, "log records", problems)
        out.log_records_in += n
        groups: dict[tuple[str, str], _Content] = {}
        for i, rl in enumerate(req.resource_logs):
            self._red = self._trunc = 0
            _, res_vals = self._attributes(rl.resource.attributes)
            res_red = self._red
            for j, sl in enumerate(rl.scope_logs):
                for k, lr in enumerate(sl.log_records):
                    self._red, self._trunc = res_red, 0
                    try:
                        got = self._log_record(lr, res_vals, groups)
                    except (InputError, RecursionError) as e:
                        reason = e.reason if isinstance(e, InputError) else _TOO_DEEP
                        out.problems.append(
                            (f"resourceLogs[{i}].scopeLogs[{j}].logRecords[{k}]", reason)
                        )
                        continue
                    if not got:
                        out.log_records_ignored += 1
                    out.redactions += self._red
                    out.truncated += self._trunc
        trace_conv = {
            c.trace_id: c.conversation_id
            for c in reversed(groups.values())
            if c.conversation_id != c.trace_id
        }
        for c in groups.values():
            c.conversation_id = trace_conv.get(
                c.trace_id,
                self._trace_conv.get(c.trace_id, c.conversation_id)
                if c.conversation_id == c.trace_id
                else c.conversation_id,
            )
            system, inputs = self._messages(c.inputs, "user")
            _, outputs = self._messages(c.outputs, "assistant")
            system = self._cap(_parts_text(c.system)) if c.system else system
            for msg in inputs:
                msg.trace_id, msg.span_id, msg.ts_ns = c.trace_id, c.span_id, c.start_ns
            for msg in outputs:
                msg.trace_id, msg.span_id, msg.ts_ns = c.trace_id, c.span_id, c.end_ns
            out.turns.append(
                TurnRecord(
                    conversation_id=c.conversation_id,
                    # an evaluation sent without trace context belongs to no trace
                    trace_id="" if c.span_id.startswith(_DETACHED) else c.trace_id,
                    span_id=c.span_id,
                    span_kind="content",
                    system_instructions=system,
                    prompt_version=c.prompt_version or _hash_version(system),
                    input_messages=inputs,
                    output_messages=outputs,
                    start_ns=c.start_ns,
                    end_ns=c.end_ns,
                    redactions=c.redactions,
                    evaluations=c.evaluations,
                )
            )

    def _log_record(
        self, lr: LogRecord, res_vals: dict[str, Any], groups: dict[tuple[str, str], _Content]
    ) -> bool:
        """Fold one log record into its span's content group; False if it is not a GenAI content event."""
        _, vals = self._attributes(lr.attributes)
        name = lr.event_name or str(vals.get("event.name", ""))
        if name not in _CONTENT_EVENTS and name != EVALUATION_EVENT:
            return False
        a = _Attrs(vals, res_vals)
        ts = lr.time_unix_nano or lr.observed_time_unix_nano
        trace_id, span_id = _log_ids(lr, a, name, ts, self._responses)
        system: Any = None
        ins: list[Any] = []
        outs: list[Any] = []
        if name != EVALUATION_EVENT:
            body = self._walk(any_value(lr.body)) if lr.HasField("body") else None
            system, ins, outs = _event_content(name, vals, body)
        conv, explicit = a.conversation(trace_id)
        c = groups.get((trace_id, span_id))
        if c is None:
            c = groups[(trace_id, span_id)] = _Content(trace_id, span_id, conv, ts, ts)
        if explicit and c.conversation_id == trace_id:
            c.conversation_id = conv
        c.prompt_version = c.prompt_version or a.str(*_PROMPT_VERSION_KEYS)
        c.system = c.system or system
        c.inputs += ins
        c.outputs += outs
        if name == EVALUATION_EVENT:
            c.evaluations.append(_evaluation(vals, "log", trace_id, span_id, ts))
        c.start_ns, c.end_ns = min(c.start_ns, ts), max(c.end_ns, ts)
        c.redactions += self._red
        return True

    # ------------------------------------------------------ dead letters

    def _dead(self, m: RawMessage, reason: str, detail: str, now_ns: int) -> DeadLetter:
        return DeadLetter(
            stage=STAGE,
            reason=reason,
            detail=self.redactor.redact(detail)[0],
            topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            key=m.key.decode("utf-8", "backslashreplace") if m.key else "",
            original_b64=base64.b64encode(self._redacted_original(m)).decode(),
            ts_ns=now_ns,
        )

    def _redacted_original(self, m: RawMessage) -> bytes:
        """The message as OTLP/JSON, redacted like every stored value (attribute keys naming a
        secret included), cut to the dead-letter limit; empty when it does not decode as an
        OTLP request at all: its bytes are then only at ``topic``/``partition``/``offset``, as
        raw bytes can hide a secret from the patterns (a length byte reads as a letter)."""
        cls = ExportLogsServiceRequest if m.topic == self.logs_topic else ExportTraceServiceRequest
        red = self._red
        try:
            doc = (
                json.loads(m.value) if is_json(m.value) else MessageToDict(cls.FromString(m.value))
            )
            text = json.dumps(self._walk_otlp(doc), ensure_ascii=False)
        except (ValueError, RecursionError, DecodeError, RuntimeError):
            return b""
        finally:
            self._red = red  # the counts are the stored rows'; a dead letter is not one
        return text.encode()[:DEADLETTER_ORIGINAL_BYTES]

    def _walk_otlp(self, x: Any) -> Any:
        """:meth:`_walk` that also reads OTLP's attribute lists: ``{"key": k, "value": v}``
        with ``k`` naming a secret has its value replaced."""
        if isinstance(x, list):
            return [self._walk_otlp(y) for y in x]
        if isinstance(x, dict):
            k = x.get("key")
            if isinstance(k, str) and "value" in x and self.redactor.is_secret_key(k):
                return {**x, "value": {"stringValue": "[REDACTED:secret]"}}
            secret_key = self._is_secret_key
            return {
                k: self._secret(y) if secret_key(k) else self._walk_otlp(y) for k, y in x.items()
            }
        return self._walk(x)

    # ------------------------------------------------------ values, redaction

    def _attributes(self, kvs: Any) -> tuple[dict[str, str], dict[str, Any]]:
        """Redacted attributes twice: as strings (for the Map column) and as values (for reading).

        A string holding JSON is parsed and redacted leaf by leaf; its value is the parsed
        JSON and its string the original text, or the re-encoded JSON if anything was redacted.
        """
        strs: dict[str, str] = {}
        vals: dict[str, Any] = {}
        for kv in kvs:
            key = kv.key
            v = kv.value
            w = v.WhichOneof("value")
            if w == "string_value":
                s = v.string_value
                if self._is_secret_key(key):  # e.g. http.request.header.authorization
                    strs[key] = vals[key] = self._secret(s)
                elif s[:1] in _JSON_OPEN and s[-1:] in _JSON_CLOSE:
                    strs[key], vals[key] = self._json_text(s)
                else:
                    s, n = self._redact(s)
                    self._red += n
                    strs[key] = vals[key] = s
            elif w == "int_value":
                x = vals[key] = v.int_value
                strs[key] = str(x)
            elif w == "bool_value":
                x = vals[key] = v.bool_value
                strs[key] = "true" if x else "false"
            elif w == "double_value":
                x = vals[key] = any_value(v)
                strs[key] = repr(x) if isinstance(x, float) else x  # JSON text of a finite double
            elif w is None:
                vals[key] = None
                strs[key] = ""
            else:
                x = self._walk(any_value(v))
                vals[key] = x
                strs[key] = json.dumps(x, ensure_ascii=False)
        return strs, vals

    def _text(self, s: str) -> str:
        """Redacted plain text (JSON text is redacted leaf by leaf)."""
        if s[:1] in _JSON_OPEN and s[-1:] in _JSON_CLOSE:
            return self._json_text(s)[0]
        s, n = self._redact(s)
        self._red += n
        return s

    def _json_text(self, s: str) -> tuple[str, Any]:
        """``(redacted text, redacted parsed value)`` for text that may be JSON."""
        if self.redactor.json_is_clean(s):  # the common case, without a walk over its strings
            try:
                return s, orjson.loads(s)
            except orjson.JSONDecodeError:  # not JSON, or JSON only the json module reads
                pass
        try:
            obj = json.loads(s)
        except ValueError:
            r, n = self._redact(s)
            self._red += n
            return r, r
        before = self._red
        obj = self._walk(obj)
        if self._red != before:
            s = json.dumps(obj, ensure_ascii=False)
        return s, obj

    def _walk(self, x: Any) -> Any:
        if isinstance(x, str):
            return self._text(x)
        if isinstance(x, list):
            return [self._walk(y) for y in x]
        if isinstance(x, dict):
            secret_key = self._is_secret_key
            return {k: self._secret(y) if secret_key(k) else self._walk(y) for k, y in x.items()}
        return x

    def _secret(self, x: Any) -> Any:
        """The value of a key naming a secret: replaced whole, or walked if a container."""
        if isinstance(x, (dict, list)):
            return self._walk(x)
        out, n = self.redactor.redact_secret_value(x)
        self._red += n
        return out

    def _cap_all(self, strs: dict[str, str]) -> dict[str, str]:
        quick = self.cfg.max_attribute_bytes // 4  # no UTF-8 character is longer than 4 bytes
        return {k: v if len(v) <= quick else self._cap(v) for k, v in strs.items()}

    def _cap(self, s: str) -> str:
        """Cut ``s`` to ``max_attribute_bytes`` of UTF-8 (after redaction, so no secret is half cut)."""
        limit = self.cfg.max_attribute_bytes
        if len(s) * 4 <= limit:
            return s
        b = s.encode("utf-8", "surrogatepass")
        if len(b) <= limit:
            return s
        self._trunc += 1
        return b[:limit].decode("utf-8", "ignore") + TRUNCATED_MARKER.format(len(b) - limit)


@dataclass
class _Content:
    """Message content gathered from the log events of one span."""

    trace_id: str
    span_id: str
    conversation_id: str
    start_ns: int
    end_ns: int
    prompt_version: str = ""
    system: Any = None
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    redactions: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)


class _Attrs:
    """Typed reads over span attributes with resource attributes as the fallback."""

    __slots__ = ("res", "vals")

    def __init__(self, vals: dict[str, Any], res: dict[str, Any]) -> None:
        self.vals = vals
        self.res = res

    def get(self, key: str) -> Any:
        v = self.vals.get(key)
        return self.res.get(key) if v is None else v

    def first(self, *keys: str) -> Any:
        for k in keys:
            v = self.vals.get(k)
            if v is not None and v != "":
                return v
        for k in keys:
            v = self.res.get(k)
            if v is not None and v != "":
                return v
        return None

    def int(self, *keys: str) -> int:
        v = self.first(*keys)
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise InputError(
                f"attribute {_found(self, keys)}: expected an integer, got {type(v).__name__}"
            )
        try:
            n = int(float(v)) if isinstance(v, (float, str)) else v
        except (ValueError, OverflowError):
            raise InputError(
                f"attribute {_found(self, keys)}: expected an integer, got {v!r:.40}"
            ) from None
        return min(max(n, 0), _UINT32_MAX)

    def conversation(self, trace_id: str) -> tuple[str, bool]:
        """``(conversation id, whether an attribute gave it)``."""
        conv = self.str(*_CONVERSATION_KEYS)
        return (conv, True) if conv else (trace_id, False)

    def prompt_version(self, system: str) -> str:
        return self.str(*_PROMPT_VERSION_KEYS) or _hash_version(system)

    # last in the class: after it, ``str`` in an annotation here would name this method
    def str(self, *keys: str) -> str:
        v = self.first(*keys)
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, (dict, list)):
            raise InputError(
                f"attribute {_found(self, keys)}: expected a string, got {type(v).__name__}"
            )
        return json.dumps(v)


def _found(a: _Attrs, keys: tuple[str, ...]) -> str:
    return next((k for k in keys if a.vals.get(k) is not None), keys[0])


# ------------------------------------------------------------------ helpers


def _ids(trace: bytes, span: bytes, parent: bytes) -> tuple[str, str, str]:
    if len(trace) != 16 or trace == _ZERO_TRACE:
        raise InputError(
            f"invalid trace_id ({len(trace)} bytes)"
            if trace != _ZERO_TRACE
            else "invalid trace_id (zero)"
        )
    if len(span) != 8 or span == _ZERO_SPAN:
        raise InputError(
            f"invalid span_id ({len(span)} bytes)"
            if span != _ZERO_SPAN
            else "invalid span_id (zero)"
        )
    if parent and len(parent) != 8:
        raise InputError(f"invalid parent_span_id ({len(parent)} bytes)")
    return trace.hex(), span.hex(), parent.hex() if parent.strip(b"\0") else ""


def _kind(a: _Attrs, parent_id: str) -> str:
    """llm | tool | agent | other, from whichever dialect marks the span."""
    v = a.vals
    op, oi, tl = (
        x if isinstance(x, str) else ""
        for x in (
            v.get("gen_ai.operation.name"),
            v.get("openinference.span.kind"),
            v.get("traceloop.span.kind"),
        )
    )
    oi, tl = oi.upper(), tl.lower()
    if op == "execute_tool" or oi == "TOOL" or tl == "tool":
        return "tool"
    if op in _LLM_OPS or oi in ("LLM", "EMBEDDING") or "llm.request.type" in v:
        return "llm"
    if op in _AGENT_OPS or oi == "AGENT" or tl in ("agent", "workflow"):
        return "agent"
    if "gen_ai.request.model" in v or "llm.model_name" in v:
        return "llm"
    if not parent_id and (oi == "CHAIN" or any(k in v for k in _CONVERSATION_KEYS)):
        return "agent"
    return "other"


def _default_operation(kind: str, a: _Attrs) -> str:
    if kind == "tool":
        return "execute_tool"
    if kind == "agent":
        return "invoke_agent"
    req = a.vals.get("llm.request.type")
    if req == "completion":
        return "text_completion"
    if req == "embedding" or a.vals.get("openinference.span.kind") == "EMBEDDING":
        return "embeddings"
    return "chat"


def _indexed(v: dict[str, Any], prefix: str, build: Any) -> list[dict[str, Any]]:
    """Collect ``prefix.N.rest`` attributes into one message dict per N, in index order."""
    groups: dict[int, dict[str, Any]] = {}
    n = len(prefix)
    for k, x in v.items():
        if k.startswith(prefix):
            i, dot, rest = k[n:].partition(".")
            if dot and i.isdigit():
                groups.setdefault(int(i), {})[rest] = x
    return [build(groups[i]) for i in sorted(groups)]


def _traceloop_message(g: dict[str, Any]) -> dict[str, Any]:
    calls = _indexed(
        g,
        "tool_calls.",
        lambda c: {
            "id": c.get("id", ""),
            "name": c.get("name", ""),
            "arguments": c.get("arguments", ""),
        },
    )
    return {
        "role": g.get("role"),
        "content": g.get("content"),
        "tool_calls": calls,
        "tool_call_id": g.get("tool_call_id", ""),
    }


def _openinference_message(g: dict[str, Any]) -> dict[str, Any]:
    calls = _indexed(
        g,
        "message.tool_calls.",
        lambda c: {
            "id": c.get("tool_call.id", ""),
            "name": c.get("tool_call.function.name", ""),
            "arguments": c.get("tool_call.function.arguments", ""),
        },
    )
    content = g.get("message.content")
    if content is None:
        content = [
            {"type": "text", "text": p.get("message_content.text", "")}
            for p in _indexed(g, "message.contents.", dict)
        ]
    return {
        "role": g.get("message.role"),
        "content": content,
        "tool_calls": calls,
        "tool_call_id": g.get("message.tool_call_id", ""),
        "name": g.get("message.name", ""),
    }


def _openinference_value(x: Any, list_key: str) -> Any:
    """``input.value``/``output.value``: an OpenAI request (``messages``) or response (``choices``),
    else plain text."""
    if isinstance(x, dict):
        return x.get(list_key) or []
    return x if isinstance(x, str) else []


def _event_content(name: str, attrs: dict[str, Any], body: Any) -> tuple[Any, list[Any], list[Any]]:
    """``(system, inputs, outputs)`` from one GenAI content event (log record or span event)."""
    if name == "gen_ai.client.inference.operation.details":
        return (
            attrs.get("gen_ai.system_instructions"),
            _as_list(attrs.get("gen_ai.input.messages")),
            _as_list(attrs.get("gen_ai.output.messages")),
        )
    if name == "gen_ai.content.prompt":
        return None, _as_list(attrs.get("gen_ai.prompt")), []
    if name == "gen_ai.content.completion":
        return None, [], _as_list(attrs.get("gen_ai.completion"))
    if not isinstance(body, dict):
        body = {"content": body} if isinstance(body, str) else {}
    role = name.removeprefix("gen_ai.").removesuffix(".message")
    if role == "system":
        return body.get("content"), [], []
    if role == "choice":
        return None, [], [body]
    msg = dict(body)
    msg.setdefault("role", role)
    if role == "tool" and "tool_call_id" not in msg:
        msg["tool_call_id"] = body.get("id", "")
    return None, [msg], []


def _remember(memory: dict[str, str], new: dict[str, str]) -> None:
    """Add ``new`` to a bounded memory, forgetting the oldest entries past TRACES_REMEMBERED."""
    for k, v in new.items():
        memory.pop(k, None)
        memory[k] = v
    while len(memory) > TRACES_REMEMBERED:
        del memory[next(iter(memory))]


def _log_ids(
    lr: LogRecord, a: _Attrs, name: str, ts: int, responses: dict[str, str]
) -> tuple[str, str]:
    """``(trace id, span id)`` of a log record. An evaluation sent without trace context but
    with a conversation id (a grader's reward, a user's rating), or with the
    ``gen_ai.response.id`` of an answer, gets a span id of its own and the conversation id as
    its trace id: the answer's conversation when this process captured it (``responses``),
    else :data:`RESPONSE_REF` + the response id (another capture process saw the answer;
    understand finds its conversation in the store)."""
    if name == EVALUATION_EVENT and not any(lr.trace_id) and not any(lr.span_id):
        conv, explicit = a.conversation("")
        if not explicit:
            response = a.str("gen_ai.response.id")
            conv = responses.get(response, "") or (RESPONSE_REF + response if response else "")
        if not conv:
            raise InputError(
                "evaluation event without trace context, gen_ai.conversation.id or "
                "gen_ai.response.id"
            )
        key = f"{conv}\0{a.str('gen_ai.evaluation.name')}\0{ts}".encode()
        return conv, _DETACHED + hashlib.sha256(key).hexdigest()[:16]
    trace_id, span_id, _ = _ids(lr.trace_id, lr.span_id, b"")
    return trace_id, span_id


def _evaluation(
    vals: dict[str, Any], source: str, trace_id: str, span_id: str, ts_ns: int
) -> Evaluation:
    """An :class:`Evaluation` from the (already redacted) attributes of an evaluation event."""
    score = vals.get("gen_ai.evaluation.score.value")
    if isinstance(score, str):
        try:
            score = float(score)
        except ValueError:
            score = None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        score = None
    return Evaluation(
        name=_as_text(vals.get("gen_ai.evaluation.name") or ""),
        score=None if score is None else float(score),
        label=_as_text(vals.get("gen_ai.evaluation.score.label") or "").strip().lower(),
        explanation=_as_text(vals.get("gen_ai.evaluation.explanation") or "")[:2000],
        response_id=_as_text(vals.get("gen_ai.response.id") or ""),
        source=source,
        span_id=span_id,
        trace_id=trace_id,
        ts_ns=ts_ns,
    )


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, list):
        return x
    if isinstance(x, dict):
        return [x]
    return [x] if isinstance(x, str) and x else []


def _is_ref(s: str) -> bool:
    """Content kept elsewhere and referenced by URI (``s3://...``, ``https://...``)."""
    head, sep, _ = s.partition("://")
    return bool(sep) and head.isalnum() and " " not in s


def _parts_text(x: Any) -> str:
    """Plain text of a content value: a string, or a list of parts whose texts are joined."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and all(isinstance(p, dict) for p in x):
        return "\n".join(
            _as_text(p.get("content", p.get("text", "")))
            for p in x
            if p.get("type", "text") == "text"
        )
    if isinstance(x, dict) and isinstance(x.get("content"), (str, list)):
        return _parts_text(x["content"])
    return _as_text(x)


def _as_text(x: Any) -> str:
    """Text as given, anything else as JSON (so arguments read the same in every dialect)."""
    if isinstance(x, str):
        return x
    if x is None:
        return ""
    return json.dumps(x, ensure_ascii=False)


def _truthy(x: Any) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes", "on")
    return bool(x) if isinstance(x, (bool, int, float)) else False


def _hash_version(system: str) -> str:
    return (
        hashlib.sha256(system.encode("utf-8", "surrogatepass")).hexdigest()[:12] if system else ""
    )


def _message_json(messages: list[Message]) -> str:
    """Messages as a JSON array; the row has the trace and span id, empty fields are left out."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content, "ts_ns": m.ts_ns}
        for k in _MESSAGE_EXTRA:
            v = getattr(m, k)
            if v:
                d[k] = v
        out.append(d)
    return json.dumps(out, ensure_ascii=False)


def _tool_row(turn: TurnRecord) -> dict[str, Any] | None:
    """The ``tool_calls`` row of a tool span's turn (None for other turns)."""
    tool = turn.tool
    if tool is None:
        return None
    return {
        "conversation_id": turn.conversation_id,
        "trace_id": turn.trace_id,
        "span_id": turn.span_id,
        "call_id": tool.call_id,
        "name": tool.name,
        "arguments": tool.arguments,
        "result": tool.result,
        "error_type": tool.error_type,
        "error_message": tool.error_message,
        "start_ns": tool.start_ns,
        "duration_ms": tool.duration_ms,
        "agent_version": turn.agent_version,
        "prompt_version": turn.prompt_version,
    }


def turn_record_row(t: TurnRecord, now_ns: int) -> dict[str, Any]:
    """The ``turn_records`` row of a turn record: the record as sent to assemble, so assemble
    can rebuild its open conversations from the store."""
    return {
        "conversation_id": t.conversation_id,
        "span_id": t.span_id,
        "span_kind": t.span_kind,
        "record": t.to_json().decode(),
        "ingested_ns": now_ns,
    }


def _turn_row(t: TurnRecord) -> dict[str, Any]:
    return {
        "conversation_id": t.conversation_id,
        "trace_id": t.trace_id,
        "span_id": t.span_id,
        "parent_span_id": t.parent_span_id,
        "span_kind": t.span_kind,
        "operation": t.operation,
        "provider": t.provider,
        "request_model": t.request_model,
        "response_model": t.response_model,
        "agent_name": t.agent_name,
        "agent_version": t.agent_version,
        "prompt_version": t.prompt_version,
        "system_instructions": t.system_instructions,
        "input_messages": _message_json(t.input_messages),
        "output_messages": _message_json(t.output_messages),
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "start_ns": t.start_ns,
        "end_ns": t.end_ns,
        "duration_ms": max(0, t.end_ns - t.start_ns) / 1e6,
        "status": t.status,
        "error_type": t.error_type,
        "error_message": t.error_message,
        "redactions": t.redactions,
    }
