"""Evidence and the five deterministic rules: from an intent's window to candidate root causes."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.config import DiagnoseConfig
from processors.diagnose.asks import REQUEST_CUE, THINGS, RepeatedAsk, repeated_asks, trace_of
from processors.diagnose.shapes import (
    MAX_TEXT,
    argument_shape,
    call_error,
    call_failed,
    is_timeout,
    normalize_text,
    shape_key,
)
from processors.diagnose.window import VERSION_DIMS, IntentStats, p_greater, percentile
from processors.records import Conversation, TagRecord

# A tool argument shape "fails" at this error rate or above and "works" at this one or below.
FAILING_SHAPE_RATE = 0.5
WORKING_SHAPE_RATE = 0.1
# The agent message before abandonment is "the" question only if healthy conversations show it
# at most this fraction as often (otherwise everyone sees it and most users go on).
HEALTHY_QUESTION_FRACTION = 0.5


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
    # every failing conversation the finding explains (diagnosis_conversations), not a sample
    explains: list[dict[str, Any]] = field(default_factory=list)


def explained(hits: Iterable[tuple[TagRecord, int, str, str]]) -> list[dict[str, Any]]:
    """``(tag, turn, trace id, tool)`` per hit -> one row per conversation, its first hit."""
    out: dict[str, dict[str, Any]] = {}
    for t, turn, trace, tool in hits:
        out.setdefault(
            t.conversation_id,
            {"conversation_id": t.conversation_id, "turn": turn, "trace_id": trace,
             "tool": tool, "arguments": ""},
        )  # fmt: skip
    return list(out.values())


def first_unique(items: Iterable[str], limit: int) -> list[str]:
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
            return m.content, trace_of(m.trace_id, conv)
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
                    "conversation_count": len(found),
                    "share_failing": round(share_fail, 4),
                    "share_healthy": share_ok,
                },
                trace_ids=first_unique((a.trace_id for _, a in reversed(found)), cfg.max_trace_ids),
                explains=explained((t, a.asked_turn, a.trace_id, "") for t, a in found),
                variant=thing,
                prompt_version=pv,
                agent_version=av,
            )
        )
    return out


def _harness_fixable(failing: str, working: str) -> bool:
    """A separator the tool wrapper can strip (``1234-5678`` vs ``12345678``): fix the harness."""
    return failing.startswith("digits-with-") and working.startswith("digits(")


@dataclass(frozen=True)
class _ShapeContrast:
    """A tool's most failing argument shape against its most used working one."""

    failing: str  # shape key
    failing_calls: int
    failing_errors: int
    working: str
    working_calls: int
    working_errors: int


def _shape_contrast(st: IntentStats, cfg: DiagnoseConfig, tool: str) -> _ShapeContrast | None:
    """The contrast of ``tool``'s shapes when it is significant, else ``None``."""
    shapes = {
        s: (st.tool_calls[(t, s)], st.tool_errors[(t, s)]) for t, s in st.tool_calls if t == tool
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
        return None
    f_err, f_n, f_shape = max(failing)
    w_n, w_shape = max(working)
    w_err = shapes[w_shape][1]
    if p_greater(f_n, f_err, w_n, w_err) >= cfg.alpha:
        return None
    return _ShapeContrast(f_shape, f_n, f_err, w_shape, w_n, w_err)


def rule_tool_argument(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """A tool fails on one argument shape and works on another, in the failing conversations."""
    out = []
    for tool in sorted({t for t, _ in st.tool_calls}):
        sc = _shape_contrast(st, cfg, tool)
        if sc is None:
            continue
        examples = [
            (t, c)
            for t in st.failing
            for c in t.conversation.tool_calls
            if c.name == tool
            and call_failed(c)
            and shape_key(argument_shape(c.arguments)) == sc.failing
        ]
        share_fail = len({id(t) for t, _ in examples}) / len(st.failing)
        if share_fail >= cfg.min_evidence_share:
            out.append(_tool_argument_candidate(st, cfg, tool, sc, examples, share_fail))
    return out


def _tool_argument_candidate(
    st: IntentStats,
    cfg: DiagnoseConfig,
    tool: str,
    sc: _ShapeContrast,
    examples: list[tuple[TagRecord, Any]],
    share_fail: float,
) -> Candidate:
    """The finding on ``tool``: the first argument whose shape differs, and the tool's error."""
    f_args, w_args = json.loads(sc.failing), json.loads(sc.working)
    diff = sorted(k for k in set(f_args) | set(w_args) if f_args.get(k) != w_args.get(k))
    argument = diff[0] if diff else "_raw"
    error, _ = most_common_text(call_error(c) for _, c in examples)
    errors = Counter(normalize_text(call_error(c)) for _, c in examples)
    f_val, w_val = f_args.get(argument, "absent"), w_args.get(argument, "absent")
    f_err, f_n, w_err, w_n = (
        sc.failing_errors,
        sc.failing_calls,
        sc.working_errors,
        sc.working_calls,
    )
    pv, av = _versions_of([t for t, _ in examples])
    return Candidate(
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
            "type": "harness" if _harness_fixable(f_val, w_val) else "prompt",
            "target": tool,
            "detail": {
                "argument": argument,
                "failing_shape": f_val,
                "working_shape": w_val,
                "error": error,
            },
        },
        confidence=round(min(1.0, (f_err / f_n - w_err / w_n) * min(1.0, share_fail / 0.6)), 4),
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
            "conversation_count": len({id(t) for t, _ in examples}),
            "share_failing": round(share_fail, 4),
        },
        trace_ids=first_unique(
            (c.trace_id or trace_of("", t.conversation) for t, c in reversed(examples)),
            cfg.max_trace_ids,
        ),
        explains=explained(
            (t, t.outcome_turn, c.trace_id or trace_of("", t.conversation), tool)
            for t, c in examples
        ),
        prompt_version=pv,
        agent_version=av,
    )


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
                trace_ids=first_unique(
                    (trace_of("", t.conversation) for t in reversed(tags)), cfg.max_trace_ids
                ),
                explains=explained(
                    (t, t.outcome_turn, trace_of("", t.conversation), "") for t in tags
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
    is_question = question.rstrip().endswith("?") or REQUEST_CUE.search(question) is not None
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
                "conversation_count": len(found),
                "share_failing": round(share_fail, 4),
                "share_healthy": share_ok,
            },
            trace_ids=first_unique((tr for _, tr in reversed(found)), cfg.max_trace_ids),
            explains=explained((t, _abandon_turn(t), tr, "") for t, tr in found),
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


