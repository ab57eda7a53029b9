"""What the review page and its API show, read from the store: plain dicts, so the pages, the
JSON API and the CLI always show the same thing.

A proposal is looked up by :func:`processors.act.proposal_row`, the one query for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from processors.act import proposal_row
from processors.config import Config
from processors.store import Store

SPARK_BUCKETS = 24
LIST_LIMIT = 500


def _json_field(text: Any) -> Any:
    """A JSON column back as data; text that is not JSON stays text."""
    if not isinstance(text, str) or not text:
        return text or {}
    try:
        return json.loads(text)
    except ValueError:
        return text


def overview(store: Store) -> dict[str, Any]:
    """Headline counts, verdicts of targeted intents, and the proposals waiting for a human."""
    counts = {
        "conversations": store.scalar("SELECT count() FROM conversations FINAL"),
        "intents": store.scalar("SELECT count() FROM intents FINAL WHERE status = 'active'"),
        "open_diagnoses": store.scalar("SELECT count() FROM diagnoses FINAL WHERE status = 'open'"),
        "open_proposals": store.scalar("SELECT count() FROM proposals FINAL WHERE status = 'open'"),
    }
    verdicts = {
        r["verdict"]: int(r["n"])
        for r in store.query(
            "SELECT verdict, count() AS n FROM outcomes FINAL WHERE (proposal_id, intent_id) IN "
            "(SELECT proposal_id, intent_id FROM proposals FINAL) GROUP BY verdict"
        )
    }
    waiting = store.query(
        "SELECT proposal_id, title, intent_id, created_ns FROM proposals FINAL WHERE status = 'open' "
        "ORDER BY created_ns DESC LIMIT 20"
    )
    return {
        "counts": {k: int(v or 0) for k, v in counts.items()},
        "verdicts": verdicts,
        "waiting": waiting,
    }


def _failure_series(
    store: Store, buckets: int, intent_id: str | None = None
) -> tuple[dict[str, list[list[int]]], int, int]:
    """``([conversations, failures] per bucket, per intent; first ns; bucket width ns)``: the
    tagged conversations' time span (of one intent, or of all) cut into ``buckets``."""
    where, params = ("WHERE intent_id = {i:String}", {"i": intent_id}) if intent_id else ("", {})
    span = store.query(
        f"SELECT min(ts_ns) AS lo, max(ts_ns) AS hi, count() AS n FROM conversation_tags FINAL {where}",
        params,
    )[0]
    lo, hi = int(span["lo"] or 0), int(span["hi"] or 0)
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    series: dict[str, list[list[int]]] = {}
    if int(span["n"] or 0):
        for r in store.query(
            "SELECT intent_id, toUInt32(intDiv(ts_ns - {lo:UInt64}, {w:UInt64})) AS b, count() AS n, "
            f"sum(failed) AS f FROM conversation_tags FINAL {where or 'WHERE 1'} "
            "AND ts_ns >= {lo:UInt64} GROUP BY intent_id, b",
            {**params, "lo": lo, "w": width},
        ):
            s = series.setdefault(r["intent_id"], [[0, 0] for _ in range(buckets)])
            s[min(int(r["b"]), buckets - 1)] = [int(r["n"]), int(r["f"])]
    return series, lo, width


