"""Contrastive failure analysis: what separates an intent's failed conversations from its
successful ones, read from the structure the spans hold. Works on any agent: it knows no
tool, word or task of any data set.

For every conversation, :func:`patterns` lists the structural facts it shows (each with the
turn, trace, tool and arguments where it happens):

=====================  ==================================================  ======================
pattern                the conversation ...                                failure_kind
=====================  ==================================================  ======================
``calls:T``            calls the state-changing tool ``T``                 unauthorized_action
``unconfirmed:T``      calls state-changing ``T`` with no explicit user    unauthorized_action
                       confirmation just before
``never:T``            never calls state-changing ``T`` (that successful   missing_action
                       conversations of the intent call)
``no_action``          makes no state-changing call at all                 missing_action
``acts``               makes a state-changing call (where successful       unauthorized_action
                       conversations of the intent more often refrain)
``arg:T.k=v``          calls ``T`` with argument ``k`` set to ``v``         wrong_tool_arguments
``ungrounded:T.k``     calls ``T`` with a value of ``k`` that appears      wrong_tool_arguments
                       nowhere in what the user said or a tool returned
``repeats:T``          calls state-changing ``T`` more than once           wrong_tool_arguments
``error:T``            gets an error from ``T``                            tool_error
``handoff``            is handed to a human                                unnecessary_escalation
=====================  ==================================================  ======================

``repeats``, ``unconfirmed`` and ``ungrounded`` also stand alone, for any tool (a cause
spread over several tools). Against each conversation's **reference set**, its nearest
successful conversations by goal (:mod:`.reference`), it also shows ``misses:T``,
``extra:T``, ``differs:T.k`` and ``extra_handoff:T`` (and ``misses``, ``extra``,
``differs``): what it does where the successes with a goal like its own do not. These
departures are tested among the conversations that have a reference set (elsewhere they
cannot show).

Prompt, model and agent versions are left to the version-shift rule (:mod:`.rules`), which
compares cumulative counts per version; here they would be confounded with time.

Each pattern is tested per intent: its share among failed conversations against its share
among successful ones, with Fisher's exact test (:func:`processors.stats.fisher_exact`) and a
Benjamini–Hochberg correction over the patterns tried; a pattern is a finding when it holds
in at least ``contrast_min_count`` failed conversations, is more common among failures by
``contrast_min_lift`` and its adjusted p-value is under ``contrast_alpha``. Findings become
:class:`~processors.records.Diagnosis` records (``rule="contrast"``) with every conversation
they explain (in ``evidence["conversations"]``; an intent-wide pattern -- ``acts``,
``calls:T``, ``never:T``, ``no_action``, ``handoff``, ``arg:T.k=v`` -- explains a
conversation only where its reference set confirms it, :func:`holds_here`; :func:`conversation_rows` makes the
``diagnosis_conversations`` rows).

**State-changing tools** are inferred without knowing the agent: a tool is read-only when
the first word of its name is a read verb (:data:`READ_VERBS`: get, list, search, find,
calculate, think, ...); any other tool changes state. A hand-off tool (its name says
escalate / hand off / transfer to / human) is the ``handoff`` pattern instead. Names are
split on ``_``, ``-``, ``.``, spaces and camelCase.

**Explicit confirmation** just before a call: the last user message before it is an
affirmation (yes, confirm, go ahead, ...) answering an agent message that asked something.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.config import DiagnoseConfig
from processors.diagnose import reference
from processors.records import Conversation, Diagnosis, Message, TagRecord
from processors.stats import fisher_exact

RULE = "contrast"

READ_VERBS = frozenset(
    [
        "get",
        "list",
        "search",
        "find",
        "lookup",
        "look",
        "query",
        "read",
        "fetch",
        "retrieve",
        "view",
        "show",
        "describe",
        "check",
        "count",
        "calculate",
        "calc",
        "compute",
        "estimate",
        "validate",
        "verify",
        "think",
        "reason",
        "plan",
        "summarize",
        "summarise",
        "browse",
        "inspect",
        "preview",
        "explain",
        "lookup",
        "load",
        "see",
        "scan",
        "match",
        "compare",
    ]
)
_HANDOFF_NAME = re.compile(r"escalat|hand_?off|transfer_to|human|live_?agent|operator")
_AFFIRM = re.compile(
    r"^\W*(yes|yeah|yep|yup|sure|ok(ay)?|confirm(ed)?|correct|right|go ahead|please do|"
    r"proceed|do it|that'?s (right|correct|fine)|sounds good|absolutely|definitely|please)\b",
    re.IGNORECASE,
)
_ASKS = re.compile(
    r"\?|\b(confirm|would you like|do you want|shall i|should i|proceed)\b", re.IGNORECASE
)
ARGUMENTS_KEPT = 300  # characters of a call's arguments kept as evidence
_SCALAR_MAX = 40  # longer argument values are free text, not a categorical value
_GROUND_MIN = 3  # shorter values (a "1", "no") are grounded anywhere: not tested
_SAFE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")

KIND_OF = {
    "calls": "unauthorized_action",
    "unconfirmed": "unauthorized_action",
    "never": "missing_action",
    "no_action": "missing_action",
    "acts": "unauthorized_action",
    "arg": "wrong_tool_arguments",
    "ungrounded": "wrong_tool_arguments",
    "repeats": "wrong_tool_arguments",
    "error": "tool_error",
    "handoff": "unnecessary_escalation",
    "misses": "missing_action",
    "extra": "unauthorized_action",
    "differs": "wrong_tool_arguments",
    "extra_handoff": "unnecessary_escalation",
}
DEPARTURES = frozenset(["misses", "extra", "differs", "extra_handoff"])  # see .reference
REFERENCED = "_referenced"  # the conversation has a reference set


def name_words(name: str) -> list[str]:
    """``getUserDetails`` / ``get_user-details`` -> ``['get', 'user', 'details']``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[\s_\-.:/]+", spaced.lower()) if w]


