"""The LLM path: the strongest finding rewritten from the evidence alone, or rejected."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from processors.diagnose.rules import Candidate, first_unique
from processors.diagnose.shapes import MAX_TEXT
from processors.diagnose.window import IntentStats
from processors.errors import LLMError
from processors.llm import UNTRUSTED_RULE, ChatJSON, untrusted_block

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
        "intent": bundle["intent"],
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


def llm_candidate(
    llm: ChatJSON,
    st: IntentStats,
    common: dict[str, Any],
    cands: Sequence[Candidate],
) -> tuple[Candidate | None, str]:
    """The LLM's diagnosis as a candidate, or ``(None, reason)`` when it fails or is not backed."""
    bundle = llm_bundle(st, common, cands)
    try:
        answer = llm.chat_json(LLM_SYSTEM, llm_prompt(bundle), LLM_SCHEMA, required=_LLM_REQUIRED)
    except LLMError as e:
        return None, f"llm error: {e}"
    problem = validate_llm_answer(answer, bundle)
    if problem:
        return None, f"llm answer rejected: {problem}"
    cited = [i for i in answer["evidence_ids"] if i in bundle["trace_ids"]]
    base = cands[0]
    return Candidate(
        rule="llm",
        target=answer["component"]["target"],
        summary=answer["summary"].strip()[:MAX_TEXT],
        root_cause=answer["root_cause"].strip()[:1000],
        component={
            "type": answer["component"]["type"],
            "target": answer["component"]["target"],
            "detail": answer["component"].get("detail", ""),
        },
        confidence=float(answer["confidence"]),
        evidence={
            **base.evidence,
            "evidence_ids": answer["evidence_ids"],
            "rule_fallback": {"rule": base.rule, "summary": base.summary},
        },
        trace_ids=cited or base.trace_ids,
        prompt_version=base.prompt_version,
        agent_version=base.agent_version,
    ), ""
