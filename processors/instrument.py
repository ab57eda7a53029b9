"""Point an agent at closeloop in one call, mark its conversations, report how they went.

For agent authors (docs/agent-authors.md)::

    from processors import instrument

    instrument.configure(service_name="support-agent")   # traces + logs to closeloop, content on
    OpenAIInstrumentor().instrument()                     # any OTel GenAI instrumentation

    with instrument.conversation(conv_id, prompt_version="support-v12", agent_version="1.4.0"):
        answer = run_agent(message)                       # every span gets the three attributes
    instrument.report_outcome(conversation_id=conv_id, label="fail", explanation="wrong refund")

:func:`configure` sets up the OpenTelemetry SDK (a tracer and a logger provider exporting
OTLP/HTTP, no sampling, message content recorded); :func:`conversation` is a context manager
(and decorator) whose values a span processor copies onto every span started inside it, the
instrumentation libraries' spans included (and onto their log records: GenAI content events); :func:`report_outcome` emits the OTel GenAI
evaluation event ``gen_ai.evaluation.result`` as a log record, tied to the current span when
there is one and always to the conversation id, so it may come long after the conversation.
Nothing here is closeloop-specific on the wire: it is standard OTLP any collector accepts.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import _logs, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"  # `closeloop up`'s OTLP/HTTP port (the collector's too)
CONVERSATION_ID = "gen_ai.conversation.id"
PROMPT_VERSION = "closeloop.prompt.version"
AGENT_VERSION = "gen_ai.agent.version"
EVALUATION_EVENT = "gen_ai.evaluation.result"
# Environment switches that make the GenAI instrumentations record message content (closeloop
# learns from the text; capture redacts it before storage). Set only when not set already.
CONTENT_CAPTURE_ENV = {
    # OpenTelemetry's GenAI instrumentations (openai-v2 & co, on opentelemetry-util-genai): the
    # latest GenAI conventions, prompts and answers as gen_ai.input/output.messages on the span
    "OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_ONLY",
    "TRACELOOP_TRACE_CONTENT": "true",  # OpenLLMetry (OpenInference records content by default)
}

# The attributes of the conversation being handled in this context (thread / asyncio task).
_conversation: ContextVar[Mapping[str, str] | None] = ContextVar(
    "closeloop_conversation", default=None
)


class ConversationAttributes(SpanProcessor):
    """Copies the current :func:`conversation`'s attributes onto every span when it starts."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for key, value in (_conversation.get() or {}).items():
            span.set_attribute(key, value)


class ConversationLogAttributes(LogRecordProcessor):
    """The same for log records: GenAI content events (prompts and answers as log records)
    then belong to the conversation even when they reach closeloop apart from their spans."""

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        values = _conversation.get()
        record = log_record.log_record
        if values:
            record.attributes = {**values, **dict(record.attributes or {})}

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@dataclass
class Instrumentation:
    """The providers :func:`configure` set up; :meth:`shutdown` flushes and stops them."""

    tracer_provider: TracerProvider
    logger_provider: LoggerProvider

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        spans = self.tracer_provider.force_flush(timeout_millis)
        return self.logger_provider.force_flush(timeout_millis) and spans

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()


def configure(
    endpoint: str | None = None,
    *,
    service_name: str | None = None,
    headers: Mapping[str, str] | None = None,
    capture_content: bool = True,
    set_global: bool = True,
    export_delay_millis: int = 1000,
) -> Instrumentation:
    """Send this process's traces and logs to closeloop over OTLP/HTTP.

    ``endpoint``: the OTLP/HTTP base URL (default ``OTEL_EXPORTER_OTLP_ENDPOINT``, else
    ``http://127.0.0.1:4318``); ``/v1/traces`` and ``/v1/logs`` are appended. Every span is
    kept (closeloop needs whole conversations). ``capture_content`` asks the GenAI
    instrumentations to record prompts and answers. ``set_global`` installs the providers as
    the global ones, which instrumentation libraries use by default. The providers are flushed
    at exit.
    """
    base = (endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT).rstrip(
        "/"
    )
    if capture_content:
        for name, value in CONTENT_CAPTURE_ENV.items():
            os.environ.setdefault(name, value)
    resource = Resource.create({"service.name": service_name} if service_name else {})
    tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    tracer_provider.add_span_processor(ConversationAttributes())  # before the exporter
    tracer_provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=dict(headers or {})),
            schedule_delay_millis=export_delay_millis,
        )
    )
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(ConversationLogAttributes())  # before the exporter
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=f"{base}/v1/logs", headers=dict(headers or {})),
            schedule_delay_millis=export_delay_millis,
        )
    )
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        _logs.set_logger_provider(logger_provider)
    atexit.register(logger_provider.shutdown)
    atexit.register(tracer_provider.shutdown)
    return Instrumentation(tracer_provider, logger_provider)


@contextmanager
def conversation(
    conversation_id: str,
    *,
    prompt_version: str | None = None,
    agent_version: str | None = None,
) -> Iterator[None]:
    """Every span started inside carries the conversation id (and the versions given).

    Wrap each turn (or the whole conversation) in it; nested uses override the outer values.
    Also a decorator, for functions that always belong to one conversation.
    """
    if not conversation_id:
        raise ValueError("conversation_id must not be empty")
    values = {
        CONVERSATION_ID: str(conversation_id),
        PROMPT_VERSION: prompt_version,
        AGENT_VERSION: agent_version,
    }
    outer = _conversation.get() or {}
    merged = {**outer, **{k: str(v) for k, v in values.items() if v is not None}}
    token = _conversation.set(merged)
    try:
        yield
    finally:
        _conversation.reset(token)


def current_conversation_id() -> str | None:
    """The conversation id of the enclosing :func:`conversation`, if any."""
    return (_conversation.get() or {}).get(CONVERSATION_ID)


def report_outcome(
    *,
    score: float | None = None,
    label: str | None = None,
    explanation: str | None = None,
    name: str = "outcome",
    conversation_id: str | None = None,
    logger_provider: Any = None,
) -> None:
    """State how a conversation went (the agent's own check, a user's rating, a grader's reward).

    Emits the OTel GenAI evaluation event ``gen_ai.evaluation.result`` (attributes
    ``gen_ai.evaluation.name`` / ``.score.value`` / ``.score.label`` / ``.explanation``) as a
    log record with the conversation id, inside the current span's trace when there is one.
    ``conversation_id`` defaults to the enclosing :func:`conversation`'s. Give a ``score``
    (e.g. 1.0 success, 0.0 failure), a ``label`` (e.g. ``"pass"`` / ``"fail"``), or both.
    """
    conv = conversation_id or current_conversation_id()
    if not conv:
        raise ValueError("report_outcome needs a conversation_id (or an enclosing conversation())")
    if score is None and not label:
        raise ValueError("report_outcome needs a score or a label")
    attributes: dict[str, Any] = {CONVERSATION_ID: conv, "gen_ai.evaluation.name": name}
    if score is not None:
        attributes["gen_ai.evaluation.score.value"] = float(score)
    if label:
        attributes["gen_ai.evaluation.score.label"] = label
    if explanation:
        attributes["gen_ai.evaluation.explanation"] = explanation
    provider = logger_provider or _logs.get_logger_provider()
    provider.get_logger("closeloop.instrument").emit(
        _logs.LogRecord(
            timestamp=time.time_ns(),
            event_name=EVALUATION_EVENT,
            attributes=attributes,
        )
    )
