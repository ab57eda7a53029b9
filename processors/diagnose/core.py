"""Layer 3 core: from tagged conversations to root causes specific enough to code against.

:class:`Diagnoser` folds every :class:`~processors.records.TagRecord` into per-intent
streaming statistics (:class:`IntentStats`: bounded windows, a river ADWIN on the failure
stream, a reservoir of failing and healthy conversations). When an intent's failure rate is
high against the other intents, drifts upward, jumps with a new prompt/model/agent version,
or belongs to a fast-growing new intent, it extracts evidence from the reservoir and runs
deterministic rules:

* ``repeated_ask`` — the agent asks again for something the user already gave;
* ``tool_argument`` — a tool fails on one argument format and works on another;
* ``prompt_regression`` (``version_regression`` for a model/agent version) — the failure
  rate jumped with the newest version;
* ``abandon_after_question`` — users leave after one specific agent question;
* ``latency`` — timeouts or rising latency in failing conversations.

An optional LLM rewrites the strongest finding from the evidence alone; an answer that
cites anything the evidence does not hold is rejected and the rule's result stands.
A diagnosis id is a hash of (intent, rule, component target), so a root cause seen again
updates its diagnosis (``version + 1``) instead of duplicating it.

>>> from processors.config import DiagnoseConfig
>>> Diagnoser(DiagnoseConfig()).open_diagnoses()
[]
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from river import drift

from processors.config import DiagnoseConfig
from processors.errors import InputError, LLMError
from processors.llm import UNTRUSTED_RULE, untrusted_block
from processors.records import Conversation, Diagnosis, TagRecord
from processors.stats import fisher_exact, two_proportion_z

STAGE = "diagnose"
SNAPSHOT_FORMAT = 1
VERSION_DIMS = ("prompt_version", "model", "agent_version")
OPEN_STATUSES = ("open", "proposed")
# A tool argument shape "fails" at this error rate or above and "works" at this one or below.
FAILING_SHAPE_RATE = 0.5
WORKING_SHAPE_RATE = 0.1
# The agent message before abandonment is "the" question only if healthy conversations show it
# at most this fraction as often (otherwise everyone sees it and most users go on).
HEALTHY_QUESTION_FRACTION = 0.5
MAX_TEXT = 300

# ---------------------------------------------------------------------------------------------
# Argument shapes


_REDACTED = re.compile(r"\[REDACTED(?::([A-Za-z0-9_.\-]+))?\]")
_EMAIL = re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_SHAPES = [  # (pattern, shape); the first full match wins; {n} is the number of digits
    (_REDACTED, None),
    (_EMAIL, "email"),
    (_UUID, "uuid"),
    (re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+Z?)?"), "date(iso)"),
    (re.compile(r"\d{1,2}/\d{1,2}/\d{2,4}"), "date(slash)"),
    (re.compile(r"\d+"), "digits({n})"),
    (re.compile(r"-?\d+\.\d+"), "decimal"),
    (re.compile(r"\d+(?:-\d+)+"), "digits-with-dash({n})"),
    (re.compile(r"\d+(?: \d+)+"), "digits-with-space({n})"),
    (re.compile(r"[A-Za-z]+"), "alpha"),
    (re.compile(r"[A-Za-z0-9]+"), "alnum"),
    (re.compile(r"[A-Za-z0-9]+(?:[\-_][A-Za-z0-9]+)+"), "alnum-with-dash"),
]


def value_shape(value: Any) -> str:
    """The format pattern of one argument value.

    >>> values = ("12345678", "ACC-1234-5678", "1234-5678", 3, None, "[REDACTED:email]")
    >>> [value_shape(v) for v in values]
    ['digits(8)', 'alnum-with-dash', 'digits-with-dash(8)', 'int', 'null', 'redacted(email)']
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    s = str(value).strip()
    if not s:
        return "empty"
    for pattern, shape in _SHAPES:
        m = pattern.fullmatch(s)
        if m:
            if shape is None:
                return f"redacted({m.group(1) or 'any'})"
            return shape.format(n=sum(c.isdigit() for c in s))
    return "text"


def argument_shape(arguments: str) -> dict[str, str]:
    """``{argument: value shape}`` of a call's JSON arguments (``{"_raw": shape}`` if no object)."""
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {"_raw": value_shape(arguments)}
    if not isinstance(parsed, dict):
        return {"_raw": value_shape(parsed)}
    return {str(k): value_shape(v) for k, v in sorted(parsed.items())}


def _shape_key(shape: dict[str, str]) -> str:
    return json.dumps(shape, sort_keys=True, separators=(",", ":"))


_NORM_SUBS = [
    (_REDACTED, "<redacted>"),
    (_EMAIL, "<email>"),
    (re.compile(r"\d+"), "<n>"),
    (re.compile(r"\s+"), " "),
]


def normalize_text(text: str) -> str:
    """Lower-cased text with numbers, emails and redactions replaced, so variants group together.

    >>> normalize_text("Order  #1234 for bob@x.io?")
    'order #<n> for <email>?'
    """
    s = text.strip()
    for pattern, repl in _NORM_SUBS:
        s = pattern.sub(repl, s)
    return s.lower()[:MAX_TEXT]


# ---------------------------------------------------------------------------------------------
# What the agent asks for, and what the user already gave


@dataclass(frozen=True)
class Thing:
    """One kind of information an agent may ask for."""

    name: str  # human form, used in summaries
    keyword: re.Pattern[str]  # how it is named in a question or next to a value
    value: re.Pattern[str] | None = None  # a value that identifies it without its name
    redaction_kinds: tuple[str, ...] = ()  # [REDACTED:kind] tokens that stand for it


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