def is_handoff(tool: str) -> bool:
    return bool(_HANDOFF_NAME.search(tool.lower()))


def changes_state(tool: str) -> bool:
    """Whether ``tool`` changes state (see the module's docstring: a data-independent guess).

    >>> [changes_state(t) for t in ("get_order", "searchFlights", "cancel_order", "think")]
    [False, False, True, False]
    """
    ws = name_words(tool)
    return bool(ws) and ws[0] not in READ_VERBS and not is_handoff(tool)


@dataclass(frozen=True)
class Hit:
    """Where a pattern shows in one conversation."""

    turn: int = -1
    trace_id: str = ""
    tool: str = ""
    arguments: str = ""


@dataclass
class Call:
    turn: int
    tool: str
    arguments: str
    args: dict[str, Any]
    trace_id: str
    error: bool


def calls_of(conv: Conversation) -> list[Call]:
    """The tool calls in transcript order: executed calls (tool messages), else the calls the
    model requested (an instrumentation that traces only model calls)."""
    msgs = conv.messages
    executed = [(i, m) for i, m in enumerate(msgs) if m.role == "tool" and m.tool_name]
    picked = executed or [
        (i, m) for i, m in enumerate(msgs) if m.role == "assistant" and m.tool_name
    ]
    out = []
    for i, m in picked:
        try:
            args = json.loads(m.tool_arguments) if m.tool_arguments else {}
        except ValueError:
            args = {}
        out.append(
            Call(
                i,
                m.tool_name,
                m.tool_arguments,
                args if isinstance(args, dict) else {},
                m.trace_id,
                bool(m.error),
            )
        )
    return out


def _confirmed(msgs: list[Message], turn: int) -> bool:
    """An explicit user confirmation just before ``turn``: the last user message affirms, and
    answers an agent message that asked something."""
    u = next((i for i in range(turn - 1, -1, -1) if msgs[i].role == "user"), -1)
    if u < 0 or not _AFFIRM.search(msgs[u].content):
        return False
    ask = next(
        (i for i in range(u - 1, -1, -1) if msgs[i].role == "assistant" and msgs[i].content),
        -1,
    )
    return ask >= 0 and bool(_ASKS.search(msgs[ask].content))


def _leaves(x: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v, prefix)
    else:
        yield prefix, x


def _grounded(value: Any, said: str) -> bool:
    s = str(value).lower()
    return len(s) < _GROUND_MIN or "[redacted" in s or s in said


