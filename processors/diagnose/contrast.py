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
``no_call``            makes no tool call at all (answers without          missing_action
                       looking anything up)
``acts``               makes a state-changing call (where successful       unauthorized_action
                       conversations of the intent more often refrain)
``arg:T.k=v``          calls ``T`` with argument ``k`` set to ``v``         wrong_tool_arguments
``ungrounded:T.k``     calls ``T`` with a value of ``k`` that appears      wrong_tool_arguments
                       nowhere in what the user said or a tool returned
                       (``ungrounded:T``: of some argument)
``repeats:T``          calls state-changing ``T`` more than once           wrong_tool_arguments
``error:T``            gets an error from ``T``                            tool_error
``handoff``            is handed to a human                                unnecessary_escalation
=====================  ==================================================  ======================

``repeats``, ``unconfirmed`` and ``ungrounded`` also stand alone, for any tool (a cause
spread over several tools). Against each conversation's **reference set**, its nearest
successful conversations by goal (:mod:`.reference`), it also shows ``misses:T``,
``extra:T``, ``differs:T.k`` (``differs:T``) and ``extra_handoff:T`` (and ``misses``,
``extra``, ``differs`` for any tool, and ``departs``: any of them): what it does where the
successes with a goal like its own do not. These departures are tested among the
conversations that have a reference set (elsewhere they cannot show). ``anomalous``: it shows
any of :data:`ANOMALIES` -- a departure, a repeated or unconfirmed state-changing call, an
argument value grounded nowhere, a tool error, no tool call at all -- tested among all
conversations: each alone
may also show in successful conversations too often to be a finding, while failures show
one of them far more often.

Prompt, model and agent versions are left to the version-shift rule (:mod:`.rules`), which
compares cumulative counts per version; here they would be confounded with time.

Each pattern is tested per intent: its share among failed conversations against its share
among successful ones, with Fisher's exact test (:func:`processors.stats.fisher_exact`) and a
Benjamini–Hochberg correction over the patterns tried; a pattern is a finding when it holds
in at least ``contrast_min_count`` failed conversations, is more common among failures by
``contrast_min_lift`` and its adjusted p-value is under ``contrast_alpha``.