THINGS: dict[str, Thing] = {
    "api_key": Thing(
        "API key",
        _rx(r"\b(?:api[ _\-]?key|api[ _\-]?token|access[ _\-]?token|secret[ _\-]?key)s?\b"),
        _rx(r"\bsk-[A-Za-z0-9_\-]{8,}"),
        ("secret",),
    ),
    "account_id": Thing("account ID", _rx(r"\baccount[ _\-]?(?:id|number|no\b|#)")),
    "email": Thing("email address", _rx(r"\be-?mail(?:[ _\-]?address)?\b"), _EMAIL, ("email",)),
    "order_number": Thing("order number", _rx(r"\border[ _\-]?(?:id|number|no\b|#)")),
    "card_last4": Thing(
        "card number",
        _rx(r"\b(?:last[ \-]?(?:4|four)(?: digits)?|card[ _\-]?number)\b"),
        None,
        ("card",),
    ),
    "phone": Thing(
        "phone number", _rx(r"\b(?:phone|mobile|cell)(?:[ _\-]?number)?\b"), None, ("phone",)
    ),
    "name": Thing(
        "name",
        _rx(r"\b(?:full[ _\-]?name|your name|first[ _\-]?name|last[ _\-]?name)\b"),
        _rx(r"\bmy (?:full )?name is \w+"),
    ),
    "date_of_birth": Thing(
        "date of birth", _rx(r"\b(?:date[ _\-]?of[ _\-]?birth|birth[ _\-]?date|dob|birthday)\b")
    ),
}
# A value next to a thing's name: a redaction, an email, a digit run, an id with digits, a date.
_VALUE_TOKEN = re.compile(
    r"\[REDACTED(?::[^\]]*)?\]|[\w.+\-]+@[\w\-]+\.[\w.\-]+|\d[\d /\-]{2,}\d"
    r"|\b(?=[A-Za-z0-9\-_]*\d)[A-Za-z0-9][A-Za-z0-9\-_]{4,}\b"
)
_REQUEST_CUE = _rx(
    r"\b(?:please|provide|share|send|give|enter|confirm|verify|need|tell me|what(?:'s| is) your"
    r"|may i have|can i have|could you|can you|would you)\b"
)
_SENTENCE = re.compile(r"(?<=[.?!])\s+|\n+")


def info_requests(text: str) -> set[str]:
    """The things an agent message asks for (a sentence naming it that is a question or a request).

    >>> sorted(info_requests("Thanks! Please provide your API key. What is your email?"))
    ['api_key', 'email']
    """
    found = set()
    for sentence in _SENTENCE.split(text):
        if not (sentence.rstrip().endswith("?") or _REQUEST_CUE.search(sentence)):
            continue
        if _VALUE_TOKEN.search(sentence):
            continue  # "checking order number 1234" states a value, it does not ask for one
        found.update(k for k, t in THINGS.items() if t.keyword.search(sentence))
    return found


def given_things(text: str) -> set[str]:
    """The things a user message (or a tool result) provides.

    Redaction happens in capture, so ``[REDACTED:secret]`` next to "API key" still counts as given.

    >>> sorted(given_things("my API key is [REDACTED:secret] and mail [REDACTED:email]"))
    ['api_key', 'email']
    """
    found = set()
    has_value = _VALUE_TOKEN.search(text) is not None
    kinds = {m.group(1) for m in _REDACTED.finditer(text)}
    for key, thing in THINGS.items():
        if (
            (has_value and thing.keyword.search(text))
            or (thing.value and thing.value.search(text))
            or kinds.intersection(thing.redaction_kinds)
        ):
            found.add(key)
    return found


@dataclass(frozen=True)
class RepeatedAsk:
    """The agent asked at ``asked_turn`` for ``thing``, which the user gave at ``given_turn``."""

    thing: str
    given_turn: int
    asked_turn: int
    message: str
    trace_id: str
    last_turn: int  # the conversation's last user turn (the ask is in it: users stop there)


def _turns(conv: Conversation) -> list[tuple[int, Any]]:
    """Messages with their turn: 1-based count of user messages so far (0 before the first)."""
    turn, out = 0, []
    for m in conv.messages:
        if m.role == "user":
            turn += 1
        out.append((turn, m))
    return out


def repeated_asks(conv: Conversation) -> list[RepeatedAsk]:
    """Every agent request for information an earlier user message or tool result already held."""
    given: dict[str, int] = {}
    out = []
    turned = _turns(conv)
    last_turn = turned[-1][0] if turned else 0
    for turn, m in turned:
        if m.role in ("user", "tool"):
            for thing in given_things(m.content):
                given.setdefault(thing, turn)
        elif m.role == "assistant":
            for thing in sorted(info_requests(m.content)):
                if thing in given:
                    out.append(
                        RepeatedAsk(
                            thing,
                            given[thing],
                            turn,
                            m.content,
                            _trace(m.trace_id, conv),
                            last_turn,
                        )
                    )
    return out


def _trace(trace_id: str, conv: Conversation) -> str:
    return trace_id or (conv.trace_ids[0] if conv.trace_ids else "")


def _is_error(call: Any) -> bool:
    return bool(call.error_type or call.error_message)


def _error_text(call: Any) -> str:
    return " ".join(x for x in (call.error_type, call.error_message) if x)[:MAX_TEXT]


def _is_timeout(text: str) -> bool:
    return re.search(r"time[ _\-]?d?[ _\-]?out", text, re.IGNORECASE) is not None


# ---------------------------------------------------------------------------------------------
# Streaming statistics


def p_greater(n_hi: int, x_hi: int, n_lo: int, x_lo: int) -> float:
    """p-value that the rate ``x_hi/n_hi`` exceeds ``x_lo/n_lo``: the larger of the one-sided
    pooled z-test and the two-sided Fisher exact test.

    The z-test alone is far too eager on the small samples a new version starts with (8 of 19
    against 15% gives z-test p=0.0005, exact p~0.005), and the diagnoser looks again at every
    failure, so it needs the conservative one.
    """
    z, p_two = two_proportion_z(n_lo, x_lo, n_hi, x_hi)
    if z <= 0:
        return 1.0 - p_two / 2
    return max(p_two / 2, fisher_exact(n_lo, x_lo, n_hi, x_hi))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])


@dataclass(frozen=True)
class _Row:
    """What the window keeps of one conversation (small and fixed: no text)."""

    ts_ns: int
    failed: bool
    outcome: str
    outcome_turn: int
    signals: tuple[str, ...]
    versions: tuple[str, str, str]  # prompt_version, model, agent_version
    latency_ms: float
    tokens: int
    tools: tuple[tuple[str, str, bool], ...]  # (tool, argument shape key, errored)


