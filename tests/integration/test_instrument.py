"""processors.instrument, the agent author's helper, against the real gateway, broker and capture.

An agent process configures the SDK with :func:`instrument.configure`, instruments the real
``openai`` client with opentelemetry-instrumentation-openai-v2 (skipped when it cannot be
imported), talks to the local fake model inside :func:`instrument.conversation`, and reports
two outcomes: one inside its span, one afterwards with only the conversation id (late feedback).

Run as a module, this file is the agent: ``python -m tests.integration.test_instrument
GATEWAY_URL LLM_BASE_URL`` prints the trace id of its turn.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from processors.instrument import (
    AGENT_VERSION,
    CONVERSATION_ID,
    EVALUATION_EVENT,
    PROMPT_VERSION,
    conversation,
    current_conversation_id,
    report_outcome,
)
from tests.llm_server import FakeLLMServer, chat_completion

from .pipeline import Pipeline, running_pipeline, wait_for

REPO = Path(__file__).resolve().parents[2]
CONV = "conv-helper-42"
PROMPT = "support-v12"
AGENT = "1.4.0"
MODEL = "gpt-4o-mini"
QUESTION = "Where is my order A-17?"
ANSWER = "Order A-17 shipped."
SKIP_EXIT = 3
AGENT_TIMEOUT_S = 120


def run_agent(gateway: str, llm_base_url: str) -> str:
    import openai
    from opentelemetry import trace
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    from processors import instrument

    setup = instrument.configure(gateway, service_name="agent-helper", export_delay_millis=50)
    OpenAIInstrumentor().instrument()  # the global providers configure() installed
    client = openai.OpenAI(base_url=llm_base_url, api_key="test-key", max_retries=0)
    tracer = trace.get_tracer("acme.support")
    with (
        instrument.conversation(CONV, prompt_version=PROMPT, agent_version=AGENT),
        tracer.start_as_current_span("support turn") as root,
    ):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}]
        )
        assert reply.choices[0].message.content == ANSWER
        instrument.report_outcome(score=0.0, label="fail", explanation="order not found")
    # an hour later: the user's rating, with nothing but the conversation id
    instrument.report_outcome(conversation_id=CONV, name="user_feedback", score=1.0)
    assert setup.force_flush()
    setup.shutdown()
    return format(root.get_span_context().trace_id, "032x")


def main(argv: list[str]) -> None:
    try:
        import opentelemetry.instrumentation.openai_v2  # noqa: F401
    except ImportError as e:
        print(f"cannot import opentelemetry-instrumentation-openai-v2: {e}")
        raise SystemExit(SKIP_EXIT) from None
    print(run_agent(*argv))


def fake_model(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, chat_completion(ANSWER, body["model"])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    env = {"CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "2"}
    with running_pipeline(tmp_path_factory.mktemp("instrument"), "capture,assemble", env) as p:
        yield p


@pytest.fixture(scope="module")
def trace_id(pipe: Pipeline) -> str:
    with FakeLLMServer(fake_model) as llm:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["PYTHONPATH"] = str(REPO)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.integration.test_instrument",
                pipe.http_url(""),
                llm.base_url,
            ],
            cwd=str(REPO),
            env=env,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT_S,
        )
    if r.returncode == SKIP_EXIT:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_every_span_carries_the_conversation_and_versions(pipe: Pipeline, trace_id: str) -> None:
    def spans() -> list[dict[str, Any]]:
        return pipe.rows(
            "SELECT name, conversation_id, attributes FROM spans FINAL "
            "WHERE trace_id = {t:String} ORDER BY start_ns",
            {"t": trace_id},
        )

    wait_for(lambda: len(spans()) == 2, 90)  # the agent's turn and the instrumented model call
    rows = spans()
    assert [r["name"] for r in rows] == ["support turn", f"chat {MODEL}"]
    for r in rows:
        assert r["conversation_id"] == CONV
        assert r["attributes"][CONVERSATION_ID] == CONV
        assert r["attributes"][PROMPT_VERSION] == PROMPT
        assert r["attributes"][AGENT_VERSION] == AGENT
    turns = pipe.rows(
        "SELECT conversation_id, prompt_version, agent_version FROM turns FINAL "
        "WHERE trace_id = {t:String} AND span_kind = 'llm'",
        {"t": trace_id},
    )
    assert [(t["conversation_id"], t["prompt_version"], t["agent_version"]) for t in turns] == [
        (CONV, PROMPT, AGENT)
    ]


def test_content_capture_is_on(pipe: Pipeline, trace_id: str) -> None:
    """configure() switched the instrumentation's content recording on: the assembled
    conversation has the question and the answer."""

    def messages() -> str:
        rows = pipe.rows(
            "SELECT messages FROM conversations FINAL WHERE conversation_id = {c:String}",
            {"c": CONV},
        )
        return rows[0]["messages"] if rows else ""

    wait_for(lambda: ANSWER in messages(), 90)
    assert QUESTION in messages() and ANSWER in messages()


def _evaluation_records(bootstrap: str, topic: str) -> list[tuple[str, dict[str, Any]]]:
    """``(trace id hex, attributes)`` of every evaluation log record written to ``topic``."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "test-instrument", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out = []
        while (msg := consumer.poll(2.0)) is not None:
            req = ExportLogsServiceRequest.FromString(msg.value())
            for rl in req.resource_logs:
                for sl in rl.scope_logs:
                    for lr in sl.log_records:
                        if lr.event_name == EVALUATION_EVENT:
                            attrs = {
                                kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                                for kv in lr.attributes
                            }
                            out.append((lr.trace_id.hex(), attrs))
        return out
    finally:
        consumer.close()


def test_outcomes_are_evaluation_events_tied_to_the_conversation(
    pipe: Pipeline, trace_id: str
) -> None:
    records = _evaluation_records(pipe.broker.bootstrap, pipe.cfg.topics.otlp_logs)
    by_name = {a["gen_ai.evaluation.name"]: (t, a) for t, a in records}
    assert sorted(by_name) == ["outcome", "user_feedback"]
    in_turn, attrs = by_name["outcome"]
    assert in_turn == trace_id  # emitted inside the turn's span: its trace context
    assert attrs == {
        CONVERSATION_ID: CONV,
        PROMPT_VERSION: PROMPT,
        AGENT_VERSION: AGENT,
        "gen_ai.evaluation.name": "outcome",
        "gen_ai.evaluation.score.value": 0.0,
        "gen_ai.evaluation.score.label": "fail",
        "gen_ai.evaluation.explanation": "order not found",
    }
    late, attrs = by_name["user_feedback"]
    assert late == ""  # no span around it: the conversation id alone ties it
    assert attrs[CONVERSATION_ID] == CONV and attrs["gen_ai.evaluation.score.value"] == 1.0


def test_conversation_context_nests_and_resets() -> None:
    assert current_conversation_id() is None
    with conversation("a", prompt_version="p1"):
        with conversation("b"):
            assert current_conversation_id() == "b"
        assert current_conversation_id() == "a"
    assert current_conversation_id() is None
    with pytest.raises(ValueError, match="conversation_id"):
        report_outcome(label="fail")
    with pytest.raises(ValueError, match="score or a label"), conversation("a"):
        report_outcome()


if __name__ == "__main__":
    main(sys.argv[1:])
