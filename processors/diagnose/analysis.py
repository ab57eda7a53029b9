"""With an LLM: why one failed conversation failed, asked of a bounded sample per intent.

The deterministic rules and the contrast (:mod:`.contrast`) stand on their own; this only adds
to them. For up to ``diagnose.llm_analysis_sample`` failed conversations of an intent the LLM
is asked, beside the stream (its own bounded step, ``llm.analysis``), where the conversation
went wrong: the message (turn), the ``failure_kind`` (:data:`~processors.records.FAILURE_KINDS`),
the tool involved, which numbered instruction of the agent's system prompt it broke or that the
prompt lacks one, and a short quote. The conversation reaches the model only inside
:func:`~processors.llm.untrusted_block`; the answer is checked against what the conversation
holds (:func:`validate_analysis`): a turn it has, a kind of the taxonomy, a tool it called, an
instruction it numbered, a quote copied from one of its messages.

The answers of an intent are grouped by (kind, tool): a group joins the open deterministic
diagnosis of the same kind and tool, adding its conversations to those the diagnosis explains;
otherwise, once ``diagnose.llm_analysis_min_agree`` conversations agree, it becomes a diagnosis
of its own (rule :data:`RULE`). Such a diagnosis is built from the structured fields only
(kind, tool, instruction numbers, counts): the quote is kept in ``failure_analyses`` for the
people reading it and never enters a diagnosis, so it cannot reach a proposal.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from processors.diagnose.shapes import MAX_TEXT
from processors.errors import LLMError
from processors.llm import UNTRUSTED_RULE, ChatJSON, untrusted_block
from processors.records import FAILURE_KINDS, Diagnosis, TagRecord

RULE = "llm_analysis"
MAX_QUOTE = 200  # characters of the quote kept
MAX_MESSAGES = 80  # messages of a conversation shown (the first ones: where it went wrong)
MAX_MESSAGE_CHARS = 600
MAX_INSTRUCTIONS = 60  # numbered lines of the system prompt shown
RELATIONS = ("broken", "lacking", "none")
_TOOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")

ANALYSIS_SYSTEM = (
    "You analyse one failed conversation between an AI agent and a user. Say where it went "
    "wrong: the index of the message (turn), the failure kind (exactly one of the listed "
    "kinds), the tool involved (one of the listed tools, or empty; for a missing action the "
    "tool that should have been called), the number of the system "
    "prompt instruction the agent broke (relation broken) or, when no instruction covers it, "
    "that the prompt lacks one (relation lacking, index -1), and a short quote copied exactly "
    "from one message that shows it (at most 200 characters). " + UNTRUSTED_RULE
)
ANALYSIS_SCHEMA = (
    '{"turn": 0, "failure_kind": "one of the kinds", "tool": "a listed tool or empty", '
    '"instruction": {"index": -1, "relation": "broken|lacking|none"}, "quote": "..."}'
)
_REQUIRED = ("turn", "failure_kind", "tool", "instruction", "quote")


@dataclass(frozen=True)
class AnalysisRequest:
    """One failed conversation to analyse: the prompt and what an answer is checked against."""

    intent_id: str
    intent_name: str
    conversation_id: str
    prompt: str
    texts: tuple[str, ...]  # each shown message's content, by turn (a quote comes from one)
    traces: tuple[str, ...]  # each message's trace id, by turn
    spans: tuple[str, ...]  # and its span id
    tools: tuple[str, ...]  # the tools the conversation or its intent called
    instructions: int  # numbered instructions of the system prompt shown


@dataclass(frozen=True)
class Analysis:
    """A validated answer: where and how one conversation failed."""

    conversation_id: str
    turn: int
    trace_id: str
    span_id: str
    failure_kind: str
    tool: str
    instruction: int  # -1: none named
    relation: str  # broken | lacking | none
    quote: str  # redacted text of the conversation: never put into a diagnosis


def system_instructions(tag: TagRecord) -> list[str]:
    """The system prompt's non-empty lines, as the agent sent them (numbered from 0)."""
    conv = tag.conversation
    lines = [
        line.strip()
        for m in (conv.messages if conv else [])
        if m.role == "system"
        for line in m.content.splitlines()
        if line.strip()
    ]
    return list(dict.fromkeys(lines))[:MAX_INSTRUCTIONS]