def _row(tag: TagRecord) -> _Row:
    conv = tag.conversation
    tools: tuple[tuple[str, str, bool], ...] = ()
    if conv is not None:
        tools = tuple(
            (c.name, _shape_key(argument_shape(c.arguments)), _is_error(c)) for c in conv.tool_calls
        )
    return _Row(
        ts_ns=tag.ts_ns,
        failed=bool(tag.failed),
        outcome=tag.outcome,
        outcome_turn=tag.outcome_turn,
        signals=tuple(sorted(set(tag.signals))),
        versions=(tag.prompt_version, tag.model, tag.agent_version),
        latency_ms=conv.latency_ms if conv else 0.0,
        tokens=(conv.input_tokens + conv.output_tokens) if conv else 0,
        tools=tools,
    )


def _bump(counter: Counter[Any], key: Any, delta: int) -> None:
    """Add ``delta``; a zero count is deleted, so memory follows the window, not history."""
    v = counter[key] + delta
    if v > 0:
        counter[key] = v
    else:
        del counter[key]


class IntentStats:
    """Streaming statistics of one intent, bounded in memory.

    Counts over the last ``window`` conversations are kept incrementally (added on arrival,
    subtracted on eviction); per-version totals are cumulative (one entry per version, so a
    new version is compared with everything before it); ``failing`` and ``healthy`` keep the
    last ``evidence_size`` conversations of each kind for evidence.
    """

    def __init__(self, intent_id: str, window: int, evidence_size: int, adwin_delta: float) -> None:
        self.intent_id = intent_id
        self.intent_name = intent_id
        self.rows: deque[_Row] = deque()
        self.window = window
        self.failing: deque[TagRecord] = deque(maxlen=evidence_size)
        self.healthy: deque[TagRecord] = deque(maxlen=evidence_size)
        self.n = 0
        self.failures = 0
        self.outcomes: Counter[str] = Counter()
        self.signals: Counter[str] = Counter()
        self.abandon_turns: Counter[int] = Counter()
        self.window_versions: Counter[tuple[str, str, bool]] = Counter()  # (dim, value, failed)
        self.tool_calls: Counter[tuple[str, str]] = Counter()  # (tool, shape)
        self.tool_errors: Counter[tuple[str, str]] = Counter()
        # (dim, value) -> [n, failures, first_seq], cumulative
        self.versions: dict[tuple[str, str], list[int]] = {}
        self.total = 0
        self.total_failures = 0
        self.first_seq = 0
        self.adwin = drift.ADWIN(delta=adwin_delta)
        self.drift_up = False  # ADWIN saw the failure rate rise and no fall since
        self.last_emit_failures = 0  # total_failures when this intent last emitted

    @property
    def rate(self) -> float:
        return self.failures / self.n if self.n else 0.0

    def add(self, tag: TagRecord, seq: int) -> None:
        """Fold one tagged conversation in (``seq``: its position in the whole stream)."""
        if not self.total:
            self.first_seq = seq
        self.intent_name = tag.intent_name or self.intent_name
        self.total += 1
        self.total_failures += bool(tag.failed)
        row = _row(tag)
        self.rows.append(row)
        self._count(row, +1)
        if len(self.rows) > self.window:
            self._count(self.rows.popleft(), -1)
        for dim, value in zip(VERSION_DIMS, row.versions):
            entry = self.versions.setdefault((dim, value), [0, 0, seq])
            entry[0] += 1
            entry[1] += row.failed
        if tag.conversation is not None:
            (self.failing if row.failed else self.healthy).append(tag)
        before = self.adwin.estimation
        self.adwin.update(1.0 if row.failed else 0.0)
        if self.adwin.drift_detected:
            self.drift_up = self.adwin.estimation > before

    def _count(self, row: _Row, sign: int) -> None:
        self.n += sign
        self.failures += sign * row.failed
        _bump(self.outcomes, row.outcome, sign)
        for s in row.signals:
            _bump(self.signals, s, sign)
        if row.failed:
            _bump(self.abandon_turns, row.outcome_turn, sign)
        for dim, value in zip(VERSION_DIMS, row.versions):
            _bump(self.window_versions, (dim, value, row.failed), sign)
        for tool, shape, errored in row.tools:
            _bump(self.tool_calls, (tool, shape), sign)
            if errored:
                _bump(self.tool_errors, (tool, shape), sign)

    def window_bounds(self) -> tuple[int, int]:
        return (self.rows[0].ts_ns, self.rows[-1].ts_ns) if self.rows else (0, 0)

    def newest_version(self, dim: str) -> tuple[str, list[int]] | None:
        """The most recently first-seen value of ``dim`` with its cumulative counts."""
        mine = [(v, e) for (d, v), e in self.versions.items() if d == dim]
        return max(mine, key=lambda ve: ve[1][2]) if mine else None

    def previous_versions(self, dim: str, value: str) -> tuple[int, int, list[str]]:
        """Pooled ``(n, failures, values)`` of the versions of ``dim`` seen before ``value``."""
        first = self.versions[(dim, value)][2]
        prev = [(v, e) for (d, v), e in self.versions.items() if d == dim and e[2] < first]
        return sum(e[0] for _, e in prev), sum(e[1] for _, e in prev), sorted(v for v, _ in prev)

    def version_rates(self, dim: str) -> list[dict[str, Any]]:
        """Window rates per value of ``dim``, most failures first."""
        values = {v for (d, v, _f) in self.window_versions if d == dim}
        out = []
        for v in values:
            n = self.window_versions[(dim, v, True)] + self.window_versions[(dim, v, False)]
            f = self.window_versions[(dim, v, True)]
            out.append({"version": v, "n": n, "failures": f, "rate": round(f / n, 4) if n else 0.0})
        return sorted(out, key=lambda r: (-r["failures"], r["version"]))

    def percentiles(self, attr: str) -> dict[str, float]:
        values = [getattr(r, attr) for r in self.rows]
        return {f"p{q}": round(percentile(values, q), 2) for q in (50, 90, 99)}


# ---------------------------------------------------------------------------------------------
# Evidence and rules


@dataclass
class Candidate:
    """A rule's finding, before it becomes a versioned :class:`Diagnosis`."""

    rule: str
    target: str
    summary: str
    root_cause: str
    component: dict[str, Any]
    confidence: float
    evidence: dict[str, Any]
    trace_ids: list[str]
    variant: str = ""  # part of the id beyond the target (the version of a regression)
    prompt_version: str = ""
    agent_version: str = ""


