"""`closeloop import`'s core: transcripts become the GenAI spans capture reads like a live agent's."""

from __future__ import annotations

import json

import pytest

from processors.capture.core import Capture, RawMessage
from processors.capture.transcripts import parse_line, read_lines, to_request
from processors.config import CaptureConfig, UnderstandConfig
from processors.understand.assemble import build_conversation
from processors.understand.outcomes import decide

NOW = 1_767_225_600 * 10**9

LINE = {
    "id": "conv-7",
    "system": "You are a ticket agent. Never close a ticket without asking.",
    "prompt_version": "v3",
    "model": "gpt-x",
    "score": 0,
    "evaluation_name": "reward",
    "messages": [
        {"role": "user", "content": "close ticket T-1"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "close_ticket", "arguments": '{"id": "T-1"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_abc123",
            "name": "close_ticket",
            "content": "Error: locked",
            "error": True,
        },
        {"role": "assistant", "content": "Sorry, the ticket is locked."},
    ],
}


def _conversation(line: dict) -> object:
    tr = parse_line(json.dumps(line), NOW)
    batch = Capture(CaptureConfig()).process(
        [RawMessage("otlp_spans", 0, 0, None, to_request(tr).SerializeToString())], NOW
    )
    assert batch.deadletters == []
    return build_conversation(tr.conversation_id, [t.to_dict() for t in batch.turns], "end")


def test_round_trip_through_capture_and_assemble() -> None:
    conv = _conversation(LINE)
    assert conv.conversation_id == "conv-7" and conv.prompt_version == "v3"
    assert conv.model == "gpt-x" and conv.llm_calls == 2
    assert [(m.role, m.content) for m in conv.messages if m.role != "tool" and m.content] == [
        ("user", "close ticket T-1"),
        ("assistant", "Sorry, the ticket is locked."),
    ]
    (call,) = conv.tool_calls
    assert (call.name, call.arguments, call.result) == (
        "close_ticket",
        '{"id": "T-1"}',
        "Error: locked",
    )
    assert call.error_type == "error" and conv.errors == 1
    (ev,) = conv.evaluations
    assert (ev.name, ev.score, ev.source) == ("reward", 0.0, "event")
    v = decide(conv.evaluations, ("resolved", 3, "answered"), UnderstandConfig())
    assert (v.outcome, v.failed, v.source) == ("failed", True, "stated")


def test_outcome_and_label_and_timestamps() -> None:
    line = {**LINE, "outcome": "escalated", "score": None, "label": "pass"}
    line["start_time"] = "2026-01-01T00:00:00Z"
    line["messages"] = [
        {**m, "timestamp": 1_767_225_600 + 10 * i} for i, m in enumerate(LINE["messages"])
    ]
    conv = _conversation(line)
    assert {(e.name, e.label) for e in conv.evaluations} == {
        ("closeloop.outcome", "escalated"),
        ("reward", "pass"),
    }
    assert conv.start_ns == 1_767_225_600 * 10**9  # the root span starts at start_time
    assert conv.end_ns == (1_767_225_600 + 30) * 10**9 + 1  # and ends after the last message
    tool = next(m for m in conv.messages if m.role == "tool")
    assert tool.ts_ns == (1_767_225_600 + 20) * 10**9 - 250_000_000  # its message's timestamp


def test_reimport_gives_the_same_ids() -> None:
    a = to_request(parse_line(json.dumps(LINE), NOW)).SerializeToString()
    b = to_request(parse_line(json.dumps(LINE), NOW)).SerializeToString()
    assert a == b


@pytest.mark.parametrize(
    "line, reason",
    [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "'id'"),
        (json.dumps({"id": "a", "messages": []}), "non-empty list"),
        (json.dumps({"id": "a", "messages": [{"role": "robot"}]}), "messages[0] needs a role"),
        (json.dumps({"id": "a", "messages": [{"role": "user"}], "outcome": "great"}), "'outcome'"),
        (json.dumps({"id": "a", "messages": [{"role": "user"}], "score": "high"}), "'score'"),
        (json.dumps({"id": "a", "messages": [{"role": "user"}], "start_time": "soon"}), "ISO 8601"),
    ],
)
def test_bad_lines_say_why(line: str, reason: str) -> None:
    ((n, got),) = list(read_lines(iter(["", line]), NOW))
    assert n == 2 and isinstance(got, str) and reason in got
