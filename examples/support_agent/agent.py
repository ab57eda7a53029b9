"""Bankly's support agent, instrumented with OpenTelemetry (GenAI semantic conventions).

The agent reads its system prompt and config from the ``main`` branch of its repository
(``git show``), so a merged change is picked up by the next :class:`SupportAgent`; its
version is the short sha of ``main``. It runs a scripted policy (deterministic, no LLM)
unless ``mode="llm"`` — or ``mode="auto"`` with ``OPENAI_BASE_URL`` set — where a real
model answers through the ``openai`` client. (With a real model you may prefer the spans
of ``opentelemetry-instrumentation-openai-v2``; this agent writes its own ``chat`` spans
so that the scripted and LLM modes report the same shape.)

Spans, one trace per user turn, all carrying ``gen_ai.conversation.id``:

* ``invoke_agent bankly-support`` (root): agent name and version; on the turn that ends the
  conversation, ``closeloop.conversation.end=true``;
* ``chat <model>``: provider, models, usage, finish reasons, system instructions and the
  input/output messages as JSON in the ``parts`` format;
* ``execute_tool <name>``: call id, arguments, result, or ``error.type`` and status ERROR.

Time is simulated: each turn starts at a given time and spans get explicit start and end
times (model and tool latencies), so hundreds of conversations take seconds to emit.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode

from .behaviour import Behaviour, behaviour_from
from .intents import Intent
from .policy import (
    ConversationState,
    LLMPolicy,
    ModelReply,
    Policy,
    ScriptedPolicy,
    semconv_message,
)
from .repo import CONFIG_PATH, PROMPT_PATH, read_main, short_sha
from .tools import call_tool, realise

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
END_ATTRIBUTE = "closeloop.conversation.end"
PROVIDER = "openai"
MAX_CALLS_PER_TURN = 6
OPTIONAL_QUESTION_RATE = 0.4  # how often the agent asks an intent's optional questions
MS = 1_000_000


class SeededIdGenerator(IdGenerator):
    """Trace and span ids from a seeded rng: the same run emits the same ids."""

    def __init__(self, seed: int | str) -> None:
        self._rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


@dataclass(frozen=True)
class TurnResult:
    text: str
    end_ns: int
    final: bool
    outcome: str  # set when final


class SupportAgent:
    """The agent at the current head of ``main`` in ``repo_path``.

    It owns its tracer provider (``BatchSpanProcessor`` over ``exporter``, by default OTLP/HTTP
    to ``{endpoint}/v1/traces``); :meth:`close` flushes and shuts it down.
    """

    def __init__(
        self,
        repo_path: Path,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        exporter: SpanExporter | None = None,
        mode: Literal["auto", "scripted", "llm"] = "auto",
        llm_client: Any = None,
        id_seed: int | str | None = None,
        max_queue_size: int = 100_000,
    ) -> None:
        if mode not in ("auto", "scripted", "llm"):
            raise ValueError(f"mode must be auto, scripted or llm, not {mode!r}")
        self.repo_path = Path(repo_path)
        self.version = short_sha(self.repo_path)
        self.behaviour: Behaviour = behaviour_from(
            read_main(self.repo_path, PROMPT_PATH), read_main(self.repo_path, CONFIG_PATH)
        )
        use_llm = mode == "llm" or (
            mode == "auto" and (llm_client is not None or bool(os.environ.get("OPENAI_BASE_URL")))
        )
        self.mode = "llm" if use_llm else "scripted"
        self.policy: Policy = (
            LLMPolicy(self.behaviour, llm_client or _openai_client())
            if use_llm
            else ScriptedPolicy(self.behaviour)
        )
        self.provider = TracerProvider(
            sampler=ALWAYS_ON,  # every span, whatever OTEL_TRACES_SAMPLER says: no sampling
            resource=Resource.create(
                {"service.name": self.behaviour.agent_name, "service.version": self.version}
            ),
            # Seeded ids depend on the version too: a new version on the same traffic gets new ids.
            id_generator=SeededIdGenerator(f"{id_seed}:{self.version}")
            if id_seed is not None
            else None,
        )
        exporter = exporter if exporter is not None else _otlp_exporter(endpoint)
        # A queue large enough for a whole cycle: the batch processor drops what does not fit.
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=max_queue_size, schedule_delay_millis=200)
        )
        self.tracer = self.provider.get_tracer("examples.support_agent", self.version)

    # -- conversations ---------------------------------------------------------------------

    def start(
        self, conversation_id: str, intent: Intent | None, rng: random.Random
    ) -> ConversationState:
        """A new conversation; ``intent`` drives the scripted policy (the LLM ignores it)."""
        state = ConversationState(conversation_id=conversation_id, intent=intent, rng=rng)
        if intent is not None:
            state.data = realise(intent.result, rng)
            state.questions = len(intent.questions)
            if intent.optional_questions and rng.random() >= OPTIONAL_QUESTION_RATE:
                state.questions -= intent.optional_questions
        return state

    def turn(self, state: ConversationState, user_text: str, at_ns: int) -> TurnResult:
        """Answer one user message sent at ``at_ns``: one trace, ending when the agent replies."""
        b = self.behaviour
        state.history.append({"role": "user", "content": user_text})
        root = self.tracer.start_span(
            f"invoke_agent {b.agent_name}",
            context=Context(),
            kind=SpanKind.INTERNAL,
            start_time=at_ns,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.agent.name": b.agent_name,
                "gen_ai.agent.version": self.version,
                "gen_ai.conversation.id": state.conversation_id,
                "gen_ai.request.model": b.model,
            },
        )
        ctx = trace.set_span_in_context(root)
        t = at_ns + state.rng.randint(3, 15) * MS
        reply = ModelReply()
        for _ in range(MAX_CALLS_PER_TURN):
            reply = self.policy.next(state)
            t = self._chat_span(state, reply, ctx, t) + state.rng.randint(1, 6) * MS
            state.history.append(reply.message())
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                t = self._tool_span(state, call, ctx, t) + state.rng.randint(2, 8) * MS
        if reply.final:
            state.outcome = reply.outcome
            root.set_attribute(END_ATTRIBUTE, True)
        root.end(end_time=t)
        return TurnResult(reply.text, t, reply.final, reply.outcome)

    def _chat_span(
        self, state: ConversationState, reply: ModelReply, ctx: Context, start: int
    ) -> int:
        b = self.behaviour
        end = start + int(reply.latency_ms * MS)
        sent = state.history  # the reply is not in the history yet
        out = {**semconv_message(reply.message()), "finish_reason": reply.finish_reason}
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": b.model,
            "gen_ai.response.model": reply.response_model,
            "gen_ai.response.id": reply.response_id,
            "gen_ai.request.temperature": b.temperature,
            "gen_ai.request.max_tokens": b.max_output_tokens,
            "gen_ai.usage.input_tokens": reply.input_tokens,
            "gen_ai.usage.output_tokens": reply.output_tokens,
            "gen_ai.response.finish_reasons": [reply.finish_reason],
            "gen_ai.conversation.id": state.conversation_id,
            "gen_ai.system_instructions": json.dumps(
                [{"type": "text", "content": b.system_prompt}]
            ),
            "gen_ai.input.messages": json.dumps([semconv_message(m) for m in sent]),
            "gen_ai.output.messages": json.dumps([out]),
        }
        span = self.tracer.start_span(
            f"chat {b.model}", context=ctx, kind=SpanKind.CLIENT, start_time=start, attributes=attrs
        )
        span.end(end_time=end)
        return end

    def _tool_span(
        self, state: ConversationState, call: dict[str, Any], ctx: Context, start: int
    ) -> int:
        """Run one tool call under the harness's timeout; record it; return its end time."""
        name, args = call["name"], call["arguments"]
        b = self.behaviour
        data = {"queue": b.escalation_queue} if name == b.escalation_tool else state.data
        run = call_tool(name, args, data, state.rng)
        timeout_s = b.timeout_s(name)
        duration_ms, error_type, error_message = run.latency_ms, run.error_type, run.error_message
        if run.latency_ms > timeout_s * 1000:
            duration_ms, error_type = timeout_s * 1000, "timeout"
            error_message = (
                f"{name} timed out after {timeout_s:g}s (tools.{name}.timeout_s={timeout_s:g})"
            )
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
            "gen_ai.tool.call.id": call["id"],
            "gen_ai.tool.call.arguments": json.dumps(args),
            "gen_ai.conversation.id": state.conversation_id,
        }
        if error_type:
            attrs["error.type"] = error_type
            content = json.dumps(f"error: {error_type}: {error_message}")
        else:
            content = json.dumps(run.result)
            attrs["gen_ai.tool.call.result"] = content
        end = start + int(duration_ms * MS)
        span = self.tracer.start_span(
            f"execute_tool {name}",
            context=ctx,
            kind=SpanKind.INTERNAL,
            start_time=start,
            attributes=attrs,
        )
        if error_type:
            span.set_status(Status(StatusCode.ERROR, error_message))
        span.end(end_time=end)
        state.history.append(
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "name": name,
                "content": content,
                "error": bool(error_type),
            }
        )
        return end

    def close(self) -> None:
        """Export everything still queued, then shut the provider down."""
        self.provider.force_flush()
        self.provider.shutdown()


def _otlp_exporter(endpoint: str) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")


def _openai_client() -> Any:
    import openai

    return openai.OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL"),
        api_key=os.environ.get("OPENAI_API_KEY") or "unused",
    )