def diagnosis_id(intent_id: str, rule: str, target: str, variant: str = "") -> str:
    """Stable id of one root cause: the same (intent, rule, target) always maps to the same id."""
    key = f"{intent_id}\x1f{rule}\x1f{target}\x1f{variant}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _unique(items: Iterable[str], limit: int) -> list[str]:
    out: list[str] = []
    for x in items:
        if x and x not in out:
            out.append(x)
            if len(out) == limit:
                break
    return out


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def most_common_text(texts: Iterable[str]) -> tuple[str, int]:
    """The most common text, grouped by :func:`normalize_text`, as first written, with its count.

    >>> most_common_text(["Order 1 failed", "order 2 failed", "timeout"])
    ('Order 1 failed', 2)
    """
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for text in texts:
        key = normalize_text(text)
        if key:
            counts[key] += 1
            first.setdefault(key, " ".join(text.split())[:MAX_TEXT])
    if not counts:
        return "", 0
    key, n = counts.most_common(1)[0]
    return first[key], n


def _last_agent_message(conv: Conversation) -> tuple[str, str]:
    """``(text, trace id)`` of the last assistant message with text."""
    for m in reversed(conv.messages):
        if m.role == "assistant" and m.content.strip():
            return m.content, _trace(m.trace_id, conv)
    return "", ""


def _abandon_turn(tag: TagRecord) -> int:
    if tag.outcome_turn >= 0:
        return tag.outcome_turn
    return len(tag.conversation.user_messages()) if tag.conversation else 0


def common_evidence(st: IntentStats, baseline: float | None) -> dict[str, Any]:
    """Evidence shared by every finding on an intent: rates, stalls, versions, latency."""
    last, last_n = most_common_text(_last_agent_message(t.conversation)[0] for t in st.failing)
    concentration = {}
    for dim in VERSION_DIMS:
        rates = st.version_rates(dim)
        if len(rates) > 1:
            top = rates[0]
            rest_n, rest_f = st.n - top["n"], st.failures - top["failures"]
            concentration[dim] = {
                "version": top["version"],
                "rate": top["rate"],
                "rest_rate": _share(rest_f, rest_n),
            }
    tools: dict[str, dict[str, Any]] = {}
    for (tool, shape), n in st.tool_calls.items():
        entry = tools.setdefault(tool, {"calls": 0, "errors": 0})
        entry["calls"] += n
        entry["errors"] += st.tool_errors[(tool, shape)]
    for entry in tools.values():
        entry["error_rate"] = _share(entry["errors"], entry["calls"])
    repeated_calls = 0
    for t in st.failing:
        calls = Counter((c.name, c.arguments) for c in t.conversation.tool_calls)
        repeated_calls += any(k > 1 for k in calls.values())
    return {
        "support": st.n,
        "failures": st.failures,
        "failure_rate": round(st.rate, 4),
        "failures_total": st.total_failures,
        "conversations_total": st.total,
        "baseline_rate": None if baseline is None else round(baseline, 4),
        "outcomes": dict(st.outcomes),
        "signals": dict(st.signals),
        "abandon_turns": {str(k): v for k, v in sorted(st.abandon_turns.items())},
        "last_agent_message": {
            "text": last,
            "count": last_n,
            "share": _share(last_n, len(st.failing)),
        },
        "versions": {dim: st.version_rates(dim) for dim in VERSION_DIMS},
        "concentration": concentration,
        "latency_ms": st.percentiles("latency_ms"),
        "tokens": st.percentiles("tokens"),
        "tools": tools,
        "repeated_tool_calls": {
            "conversations": repeated_calls,
            "share": _share(repeated_calls, len(st.failing)),
        },
        "evidence_conversations": {"failing": len(st.failing), "healthy": len(st.healthy)},
    }


def _versions_of(tags: Sequence[TagRecord]) -> tuple[str, str]:
    """The prompt and agent versions most of ``tags`` ran under."""
    p = Counter(t.prompt_version for t in tags).most_common(1)
    a = Counter(t.agent_version for t in tags).most_common(1)
    return (p[0][0] if p else "", a[0][0] if a else "")