def tools_of(tags: Iterable[TagRecord]) -> set[str]:
    """The tools these conversations called (names that are identifiers)."""
    return {
        c.name
        for t in tags
        for c in (t.conversation.tool_calls if t.conversation else [])
        if _TOOL.fullmatch(c.name)
    }


def analysis_request(tag: TagRecord, intent_tools: Iterable[str] = ()) -> AnalysisRequest | None:
    """The request for a failed conversation (``None``: it carries no conversation). The tools
    an answer may name: those of the conversation and ``intent_tools``, those its intent's
    other conversations called (a missing action is a tool this one never called)."""
    conv = tag.conversation
    if conv is None or not conv.messages:
        return None
    shown = [m for m in conv.messages if m.role != "system"][:MAX_MESSAGES]
    texts = tuple((m.content or m.tool_arguments)[:MAX_MESSAGE_CHARS] for m in shown)
    tools = tuple(
        sorted(
            tools_of([tag])
            | {m.tool_name for m in shown if _TOOL.fullmatch(m.tool_name)}
            | {t for t in intent_tools if _TOOL.fullmatch(t)}
        )
    )
    instructions = system_instructions(tag)
    facts = {
        "kinds": list(FAILURE_KINDS),
        "relations": list(RELATIONS),
        "turns": len(shown),
        "instructions": len(instructions),
    }
    messages = [
        {
            "turn": i,
            "role": m.role,
            "text": texts[i],
            **({"tool": m.tool_name} if m.tool_name else {}),
            **({"arguments": m.tool_arguments[:MAX_MESSAGE_CHARS]} if m.tool_arguments else {}),
            **({"error": m.error[:MAX_TEXT]} if m.error else {}),
        }
        for i, m in enumerate(shown)
    ]
    prompt = "\n\n".join(
        [
            "Facts:\n" + json.dumps(facts),
            untrusted_block("tools", [{"tool": t} for t in tools]),
            untrusted_block(
                "system_prompt_instructions",
                [{"index": i, "instruction": s} for i, s in enumerate(instructions)],
            ),
            untrusted_block("outcome", [{"outcome": tag.outcome, "why": tag.outcome_reason}]),
            untrusted_block("conversation", messages),
        ]
    )
    return AnalysisRequest(
        intent_id=tag.intent_id,
        intent_name=tag.intent_name,
        conversation_id=tag.conversation_id,
        prompt=prompt,
        texts=texts,
        traces=tuple(m.trace_id for m in shown),
        spans=tuple(m.span_id for m in shown),
        tools=tools,
        instructions=len(instructions),
    )


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_analysis(answer: dict[str, Any], req: AnalysisRequest) -> str:
    """Why ``answer`` is not backed by the conversation of ``req`` (empty string: it is)."""
    turn, kind, tool = answer.get("turn"), answer.get("failure_kind"), answer.get("tool")
    if not _is_int(turn) or not 0 <= turn < len(req.texts):
        return f"turn {str(turn)[:20]!r} is not a message of the conversation"
    if kind not in FAILURE_KINDS:
        return f"failure_kind {str(kind)[:40]!r} is not one of {', '.join(FAILURE_KINDS)}"
    if not isinstance(tool, str) or (tool and tool not in req.tools):
        return f"tool {str(tool)[:40]!r} is not a tool of the conversation or its intent"
    ins = answer.get("instruction")
    if not isinstance(ins, dict) or ins.get("relation") not in RELATIONS:
        return "instruction must be an object with a relation of broken, lacking or none"
    index = ins.get("index")
    if not _is_int(index) or not -1 <= index < req.instructions:
        return f"instruction index {str(index)[:20]!r} is not a numbered instruction"
    if (ins["relation"] == "broken") != (index >= 0):
        return "a broken instruction needs its index; lacking or none take -1"
    quote = answer.get("quote")
    if not isinstance(quote, str) or not quote.strip() or len(quote) > MAX_QUOTE:
        return f"the quote must be text of at most {MAX_QUOTE} characters"
    if not any(quote.strip() in t for t in req.texts):
        return "the quote is not copied from a message of the conversation"
    return ""


