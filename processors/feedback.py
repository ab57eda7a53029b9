"""Tagged conversations read back from the store, and late feedback recorded against them.

Used by ``closeloop feedback``, ``POST /api/feedback`` (the review page's server), the
understand stage (an evaluation event that arrives over OTLP after its conversation left
assemble's state becomes a conversation of evaluations only: it is late feedback) and
``closeloop diagnose``. The decisions are the pure core's (:mod:`processors.understand.feedback`);
this module reads and writes the store and hands the new tags to a ``publish`` callback
(the ``closeloop.tags`` topic when a stack runs, so diagnose and verification take them in).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from processors.config import Config
from processors.errors import InputError
from processors.records import Conversation, Evaluation, Message, TagRecord, ToolCall
from processors.store import Store
from processors.understand.core import tag_row
from processors.understand.feedback import add_feedback, retag, stated_evaluations


def load_tagged(
    store: Store, *, intent_id: str | None = None, conversation_id: str | None = None
) -> list[TagRecord]:
    """The newest tags (oldest first) with their conversations rebuilt as assembled: messages,
    traces, model calls and the tool calls with their own durations (diagnose's latency rule
    compares per-call times, which a conversation total alone would misstate)."""
    where, params = [], {}
    if intent_id is not None:
        where.append("t.intent_id = {i:String}")
        params["i"] = intent_id
    if conversation_id is not None:
        where.append("t.conversation_id = {c:String}")
        params["c"] = conversation_id
    rows = store.query(
        """
        SELECT t.* EXCEPT ts, c.messages AS messages_json, c.trace_ids AS trace_ids,
               c.closed_reason AS closed_reason, c.latency_ms AS latency_ms, c.errors AS errors,
               c.llm_calls AS llm_calls, c.start_ns AS start_ns, c.end_ns AS end_ns
        FROM (SELECT * FROM conversation_tags FINAL) AS t
        INNER JOIN (SELECT * FROM conversations FINAL) AS c ON c.conversation_id = t.conversation_id
        """
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY t.ts_ns, t.conversation_id",
        params,
    )
    calls = _tool_calls(store, intent_id, conversation_id)
    out = []
    for r in rows:
        msgs = [Message.from_dict(m) for m in json.loads(r.pop("messages_json") or "[]")]
        conv = Conversation(
            conversation_id=r["conversation_id"],
            version=r["conversation_version"],
            messages=msgs,
            trace_ids=r.pop("trace_ids"),
            closed_reason=r.pop("closed_reason"),
            latency_ms=r.pop("latency_ms"),
            errors=r.pop("errors"),
            llm_calls=r.pop("llm_calls"),
            start_ns=r.pop("start_ns"),
            end_ns=r.pop("end_ns"),
            prompt_version=r["prompt_version"],
            agent_version=r["agent_version"],
            model=r["model"],
            tool_calls=calls.get(r["conversation_id"], []),
        )
        r["failed"] = bool(r["failed"])
        out.append(TagRecord.from_dict({**r, "conversation": conv.to_dict()}))
    return out


def _tool_calls(
    store: Store, intent_id: str | None, conversation_id: str | None
) -> dict[str, list[ToolCall]]:
    if conversation_id is not None:
        cond, params = "conversation_id = {c:String}", {"c": conversation_id}
    elif intent_id is not None:
        cond = (
            "conversation_id IN (SELECT conversation_id FROM conversation_tags FINAL "
            "WHERE intent_id = {i:String})"
        )
        params = {"i": intent_id}
    else:
        cond, params = "1", {}
    out: dict[str, list[ToolCall]] = {}
    for r in store.query(
        "SELECT conversation_id, trace_id, span_id, call_id, name, arguments, result, "
        "error_type, error_message, start_ns, duration_ms FROM tool_calls FINAL WHERE "
        + cond
        + " ORDER BY start_ns",
        params,
    ):
        out.setdefault(r.pop("conversation_id"), []).append(ToolCall.from_dict(r))
    return out


def record_feedback(
    store: Store,
    cfg: Config,
    conversation_id: str,
    evaluation: Evaluation | list[Evaluation],
    publish: Callable[[TagRecord], None] | None = None,
) -> TagRecord:
    """Store the evaluation(s) for the conversation and write its re-versioned tags; the new
    :class:`TagRecord` goes to ``publish`` too. :class:`InputError` if the conversation is unknown."""
    evaluations = evaluation if isinstance(evaluation, list) else [evaluation]
    found = load_tagged(store, conversation_id=conversation_id)
    if not found:
        raise InputError(
            f"no tagged conversation {conversation_id[:200]!r} (it may not have closed yet)"
        )
    tag = found[-1]
    store.insert_records(
        "feedback",
        [
            {
                "conversation_id": conversation_id,
                "name": ev.name,
                "score": ev.score,
                "label": ev.label,
                "explanation": ev.explanation,
                "source": ev.source,
                "ts_ns": ev.ts_ns,
            }
            for ev in evaluations
        ],
    )
    spans = store.query(
        "SELECT span_id, trace_id, attributes, events, end_ns FROM spans FINAL "
        "WHERE conversation_id = {c:String}",
        {"c": conversation_id},
    )
    earlier = stored_feedback(store, [conversation_id]).get(conversation_id, [])
    new = retag(tag, [*stated_evaluations(spans), *earlier], cfg.understand)
    store.insert_records("conversation_tags", [tag_row(new)])
    if publish is not None:
        publish(new)
    return new


def stored_feedback(store: Store, conversation_ids: list[str]) -> dict[str, list[Evaluation]]:
    """The late feedback recorded for these conversations, by conversation id."""
    if not conversation_ids:
        return {}
    out: dict[str, list[Evaluation]] = {}
    for r in store.query(
        "SELECT * EXCEPT ts FROM feedback FINAL WHERE conversation_id IN {c:Array(String)}",
        {"c": sorted(set(conversation_ids))},
    ):
        out.setdefault(r.pop("conversation_id"), []).append(Evaluation.from_dict(r))
    return out


def with_feedback(store: Store, convs: list[Conversation]) -> list[Conversation]:
    """``convs`` with the late feedback stored for them among their evaluations, so a
    conversation assembled again (more spans, a re-publish) keeps the outcome feedback gave
    it instead of a tag computed without it."""
    stored = stored_feedback(store, [c.conversation_id for c in convs])
    return [add_feedback(c, stored.get(c.conversation_id, [])) for c in convs]


def answers_of(store: Store, response_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """Where the answers with these ``gen_ai.response.id`` are, as the store keeps them from
    every captured span (``responses``): ``{response id: (conversation, trace, span id)}``."""
    if not response_ids:
        return {}
    rows = store.query(
        "SELECT response_id, conversation_id, trace_id, span_id FROM responses FINAL "
        "WHERE response_id IN {r:Array(String)} AND conversation_id != ''",
        {"r": sorted(set(response_ids))},
    )
    return {r["response_id"]: (r["conversation_id"], r["trace_id"], r["span_id"]) for r in rows}
