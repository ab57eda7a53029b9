"""The assembler core: transcripts from spans, de-duplicated history, closing, late spans."""

from __future__ import annotations

from processors.config import AssembleConfig
from processors.records import Message, ToolCall, TurnRecord
from processors.understand import assemble

S = 1_000_000_000


def llm(span: str, start: int, inputs: list[Message], outputs: list[Message], **kw) -> TurnRecord:
    return TurnRecord(
        conversation_id="c",
        trace_id="t" + span,
        span_id=span,
        span_kind="llm",
        start_ns=start,
        end_ns=start + S // 2,
        input_messages=inputs,
        output_messages=outputs,
        prompt_version="p1",
        **kw,
    )


def test_history_resent_on_every_call_is_kept_once_and_repeats_survive() -> None:
    u1, a1 = Message(role="user", content="yes"), Message(role="assistant", content="Which card?")
    u2 = Message(role="user", content="yes")  # the user says the same thing again
    turns = [
        llm("s1", 0, [Message(role="system", content="sys"), u1], [a1]),
        llm(
            "s2",
            5 * S,
            [Message(role="system", content="sys"), u1, a1, u2],
            [Message(role="assistant", content="Done.")],
        ),
    ]
    conv = assemble.build_conversation("c", [t.to_dict() for t in turns], "end")
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "yes"),
        ("assistant", "Which card?"),
        ("user", "yes"),
        ("assistant", "Done."),
    ]
    assert conv.llm_calls == 2 and conv.prompt_version == "p1" and conv.version == 2


def test_tool_results_from_model_inputs_are_kept_unless_a_tool_span_has_them() -> None:
    call = Message(
        role="assistant", tool_name="lookup", tool_call_id="call1", tool_arguments='{"id": 1}'
    )
    result = Message(role="tool", content="found", tool_call_id="call1")
    turns = [
        llm("s1", 0, [Message(role="user", content="find 1")], [call]),
        llm(
            "s2",
            2 * S,
            [Message(role="user", content="find 1"), call, result],
            [Message(role="assistant", content="It is found.")],
        ),
    ]
    conv = assemble.build_conversation("c", [t.to_dict() for t in turns], "end")
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    executed = TurnRecord(
        conversation_id="c",
        trace_id="t",
        span_id="tool1",
        span_kind="tool",
        start_ns=S,
        end_ns=S + 10,
        tool=ToolCall(name="lookup", call_id="call1", result="found"),
    )
    conv = assemble.build_conversation("c", [t.to_dict() for t in [*turns, executed]], "end")
    assert [m.role for m in conv.messages].count("tool") == 1
    assert conv.tool_calls[0].name == "lookup"


def test_closing_on_end_marker_idle_and_late_span_reopens() -> None:
    cfg = AssembleConfig(idle_timeout_s=30)
    st = assemble.add_turns(
        None,
        [llm("s1", 0, [Message(role="user", content="hi")], [], end_of_conversation=True)],
        now_ns=100 * S,
    )
    assert assemble.is_due(st, 100 * S, cfg, 0) == ""  # grace for sibling spans
    assert assemble.is_due(st, 102 * S, cfg, 0) == "end"
    first = assemble.close("c", st, "end", 102 * S)
    late = assemble.add_turns(
        st, [llm("s2", S, [], [Message(role="assistant", content="late")])], now_ns=110 * S
    )
    assert late["closed_ns"] == 0
    assert assemble.is_due(late, 110 * S, cfg, 0) == ""
    assert assemble.is_due(late, 112 * S, cfg, 0) == "end"  # it had ended: closes again after grace
    second = assemble.close("c", late, "end", 112 * S)
    assert second.version > first.version  # the newer row replaces the older
    assert assemble.is_expired(late, 112 * S + int(cfg.linger_s * S), cfg)
    idle = assemble.add_turns(None, [llm("s9", 0, [], [])], now_ns=0)  # its span ends at S/2
    # idleness is event time: the watermark, not the wall clock, must pass the last span
    assert assemble.is_due(idle, 1000 * S, cfg, 30 * S) == ""
    assert assemble.is_due(idle, 29 * S, cfg, 30 * S + S // 2) == ""  # and 30 s of wall time
    assert assemble.is_due(idle, 30 * S, cfg, 30 * S + S // 2) == "idle"


def test_content_record_merges_into_its_span_in_either_order() -> None:
    span = TurnRecord(
        conversation_id="c", trace_id="t", span_id="s", span_kind="llm", start_ns=0, end_ns=S
    )
    content = TurnRecord(
        conversation_id="c",
        trace_id="t",
        span_id="s",
        span_kind="content",
        input_messages=[Message(role="user", content="hello")],
    )
    for order in ([span, content], [content, span]):
        st = assemble.add_turns(None, order, now_ns=0)
        conv = assemble.build_conversation("c", list(st["turns"].values()), "end")
        assert [(m.role, m.content) for m in conv.messages] == [("user", "hello")]
        assert conv.llm_calls == 1