def intents(store: Store, cfg: Config, buckets: int = SPARK_BUCKETS) -> dict[str, Any]:
    """Intents with size, failure and signal rates, a volume/failure series and their changes.

    Raw examples are withheld from intents smaller than ``understand.min_examples_shown``
    (small clusters can single out a person).
    """
    rows = store.query(
        "SELECT intent_id, name, description, keywords, examples, size, status, parent_id, taxonomy_version, "
        "created_ns, updated_ns FROM intents FINAL ORDER BY size DESC, intent_id LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )
    stats = {
        r["intent_id"]: r
        for r in store.query(
            "SELECT intent_id, count() AS n, sum(failed) AS failures FROM conversation_tags FINAL GROUP BY intent_id"
        )
    }
    signals: dict[str, dict[str, int]] = {}
    for r in store.query(
        "SELECT intent_id, s AS signal, count() AS n FROM conversation_tags FINAL "
        "ARRAY JOIN signals AS s GROUP BY intent_id, signal ORDER BY signal"
    ):
        signals.setdefault(r["intent_id"], {})[r["signal"]] = int(r["n"])
    series, lo, width = _failure_series(store, buckets)
    changes = store.query(
        "SELECT taxonomy_version, intent_id, change, name, other_id, ts_ns FROM intent_changes FINAL "
        "ORDER BY taxonomy_version DESC, ts_ns DESC, intent_id LIMIT 200"
    )
    by_intent: dict[str, list[dict[str, Any]]] = {}
    for c in changes:
        by_intent.setdefault(c["intent_id"], []).append(c)
    out = []
    for r in rows:
        st = stats.get(r["intent_id"], {})
        n, fails = int(st.get("n", 0)), int(st.get("failures", 0))
        shown = int(r["size"]) >= cfg.understand.min_examples_shown
        out.append(
            {
                **r,
                "examples": list(r["examples"]) if shown else [],
                "examples_withheld": not shown,
                "conversations": n,
                "failures": fails,
                "failure_rate": fails / n if n else 0.0,
                "signal_rates": {k: v / n for k, v in signals.get(r["intent_id"], {}).items()}
                if n
                else {},
                "series": series.get(r["intent_id"], [[0, 0] for _ in range(buckets)]),
                "changes": by_intent.get(r["intent_id"], []),
            }
        )
    return {
        "intents": out,
        "changes": changes,
        "buckets": {"from_ns": lo, "width_ns": width, "count": buckets},
    }


_DIAG_LIST = (
    "diagnosis_id, intent_id, intent_name, rule, summary, confidence, support, failures, failure_rate, "
    "baseline_rate, status, version, updated_ns"
)


def diagnoses(store: Store) -> list[dict[str, Any]]:
    return store.query(
        f"SELECT {_DIAG_LIST} FROM diagnoses FINAL ORDER BY status = 'open' DESC, updated_ns DESC "
        "LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )


def diagnosis(store: Store, diagnosis_id: str) -> dict[str, Any] | None:
    """One diagnosis with component and evidence as data, the proposals made from it, and the
    LLM's failure analyses of the conversations it explains (their quotes are untrusted text)."""
    rows = store.query(
        "SELECT * FROM diagnoses FINAL WHERE diagnosis_id = {d:String}", {"d": diagnosis_id}
    )
    if not rows:
        return None
    d = rows[0]
    d["component"], d["evidence"] = _json_field(d["component"]), _json_field(d["evidence"])
    d["proposals"] = store.query(
        "SELECT proposal_id, title, status FROM proposals FINAL "
        "WHERE diagnosis_id = {d:String} ORDER BY created_ns",
        {"d": diagnosis_id},
    )
    d["analyses"] = store.query(
        "SELECT conversation_id, turn, trace_id, failure_kind, tool, instruction, relation, quote "
        "FROM failure_analyses FINAL WHERE intent_id = {i:String} AND conversation_id IN "
        "(SELECT conversation_id FROM diagnosis_conversations FINAL "
        "WHERE diagnosis_id = {d:String} AND explained = 1) "
        "ORDER BY conversation_id LIMIT {n:UInt32}",
        {"i": d["intent_id"], "d": diagnosis_id, "n": LIST_LIMIT},
    )
    return d


def proposals(store: Store) -> list[dict[str, Any]]:
    """Proposals, the ones awaiting a decision first, with the last decision and who took it."""
    rows = store.query(
        "SELECT proposal_id, diagnosis_id, intent_id, backend, repo, branch, title, files, pr_number, pr_url, "
        "status, version, created_ns, updated_ns FROM proposals FINAL "
        "ORDER BY status = 'open' DESC, updated_ns DESC LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )
    last = {
        r["proposal_id"]: r
        for r in store.query(
            "SELECT proposal_id, argMax(decision, ts_ns) AS decision, argMax(reviewer, ts_ns) AS reviewer, "
            "max(ts_ns) AS decided_ns FROM reviews FINAL GROUP BY proposal_id"
        )
    }
    return [{**r, "last_decision": last.get(r["proposal_id"])} for r in rows]


def proposal(store: Store, proposal_id: str) -> dict[str, Any] | None:
    """One proposal with its reviews (oldest first), its diagnosis summary and its outcome."""
    p = proposal_row(store, proposal_id)
    if p is None:
        return None
    p["reviews"] = store.query(
        "SELECT * FROM reviews FINAL WHERE proposal_id = {p:String} ORDER BY ts_ns",
        {"p": proposal_id},
    )
    diag = store.query(
        "SELECT diagnosis_id, intent_name, summary, root_cause, status FROM diagnoses FINAL "
        "WHERE diagnosis_id = {d:String}",
        {"d": p["diagnosis_id"]},
    )
    p["diagnosis"] = diag[0] if diag else None
    p["outcome"] = next(
        iter(
            store.query(
                "SELECT * FROM outcomes FINAL WHERE proposal_id = {p:String} AND intent_id = {i:String}",
                {"p": proposal_id, "i": p["intent_id"]},
            )
        ),
        None,
    )
    return p


def outcomes(store: Store) -> list[dict[str, Any]]:
    """Per proposal: the target intent's outcome and the control intents' outcomes."""
    props = {
        r["proposal_id"]: r
        for r in store.query("SELECT proposal_id, intent_id, title, status FROM proposals FINAL")
    }
    names = {
        r["intent_id"]: r["name"] for r in store.query("SELECT intent_id, name FROM intents FINAL")
    }
    groups: dict[str, dict[str, Any]] = {}
    for o in store.query(
        "SELECT * FROM outcomes FINAL ORDER BY ts_ns DESC, proposal_id, intent_id"
    ):
        p = props.get(o["proposal_id"], {})
        g = groups.setdefault(
            o["proposal_id"],
            {
                "proposal_id": o["proposal_id"],
                "title": p.get("title", ""),
                "intent_id": p.get("intent_id", ""),
                "target": None,
                "controls": [],
            },
        )
        o = {**o, "intent_name": names.get(o["intent_id"], "")}
        if o["intent_id"] == g["intent_id"]:
            g["target"] = o
        else:
            g["controls"].append(o)
    return list(groups.values())


CONVERSATION_LIST_LIMIT = 100
CHART_BUCKETS = 48


def conversation(store: Store, conversation_id: str) -> dict[str, Any] | None:
    """One conversation as stored (redacted in capture): the assembled transcript, its tag
    (intent, outcome and where it came from, signals), its model calls, its tool calls with
    arguments and results, the feedback and evaluations received for it, and the diagnoses
    that explain it.
    ``None`` when nothing of it is stored."""
    p = {"c": conversation_id}
    rows = store.query("SELECT * FROM conversations FINAL WHERE conversation_id = {c:String}", p)
    tags = store.query(
        "SELECT intent_id, intent_name, outcome, failed, signals, outcome_turn, outcome_source, "
        "outcome_reason FROM conversation_tags FINAL WHERE conversation_id = {c:String}",
        p,
    )
    feedback = store.query(
        "SELECT name, score, label, explanation, source, ts_ns FROM feedback FINAL "
        "WHERE conversation_id = {c:String} ORDER BY ts_ns",
        p,
    )
    explained_by = store.query(
        "SELECT dc.diagnosis_id AS diagnosis_id, dc.failure_kind AS failure_kind, dc.turn AS turn, "
        "dc.tool AS tool, dc.detail AS detail, d.latest_summary AS summary FROM diagnosis_conversations AS dc "
        "FINAL LEFT JOIN (SELECT diagnosis_id, argMax(summary, version) AS latest_summary FROM diagnoses "
        "WHERE diagnosis_id IN (SELECT diagnosis_id FROM diagnosis_conversations "
        "WHERE conversation_id = {c:String}) GROUP BY diagnosis_id) AS d "
        "ON d.diagnosis_id = dc.diagnosis_id "
        "WHERE dc.conversation_id = {c:String} AND dc.explained = 1 ORDER BY dc.diagnosis_id",
        p,
    )
    turns = store.query(
        "SELECT trace_id, span_id, span_kind, operation, request_model, response_model, agent_name, "
        "input_tokens, output_tokens, start_ns, duration_ms, status, error_type, error_message "
        "FROM turns FINAL WHERE conversation_id = {c:String} ORDER BY start_ns, span_id",
        p,
    )
    tools = store.query(
        "SELECT call_id, name, arguments, result, error_type, error_message, start_ns, duration_ms "
        "FROM tool_calls FINAL WHERE conversation_id = {c:String} ORDER BY start_ns, call_id",
        p,
    )
    if not (rows or turns):
        return None
    conv = rows[0] if rows else {"conversation_id": conversation_id}
    conv["messages"] = _json_field(conv.get("messages")) or []
    conv["trace_ids"] = list(conv.get("trace_ids") or sorted({t["trace_id"] for t in turns}))
    return {
        **conv,
        "tag": tags[0] if tags else None,
        "turns": turns,
        "tool_calls": tools,
        "feedback": feedback,
        "explained_by": explained_by,
    }


def conversation_of_trace(store: Store, trace_id: str) -> str | None:
    """The conversation a trace belongs to (an assembled one first, else its captured turns)."""
    for sql in (
        "SELECT conversation_id FROM conversations FINAL WHERE has(trace_ids, {t:String}) "
        "OR conversation_id = {t:String} ORDER BY version DESC LIMIT 1",
        "SELECT conversation_id FROM turns FINAL WHERE trace_id = {t:String} LIMIT 1",
    ):
        rows = store.query(sql, {"t": trace_id})
        if rows:
            return str(rows[0]["conversation_id"])
    return None


def intent_detail(
    store: Store, intent_id: str, buckets: int = CHART_BUCKETS
) -> dict[str, Any] | None:
    """One intent: its failure rate over time (``buckets`` over its own time span), the moments
    each later prompt version first answered it, and its conversations, failed ones first."""
    p: dict[str, Any] = {"i": intent_id}
    rows = store.query(
        "SELECT intent_id, name, description, size, status FROM intents FINAL "
        "WHERE intent_id = {i:String}",
        p,
    )
    if not rows:
        return None
    by_intent, lo, width = _failure_series(store, buckets, intent_id)
    series = by_intent.get(intent_id, [[0, 0] for _ in range(buckets)])
    versions = store.query(
        "SELECT prompt_version AS version, min(ts_ns) AS first_ns FROM conversation_tags FINAL "
        "WHERE intent_id = {i:String} AND prompt_version != '' GROUP BY prompt_version "
        "ORDER BY first_ns",
        p,
    )
    convs = store.query(
        "SELECT t.conversation_id AS conversation_id, t.failed AS failed, t.outcome AS outcome, "
        "t.signals AS signals, t.prompt_version AS prompt_version, t.ts_ns AS ts_ns, "
        "c.n_user_turns AS user_turns, c.n_tool_calls AS tool_calls, c.errors AS errors "
        "FROM (SELECT * FROM conversation_tags FINAL WHERE intent_id = {i:String}) AS t "
        "LEFT JOIN (SELECT * FROM conversations FINAL) AS c ON c.conversation_id = t.conversation_id "
        "ORDER BY t.failed DESC, t.ts_ns DESC LIMIT {n:UInt32}",
        {**p, "n": CONVERSATION_LIST_LIMIT},
    )
    return {
        **rows[0],
        "series": series,
        "buckets": {"from_ns": lo, "width_ns": width, "count": buckets},
        "version_changes": [(int(v["first_ns"]), v["version"]) for v in versions[1:]],
        "conversations": convs,
        "tagged": sum(n for n, _ in series),
    }