def _timeouts(t: TagRecord) -> list[tuple[str, str, str]]:
    """``(tool, error, trace id)`` of every timeout in ``t``'s conversation."""
    conv = t.conversation
    hits = [
        (c.name, call_error(c), c.trace_id or trace_of("", conv))
        for c in conv.tool_calls
        if call_failed(c) and is_timeout(call_error(c))
    ]
    hits += [
        (m.tool_name, m.error, trace_of(m.trace_id, conv))
        for m in conv.messages
        if m.error and is_timeout(m.error)
    ]
    return hits


@dataclass
class _Slowness:
    """Timeouts and latency per model call, failing against healthy conversations."""

    hit: list[tuple[TagRecord, list[tuple[str, str, str]]]]  # failing conversations with timeouts
    share_fail: float
    share_ok: float
    slow_fail: float
    slow_ok: float
    by_timeouts: bool
    by_latency: bool


def _slowness(st: IntentStats, cfg: DiagnoseConfig) -> _Slowness:
    hit = [(t, h) for t, h in ((t, _timeouts(t)) for t in st.failing) if h]
    share_fail = len(hit) / len(st.failing)
    share_ok = _share(sum(bool(_timeouts(t)) for t in st.healthy), len(st.healthy))
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
    return _Slowness(hit, share_fail, share_ok, slow_fail, slow_ok, by_timeouts, by_latency)


def _slow_conversations(
    st: IntentStats, cfg: DiagnoseConfig, sl: _Slowness
) -> list[dict[str, Any]]:
    """The failing conversations the latency finding explains: those with a timeout, else
    those ``latency_ratio`` times slower per model call than the healthy median."""
    return explained(
        [(t, t.outcome_turn, h[0][2], h[0][0]) for t, h in sl.hit]
        or [
            (t, t.outcome_turn, trace_of("", t.conversation), "")
            for t in st.failing
            if _per_call_ms(t) >= cfg.latency_ratio * sl.slow_ok
        ]
    )


def rule_latency(st: IntentStats, cfg: DiagnoseConfig) -> list[Candidate]:
    """Failing conversations hit timeouts, or are much slower than healthy ones."""
    sl = _slowness(st, cfg)
    if not (sl.by_timeouts or sl.by_latency):
        return []
    flat = [x for _, h in sl.hit for x in h]
    tool = Counter(name for name, _, _ in flat if name).most_common(1)
    tool_name = tool[0][0] if tool else ""
    error_text, _ = most_common_text(e for _, e, _ in flat)
    target = config_key([*(e for _, e, _ in flat), tool_name]) or (
        f"{tool_name}.timeout" if tool_name else "timeout"
    )
    durations = [
        c.duration_ms for t, _ in sl.hit for c in t.conversation.tool_calls if c.name == tool_name
    ]
    tags = [t for t, _ in sl.hit] or list(st.failing)
    pv, av = _versions_of(tags)
    if sl.by_timeouts:
        what = f"{tool_name or 'a tool'} times out" + (f' ("{error_text}")' if error_text else "")
    else:
        what = (
            f"model calls take {sl.slow_fail:.0f} ms vs {sl.slow_ok:.0f} ms "
            "in healthy conversations"
        )
    return [
        Candidate(
            rule="latency",
            target=target,
            summary=f"users abandon {st.intent_name} when {what}",
            root_cause=(
                f"{sl.share_fail:.0%} of failing {st.intent_name} conversations hit a timeout "
                f"({sl.share_ok:.0%} of healthy ones); median latency per model call "
                f"{sl.slow_fail:.0f} ms failing vs "
                f"{sl.slow_ok:.0f} ms healthy"
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
                min(
                    1.0,
                    max(
                        sl.share_fail - sl.share_ok,
                        1 - sl.slow_ok / sl.slow_fail if sl.slow_fail else 0.0,
                    ),
                ),
                4,
            ),
            evidence={
                "timeout_conversations": len(sl.hit),
                "share_failing": round(sl.share_fail, 4),
                "share_healthy": sl.share_ok,
                "tool": tool_name,
                "error": error_text,
                "latency_p50_failing_ms": sl.slow_fail,
                "latency_p50_healthy_ms": sl.slow_ok,
            },
            trace_ids=first_unique(
                (tr for _, h in reversed(sl.hit) for _, _, tr in h), cfg.max_trace_ids
            )
            or first_unique(
                (trace_of("", t.conversation) for t in reversed(st.failing)), cfg.max_trace_ids
            ),
            explains=_slow_conversations(st, cfg, sl),
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
