"""Late feedback: an outcome that arrives after the conversation closed (a user's rating an
hour later, a task's reward at the end of the day) re-versions the conversation's tags.

Pure core: :func:`feedback_evaluation` validates and redacts what was sent;
:func:`stated_evaluations` reads the evaluations a conversation's spans carried (span events
and the outcome attribute, as stored in ``spans``); :func:`add_feedback` puts stored feedback
back among a conversation's evaluations when it is assembled again, so feedback's outcome
outlives later versions; :func:`rejoined` sends an evaluation known only by the response id it
judges to that answer's conversation, and :func:`requeued` back to wait for that answer while
:func:`awaits_answer` says it may; :func:`retag` gives the conversation's
new :class:`~processors.records.TagRecord`, one version above the last, with the outcome
:mod:`.outcomes` decides from every evaluation (the newest of each name counts).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from processors.config import UnderstandConfig
from processors.errors import InputError
from processors.records import (
    EVALUATION_EVENT,
    OUTCOME_ATTRIBUTE,
    OUTCOME_REASON_ATTRIBUTE,
    Conversation,
    Evaluation,
    TagRecord,
    TurnRecord,
)
from processors.redact import Redactor
from processors.understand.outcomes import decide
from processors.understand.signals import structural_signals

FEEDBACK_NAME = "feedback"
MAX_COMMENT = 2000
MAX_LABEL = 100


def feedback_evaluation(
    *,
    score: Any = None,
    label: Any = None,
    comment: Any = None,
    name: Any = None,
    redactor: Redactor,
    now_ns: int,
) -> Evaluation:
    """The evaluation a feedback request states; :class:`InputError` names what is wrong."""
    if score is None and not label:
        raise InputError("feedback needs a score or a label")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float, str)):
            raise InputError("score must be a number")
        try:
            score = float(score)
        except ValueError:
            raise InputError(f"score must be a number, got {str(score)[:20]!r}") from None
        if not math.isfinite(score):
            raise InputError("score must be finite")
    for key, v, limit in (("label", label, MAX_LABEL), ("name", name, MAX_LABEL)):
        if v is not None and (not isinstance(v, str) or len(v) > limit):
            raise InputError(f"{key} must be a string of at most {limit} characters")
    if comment is not None and not isinstance(comment, str):
        raise InputError("comment must be a string")
    explanation, _ = redactor.redact((comment or "")[:MAX_COMMENT])
    return Evaluation(
        name=name or FEEDBACK_NAME,
        score=score,
        label=(label or "").strip().lower(),
        explanation=explanation,
        source="feedback",
        ts_ns=now_ns,
    )


def stated_evaluations(span_rows: Iterable[Mapping[str, Any]]) -> list[Evaluation]:
    """Evaluations from ``spans`` rows (``span_id``, ``trace_id``, ``attributes``, ``events``
    JSON, ``end_ns``): the evaluation events and the outcome attribute capture stored."""
    out = []
    for r in span_rows:
        attrs = r.get("attributes") or {}
        if attrs.get(OUTCOME_ATTRIBUTE):
            out.append(
                Evaluation(
                    name=OUTCOME_ATTRIBUTE,
                    label=str(attrs[OUTCOME_ATTRIBUTE]).strip().lower(),
                    explanation=str(attrs.get(OUTCOME_REASON_ATTRIBUTE, "")),
                    source="attribute",
                    span_id=r.get("span_id", ""),
                    trace_id=r.get("trace_id", ""),
                    ts_ns=int(r.get("end_ns") or 0),
                )
            )
        try:
            events = json.loads(r.get("events") or "[]")
        except ValueError:
            continue
        for ev in events if isinstance(events, list) else []:
            if not isinstance(ev, dict) or ev.get("name") != EVALUATION_EVENT:
                continue
            a = ev.get("attributes") or {}
            try:
                score = float(a["gen_ai.evaluation.score.value"])
            except (KeyError, TypeError, ValueError):
                score = None
            out.append(
                Evaluation(
                    name=str(a.get("gen_ai.evaluation.name", "")),
                    score=score if score is None or math.isfinite(score) else None,
                    label=str(a.get("gen_ai.evaluation.score.label", "")).strip().lower(),
                    explanation=str(a.get("gen_ai.evaluation.explanation", "")),
                    response_id=str(a.get("gen_ai.response.id", "")),
                    source="event",
                    span_id=r.get("span_id", ""),
                    trace_id=r.get("trace_id", ""),
                    ts_ns=int(ev.get("time_ns") or 0),
                )
            )
    return out


def add_feedback(conv: Conversation, feedback: list[Evaluation]) -> Conversation:
    """``conv`` with the stored ``feedback`` among its evaluations, each once (a conversation
    tagged again must not count the same feedback twice, nor lose it)."""
    have = {_identity(ev) for ev in conv.evaluations}
    extra = [ev for ev in feedback if _identity(ev) not in have]
    if not extra:
        return conv
    return dataclasses.replace(conv, evaluations=[*conv.evaluations, *extra])


def _identity(ev: Evaluation) -> tuple[Any, ...]:
    # what the feedback table keeps of an evaluation (span and response ids are not stored)
    return (ev.name, ev.score, ev.label, ev.explanation, ev.source, ev.ts_ns)


def rejoined(conv: Conversation, answer: tuple[str, str, str]) -> list[TurnRecord]:
    """The evaluations of ``conv``, named after the response id they judge
    (:data:`~processors.records.RESPONSE_REF`), as turn records of the answer's conversation,
    tied to its span: ``answer`` is ``(conversation id, trace id, span id)``. Each keeps the
    span id capture gave it, so a redelivery adds nothing twice."""
    cid, trace_id, span_id = answer
    return [
        _detached(cid, ev.span_id, dataclasses.replace(ev, trace_id=trace_id, span_id=span_id))
        for ev in conv.evaluations
    ]


def requeued(conv: Conversation) -> list[TurnRecord]:
    """The evaluations of ``conv``, named after an answer not stored yet, as the turn records
    of ``conv`` itself: sent back through ``closeloop.turns`` they reopen it, and its answer
    is looked up again when it closes again."""
    return [_detached(conv.conversation_id, ev.span_id, ev) for ev in conv.evaluations]


def awaits_answer(conv: Conversation, now_ns: int, wait_s: float) -> bool:
    """Whether the evaluations of ``conv`` may wait longer for the answer they name: until
    ``wait_s`` after the newest of them. One without a time, or with a time ahead of
    ``now_ns`` (a wrong clock), waits no longer: nothing would bound its wait.

    >>> conv = Conversation("c", evaluations=[Evaluation(ts_ns=10**9)])
    >>> awaits_answer(conv, 5 * 10**9, 10.0), awaits_answer(conv, 12 * 10**9, 10.0)
    (True, False)
    """
    made = max((ev.ts_ns for ev in conv.evaluations), default=0)
    return 0 < made <= now_ns < made + int(wait_s * 1e9)


def _detached(cid: str, span_id: str, ev: Evaluation) -> TurnRecord:
    return TurnRecord(
        conversation_id=cid,
        trace_id="",  # no trace of its own, as capture sends a detached evaluation
        span_id=span_id,
        span_kind="content",
        start_ns=ev.ts_ns,
        end_ns=ev.ts_ns,
        evaluations=[ev],
    )


def retag(tag: TagRecord, evaluations: list[Evaluation], cfg: UnderstandConfig) -> TagRecord:
    """``tag`` one version up, its outcome decided again with ``evaluations``."""
    if tag.conversation is not None:
        sig = structural_signals(tag.conversation)
        heuristic = (sig.outcome, sig.outcome_turn, sig.outcome_why)
    else:
        heuristic = (tag.outcome, tag.outcome_turn, tag.outcome_reason)
    v = decide(evaluations, heuristic, cfg)
    return dataclasses.replace(
        tag,
        conversation_version=tag.conversation_version + 1,
        outcome=v.outcome,
        outcome_turn=v.turn if v.source == "heuristic" else tag.outcome_turn,
        failed=v.failed,
        outcome_source=v.source,
        outcome_reason=v.reason,
        # ts_ns stays the conversation's arrival time: verification splits before/after a
        # merge on it, and late feedback must count where its conversation happened
    )
