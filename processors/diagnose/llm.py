"""The LLM path: the strongest finding reworded from the evidence alone, or rejected.

It runs beside the stream: the rule's diagnosis is emitted first, with a :class:`Refinement`
asking the LLM to reword it; an accepted answer becomes that diagnosis' next version (same
id: one diagnosis per finding, whichever path found it), marked ``source="llm"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from processors.diagnose.rules import Candidate, first_unique
from processors.diagnose.shapes import MAX_TEXT
from processors.diagnose.window import IntentStats
from processors.errors import LLMError
from processors.llm import UNTRUSTED_RULE, ChatJSON, untrusted_block
from processors.records import Diagnosis

LLM_SYSTEM = (
    "You diagnose why users of an AI agent fail at one intent. You get statistics and rule "
    "findings computed from real conversations. Write one diagnosis specific enough to code "
    "against, citing only trace ids and evidence keys that appear in the input. The component is "
    "what to change: type prompt (target system_prompt), harness (target a tool name) or config "
    "(target a config key), and its target must be one of the listed targets. " + UNTRUSTED_RULE
)
LLM_SCHEMA = (
    '{"summary": "users abandon <intent> at turn N because ...", "root_cause": "...", '
    '"component": {"type": "prompt|harness|config", "target": "...", "detail": "..."}, '
    '"confidence": 0.0, "evidence_ids": ["evidence keys or trace ids relied on"]}'
)
_LLM_REQUIRED = ("summary", "root_cause", "component", "confidence", "evidence_ids")


def llm_bundle(
    st: IntentStats, common: dict[str, Any], cands: Sequence[Candidate]
) -> dict[str, Any]:
    """The evidence an LLM may see and cite: no raw conversations, only redacted extracts."""
    traces = first_unique((tr for c in cands for tr in c.trace_ids), 20)
    targets = sorted({c.target for c in cands} | {"system_prompt"} | {t for t, _ in st.tool_calls})
    findings = [
        {
            "rule": c.rule,
            "summary": c.summary,
            "component": c.component,
            "confidence": c.confidence,
            "evidence": c.evidence,
        }
        for c in cands
    ]
    return {
        "intent": st.intent_name,
        "stats": common,
        "findings": findings,
        "targets": targets,
        "trace_ids": traces,
    }


def llm_prompt(bundle: dict[str, Any]) -> str:
    """The user message: statistics as JSON, every text from conversations quoted as data."""
    findings = bundle["findings"]
    quoted = [
        {"finding": i, "evidence": f["evidence"], "summary": f["summary"]}
        for i, f in enumerate(findings)
    ]
    stats = dict(bundle["stats"])
    last = stats.pop("last_agent_message")
    facts = {
        "stats": stats,
        "allowed_targets": bundle["targets"],
        "trace_ids": bundle["trace_ids"],
        "findings": [
            {
                "finding": i,
                "rule": f["rule"],
                "component_type": f["component"]["type"],
                "target": f["component"]["target"],
                "confidence": f["confidence"],
            }
            for i, f in enumerate(findings)
        ],
    }
    return "\n\n".join(
        [
            "Facts:\n" + json.dumps(facts, ensure_ascii=False, default=str),
            untrusted_block("intent_name", [{"intent": bundle["intent"]}]),
            untrusted_block("last_agent_message_before_abandonment", [last]),
            untrusted_block("finding_evidence", quoted),
        ]
    )


def validate_llm_answer(answer: dict[str, Any], bundle: dict[str, Any]) -> str:
    """Why ``answer`` is not backed by ``bundle`` (empty string: it is)."""
    comp = answer.get("component")
    if not isinstance(answer.get("summary"), str) or not answer["summary"].strip():
        return "no summary"
    if not isinstance(answer.get("root_cause"), str) or not answer["root_cause"].strip():
        return "no root cause"
    if not isinstance(comp, dict) or comp.get("type") not in ("prompt", "harness", "config"):
        return "component type must be prompt, harness or config"
    if comp.get("target") not in bundle["targets"]:
        return f"component target {comp.get('target')!r} is not in the evidence"
    conf = answer.get("confidence")
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
        return "confidence must be a number within [0, 1]"
    ids = answer.get("evidence_ids")
    if not isinstance(ids, list) or not ids:
        return "no evidence ids"
    known = set(bundle["trace_ids"]) | set(bundle["stats"])
    for f in bundle["findings"]:
        known |= set(f["evidence"])
    unknown = [i for i in ids if not isinstance(i, str) or i not in known]
    if unknown:
        return f"unknown evidence ids {unknown[:3]}"
    return ""


@dataclass(frozen=True)
class Refinement:
    """Diagnosis ``diagnosis_id`` to reword with the LLM, from ``bundle`` (:func:`llm_bundle`)."""

    diagnosis_id: str
    bundle: dict[str, Any]


def ask_refinement(bundle: dict[str, Any], llm: ChatJSON) -> dict[str, Any]:
    """The LLM's diagnosis from ``bundle``; :class:`LLMError` when it fails or is not backed."""
    answer = llm.chat_json(LLM_SYSTEM, llm_prompt(bundle), LLM_SCHEMA, required=_LLM_REQUIRED)
    problem = validate_llm_answer(answer, bundle)
    if problem:
        raise LLMError(f"llm answer rejected: {problem}")
    return answer


def refined(d: Diagnosis, answer: dict[str, Any], bundle: dict[str, Any], now_ns: int) -> Diagnosis:
    """The next version of ``d`` in the words of a validated ``answer`` (the rule's kept)."""
    cited = [i for i in answer["evidence_ids"] if i in bundle["trace_ids"]]
    return replace(
        d,
        summary=answer["summary"].strip()[:MAX_TEXT],
        root_cause=answer["root_cause"].strip()[:1000],
        component={
            "type": answer["component"]["type"],
            "target": answer["component"]["target"],
            "detail": str(answer["component"].get("detail", ""))[:MAX_TEXT],
        },
        confidence=float(answer["confidence"]),
        evidence={
            **d.evidence,
            "evidence_ids": answer["evidence_ids"],
            "rule_wording": {"summary": d.summary, "root_cause": d.root_cause},
        },
        trace_ids=cited or d.trace_ids,
        source="llm",
        version=d.version + 1,
        updated_ns=now_ns,
    )