**One explanation per conversation** (:func:`explain`): each failed conversation is explained
by the most specific finding that holds in it (:func:`specificity`: naming the tool, naming
the argument, checked against its own nearest successes), not by every finding it shows; an
intent-wide pattern -- ``acts``, ``calls:T``, ``never:T``, ``no_action``, ``handoff``,
``arg:T.k=v`` -- holds in a conversation only where its reference set confirms it
(:func:`holds_here`); a finding on departures for any tool (``departs``, ``misses``, ...)
explains each conversation by its own departure, naming the tool, and ``anomalous`` by its
own anomaly (a departure first: it is checked against the conversation's nearest successes).
The explained
conversations are grouped per kind and tool into :class:`~processors.records.Diagnosis`
records (``rule="contrast"``, one id per intent, kind and tool) with every conversation they
explain (in ``evidence["conversations"]``, each with its own pattern, turn, trace, tool and
arguments; :func:`conversation_rows` makes the ``diagnosis_conversations`` rows) and, when
the significant finding is a family (``departs``, ``anomalous``), that finding's counts
(``tested``). A group of fewer than ``contrast_min_count`` conversations is no diagnosis;
groups beyond ``contrast_max_per_intent`` are given up the same way, one at a time, their
conversations moving to their next explanation.

**State-changing tools** are inferred without knowing the agent: a tool is read-only when
the first word of its name is a read verb (:data:`READ_VERBS`: get, list, search, find,
calculate, think, ...); any other tool changes state. A hand-off tool (its name says
escalate / hand off / transfer to / human) is the ``handoff`` pattern instead. Names are
split on ``_``, ``-``, ``.``, spaces and camelCase.

**Explicit confirmation** just before a call: the last user message before it affirms (yes,
confirm, go ahead, ... opening any of its sentences or clauses) and refuses nothing (no, don't,
wait, ...), answering an agent message that asked something.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
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
# An answer's sentences and clauses each may carry it: "That sounds good. Yes, please go
# ahead." affirms as much as "Yes" does.
_CLAUSE = r"(?:^|[.!?;,:]\s+|\n|\b(?:then|and|so|but)\s+)\W*"
_AFFIRM = re.compile(
    _CLAUSE + r"(yes|yeah|yep|yup|sure|ok(ay)?|confirm(ed)?|correct|right|go ahead|please do|"
    r"proceed|do it|that'?s (right|correct|fine)|sounds good|absolutely|definitely|"
    r"please(?=\s+\w))\b"  # a request ("please book it"), not a courtesy ("..., please.")
    r"(?!\W*(?:not|don'?t|do not)\b)",  # "please don't"
    re.IGNORECASE,
)
_REFUSE = re.compile(  # a refusal anywhere in the answer outweighs an affirmation
    _CLAUSE + r"(no|nope|don'?t|do not|wait|hold on|stop)\b(?!\W*(?:problem|worries)\b)",
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
    "no_call": "missing_action",
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
    "departs": "other",  # any departure: each conversation is explained by its own (explain)
    "anomalous": "other",  # any anomaly: each conversation is explained by its own (explain)
}
DEPARTURES = frozenset(["misses", "extra", "differs", "extra_handoff", "departs"])  # .reference
# What one conversation does that points at its own failure, whatever its intent's other
# conversations do: a departure from its nearest successes, a repeated or unconfirmed
# state-changing call, an argument value grounded nowhere, a tool error, an answer given
# without consulting any tool (an agent with tools that uses none). ``anomalous``: any.
ANOMALIES = frozenset(
    [
        "misses",
        "extra",
        "differs",
        "extra_handoff",
        "repeats",
        "ungrounded",
        "unconfirmed",
        "error",
        "no_call",
    ]
)
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
    """An explicit user confirmation just before ``turn``: the last user message affirms and
    refuses nothing, and answers an agent message that asked something."""
    u = next((i for i in range(turn - 1, -1, -1) if msgs[i].role == "user"), -1)
    said = msgs[u].content if u >= 0 else ""
    if not _AFFIRM.search(said) or _REFUSE.search(said):
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
                out.setdefault(f"ungrounded:{c.tool}", hit)
                out.setdefault("ungrounded", hit)
    if not any_write:
        out["no_action"] = Hit(len(msgs) - 1, conv.trace_ids[-1] if conv.trace_ids else "")
    if not calls:
        out["no_call"] = Hit(len(msgs) - 1, conv.trace_ids[-1] if conv.trace_ids else "")
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
    argument: str = ""  # the argument most of them give otherwise (a ``differs:T`` group)
    explained_by: dict[str, str] = field(default_factory=dict)  # conversation id -> its pattern
    tested: Finding | None = None  # the significant finding this group of ``hits`` is under

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
    """What sets ``failed`` conversations (id -> patterns) apart from ``ok`` ones: the
    significant patterns (:func:`tally`, :func:`significant`), with every failed conversation
    explained by one of them at most (:func:`explain`); strongest first, at most
    ``contrast_max_per_intent``."""
    add_never(failed, ok)
    for pats in (*failed.values(), *ok.values()):
        add_anomalous(pats)
    counts = tally(failed, ok)
    return explain(significant(counts, cfg), failed, counts, cfg)


def add_never(failed: dict[str, dict[str, Hit]], ok: dict[str, dict[str, Hit]]) -> None:
    """``never:T`` for the state-changing tools successful conversations call (not for a
    conversation the user left: see :func:`_failed_patterns`)."""
    writes = {p.split(":", 1)[1] for pats in ok.values() for p in pats if p.startswith("calls:")}
    for group in (failed, ok):
        for pats in group.values():
            for t in writes:
                if f"calls:{t}" not in pats and "_abandoned" not in pats:
                    pats[f"never:{t}"] = Hit()


def add_anomalous(pats: dict[str, Hit]) -> None:
    """``anomalous``, where the conversation (patterns ``pats``) shows one of :data:`ANOMALIES`:
    at its first."""
    hits = [h for p, h in pats.items() if _head(p) in ANOMALIES]
    if hits:
        pats["anomalous"] = min(hits, key=lambda h: h.turn)


def tally(failed: dict[str, dict[str, Hit]], ok: dict[str, dict[str, Hit]]) -> dict[str, Finding]:
    """Every pattern failed conversations show, with its counts among failed and successful
    conversations and its (unadjusted) Fisher p-value. A departure from the nearest successes
    can only show where there are some: it is counted among the conversations that have a
    reference set."""
    n_failed = {False: len(failed), True: sum(1 for p in failed.values() if REFERENCED in p)}
    n_ok = {False: len(ok), True: sum(1 for p in ok.values() if REFERENCED in p)}
    shown: dict[str, int] = {}
    for pats in failed.values():
        for p in pats:
            if not p.startswith("_"):
                shown[p] = shown.get(p, 0) + 1
    out = {}
    for p, a in shown.items():
        b = sum(1 for pats in ok.values() if p in pats)
        ref = _head(p) in DEPARTURES
        nf, no = n_failed[ref], n_ok[ref]
        out[p] = Finding(p, KIND_OF[_head(p)], a, nf, b, no, fisher_exact(nf, a, no, b))
    return out


def significant(counts: dict[str, Finding], cfg: DiagnoseConfig) -> list[Finding]:
    """The patterns of ``counts`` that hold in ``contrast_min_count`` failed conversations, are
    more common among them by ``contrast_min_lift``, and whose Benjamini–Hochberg adjusted
    p-value is under ``contrast_alpha`` (as their ``p_value``), strongest first."""
    candidates = [
        f
        for f in counts.values()
        if f.failed_with >= cfg.contrast_min_count and f.lift >= cfg.contrast_min_lift
    ]
    adjusted = _bh([f.p_value for f in candidates])
    found = [
        replace(f, p_value=q)
        for f, q in zip(candidates, adjusted, strict=True)
        if q < cfg.contrast_alpha
    ]
    return sorted(found, key=lambda f: (f.p_value, -f.lift, f.pattern))


@dataclass(frozen=True)
class _Option:
    """One way to explain a failed conversation: by ``pattern``, under significant ``finding``."""

    specificity: int
    finding: Finding
    pattern: str
    p_value: float  # the pattern's own (unadjusted)

    def rank(self) -> tuple[bool, int, float, float, str]:
        # checked against the conversation's own nearest successes first
        referenced = _head(self.pattern) in DEPARTURES or _confirming(self.pattern) is not None
        return (not referenced, -self.specificity, self.finding.p_value, self.p_value, self.pattern)


def explain(
    found: list[Finding],
    failed: dict[str, dict[str, Hit]],
    counts: dict[str, Finding],
    cfg: DiagnoseConfig,
) -> list[Finding]:
    """The diagnoses of significant findings ``found``, one per kind and tool: each failed
    conversation is explained once, by the most specific finding that holds in it
    (:func:`specificity`; then the strongest), so that it is not listed under several
    diagnoses of different kinds. A finding for any tool of the departures (``departs``,
    ``misses``, ``extra``, ``differs``) explains each conversation by one of that
    conversation's own departures (:func:`own_explanations`), naming the tool where it can; of
    those, the one that sets failed conversations apart most; ``anomalous`` by one of its own
    anomalies (:func:`own_explanations`), a departure first. A group of fewer than
    ``contrast_min_count`` conversations, or whose pattern is not more common among failed
    conversations than among successful ones, is no diagnosis: its conversations go to their
    next explanation, if any. Such groups are given up one at a time, first those that could
    never be large enough, then the one fewest conversations could join; then, while there are
    more than ``contrast_max_per_intent`` groups, the one fewest conversations could join (not
    cut from the list: its conversations would be left with no explanation). Strongest
    first."""
    options: dict[str, list[_Option]] = {}
    for cid, pats in failed.items():
        mine = []
        for f in found:
            if not holds_here(f.pattern, pats):
                continue
            for p in own_explanations(f.pattern, pats) or [f.pattern]:
                mine.append(_Option(specificity(p), f, p, counts[p].p_value))
        options[cid] = sorted(mine, key=_Option.rank)
    dropped: set[tuple[str, str]] = set()
    while True:
        groups: dict[tuple[str, str], dict[str, _Option]] = {}
        for cid, mine in options.items():
            best = next((o for o in mine if _group(o.pattern) not in dropped), None)
            if best is not None:
                groups.setdefault(_group(best.pattern), {})[cid] = best
        could = Counter(g for mine in options.values() for g in {_group(o.pattern) for o in mine})
        weak = []
        for g, members in groups.items():
            lift = counts[_typical(members)].lift
            if len(members) < cfg.contrast_min_count or lift <= 0:
                hopeless = could[g] < cfg.contrast_min_count or lift <= 0
                weak.append((not hopeless, could[g], len(members), lift, g))
        if not weak and len(groups) > cfg.contrast_max_per_intent:
            # More diagnoses than an intent keeps: one is given up the same way, its
            # conversations to their next explanation (cutting the list would leave them none).
            weak = [
                (True, could[g], len(m), counts[_typical(m)].lift, g) for g, m in groups.items()
            ]
        if not weak:
            break
        # One at a time, the one fewest conversations could join first: its conversations move
        # to their next explanation and may make another group large enough.
        dropped.add(min(weak)[4])
    out = [_group_finding(members, failed, counts) for members in groups.values()]
    out.sort(key=lambda f: (f.p_value, -len(f.hits), f.pattern))
    return out


def _group(pattern: str) -> tuple[str, str]:
    """The diagnosis a conversation explained by ``pattern`` belongs to: its kind and tool."""
    return KIND_OF[_head(pattern)], _tool(pattern)


def _typical(members: dict[str, _Option]) -> str:
    """The pattern explaining most conversations of a group (on a tie the best ranked)."""
    n = Counter(o.pattern for o in members.values())
    return min(members.values(), key=lambda o: (-n[o.pattern], o.rank())).pattern


def _group_finding(
    members: dict[str, _Option], failed: dict[str, dict[str, Hit]], counts: dict[str, Finding]
) -> Finding:
    """A group's diagnosis: its typical pattern's counts, the significance of the finding most
    of its conversations are explained under (on a tie the strongest), and where each of its
    conversations shows its own."""
    typical = _typical(members)
    n = Counter(o.finding.pattern for o in members.values())
    under = min(
        (o.finding for o in members.values()), key=lambda f: (-n[f.pattern], f.p_value, f.pattern)
    )
    hits = {cid: failed[cid][members[cid].pattern] for cid in sorted(members)}
    return replace(
        counts[typical],
        p_value=under.p_value,
        hits=hits,
        explained_by={cid: members[cid].pattern for cid in hits},
        argument=_common_argument(typical, [failed[cid] for cid in hits]),
        tested=None if under.pattern == typical else under,
    )


_UNIONS = frozenset(["anomalous", "departs"])  # of patterns that are findings themselves
_FAMILIES = {
    "anomalous": ANOMALIES,
    "departs": DEPARTURES,
    "misses": frozenset(["misses"]),
    "extra": frozenset(["extra"]),
    "differs": frozenset(["differs"]),
}


def own_explanations(pattern: str, pats: dict[str, Hit]) -> list[str]:
    """For a family pattern (``anomalous``, ``departs``, ``misses``, ...): the conversation's
    own patterns of that family, naming the tool (``misses:T``, ``extra:T``, ``differs:T``,
    ``extra_handoff:T``, ``repeats:T``, ``ungrounded:T``, ...) or not (``misses``,
    ``repeats``, ...); empty for any other pattern."""
    heads = _FAMILIES.get(pattern, ())
    return sorted(p for p in pats if _head(p) in heads and "." not in p and p not in _UNIONS)


def _common_argument(pattern: str, explained: list[dict[str, Hit]]) -> str:
    """For a ``differs:T`` (``ungrounded:T``) group: the argument of ``T`` most of its
    conversations give otherwise (grounded nowhere)."""
    if _head(pattern) not in ("differs", "ungrounded") or "." in pattern:
        return ""
    keys = Counter(
        p.split(".", 1)[1] for pats in explained for p in pats if p.startswith(pattern + ".")
    )
    return min(keys, key=lambda k: (-keys[k], k)) if keys else ""


def specificity(pattern: str) -> int:
    """How much a pattern says about the conversations it explains: one for naming the tool,
    one for naming its argument, one for being checked against the conversation's own nearest
    successes (a departure, or an intent-wide pattern that :func:`holds_here` confirms).

    >>> [specificity(p) for p in ("ungrounded", "repeats:T", "misses:T", "differs:T.k")]
    [0, 1, 2, 3]
    """
    head, _, rest = pattern.partition(":")
    named = bool(rest.split(".", 1)[0].split("=", 1)[0])
    argument = "." in rest or "=" in rest
    referenced = head in DEPARTURES or _confirming(pattern) is not None
    return int(named) + int(argument) + int(referenced)


def _head(pattern: str) -> str:
    return pattern.partition(":")[0]


def _tool(pattern: str) -> str:
    return pattern.partition(":")[2].split(".", 1)[0].split("=", 1)[0]


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
    argument = _component(f)["detail"]["argument"]
    other_value = (
        f"a `{argument}` other than the one" if argument else "argument values other than the ones"
    )
    what_ungrounded = (
        f"call `{tool}` with a `{argument}` value that appears nowhere in what the user "
        "said or a tool returned"
        if tool and argument
        else f"call `{tool}` with an argument value that appears nowhere in what the user "
        "said or a tool returned"
        if tool
        else "make a state-changing call with an argument value that appears nowhere in what the "
        "user said or a tool returned"
    )
    what = {
        "calls": f"call `{tool}`",
        "never": f"never call `{tool}`",
        "no_action": "end without any state-changing tool call",
        "no_call": "end without any tool call at all",
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
        "differs": f"call `{tool}` with {other_value} most of the successful conversations "
        "with the most similar goals give"
        if tool
        else "call a state-changing tool with an argument value other than the one most of "
        "the successful conversations with the most similar goals give",
        "extra_handoff": "hand the user to a human where most of the successful conversations "
        "with the most similar goals do not",
        "departs": "do what most of the successful conversations with the most similar goals "
        "do not, or the reverse",
        "anomalous": "depart from the successful conversations with the most similar goals, "
        "repeat or make unconfirmed a state-changing call, give an argument value grounded "
        "nowhere, or get a tool error",
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
    if f.tested is not None:  # significant under a broader pattern, not alone
        t = f.tested
        root += (
            f" (tested as `{_head(t.pattern)}`: {t.failed_with} of {t.failed} failed "
            f"conversations, {t.ok_with} of {t.ok} successful ones)"
        )
    return summary, root


def _component(f: Finding) -> dict[str, Any]:
    head, _, rest = f.pattern.partition(":")
    tool = rest.split(".", 1)[0].split("=", 1)[0]
    argument = f.argument
    if head in ("arg", "ungrounded", "differs") and "." in rest:
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
        # the significant finding the conversations are explained under, when not this pattern
        # itself (a departure for any tool, each conversation by its own: see explain)
        "tested": None
        if f.tested is None
        else {
            "pattern": f.tested.pattern,
            **{k: getattr(f.tested, k) for k in ("failed_with", "failed", "ok_with", "ok")},
        },
        "conversations": [  # every conversation the finding explains (diagnosis_conversations)
            {
                "conversation_id": cid,
                "pattern": _head(f.explained_by.get(cid, f.pattern)),  # its own, in this group
                "turn": h.turn,
                "trace_id": h.trace_id or (conv_traces.get(cid) or [""])[0],
                "tool": h.tool,
                "arguments": h.arguments[:ARGUMENTS_KEPT],
            }
            for cid, h in f.hits.items()
        ],
    }
    trace_ids = [h.trace_id or (conv_traces.get(cid) or [""])[0] for cid, h in f.hits.items()]
    # one diagnosis per intent, kind and tool (see explain): found again, it is updated
    key = f"{intent_id}\x1f{RULE}\x1f{f.kind}\x1f{comp['detail']['tool']}"
    did = hashlib.sha256(key.encode()).hexdigest()[:24]
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
    """The contrastive diagnoses of one intent's tagged conversations (:func:`analysed`; none
    without enough failed and successful ones)."""
    group = analysed(tags)
    failed = {t.conversation_id: _failed_patterns(t, c) for t, c in group if t.failed}
    ok = {t.conversation_id: patterns(c) for t, c in group if not t.failed}
    if len(failed) < cfg.contrast_min_failures or len(ok) < cfg.contrast_min_successes:
        return []
    add_departures({t.conversation_id: c for t, c in group}, failed, ok, cfg)
    traces = {t.conversation_id: c.trace_ids for t, c in group}
    return [
        diagnosis_of(f, intent_id, intent_name, traces, now_ns) for f in contrast(failed, ok, cfg)
    ]


def analysed(tags: Iterable[TagRecord]) -> list[tuple[TagRecord, Conversation]]:
    """The conversations of ``tags`` an analysis contrasts: the newest version of each, over
    the span of time both the failed and the successful ones cover. The failures from before
    the first success are left out even when nothing older was dropped: an intent failing from
    its start is left to the rules, which look first (analysing them too made the contrast
    file a second diagnosis beside a rule's for each of the demo's planted failures)."""
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
    return [(t, c) for t, c in newest.values() if t.ts_ns >= since]


_MISSING = ("never:", "no_action", "no_call", "misses")


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
        for head in ("misses", "extra", "differs", ""):
            hits = [mine[p] for p in sorted(found) if ":" in p and head in ("", _head(p))]
            if hits:  # "": any departure
                mine[head or "departs"] = min(hits, key=lambda h: h.turn)


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


def conversation_rows(
    diags: Iterable[Diagnosis], only: set[str] | None = None
) -> list[dict[str, Any]]:
    """``diagnosis_conversations`` rows: every conversation each diagnosis explains (the
    ``conversations`` of its evidence; a rule's diagnosis without them: its trace ids), or
    only those of ``only``."""
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
            cid = str(c.get("conversation_id") or c.get("trace_id") or "")
            if only is not None and cid not in only:
                continue
            rows.append(
                {
                    "diagnosis_id": d.diagnosis_id,
                    "conversation_id": cid,
                    "intent_id": d.intent_id,
                    "failure_kind": d.failure_kind,
                    "trace_id": str(c.get("trace_id") or ""),
                    "turn": int(c.get("turn", -1)),
                    "tool": str(c.get("tool") or ""),
                    "arguments": str(c.get("arguments") or ""),
                    "detail": str(c.get("pattern") or d.evidence.get("pattern") or d.rule),
                    "explained": 1,
                    "version": d.version,
                    "updated_ns": d.updated_ns,
                }
            )
    return rows


def unexplained_rows(d: Diagnosis, conversation_ids: Iterable[str]) -> list[dict[str, Any]]:
    """``diagnosis_conversations`` rows saying ``d`` (at its version) no longer explains these
    conversations (``explained = 0``: their newest row for the diagnosis)."""
    return [
        {
            "diagnosis_id": d.diagnosis_id,
            "conversation_id": cid,
            "intent_id": d.intent_id,
            "failure_kind": d.failure_kind,
            "trace_id": "",
            "turn": -1,
            "tool": "",
            "arguments": "",
            "detail": "",
            "explained": 0,
            "version": d.version,
            "updated_ns": d.updated_ns,
        }
        for cid in sorted(conversation_ids)
    ]