def patterns(conv: Conversation) -> dict[str, Hit]:
    """The structural patterns ``conv`` shows, each with where it first shows
    (``never:T`` is added per intent, by :func:`analyse`)."""
    out: dict[str, Hit] = {}
    msgs = conv.messages
    calls = calls_of(conv)
    seen: dict[str, int] = {}
    said_at = _said_prefixes(msgs)
    any_write = False
    for c in calls:
        hit = Hit(c.turn, c.trace_id, c.tool, c.arguments[:500])
        if c.error:
            out.setdefault(f"error:{c.tool}", hit)
        if is_handoff(c.tool) and not c.error:
            out.setdefault("handoff", hit)
        if not changes_state(c.tool):
            continue
        any_write = True
        seen[c.tool] = seen.get(c.tool, 0) + 1
        out.setdefault(f"calls:{c.tool}", hit)
        if seen[c.tool] == 2:
            out.setdefault(f"repeats:{c.tool}", hit)
            out.setdefault("repeats", hit)
        if not _confirmed(msgs, c.turn):
            out.setdefault(f"unconfirmed:{c.tool}", hit)
            out.setdefault("unconfirmed", hit)
        said = said_at[c.turn]
        for key, v in _leaves(c.args):
            if not key or not _SAFE_KEY.fullmatch(key.replace(".", "_")):
                continue
            if isinstance(v, (str, int, float, bool)) and len(str(v)) <= _SCALAR_MAX:
                out.setdefault(f"arg:{c.tool}.{key}={v}", hit)
            if v is not None and not isinstance(v, bool) and not _grounded(v, said):
                out.setdefault(f"ungrounded:{c.tool}.{key}", hit)
                out.setdefault("ungrounded", hit)
    if calls and not any_write:
        out["no_action"] = Hit(len(msgs) - 1, conv.trace_ids[-1] if conv.trace_ids else "")
    first_write = next((c for c in calls if changes_state(c.tool)), None)
    if first_write is not None:
        out["acts"] = Hit(
            first_write.turn, first_write.trace_id, first_write.tool, first_write.arguments[:500]
        )
    return out


def _said_prefixes(msgs: list[Message]) -> list[str]:
    """For each message index, the lower-cased text of the user's messages and the tool
    results before it: what an argument value may be grounded in."""
    out: list[str] = []
    acc: list[str] = []
    for m in msgs:
        out.append("\n".join(acc))
        if m.role == "user" or (m.role == "tool" and not m.error):
            acc.append(m.content.lower())
    return out


# -- the test ------------------------------------------------------------------------------


@dataclass
class Finding:
    pattern: str
    kind: str
    failed_with: int
    failed: int
    ok_with: int
    ok: int
    p_value: float
    hits: dict[str, Hit] = field(default_factory=dict)  # failed conversation id -> where

    @property
    def lift(self) -> float:
        return self.failed_with / max(self.failed, 1) - self.ok_with / max(self.ok, 1)


