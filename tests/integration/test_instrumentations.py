"""Spans as the real instrumentation libraries emit them, through the whole capture pipeline.

Each library instruments the real ``openai`` client in an agent process of its own (the
libraries patch the same methods, and read their settings at start), talking to a local
fake model that first asks for a tool and then answers. The agent exports over OTLP/HTTP
to the gateway; the worker runs capture and assemble. Whatever the dialect, the normalised
turns and the assembled conversation must come out the same:

- ``openai-v2``: opentelemetry-instrumentation-openai-v2 (OTel GenAI semconv), content as
  ``gen_ai.client.inference.operation.details`` log events (``EVENT_ONLY``) on the logs signal;
- ``openai-v2-span``: the same library with the content on the span (``SPAN_ONLY``);
- ``openinference``: openinference-instrumentation-openai (``llm.*`` indexed attributes);
- ``openllmetry``: opentelemetry-instrumentation-openai (traceloop).

A library that cannot be imported is skipped with the import error as the reason.

Run as a module, this file is the agent: ``python -m tests.integration.test_instrumentations
LIB GATEWAY_URL LLM_BASE_URL`` prints the trace id of its conversation.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.llm_server import FakeLLMServer, chat_completion

from .pipeline import Pipeline, running_pipeline, wait_for

REPO = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"
SYSTEM = "You are Acme's support agent. Answer briefly."
QUESTION = "Where is my order A-17?"
ARGUMENTS = json.dumps({"order_id": "A-17"})
RESULT = json.dumps({"status": "shipped", "carrier": "DHL"})
ANSWER = "Order A-17 shipped with DHL."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by id",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
USAGE = [(50, 7), (80, 9)]  # (prompt, completion) tokens of the two model answers
AGENT_TIMEOUT_S = 120
CONTENT_MODE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
SKIP_EXIT = 3  # the agent's exit code when its library cannot be imported

# lib -> (instrumentor module, whether it takes a logger provider, extra environment)
LIBS: dict[str, tuple[str, bool, dict[str, str]]] = {
    "openai-v2": (
        "opentelemetry.instrumentation.openai_v2",
        True,
        {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental", CONTENT_MODE: "EVENT_ONLY"},
    ),
    "openai-v2-span": (
        "opentelemetry.instrumentation.openai_v2",
        True,
        {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental", CONTENT_MODE: "SPAN_ONLY"},
    ),
    "openinference": ("openinference.instrumentation.openai", False, {}),
    "openllmetry": (
        "opentelemetry.instrumentation.openai",
        False,
        {"TRACELOOP_TRACE_CONTENT": "true"},
    ),
}


# ---------------------------------------------------------------------------------------------
# The agent (runs in its own process)
# ---------------------------------------------------------------------------------------------


def run_agent(lib: str, gateway: str, llm_base_url: str) -> str:
    """One instrumented conversation with a tool call; returns its trace id (hex)."""
    import openai
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    module, takes_logger, _ = LIBS[lib]
    instrumentor = importlib.import_module(module).OpenAIInstrumentor()
    resource = Resource.create({"service.name": f"agent-{lib}"})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{gateway}/v1/traces"), schedule_delay_millis=50
        )
    )
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(
        BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=f"{gateway}/v1/logs"), schedule_delay_millis=50
        )
    )
    instrumentor.instrument(tracer_provider=tp, **({"logger_provider": lp} if takes_logger else {}))

    client = openai.OpenAI(base_url=llm_base_url, api_key="test-key", max_retries=0)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
    ]
    with tp.get_tracer("acme.support").start_as_current_span("support turn") as root:
        first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        ask = first.choices[0].message
        call = ask.tool_calls[0]
        assert call.function.name == "lookup_order" and json.loads(call.function.arguments)
        messages += [
            ask.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": RESULT},
        ]
        final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        assert final.choices[0].message.content == ANSWER
    assert tp.force_flush(30_000) and lp.force_flush(30_000)
    tp.shutdown()
    lp.shutdown()
    return format(root.get_span_context().trace_id, "032x")


def main(argv: list[str]) -> None:
    lib, gateway, llm = argv
    try:
        importlib.import_module(LIBS[lib][0])
    except ImportError as e:
        print(f"cannot import {LIBS[lib][0]}: {e}")
        raise SystemExit(SKIP_EXIT) from None
    print(run_agent(lib, gateway, llm))


# ---------------------------------------------------------------------------------------------
# The model, the pipeline and one run of every library
# ---------------------------------------------------------------------------------------------


def fake_model(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """First a tool call, then (once the tool result is in) the answer."""
    answered = body["messages"][-1]["role"] == "tool"
    out = chat_completion(ANSWER if answered else "", body["model"])
    prompt, completion = USAGE[answered]
    out["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if not answered:
        out["choices"][0]["finish_reason"] = "tool_calls"
        out["choices"][0]["message"] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": ARGUMENTS},
                }
            ],
        }
    return 200, out


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    env = {"CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "2"}
    with running_pipeline(
        tmp_path_factory.mktemp("instrumentations"), "capture,assemble", env
    ) as p:
        yield p


@pytest.fixture(scope="module")
def traces(pipe: Pipeline) -> dict[str, tuple[str, str]]:
    """Run every library's agent at once: ``{lib: (trace id, "")}``, or ``("", why skipped)``."""
    with FakeLLMServer(fake_model) as llm:
        procs = {}
        for lib, (_, _, extra) in LIBS.items():
            env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
            procs[lib] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.test_instrumentations",
                    lib,
                    pipe.http_url(""),
                    llm.base_url,
                ],
                cwd=str(REPO),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        out = {}
        for lib, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=AGENT_TIMEOUT_S)
            if proc.returncode == SKIP_EXIT:
                out[lib] = ("", stdout.strip())
                continue
            assert proc.returncode == 0, f"{lib} agent failed:\n{stderr[-3000:]}"
            out[lib] = (stdout.strip().splitlines()[-1], "")
    return out