def rule_repeated_ask(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """The agent asks for a thing the user gave earlier, and users stop in that turn."""
    hits: dict[str, list[tuple[TagRecord, RepeatedAsk]]] = {}
    for t in st.failing:
        seen = set()
        for ask in repeated_asks(t.conversation):
            if ask.asked_turn >= ask.last_turn and ask.thing not in seen:  # users stop right there
                seen.add(ask.thing)
                hits.setdefault(ask.thing, []).append((t, ask))
    out = []
    for thing, found in hits.items():
        healthy = sum(
            any(a.thing == thing for a in repeated_asks(t.conversation)) for t in st.healthy
        )
        share_fail = len(found) / len(st.failing)
        share_ok = _share(healthy, len(st.healthy))
        if (
            len(found) < cfg.min_failures
            or share_fail < cfg.min_evidence_share
            or share_ok > share_fail * HEALTHY_QUESTION_FRACTION
        ):
            continue
        tags = [t for t, _ in found]
        given_turn = Counter(a.given_turn for _, a in found).most_common(1)[0][0]
        asked_turn = Counter(a.asked_turn for _, a in found).most_common(1)[0][0]
        abandon = Counter(_abandon_turn(t) for t in tags).most_common(1)[0][0]
        message = most_common_text(a.message for _, a in found)[0]
        name = THINGS[thing].name
        pv, av = _versions_of(tags)
        out.append(
            Candidate(
                rule="repeated_ask",
                target="system_prompt",
                summary=(
                    f"users abandon {st.intent_name} at turn {abandon} because the agent asks for "
                    f"the {name} they gave at turn {given_turn}"
                ),
                root_cause=(
                    f"the agent does not carry forward the {name} the user already gave and asks "
                    f"for it again (turn {asked_turn}); users leave instead of repeating it"
                ),
                component={
                    "type": "prompt",
                    "target": "system_prompt",
                    "detail": f"carry forward the {name} the user already gave",
                },
                confidence=round(
                    min(1.0, share_fail - share_ok) * min(1.0, len(found) / (2 * cfg.min_failures)),
                    4,
                ),
                evidence={
                    "thing": thing,
                    "thing_name": name,
                    "given_turn": given_turn,
                    "asked_turn": asked_turn,
                    "abandon_turn": abandon,
                    "agent_message": message,
                    "conversations": len(found),
                    "share_failing": round(share_fail, 4),
                    "share_healthy": share_ok,
                },
                trace_ids=_unique((a.trace_id for _, a in reversed(found)), cfg.max_trace_ids),
                variant=thing,
                prompt_version=pv,
                agent_version=av,
            )
        )
    return out


def _harness_fixable(failing: str, working: str) -> bool:
    """A separator the tool wrapper can strip (``1234-5678`` vs ``12345678``): fix the harness."""
    return failing.startswith("digits-with-") and working.startswith("digits(")


def rule_tool_argument(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """A tool fails on one argument shape and works on another, in the failing conversations."""
    out = []
    for tool in sorted({t for t, _ in st.tool_calls}):
        shapes = {
            s: (st.tool_calls[(t, s)], st.tool_errors[(t, s)])
            for t, s in st.tool_calls
            if t == tool
        }
        failing = [
            (e, n, s)
            for s, (n, e) in shapes.items()
            if e >= cfg.min_failures and e / n >= FAILING_SHAPE_RATE
        ]
        working = [
            (n, s)
            for s, (n, e) in shapes.items()
            if n >= cfg.min_failures and e / n <= WORKING_SHAPE_RATE
        ]
        if not failing or not working:
            continue
        f_err, f_n, f_shape = max(failing)
        w_n, w_shape = max(working)
        w_err = shapes[w_shape][1]
        if p_greater(f_n, f_err, w_n, w_err) >= cfg.alpha:
            continue
        examples = [
            (t, c)
            for t in st.failing
            for c in t.conversation.tool_calls
            if c.name == tool
            and _is_error(c)
            and _shape_key(argument_shape(c.arguments)) == f_shape
        ]
        convs = {id(t) for t, _ in examples}
        share_fail = len(convs) / len(st.failing)
        if share_fail < cfg.min_evidence_share:
            continue
        f_args, w_args = json.loads(f_shape), json.loads(w_shape)
        diff = sorted(k for k in set(f_args) | set(w_args) if f_args.get(k) != w_args.get(k))
        argument = diff[0] if diff else "_raw"
        error, _ = most_common_text(_error_text(c) for _, c in examples)
        errors = Counter(normalize_text(_error_text(c)) for _, c in examples)
        f_val, w_val = f_args.get(argument, "absent"), w_args.get(argument, "absent")
        kind = "harness" if _harness_fixable(f_val, w_val) else "prompt"
        tags = [t for t, _ in examples]
        pv, av = _versions_of(tags)
        out.append(
            Candidate(
                rule="tool_argument",
                target=tool,
                summary=(
                    f"{st.intent_name} fails because {tool} rejects {argument} given as {f_val} "
                    f'(it works as {w_val}): "{error}"'
                ),
                root_cause=(
                    f"the agent calls {tool} with {argument} formatted as {f_val}; "
                    f"the tool fails on "
                    f"{f_err}/{f_n} such calls and {w_err}/{w_n} calls with {w_val}"
                ),
                component={
                    "type": kind,
                    "target": tool,
                    "detail": {
                        "argument": argument,
                        "failing_shape": f_val,
                        "working_shape": w_val,
                        "error": error,
                    },
                },
                confidence=round(
                    min(1.0, (f_err / f_n - w_err / w_n) * min(1.0, share_fail / 0.6)), 4
                ),
                evidence={
                    "tool": tool,
                    "argument": argument,
                    "failing_shape": f_args,
                    "working_shape": w_args,
                    "failing_calls": f_n,
                    "failing_errors": f_err,
                    "working_calls": w_n,
                    "working_errors": w_err,
                    "error": error,
                    "errors": dict(errors.most_common(3)),
                    "conversations": len(convs),
                    "share_failing": round(share_fail, 4),
                },
                trace_ids=_unique(
                    (c.trace_id or _trace("", t.conversation) for t, c in reversed(examples)),
                    cfg.max_trace_ids,
                ),
                prompt_version=pv,
                agent_version=av,
            )
        )
    return out


def version_shift(st: IntentStats, cfg: DiagnoseConfig) -> list[dict[str, Any]]:
    """Newest prompt/model/agent versions failing significantly more than the previous ones."""
    out = []
    for dim in VERSION_DIMS:
        newest = st.newest_version(dim)
        if newest is None:
            continue
        value, (n, f, _first) = newest
        prev_n, prev_f, prev_values = st.previous_versions(dim, value)
        if n < cfg.min_version_support or prev_n < cfg.min_version_support or f < cfg.min_failures:
            continue
        rate, prev_rate = f / n, prev_f / prev_n
        if rate < cfg.min_failure_rate or rate - prev_rate < cfg.min_lift:
            continue
        p = p_greater(n, f, prev_n, prev_f)
        if p < cfg.alpha:
            out.append(
                {
                    "dim": dim,
                    "version": value,
                    "n": n,
                    "failures": f,
                    "rate": round(rate, 4),
                    "previous": prev_values,
                    "previous_n": prev_n,
                    "previous_failures": prev_f,
                    "previous_rate": round(prev_rate, 4),
                    "p_value": p,
                }
            )
    return out


_DIM_COMPONENT = {
    "prompt_version": ("prompt_regression", "prompt", "system_prompt", "prompt version"),
    "model": ("version_regression", "config", "model", "model"),
    "agent_version": ("version_regression", "harness", "agent_version", "agent version"),
}


def rule_version_regression(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """The failure rate jumped with the newest prompt version (or model, or agent version)."""
    out = []
    for shift in version_shift(st, cfg):
        rule, kind, target, label = _DIM_COMPONENT[shift["dim"]]
        version = shift["version"]
        dim_index = VERSION_DIMS.index(shift["dim"])
        tags = [
            t
            for t in st.failing
            if (t.prompt_version, t.model, t.agent_version)[dim_index] == version
        ]
        prev = ", ".join(shift["previous"]) or "none"
        out.append(
            Candidate(
                rule=rule,
                target=target,
                summary=(
                    f"{st.intent_name} fails {shift['rate']:.0%} of the time "
                    f"under {label} {version} "
                    f"vs {shift['previous_rate']:.0%} under {prev}"
                ),
                root_cause=(
                    f"the failure rate of {st.intent_name} rose "
                    f"from {shift['previous_rate']:.0%} to "
                    f"{shift['rate']:.0%} when {label} {version} replaced {prev} "
                    f"(one-sided p={shift['p_value']:.2g})"
                ),
                component={
                    "type": kind,
                    "target": target,
                    "detail": {
                        "version": version,
                        "previous": shift["previous"],
                        "rate": shift["rate"],
                        "previous_rate": shift["previous_rate"],
                    },
                },
                confidence=round(
                    min(1.0, (shift["rate"] - shift["previous_rate"]) * 2)
                    * min(1.0, shift["n"] / (2 * cfg.min_version_support)),
                    4,
                ),
                evidence={"version_shift": shift},
                trace_ids=_unique(
                    (_trace("", t.conversation) for t in reversed(tags)), cfg.max_trace_ids
                ),
                variant=version,
                prompt_version=version
                if shift["dim"] == "prompt_version"
                else _versions_of(tags)[0],
                agent_version=version if shift["dim"] == "agent_version" else _versions_of(tags)[1],
            )
        )
    return out


def rule_abandon_after_question(
    st: IntentStats, cfg: DiagnoseConfig, exclude: set[str]
) -> list[Candidate]:
    """Users leave after one specific agent question that healthy conversations rarely show."""
    groups: dict[str, list[tuple[TagRecord, str]]] = {}
    for t in st.failing:
        if t.outcome != "abandoned":
            continue
        text, trace = _last_agent_message(t.conversation)
        if text:
            groups.setdefault(normalize_text(text), []).append((t, trace))
    if not groups:
        return []
    question, found = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    shown = " ".join(_last_agent_message(found[0][0].conversation)[0].split())[:MAX_TEXT]
    share_fail = len(found) / len(st.failing)
    is_question = question.rstrip().endswith("?") or _REQUEST_CUE.search(question) is not None
    healthy = sum(
        any(
            m.role == "assistant" and normalize_text(m.content) == question
            for m in t.conversation.messages
        )
        for t in st.healthy
    )
    share_ok = _share(healthy, len(st.healthy))
    if (
        question in exclude
        or not is_question
        or len(found) < cfg.min_failures
        or share_fail < cfg.min_evidence_share
        or share_ok > share_fail * HEALTHY_QUESTION_FRACTION
    ):
        return []
    tags = [t for t, _ in found]
    turn = Counter(_abandon_turn(t) for t in tags).most_common(1)[0][0]
    pv, av = _versions_of(tags)
    return [
        Candidate(
            rule="abandon_after_question",
            target="system_prompt",
            summary=f'users abandon {st.intent_name} at turn {turn} after the agent asks "{shown}"',
            root_cause=(
                f"{share_fail:.0%} of failing {st.intent_name} conversations end right after this "
                f"agent question, which healthy conversations show {share_ok:.0%} of the time"
            ),
            component={
                "type": "prompt",
                "target": "system_prompt",
                "detail": f'rework or avoid the question "{shown}"',
            },
            confidence=round(
                min(1.0, share_fail - share_ok) * min(1.0, len(found) / (2 * cfg.min_failures)), 4
            ),
            evidence={
                "agent_message": shown,
                "abandon_turn": turn,
                "conversations": len(found),
                "share_failing": round(share_fail, 4),
                "share_healthy": share_ok,
            },
            trace_ids=_unique((tr for _, tr in reversed(found)), cfg.max_trace_ids),
            variant=hashlib.sha256(question.encode()).hexdigest()[:12],
            prompt_version=pv,
            agent_version=av,
        )
    ]


_KEYLIKE = re.compile(r"[A-Za-z][\w.\-]*")


def config_key(texts: Iterable[str]) -> str:
    """The first config-like timeout key in ``texts`` (``read_timeout``, ``http.timeout_s``), or ''.

    >>> config_key(["TimeoutError: search timed out (timeout_s=30)"])
    'timeout_s'
    """
    for text in texts:
        for token in _KEYLIKE.findall(text):
            if "timeout" in token.lower() and ("_" in token or "." in token):
                return token.strip(".-")
    return ""


def _per_call_ms(t: TagRecord) -> float:
    """Latency per model call: long conversations are not slow ones."""
    conv = t.conversation
    return conv.latency_ms / max(1, conv.llm_calls)


def rule_latency(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """Failing conversations hit timeouts, or are much slower than healthy ones."""

    def timeouts(t: TagRecord) -> list[tuple[str, str, str]]:
        conv = t.conversation
        hits = [
            (c.name, _error_text(c), c.trace_id or _trace("", conv))
            for c in conv.tool_calls
            if _is_error(c) and _is_timeout(_error_text(c))
        ]
        hits += [
            (m.tool_name, m.error, _trace(m.trace_id, conv))
            for m in conv.messages
            if m.error and _is_timeout(m.error)
        ]
        return hits

    failing = [(t, timeouts(t)) for t in st.failing]
    hit = [(t, h) for t, h in failing if h]
    share_fail = len(hit) / len(st.failing)
    share_ok = _share(sum(bool(timeouts(t)) for t in st.healthy), len(st.healthy))
    slow_fail = percentile([_per_call_ms(t) for t in st.failing], 50)
    slow_ok = percentile([_per_call_ms(t) for t in st.healthy], 50)
    by_timeouts = (
        len(hit) >= cfg.min_failures
        and share_fail >= cfg.min_evidence_share
        and share_ok <= share_fail * HEALTHY_QUESTION_FRACTION
    )
    by_latency = (
        slow_ok > 0
        and slow_fail >= cfg.latency_ratio * slow_ok
        and len(st.healthy) >= cfg.min_failures
    )
    if not (by_timeouts or by_latency):
        return []
    flat = [x for _, h in hit for x in h]
    tool = Counter(name for name, _, _ in flat if name).most_common(1)
    tool_name = tool[0][0] if tool else ""
    error_text, _ = most_common_text(e for _, e, _ in flat)
    target = config_key([*(e for _, e, _ in flat), tool_name]) or (
        f"{tool_name}.timeout" if tool_name else "timeout"
    )
    durations = [
        c.duration_ms for t, _ in hit for c in t.conversation.tool_calls if c.name == tool_name
    ]
    tags = [t for t, _ in hit] or list(st.failing)
    pv, av = _versions_of(tags)
    if by_timeouts:
        what = f"{tool_name or 'a tool'} times out" + (f' ("{error_text}")' if error_text else "")
    else:
        what = f"model calls take {slow_fail:.0f} ms vs {slow_ok:.0f} ms in healthy conversations"
    return [
        Candidate(
            rule="latency",
            target=target,
            summary=f"users abandon {st.intent_name} when {what}",
            root_cause=(
                f"{share_fail:.0%} of failing {st.intent_name} conversations hit a timeout "
                f"({share_ok:.0%} of healthy ones); median latency per model call "
                f"{slow_fail:.0f} ms failing vs "
                f"{slow_ok:.0f} ms healthy"
            ),
            component={
                "type": "config",
                "target": target,
                "detail": {
                    "tool": tool_name,
                    "error": error_text,
                    "tool_duration_ms_p90": round(percentile(durations, 90), 2),
                    "tool_duration_ms_max": round(max(durations, default=0.0), 2),
                },
            },
            confidence=round(
                min(1.0, max(share_fail - share_ok, 1 - slow_ok / slow_fail if slow_fail else 0.0)),
                4,
            ),
            evidence={
                "timeout_conversations": len(hit),
                "share_failing": round(share_fail, 4),
                "share_healthy": share_ok,
                "tool": tool_name,
                "error": error_text,
                "latency_p50_failing_ms": slow_fail,
                "latency_p50_healthy_ms": slow_ok,
            },
            trace_ids=_unique((tr for _, h in reversed(hit) for _, _, tr in h), cfg.max_trace_ids)
            or _unique(
                (_trace("", t.conversation) for t in reversed(st.failing)), cfg.max_trace_ids
            ),
            prompt_version=pv,
            agent_version=av,
        )
    ]


def run_rules(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """Every rule's findings on ``st``, strongest first (none without failing conversations)."""
    if not st.failing:
        return []
    asks = rule_repeated_ask(st, cfg)
    exclude = {normalize_text(c.evidence["agent_message"]) for c in asks}
    found = (
        asks
        + rule_tool_argument(st, cfg)
        + rule_version_regression(st, cfg)
        + rule_abandon_after_question(st, cfg, exclude)
        + rule_latency(st, cfg)
    )
    return sorted(found, key=lambda c: (-c.confidence, c.rule, c.target))


# ---------------------------------------------------------------------------------------------
# The LLM path


class ChatJSON(Protocol):
    """What the diagnoser needs of :class:`processors.llm.LLM`."""

    def chat_json(
        self, system: str, user: str, schema_hint: str, *, required: tuple[str, ...] = ()
    ) -> dict[str, Any]: ...


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
    traces = _unique((tr for c in cands for tr in c.trace_ids), 20)
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


# ---------------------------------------------------------------------------------------------
# The diagnoser


@dataclass
class _Emitted:
    diagnosis: Diagnosis
    total_failures: int  # the intent's cumulative failures when last emitted


@dataclass
class _State:
    intents: dict[str, IntentStats] = field(default_factory=dict)
    diagnoses: dict[str, _Emitted] = field(default_factory=dict)
    seq: int = 0
    total_n: int = 0  # window counts summed over intents (for the other-intents baseline)
    total_f: int = 0


class Diagnoser:
    """Streaming diagnoser: feed tagged conversations, get new or updated diagnoses.

    ``llm``: an object with ``chat_json`` (:class:`processors.llm.LLM`), or ``None`` for the
    deterministic rules only. ``llm_rejections`` counts LLM answers that fell back to a rule.
    """

    def __init__(self, cfg: DiagnoseConfig, llm: ChatJSON | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.llm = llm
        self.llm_rejections: list[str] = []
        self._s = _State()

    # -- feeding

    def observe(self, tag: TagRecord, now_ns: int) -> list[Diagnosis]:
        """Fold ``tag`` in; return the diagnoses it creates or materially updates.

        Raises :class:`InputError` for a tag without an intent (the agent dead-letters it).
        """
        if not tag.intent_id:
            raise InputError(
                "tag record without intent_id", stage=STAGE, detail=tag.conversation_id
            )
        s = self._s
        s.seq += 1
        st = s.intents.get(tag.intent_id)
        if st is None:
            st = s.intents[tag.intent_id] = IntentStats(
                tag.intent_id, self.cfg.window, self.cfg.evidence_size, self.cfg.adwin_delta
            )
        n0, f0 = st.n, st.failures
        st.add(tag, s.seq)
        s.total_n += st.n - n0
        s.total_f += st.failures - f0
        # Evidence only grows with failures; after an emission wait until it grew materially.
        if not tag.failed or (st.last_emit_failures and not self._grown(st, st.last_emit_failures)):
            return []
        reasons = self.triggers(st)
        if not reasons:
            return []
        return self._evaluate(st, reasons, now_ns, force=False)

    def diagnose_now(self, intent_id: str, now_ns: int) -> list[Diagnosis]:
        """Run the rules on one intent now, whatever the triggers say (minimum support holds)."""
        st = self._s.intents.get(intent_id)
        if st is None or not self._enough(st):
            return []
        return self._evaluate(st, self.triggers(st) or ["requested"], now_ns, force=True)

    # -- triggers

    def _enough(self, st: IntentStats) -> bool:
        return st.n >= self.cfg.min_support and st.failures >= self.cfg.min_failures

    def _baseline_counts(self, st: IntentStats) -> tuple[int, int]:
        """Window counts of the other intents that are healthy (rate under ``min_failure_rate``).

        Intents that fail themselves are left out: several broken intents would otherwise
        lift the norm and hide each other.
        """
        n = f = 0
        for other in self._s.intents.values():
            if other is st or not other.n or other.rate >= self.cfg.min_failure_rate:
                continue
            n += other.n
            f += other.failures
        return n, f

    def baseline(self, st: IntentStats) -> float | None:
        """The pooled window failure rate of the other, healthy intents (``None``: too few of them)."""
        n, f = self._baseline_counts(st)
        return f / n if n >= self.cfg.min_support else None

    def triggers(self, st: IntentStats) -> list[str]:
        """Why ``st`` deserves a diagnosis now (empty: it does not)."""
        cfg = self.cfg
        if not self._enough(st):
            return []
        reasons = []
        high = st.rate >= cfg.min_failure_rate
        base = self.baseline(st)
        base_n, base_f = self._baseline_counts(st)
        if high and (
            base is None
            or (
                st.rate - base >= cfg.min_lift
                and p_greater(st.n, st.failures, base_n, base_f) < cfg.alpha
            )
        ):
            reasons.append("high_vs_baseline")
        if st.drift_up and st.adwin.estimation >= cfg.min_failure_rate:
            reasons.append("drift")
        if version_shift(st, cfg):
            reasons.append("version_shift")
        since = self._s.seq - st.first_seq + 1
        if high and st.first_seq > cfg.emergence_warmup and st.total / since >= cfg.emergence_share:
            reasons.append("emergence")
        return reasons

    # -- evaluation and emission

    def _evaluate(
        self, st: IntentStats, reasons: list[str], now_ns: int, force: bool
    ) -> list[Diagnosis]:
        cands = run_rules(st, self.cfg)
        if not cands:
            return []
        common = common_evidence(st, self.baseline(st))
        common["trigger"] = reasons
        out = []
        for i, c in enumerate(cands):
            did = diagnosis_id(st.intent_id, c.rule, c.target, c.variant)
            if not self._should_emit(did, st, force):
                continue
            if i == 0 and self.llm is not None:
                better, why = llm_candidate(self.llm, st, common, cands)
                if better is None:
                    self.llm_rejections.append(why)
                else:
                    c, did = better, diagnosis_id(st.intent_id, better.rule, better.target)
            out.append(self._record(did, st, c, common, now_ns))
        if out:
            st.last_emit_failures = st.total_failures
        return out

    def _should_emit(self, did: str, st: IntentStats, force: bool) -> bool:
        prev = self._s.diagnoses.get(did)
        if prev is None:
            return True
        if prev.diagnosis.status == "rejected":
            return False  # a human said no: the same finding is not raised again
        if force:
            return True
        return self._grown(st, prev.total_failures)

    def _grown(self, st: IntentStats, then: int) -> bool:
        """Failures grew materially since ``then``: by ``reemit_growth`` and ``min_failures``."""
        return st.total_failures >= then + max(then * self.cfg.reemit_growth, self.cfg.min_failures)

    def _record(
        self, did: str, st: IntentStats, c: Candidate, common: dict[str, Any], now_ns: int
    ) -> Diagnosis:
        prev = self._s.diagnoses.get(did)
        lo, hi = st.window_bounds()
        base = common["baseline_rate"]
        shift = c.evidence.get("version_shift")
        if shift:  # a regression's baseline is the previous versions, not the other intents
            base = shift["previous_rate"]
        d = Diagnosis(
            diagnosis_id=did,
            intent_id=st.intent_id,
            intent_name=st.intent_name,
            rule=c.rule,
            summary=c.summary,
            root_cause=c.root_cause,
            component=c.component,
            confidence=c.confidence,
            evidence={**common, **c.evidence},
            trace_ids=c.trace_ids,
            support=st.n,
            failures=st.failures,
            failure_rate=round(st.rate, 4),
            baseline_rate=base or 0.0,
            prompt_version=c.prompt_version,
            agent_version=c.agent_version,
            window_from_ns=lo,
            window_to_ns=hi,
            status="open"
            if prev is None or prev.diagnosis.status == "resolved"
            else prev.diagnosis.status,
            version=1 if prev is None else prev.diagnosis.version + 1,
            updated_ns=now_ns,
        )
        self._s.diagnoses[did] = _Emitted(d, st.total_failures)
        return d

    # -- inspection and state

    def open_diagnoses(self) -> list[Diagnosis]:
        """The latest version of every open or proposed diagnosis, by intent then id."""
        ds = [
            e.diagnosis for e in self._s.diagnoses.values() if e.diagnosis.status in OPEN_STATUSES
        ]
        return sorted(ds, key=lambda d: (d.intent_id, d.diagnosis_id))

    def set_status(self, diagnosis_id: str, status: str, now_ns: int) -> Diagnosis:
        """Record a status change from act/review (``proposed``, ``resolved``, ``rejected``)."""
        if status not in ("open", "proposed", "resolved", "rejected"):
            raise ValueError(f"unknown diagnosis status {status!r}")
        e = self._s.diagnoses.get(diagnosis_id)
        if e is None:
            raise KeyError(diagnosis_id)
        e.diagnosis = replace(
            e.diagnosis, status=status, version=e.diagnosis.version + 1, updated_ns=now_ns
        )
        return e.diagnosis

    def intent_stats(self, intent_id: str) -> IntentStats | None:
        return self._s.intents.get(intent_id)

    def snapshot(self) -> bytes:
        """The whole state (config included, LLM client excluded) as bytes for a checkpoint.

        Pickle, so only restore snapshots this process family wrote (a trusted changelog).
        """
        return zlib.compress(
            pickle.dumps((SNAPSHOT_FORMAT, self.cfg, self._s), protocol=pickle.HIGHEST_PROTOCOL)
        )

    @classmethod
    def restore(cls, data: bytes, llm: ChatJSON | None = None) -> Diagnoser:
        """A diagnoser in the state of :meth:`snapshot`."""
        try:
            fmt, cfg, state = pickle.loads(zlib.decompress(data))
        except (zlib.error, pickle.UnpicklingError, ValueError, EOFError) as e:
            raise InputError("unreadable diagnoser snapshot", stage=STAGE, detail=str(e)) from None
        if fmt != SNAPSHOT_FORMAT:
            raise InputError(
                f"diagnoser snapshot format {fmt}, expected {SNAPSHOT_FORMAT}", stage=STAGE
            )
        d = cls(cfg, llm)
        d._s = state
        return d


def diagnosis_rows(diags: Iterable[Diagnosis]) -> list[dict[str, Any]]:
    """Rows for the ``diagnoses`` table (schemas/003_loop.sql), component and evidence as JSON."""
    rows = []
    for d in diags:
        row = {f: getattr(d, f) for f in DIAGNOSIS_COLUMNS}
        row["component"] = json.dumps(d.component, ensure_ascii=False, sort_keys=True, default=str)
        row["evidence"] = json.dumps(d.evidence, ensure_ascii=False, sort_keys=True, default=str)
        rows.append(row)
    return rows


DIAGNOSIS_COLUMNS = (
    "diagnosis_id",
    "intent_id",
    "intent_name",
    "rule",
    "summary",
    "root_cause",
    "component",
    "confidence",
    "evidence",
    "trace_ids",
    "support",
    "failures",
    "failure_rate",
    "baseline_rate",
    "prompt_version",
    "agent_version",
    "window_from_ns",
    "window_to_ns",
    "status",
    "version",
    "updated_ns",
)