def _bh(pvalues: list[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values, in the input's order."""
    n = len(pvalues)
    order = sorted(range(n), key=lambda i: pvalues[i])
    adj = [1.0] * n
    running = 1.0
    for rank in range(n, 0, -1):
        i = order[rank - 1]
        running = min(running, pvalues[i] * n / rank)
        adj[i] = running
    return adj


def contrast(
    failed: dict[str, dict[str, Hit]], ok: dict[str, dict[str, Hit]], cfg: DiagnoseConfig
) -> list[Finding]:
    """The patterns that set ``failed`` conversations (id -> patterns) apart from ``ok`` ones,
    strongest first, at most ``contrast_max_per_intent``, none explaining the same
    conversations as a stronger one of the same kind."""
    nf, no = len(failed), len(ok)
    # never:T for state-changing tools successful conversations call
    writes = {p.split(":", 1)[1] for pats in ok.values() for p in pats if p.startswith("calls:")}
    for group in (failed, ok):
        for pats in group.values():
            for t in writes:
                if f"calls:{t}" not in pats and "_abandoned" not in pats:
                    pats[f"never:{t}"] = Hit()
    candidates: list[Finding] = []
    counts_f: dict[str, int] = {}
    for pats in failed.values():
        for p in pats:
            counts_f[p] = counts_f.get(p, 0) + 1
    # a departure from the nearest successes can only show where there are some: it is
    # tested among the conversations that have a reference set
    nf_ref = sum(1 for pats in failed.values() if REFERENCED in pats)
    no_ref = sum(1 for pats in ok.values() if REFERENCED in pats)
    for p, a in counts_f.items():
        if a < cfg.contrast_min_count or p.startswith("_"):
            continue
        b = sum(1 for pats in ok.values() if p in pats)
        n_f, n_o = (nf_ref, no_ref) if p.split(":", 1)[0] in DEPARTURES else (nf, no)
        f = Finding(p, KIND_OF[p.split(":", 1)[0]], a, n_f, b, n_o, fisher_exact(n_f, a, n_o, b))
        if f.lift >= cfg.contrast_min_lift:
            candidates.append(f)
    adjusted = _bh([f.p_value for f in candidates])
    found = [f for f, q in zip(candidates, adjusted, strict=True) if q < cfg.contrast_alpha]
    for f, q in zip(candidates, adjusted, strict=True):
        f.p_value = q
    # on a tie the pattern naming a tool first: it says more
    found.sort(key=lambda f: (f.p_value, -f.lift, ":" not in f.pattern, f.pattern))
    kept: list[Finding] = []
    covered: dict[str, set[str]] = {}
    for f in found:
        ids = {cid for cid, pats in failed.items() if holds_here(f.pattern, pats)}
        if len(ids) < cfg.contrast_min_count:
            continue  # the contrast holds for the intent, not in enough conversations
        if ids <= covered.get(f.kind, set()):
            continue  # a weaker restatement of a finding already kept
        covered.setdefault(f.kind, set()).update(ids)
        f.hits = {cid: failed[cid][f.pattern] for cid in sorted(ids)}
        kept.append(f)
        if len(kept) >= cfg.contrast_max_per_intent:
            break
    return kept


def _confirming(pattern: str) -> str | None:
    """The departure (:mod:`.reference`) that shows an intent-wide pattern in one conversation,
    or None when the pattern is about that conversation alone."""
    head, _, rest = pattern.partition(":")
    tool = rest.split(".", 1)[0].split("=", 1)[0]
    return {
        "acts": "extra",
        "calls": f"extra:{tool}",
        "never": f"misses:{tool}",
        "no_action": "misses",
        "handoff": "extra_handoff:",
        "arg": f"differs:{rest.split('=', 1)[0]}",
    }.get(head)


def holds_here(pattern: str, pats: dict[str, Hit]) -> bool:
    """Whether ``pattern`` explains this conversation (patterns ``pats``). A pattern that says
    "failed conversations of the intent do X, successful ones do not" explains a conversation
    when it does X *and* its own nearest successful conversations by goal do not: the intent
    may mix goals whose right actions differ."""
    if pattern not in pats:
        return False
    confirm = _confirming(pattern)
    if confirm is None:
        return True
    return confirm in pats or (confirm.endswith(":") and any(p.startswith(confirm) for p in pats))


# -- diagnoses -----------------------------------------------------------------------------


def _describe(f: Finding, intent: str) -> tuple[str, str]:
    head, _, rest = f.pattern.partition(":")
    tool = rest.split(".", 1)[0].split("=", 1)[0]
    what_ungrounded = (
        f"call `{tool}` with a `{rest.split('.', 1)[-1]}` that appears nowhere in what the user "
        "said or a tool returned"
        if tool
        else "make a state-changing call with an argument value that appears nowhere in what the "
        "user said or a tool returned"
    )
    what = {
        "calls": f"call `{tool}`",
        "never": f"never call `{tool}`",
        "no_action": "end without any state-changing tool call",
        "acts": "make a state-changing tool call",
        "arg": f"call `{tool}` with `{rest.split('.', 1)[-1]}`",
        "error": f"get an error from `{tool}`",
        "handoff": "hand the user to a human",
        "misses": f"never call `{tool}`, which most of the successful conversations with the "
        "most similar goals call"
        if tool
        else "never make a state-changing call that most of the successful conversations "
        "with the most similar goals make",
        "extra": f"call `{tool}`, which most of the successful conversations with the most "
        "similar goals do not"
        if tool
        else "make a state-changing call that most of the successful conversations with the "
        "most similar goals do not",
        "differs": f"call `{tool}` with a `{rest.split('.', 1)[-1]}` other than the one most of "
        "the successful conversations with the most similar goals give"
        if tool
        else "call a state-changing tool with an argument value other than the one most of "
        "the successful conversations with the most similar goals give",
        "extra_handoff": "hand the user to a human where most of the successful conversations "
        "with the most similar goals do not",
        "ungrounded": what_ungrounded,
        "repeats": f"call `{tool}` more than once" if tool else "repeat a state-changing call",
        "unconfirmed": f"call `{tool}` without an explicit confirmation from the user just before"
        if tool
        else "make a state-changing call without an explicit confirmation from the user just "
        "before",
    }[head]
    among = " with successful ones of a similar goal" if head in DEPARTURES else ""
    counts = (
        f"{f.failed_with} of {f.failed} failed conversations{among} {what}; "
        f"{f.ok_with} of {f.ok} successful ones{among and ' with such neighbours'} do"
    )
    summary = f"in {intent}, {counts}"
    root = f"{f.kind.replace('_', ' ')}: in {intent}, {counts}"
    return summary, root


def _component(f: Finding) -> dict[str, Any]:
    head, _, rest = f.pattern.partition(":")
    tool = rest.split(".", 1)[0].split("=", 1)[0]
    argument = ""
    if head in ("arg", "ungrounded", "differs"):
        argument = rest.split(".", 1)[-1].split("=", 1)[0]
    return {"type": "prompt", "target": "", "detail": {"tool": tool, "argument": argument}}


def diagnosis_of(
    f: Finding, intent_id: str, intent_name: str, conv_traces: dict[str, list[str]], now_ns: int
) -> Diagnosis:
    summary, root = _describe(f, intent_name or intent_id)
    head = f.pattern.partition(":")[0]
    comp = _component(f)
    evidence = {
        "pattern": head,
        "tool": comp["detail"]["tool"],
        "argument": comp["detail"]["argument"],
        "failed_with": f.failed_with,
        "failed": f.failed,
        "ok_with": f.ok_with,
        "ok": f.ok,
        "lift": round(f.lift, 3),
        "p_value": f.p_value,
        "conversations": [  # every conversation the finding explains (diagnosis_conversations)
            {
                "conversation_id": cid,
                "turn": h.turn,
                "trace_id": h.trace_id or (conv_traces.get(cid) or [""])[0],
                "tool": h.tool,
                "arguments": h.arguments[:ARGUMENTS_KEPT],
            }
            for cid, h in f.hits.items()
        ],
    }
    trace_ids = [h.trace_id or (conv_traces.get(cid) or [""])[0] for cid, h in f.hits.items()]
    did = hashlib.sha256(f"{intent_id}\x1f{RULE}\x1f{f.pattern}".encode()).hexdigest()[:24]
    return Diagnosis(
        diagnosis_id=did,
        intent_id=intent_id,
        intent_name=intent_name,
        rule=RULE,
        failure_kind=f.kind,
        summary=summary,
        root_cause=root,
        component=comp,
        confidence=round(1.0 - f.p_value, 4),
        evidence=evidence,
        trace_ids=[t for t in dict.fromkeys(trace_ids) if t],
        support=f.failed + f.ok,
        failures=f.failed,
        failure_rate=f.failed / max(f.failed + f.ok, 1),
        baseline_rate=f.ok_with / max(f.ok, 1),
        updated_ns=now_ns,
    )


def intent_findings(
    intent_id: str, intent_name: str, tags: Iterable[TagRecord], cfg: DiagnoseConfig, now_ns: int
) -> list[Diagnosis]:
    """The contrastive diagnoses of one intent's tagged conversations (the newest version of
    each conversation counts; none without enough failed and successful ones)."""
    newest: dict[str, tuple[TagRecord, Conversation]] = {}
    for t in tags:
        if t.conversation is None:
            continue
        old = newest.get(t.conversation_id)
        if old is None or t.conversation_version >= old[0].conversation_version:
            newest[t.conversation_id] = (t, t.conversation)
    # The failed and the successful conversations over the same span of time: reservoirs of
    # the last N of each reach back unequally far, and behaviour that changed over time
    # would otherwise look like a difference between them.
    firsts = [
        min((t.ts_ns for t, _ in newest.values() if t.failed == side), default=None)
        for side in (True, False)
    ]
    since = max((f for f in firsts if f is not None), default=0)
    group = [(t, c) for t, c in newest.values() if t.ts_ns >= since]
    failed = {t.conversation_id: _failed_patterns(t, c) for t, c in group if t.failed}
    ok = {t.conversation_id: patterns(c) for t, c in group if not t.failed}
    if len(failed) < cfg.contrast_min_failures or len(ok) < cfg.contrast_min_successes:
        return []
    add_departures({t.conversation_id: c for t, c in group}, failed, ok, cfg)
    traces = {t.conversation_id: c.trace_ids for t, c in group}
    return [
        diagnosis_of(f, intent_id, intent_name, traces, now_ns) for f in contrast(failed, ok, cfg)
    ]


_MISSING = ("never:", "no_action", "misses")


def add_departures(
    convs: dict[str, Conversation],
    failed: dict[str, dict[str, Hit]],
    ok: dict[str, dict[str, Hit]],
    cfg: DiagnoseConfig,
) -> None:
    """Add to every conversation's patterns how it departs from its nearest successful
    conversations by goal (:mod:`.reference`), where each shows."""
    writes: dict[str, dict[str, dict[str, set[str]]]] = {}
    first: dict[tuple[str, str], Hit] = {}
    for cid, conv in convs.items():
        for c in calls_of(conv):
            if not changes_state(c.tool) and not (is_handoff(c.tool) and not c.error):
                continue
            first.setdefault((cid, c.tool), Hit(c.turn, c.trace_id, c.tool, c.arguments[:500]))
            args = writes.setdefault(cid, {}).setdefault(c.tool, {})
            for key, v in _leaves(c.args):
                if key and isinstance(v, (str, int, float)) and len(str(v)) <= _SCALAR_MAX:
                    args.setdefault(key, set()).add(str(v))
    pats = {**failed, **ok}
    vectors = reference.tfidf({cid: reference.goal_text(c) for cid, c in convs.items()})
    refs = reference.references(
        vectors, ok, cfg.contrast_reference_size, cfg.contrast_reference_similarity
    )
    for cid, found in reference.departures(writes, is_handoff, refs).items():
        conv, mine = convs[cid], pats[cid]
        mine[REFERENCED] = Hit()
        if "_abandoned" in mine:
            found = {p for p in found if not p.startswith(_MISSING)}
        end = Hit(len(conv.messages) - 1, conv.trace_ids[-1] if conv.trace_ids else "")
        for p in found:
            tool = p.partition(":")[2].split(".", 1)[0]
            if tool:
                mine[p] = end if p.startswith("misses") else first[(cid, tool)]
        for head in ("misses", "extra", "differs"):
            hits = [mine[p] for p in sorted(found) if p.startswith(head + ":")]
            if hits:
                mine[head] = min(hits, key=lambda h: h.turn)


def _failed_patterns(tag: TagRecord, conv: Conversation) -> dict[str, Hit]:
    """A failed conversation's patterns. The user left (``abandoned``): an action never taken
    is a consequence of leaving, not a cause, so the missing-action patterns are left out."""
    pats = patterns(conv)
    if tag.outcome == "abandoned":
        pats = {p: h for p, h in pats.items() if not p.startswith(_MISSING)}
        pats["_abandoned"] = Hit()  # never:T is not added to it either (see contrast)
    return pats


def analyse(tags: Sequence[TagRecord], cfg: DiagnoseConfig, now_ns: int) -> list[Diagnosis]:
    """:func:`intent_findings` for every intent of ``tags`` (a batch analysis: a backfill, a bench)."""
    by_intent: dict[str, list[TagRecord]] = {}
    for t in tags:
        by_intent.setdefault(t.intent_id, []).append(t)
    out = []
    for intent_id, group in sorted(by_intent.items()):
        name = group[-1].intent_name
        out += intent_findings(intent_id, name, group, cfg, now_ns)
    return out


def conversation_rows(diags: Iterable[Diagnosis]) -> list[dict[str, Any]]:
    """``diagnosis_conversations`` rows: every conversation each diagnosis explains (the
    ``conversations`` of its evidence; a rule's diagnosis without them: its trace ids)."""
    rows = []
    for d in diags:
        convs = d.evidence.get("conversations")
        if not isinstance(convs, list):
            convs = [
                {"conversation_id": "", "turn": -1, "trace_id": t, "tool": "", "arguments": ""}
                for t in d.trace_ids
            ]
        for c in convs:
            if not isinstance(c, dict):
                continue
            rows.append(
                {
                    "diagnosis_id": d.diagnosis_id,
                    "conversation_id": str(c.get("conversation_id") or c.get("trace_id") or ""),
                    "intent_id": d.intent_id,
                    "failure_kind": d.failure_kind,
                    "trace_id": str(c.get("trace_id") or ""),
                    "turn": int(c.get("turn", -1)),
                    "tool": str(c.get("tool") or ""),
                    "arguments": str(c.get("arguments") or ""),
                    "detail": str(d.evidence.get("pattern") or d.rule),
                    "version": d.version,
                    "updated_ns": d.updated_ns,
                }
            )
    return rows