def trace_of(traces: dict[str, tuple[str, str]], lib: str) -> str:
    trace_id, skipped = traces[lib]
    if skipped:
        pytest.skip(f"{lib}: {skipped}")
    return trace_id


# ---------------------------------------------------------------------------------------------
# What every dialect must normalise to
# ---------------------------------------------------------------------------------------------


def _msg(
    role: str,
    content: str = "",
    tool_name: str = "",
    tool_call_id: str = "",
    tool_arguments: str = "",
) -> dict[str, str]:
    return {
        "role": role,
        "content": content,
        "tool_name": tool_name,
        "tool_call_id": tool_call_id,
        "tool_arguments": tool_arguments,
    }


USER = _msg("user", QUESTION)
ASK = _msg("assistant", tool_name="lookup_order", tool_call_id="call_1", tool_arguments=ARGUMENTS)
TOOL_RESULT = _msg("tool", RESULT, tool_call_id="call_1")
FINAL = _msg("assistant", ANSWER)
PROMPT_VERSION = hashlib.sha256(SYSTEM.encode()).hexdigest()[:12]
EXPECTED_CALLS = [
    {"system": SYSTEM, "prompt_version": PROMPT_VERSION, "input": [USER], "output": [ASK]},
    {
        "system": SYSTEM,
        "prompt_version": PROMPT_VERSION,
        "input": [USER, ASK, TOOL_RESULT],
        "output": [FINAL],
    },
]


def _norm(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{k: m.get(k, "") for k in USER} for m in messages]


def model_calls(pipe: Pipeline, trace_id: str) -> list[dict[str, Any]]:
    """The trace's LLM calls from the turns topic, each span record completed by the content
    record of the same span (content sent on the logs signal), as the assembler does."""
    spans: dict[str, dict[str, Any]] = {}
    content: dict[str, dict[str, Any]] = {}
    for r in pipe.turn_records():
        if r["trace_id"] == trace_id:
            (content if r["span_kind"] == "content" else spans)[r["span_id"]] = r
    calls = []
    for span_id, s in sorted(spans.items(), key=lambda kv: kv[1]["start_ns"]):
        if s["span_kind"] != "llm":
            continue
        c = content.get(span_id, {})
        calls.append(
            {
                "system": s["system_instructions"] or c.get("system_instructions", ""),
                "prompt_version": s["prompt_version"] or c.get("prompt_version", ""),
                "input": _norm(s["input_messages"] or c.get("input_messages", [])),
                "output": _norm(s["output_messages"] or c.get("output_messages", [])),
            }
        )
    return calls


@pytest.mark.parametrize("lib", list(LIBS))
def test_turns_are_the_same_in_every_dialect(
    pipe: Pipeline, traces: dict[str, tuple[str, str]], lib: str
) -> None:
    trace_id = trace_of(traces, lib)
    wait_for(lambda: model_calls(pipe, trace_id) == EXPECTED_CALLS, 60)
    assert model_calls(pipe, trace_id) == EXPECTED_CALLS
    via_logs = {
        r["span_id"]
        for r in pipe.turn_records()
        if r["trace_id"] == trace_id and r["span_kind"] == "content"
    }
    assert len(via_logs) == (2 if LIBS[lib][2].get(CONTENT_MODE) == "EVENT_ONLY" else 0)
    rows = pipe.wait_rows(
        "SELECT span_kind, operation, provider, request_model, input_tokens, "
        "output_tokens FROM turns FINAL WHERE trace_id = {t:String} "
        "AND span_kind = 'llm' ORDER BY start_ns",
        2,
        {"t": trace_id},
    )
    assert [tuple(r.values()) for r in rows] == [
        ("llm", "chat", "openai", MODEL, *USAGE[0]),
        ("llm", "chat", "openai", MODEL, *USAGE[1]),
    ]
    # one spans row per span: the agent's own root span and the two model calls
    assert (
        pipe.store.scalar(
            "SELECT count() FROM spans FINAL WHERE trace_id = {t:String}", {"t": trace_id}
        )
        == 3
    )


def conversation(pipe: Pipeline, trace_id: str) -> dict[str, Any] | None:
    rows = pipe.rows(
        "SELECT messages, llm_calls, prompt_version, model, input_tokens, output_tokens "
        "FROM conversations FINAL WHERE conversation_id = {c:String}",
        {"c": trace_id},
    )
    if not rows:
        return None
    row = rows[0]
    row["messages"] = _norm(json.loads(row["messages"]))
    return row


EXPECTED_CONVERSATION = {
    "messages": [USER, ASK, TOOL_RESULT, FINAL],
    "llm_calls": 2,
    "prompt_version": PROMPT_VERSION,
    "model": MODEL,
    "input_tokens": USAGE[0][0] + USAGE[1][0],
    "output_tokens": USAGE[0][1] + USAGE[1][1],
}


@pytest.mark.parametrize("lib", list(LIBS))
def test_conversation_is_the_same_in_every_dialect(
    pipe: Pipeline, traces: dict[str, tuple[str, str]], lib: str
) -> None:
    trace_id = trace_of(traces, lib)  # no conversation id attribute: the trace is the conversation
    wait_for(lambda: conversation(pipe, trace_id) == EXPECTED_CONVERSATION, 90)
    assert conversation(pipe, trace_id) == EXPECTED_CONVERSATION


if __name__ == "__main__":
    main(sys.argv[1:])
