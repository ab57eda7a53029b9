"""Late feedback's core: validation, redaction, stored evaluations read back, re-versioned tags."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from processors.config import UnderstandConfig
from processors.errors import InputError
from processors.records import RESPONSE_REF, Conversation, Evaluation, Message, TagRecord
from processors.redact import Redactor
from processors.understand.feedback import (
    add_feedback,
    awaits_answer,
    feedback_evaluation,
    rejoined,
    requeued,
    retag,
    stated_evaluations,
)
from processors.understand.outcomes import decide

R = Redactor(["secrets", "emails", "cards", "phones"])


def _tag(**kw: object) -> TagRecord:
    conv = Conversation("c", messages=[Message("user", "refund"), Message("assistant", "Done.")])
    return TagRecord(
        "c", 4, "i", "refunds", 1, outcome="resolved", ts_ns=111, conversation=conv, **kw
    )


def test_feedback_is_validated_and_redacted() -> None:
    ev = feedback_evaluation(score="0", comment="call me at jane@example.com", redactor=R, now_ns=5)
    assert (ev.name, ev.score, ev.source, ev.ts_ns) == ("feedback", 0.0, "feedback", 5)
    assert "jane@example.com" not in ev.explanation
    for bad in ({}, {"score": "x"}, {"score": float("nan")}, {"score": True}, {"label": 3}):
        with pytest.raises(InputError):
            feedback_evaluation(redactor=R, now_ns=1, **bad)


def test_retag_reversions_and_keeps_arrival_time() -> None:
    down = feedback_evaluation(label="thumbs_down", redactor=R, now_ns=9)
    new = retag(_tag(), [down], UnderstandConfig())
    assert (new.conversation_version, new.outcome, new.failed, new.outcome_source) == (
        5,
        "failed",
        True,
        "stated",
    )
    assert new.ts_ns == 111  # verification counts it where the conversation happened
    up = feedback_evaluation(label="thumbs_up", redactor=R, now_ns=10)
    again = retag(new, [down, up], UnderstandConfig())
    assert (again.conversation_version, again.failed) == (6, False)


def test_evaluations_read_back_from_span_rows() -> None:
    rows = [
        {
            "span_id": "s1",
            "trace_id": "t",
            "end_ns": 3,
            "attributes": {"closeloop.outcome": "Escalated"},
            "events": json.dumps(
                [
                    {"name": "exception", "time_ns": 1, "attributes": {}},
                    {
                        "name": "gen_ai.evaluation.result",
                        "time_ns": 2,
                        "attributes": {
                            "gen_ai.evaluation.name": "reward",
                            "gen_ai.evaluation.score.value": "1.0",
                        },
                    },
                ]
            ),
        },
        {"span_id": "s2", "trace_id": "t", "end_ns": 4, "attributes": {}, "events": "not json"},
    ]
    got = stated_evaluations(rows)
    assert [(e.name, e.label, e.score, e.source) for e in got] == [
        ("closeloop.outcome", "escalated", None, "attribute"),
        ("reward", "", 1.0, "event"),
    ]
    assert isinstance(got[0], Evaluation)


def test_stored_feedback_joins_a_later_version_once() -> None:
    reward = Evaluation(name="reward", score=1.0, source="event", span_id="s1", ts_ns=3)
    conv = Conversation("c", version=9, evaluations=[reward])
    down = feedback_evaluation(label="thumbs_down", redactor=R, now_ns=9)
    again = add_feedback(add_feedback(conv, [down]), [down])
    assert again.evaluations == [reward, down]
    assert add_feedback(conv, []) is conv
    verdict = decide(again.evaluations, ("resolved", -1, ""), UnderstandConfig())
    assert (verdict.outcome, verdict.failed, verdict.source) == ("failed", True, "stated")


def test_an_evaluation_named_after_an_answer_rejoins_its_conversation_on_the_answers_span() -> None:
    ev = Evaluation(name="grader", score=0.0, response_id="chatcmpl-1", source="log",
                    span_id="eval-0123", trace_id=RESPONSE_REF + "chatcmpl-1", ts_ns=7)  # fmt: skip
    stand_in = Conversation(RESPONSE_REF + "chatcmpl-1", evaluations=[ev])
    (turn,) = rejoined(stand_in, ("conv-9", "ab" * 16, "cd" * 8))
    assert (turn.conversation_id, turn.trace_id, turn.span_id, turn.span_kind) == (
        "conv-9",
        "",
        "eval-0123",
        "content",
    )
    (moved,) = turn.evaluations
    assert (moved.trace_id, moved.span_id, moved.score, moved.response_id) == (
        "ab" * 16,
        "cd" * 8,
        0.0,
        "chatcmpl-1",
    )


def test_an_evaluation_whose_answer_is_not_stored_goes_back_to_wait_for_a_bounded_time() -> None:
    ev = Evaluation(name="grader", score=0.0, response_id="chatcmpl-2", source="log",
                    span_id="eval-0456", trace_id=RESPONSE_REF + "chatcmpl-2", ts_ns=10**9)  # fmt: skip
    stand_in = Conversation(RESPONSE_REF + "chatcmpl-2", evaluations=[ev])
    (turn,) = requeued(stand_in)
    assert (turn.conversation_id, turn.span_id, turn.span_kind, turn.evaluations) == (
        RESPONSE_REF + "chatcmpl-2",
        "eval-0456",  # the stand-in's own record again: assemble merges it, adds nothing
        "content",
        [ev],
    )
    second = 61 * 10**9
    assert awaits_answer(stand_in, second, 60.0) is False
    assert awaits_answer(stand_in, second - 1, 60.0) is True
    assert awaits_answer(stand_in, second, 0.0) is False  # answer_wait_s: 0, no wait
    # the newest evaluation of the stand-in counts
    newer = Conversation(stand_in.conversation_id, evaluations=[ev, replace(ev, ts_ns=2 * 10**9)])
    assert awaits_answer(newer, second, 60.0) is True
    # no time, or a time ahead of now: nothing bounds the wait, so none
    assert awaits_answer(Conversation("x", evaluations=[replace(ev, ts_ns=0)]), 5, 60.0) is False
    assert awaits_answer(stand_in, 10**9 - 1, 60.0) is False