def ask_analysis(req: AnalysisRequest, llm: ChatJSON) -> Analysis:
    """The LLM's analysis of ``req``; :class:`LLMError` when it fails or is not backed."""
    answer = llm.chat_json(ANALYSIS_SYSTEM, req.prompt, ANALYSIS_SCHEMA, required=_REQUIRED)
    problem = validate_analysis(answer, req)
    if problem:
        raise LLMError(f"llm analysis rejected: {problem}")
    turn = answer["turn"]
    return Analysis(
        conversation_id=req.conversation_id,
        turn=turn,
        trace_id=req.traces[turn],
        span_id=req.spans[turn],
        failure_kind=answer["failure_kind"],
        tool=answer["tool"],
        instruction=answer["instruction"]["index"],
        relation=answer["instruction"]["relation"],
        quote=answer["quote"].strip(),
    )


def analysis_row(req: AnalysisRequest, a: Analysis, now_ns: int) -> dict[str, Any]:
    """A ``failure_analyses`` row: the answer with its quote, for people to read."""
    return {
        "conversation_id": a.conversation_id,
        "intent_id": req.intent_id,
        "failure_kind": a.failure_kind,
        "turn": a.turn,
        "trace_id": a.trace_id,
        "span_id": a.span_id,
        "tool": a.tool,
        "instruction": a.instruction,
        "relation": a.relation,
        "quote": a.quote,
        "ts_ns": now_ns,
    }


def diagnosis_tool(d: Diagnosis) -> str:
    """The tool a diagnosis is about (``""``: none in particular)."""
    return str((d.evidence or {}).get("tool") or "")


def joins(d: Diagnosis, kind: str, tool: str) -> bool:
    """Analyses of ``kind`` about ``tool`` explain the same failure as ``d``."""
    return d.failure_kind == kind and diagnosis_tool(d) == tool


def with_conversations(d: Diagnosis, analyses: Sequence[Analysis]) -> Diagnosis | None:
    """``d`` explaining the conversations of ``analyses`` too (``None``: it already did).
    Only their structured fields join it: conversation, trace, turn and tool."""
    convs = d.evidence.get("conversations")
    convs = list(convs) if isinstance(convs, list) else []
    have = {c.get("conversation_id") for c in convs if isinstance(c, dict)}
    new = [_explained(a) for a in analyses if a.conversation_id not in have]
    if not new:
        return None
    return replace(d, evidence={**d.evidence, "conversations": convs + new})


def _explained(a: Analysis) -> dict[str, Any]:
    return {
        "conversation_id": a.conversation_id,
        "turn": a.turn,
        "trace_id": a.trace_id,
        "tool": a.tool,
        "arguments": "",
    }


def analysis_diagnosis(
    did: str, intent_id: str, intent_name: str, group: Sequence[Analysis], analysed: int
) -> Diagnosis:
    """The diagnosis a group of agreeing analyses makes (no deterministic one to join):
    structured fields and counts only, none of the conversations' words."""
    a = group[0]
    kind, tool = a.failure_kind, a.tool
    broken = Counter(x.instruction for x in group if x.relation == "broken")
    lacking = sum(x.relation == "lacking" for x in group)
    where = f" around the `{tool}` tool" if tool else ""
    summary = (
        f"In {intent_name or intent_id}, {len(group)} of {analysed} failed conversations "
        f"analysed show {kind.replace('_', ' ')}{where}"
    )
    if broken:
        index, n = broken.most_common(1)[0]
        root = f"the agent broke instruction {index} of its system prompt in {n} of them"
    elif lacking:
        root = f"the system prompt has no instruction for it ({lacking} of them)"
    else:
        root = "no instruction of the system prompt was named"
    return Diagnosis(
        diagnosis_id=did,
        intent_id=intent_id,
        intent_name=intent_name,
        rule=RULE,
        failure_kind=kind,
        summary=summary,
        root_cause=f"An LLM's per-conversation failure analysis: {root}.",
        component={"type": "prompt", "target": "", "detail": {"tool": tool, "argument": ""}},
        confidence=round(len(group) / max(analysed, 1), 4),
        evidence={
            "pattern": "analysis",
            "tool": tool,
            "argument": "",
            "failed_with": len(group),
            "failed": analysed,
            "instructions_broken": {str(i): n for i, n in sorted(broken.items())},
            "instruction_lacking": lacking,
            "conversations": [_explained(x) for x in group],
        },
        trace_ids=list(dict.fromkeys(x.trace_id for x in group if x.trace_id)),
        source="llm",
    )
