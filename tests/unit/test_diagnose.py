from __future__ import annotations

import json
import random
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest

from bench.diagnose import HEALTHY, SyntheticStream, false_alarms, mixed
from processors.config import DiagnoseConfig, LLMConfig
from processors.diagnose.asks import given_things, info_requests, repeated_asks
from processors.diagnose.core import DIAGNOSIS_COLUMNS, Diagnoser, diagnosis_id, diagnosis_rows
from processors.diagnose.shapes import argument_shape, value_shape
from processors.diagnose.window import IntentStats
from processors.errors import ConfigError, InputError
from processors.llm import LLM, UNTRUSTED_RULE
from processors.records import Conversation, Diagnosis, Message, TagRecord, ToolCall
from tests.ddl import ddl_columns
from tests.llm_server import FakeLLMServer

CFG = DiagnoseConfig()


def feed(d: Diagnoser, tags: list[TagRecord]) -> list[Diagnosis]:
    out = []
    for t in tags:
        out += d.observe(t, t.ts_ns)
    return out


def planted(
    intent: str,
    pattern: str,
    *,
    n: int = 1500,
    rate: float = 0.4,
    seed: int = 0,
) -> tuple[Diagnoser, list[Diagnosis], dict[str, TagRecord]]:
    """``pattern`` planted in ``intent`` among healthy ones: diagnoser, emissions, tags by trace."""
    tags = mixed(SyntheticStream(seed), n, {**HEALTHY, intent: rate}, patterns={intent: pattern})
    d = Diagnoser(CFG)
    out = feed(d, tags)
    by_trace = {tr: t for t in tags for tr in t.conversation.trace_ids}
    return d, out, by_trace


def in_trace(tag: TagRecord, trace: str) -> tuple[list[Message], list[Any]]:
    conv = tag.conversation
    return [m for m in conv.messages if m.trace_id == trace], [
        c for c in conv.tool_calls if c.trace_id == trace
    ]


def only(out: list[Diagnosis]) -> Diagnosis:
    """The one root cause emitted (possibly several versions of it): its latest version."""
    assert out
    assert {d.diagnosis_id for d in out} == {out[0].diagnosis_id}, [
        (d.intent_id, d.rule) for d in out
    ]
    return max(out, key=lambda d: d.version)


# -- shapes and the ask/give lexicon


@pytest.mark.parametrize(
    "value, shape",
    [
        ("12345678", "digits(8)"),
        ("ACC-1234-5678", "alnum-with-dash"),
        ("1234-5678", "digits-with-dash(8)"),
        ("bob@example.com", "email"),
        ("[REDACTED:secret]", "redacted(secret)"),
        ("2024-01-31", "date(iso)"),
        ("abc", "alpha"),
        ("ab12", "alnum"),
        ("hello world!", "text"),
        ("", "empty"),
        (7, "int"),
        (1.5, "float"),
        (True, "bool"),
        (None, "null"),
        ([1], "list"),
        ({"a": 1}, "object"),
    ],
)
def test_value_shape(value: Any, shape: str) -> None:
    assert value_shape(value) == shape


def test_argument_shape_keys_and_non_json() -> None:
    assert argument_shape('{"b": "12", "a": "x-1"}') == {"a": "alnum-with-dash", "b": "digits(2)"}
    assert argument_shape("not json") == {"_raw": "text"}
    assert argument_shape("") == {}


def test_info_requests_need_a_question_or_request() -> None:
    assert info_requests("Please provide your API key.") == {"api_key"}
    assert info_requests("What's your order number?") == {"order_number"}
    assert info_requests("Your API key was rotated yesterday.") == set()
    assert (
        info_requests("Please wait while I check order number 12345.") == set()
    )  # states, not asks


def test_given_things_counts_redacted_values() -> None:
    assert given_things("my API key is [REDACTED:secret]") == {"api_key"}
    assert given_things("reach me at [REDACTED:email]") == {"email"}
    assert given_things("my account number is 12345678") == {"account_id"}
    assert given_things("I don't know my account number") == set()
    assert given_things('{"account_id": "12345678"}') == {"account_id"}  # a tool result


def test_repeated_asks_finds_turns() -> None:
    conv = Conversation(
        conversation_id="c",
        messages=[
            Message("user", "hi, my API key is [REDACTED:secret]", trace_id="t1"),
            Message("assistant", "Thanks, checking.", trace_id="t1"),
            Message("user", "and?", trace_id="t2"),
            Message("assistant", "Could you share your API key?", trace_id="t2"),
        ],
    )
    (ask,) = repeated_asks(conv)
    assert (ask.thing, ask.given_turn, ask.asked_turn, ask.trace_id, ask.last_turn) == (
        "api_key",
        1,
        2,
        "t2",
        2,
    )


# -- each planted pattern gives exactly its diagnosis


def test_repeated_ask_planted_among_healthy_intents() -> None:
    _, out, by_trace = planted("api_setup", "repeated_ask")
    d = only(out)
    assert (d.intent_id, d.rule) == ("api_setup", "repeated_ask")
    assert (
        d.summary == "users abandon api setup at turn 2 because the agent asks for the API key "
        "they gave at turn 1"
    )
    assert d.component == {
        "type": "prompt",
        "target": "system_prompt",
        "detail": "carry forward the API key the user already gave",
    }
    assert d.evidence["given_turn"] == 1 and d.evidence["abandon_turn"] == 2
    assert d.evidence["agent_message"] == "Please provide your API key so I can continue."
    assert 1 <= len(d.trace_ids) <= 10
    for tr in d.trace_ids:
        tag = by_trace[tr]
        msgs, _ = in_trace(tag, tr)
        assert tag.failed and tag.intent_id == "api_setup"
        assert any(m.role == "assistant" and "api_key" in info_requests(m.content) for m in msgs)
    assert d.support >= CFG.min_support and d.failures >= CFG.min_failures
    assert d.failure_rate > d.baseline_rate


def test_tool_argument_planted_names_tool_argument_and_shapes() -> None:
    _, out, by_trace = planted("account_lookup", "tool_argument")
    d = only(out)
    assert (d.intent_id, d.rule) == ("account_lookup", "tool_argument")
    assert d.component == {
        "type": "prompt",
        "target": "get_account",
        "detail": {
            "argument": "account_id",
            "failing_shape": "alnum-with-dash",
            "working_shape": "digits(8)",
            "error": "ValidationError account_id must be 8 digits",
        },
    }
    assert d.evidence["failing_shape"] == {"account_id": "alnum-with-dash", "verbose": "bool"}
    for tr in d.trace_ids:
        _, calls = in_trace(by_trace[tr], tr)
        assert any(
            c.name == "get_account" and c.error_type and "ACC-" in c.arguments for c in calls
        )


def test_abandon_after_question_planted() -> None:
    _, out, by_trace = planted("cancel_subscription", "question")
    d = only(out)
    assert (d.intent_id, d.rule) == ("cancel_subscription", "abandon_after_question")
    assert d.summary == (
        "users abandon cancel subscription at turn 1 after the agent asks "
        '"Before I cancel, can you tell me why you want to leave?"'
    )
    for tr in d.trace_ids:
        msgs, _ = in_trace(by_trace[tr], tr)
        assert msgs[-1].content == "Before I cancel, can you tell me why you want to leave?"


def test_latency_planted_names_the_timeout_key() -> None:
    _, out, by_trace = planted("docs_search", "timeout")
    d = only(out)
    assert (d.intent_id, d.rule) == ("docs_search", "latency")
    assert d.component["type"] == "config" and d.component["target"] == "search.timeout_s"
    assert d.component["detail"]["tool"] == "search_docs"
    assert d.component["detail"]["tool_duration_ms_p90"] == 30000.0
    for tr in d.trace_ids:
        _, calls = in_trace(by_trace[tr], tr)
        assert any(c.error_type == "TimeoutError" for c in calls)


def test_prompt_regression_at_version_change() -> None:
    stream = SyntheticStream(3)
    before = mixed(stream, 1500, HEALTHY)
    after = mixed(stream, 800, {**HEALTHY, "refund": 0.4}, prompt_version="v2")
    d = Diagnoser(CFG)
    assert feed(d, before) == []
    out = feed(d, after)
    diag = only(out)
    assert (diag.intent_id, diag.rule, diag.prompt_version) == ("refund", "prompt_regression", "v2")
    assert diag.component["type"] == "prompt" and diag.component["target"] == "system_prompt"
    detail = diag.component["detail"]
    assert (detail["version"], detail["previous"]) == ("v2", ["v1"])
    assert diag.baseline_rate < 0.15 and detail["rate"] > 0.25
    assert "version_shift" in diag.evidence["trigger"]
    by_trace = {tr: t for t in after for tr in t.conversation.trace_ids}
    for tr in diag.trace_ids:
        tag = by_trace[tr]
        assert tag.intent_id == "refund" and tag.failed and tag.prompt_version == "v2"
    # a new, bad intent first seen late is diagnosed as emerging too
    late = mixed(
        stream,
        600,
        {**HEALTHY, "export_data": 0.5},
        patterns={"export_data": "question"},
        prompt_version="v2",
    )
    new = [x for x in feed(d, late) if x.intent_id == "export_data"]
    assert (
        new
        and new[0].rule == "abandon_after_question"
        and "emergence" in new[0].evidence["trigger"]
    )


def test_failure_present_since_start_is_diagnosed_even_without_drift() -> None:
    d, out, _ = planted("api_setup", "repeated_ask", n=900, rate=0.35, seed=7)
    assert only(out).intent_id == "api_setup"
    st = d.intent_stats("api_setup")
    assert st is not None and not st.drift_up


# -- no false alarms


def test_clean_control_raises_nothing() -> None:
    d = Diagnoser(CFG)
    assert feed(d, mixed(SyntheticStream(11), 3000, HEALTHY)) == []
    assert d.open_diagnoses() == []
    assert d.diagnose_now("billing", 0) == []


def test_long_stable_stream_raises_nothing() -> None:
    alarms, _ = false_alarms(5, CFG, 20_000)
    assert alarms == 0


def test_adwin_flags_a_rising_failure_rate() -> None:
    stream = SyntheticStream(2)
    st = IntentStats("refund", 500, 50, CFG.adwin_delta)
    for i in range(1000):
        st.add(stream.tag("refund", failed=stream.rng.random() < 0.05), i)
    assert not st.drift_up
    for i in range(400):
        st.add(stream.tag("refund", failed=stream.rng.random() < 0.4), 1000 + i)
    assert st.drift_up
    assert len(st.rows) == 500 and len(st.failing) == 50 and len(st.healthy) == 50  # bounded


# -- identity, updates, state


def test_more_evidence_updates_the_same_diagnosis() -> None:
    stream = SyntheticStream(4)
    rates, patterns = {**HEALTHY, "api_setup": 0.4}, {"api_setup": "repeated_ask"}
    d = Diagnoser(CFG)
    first = feed(d, mixed(stream, 700, rates, patterns=patterns))
    later = feed(d, mixed(stream, 2500, rates, patterns=patterns))
    assert first and later
    did = first[0].diagnosis_id
    assert did == diagnosis_id("api_setup", "repeated_ask", "system_prompt", "api_key")
    assert {x.diagnosis_id for x in later} == {did}
    versions = [x.version for x in first + later]
    assert versions == list(range(1, len(versions) + 1))
    # re-emitted only when failures grew materially: by 25% and by at least min_failures each time
    grown = [x.evidence["failures_total"] for x in first + later]
    assert all(b >= a + max(a * CFG.reemit_growth, CFG.min_failures) for a, b in pairwise(grown))
    (open_,) = d.open_diagnoses()
    assert open_.version == versions[-1]
    # diagnose_now answers the same root cause, and a rejected one is not raised again
    (now,) = d.diagnose_now("api_setup", 1)
    assert now.diagnosis_id == did and now.version == versions[-1] + 1
    d.set_status(did, "rejected", 2)
    assert feed(d, mixed(stream, 1500, rates, patterns=patterns)) == []
    assert d.open_diagnoses() == []


def test_snapshot_restore_round_trip() -> None:
    stream = SyntheticStream(9)
    rates, patterns = {**HEALTHY, "account_lookup": 0.4}, {"account_lookup": "tool_argument"}
    first, rest = (
        mixed(stream, 400, rates, patterns=patterns),
        mixed(stream, 1500, rates, patterns=patterns),
    )
    a = Diagnoser(CFG)
    feed(a, first)
    b = Diagnoser(CFG)
    b.restore(a.snapshot())
    out_a, out_b = feed(a, rest), feed(b, rest)
    assert out_a and [x.to_dict() for x in out_a] == [x.to_dict() for x in out_b]
    assert a.open_diagnoses() == b.open_diagnoses()
    with pytest.raises(InputError, match="snapshot"):
        Diagnoser(CFG).restore(b"garbage")


def test_tag_without_intent_is_an_input_error() -> None:
    tag = SyntheticStream(0).tag("x", failed=False)
    tag.intent_id = ""
    with pytest.raises(InputError, match="intent_id"):
        Diagnoser(CFG).observe(tag, 0)


def test_rows_match_the_diagnoses_table() -> None:
    columns = ddl_columns("diagnoses")
    assert "failure_kind" in columns
    assert list(DIAGNOSIS_COLUMNS) == columns
    _, out, _ = planted("account_lookup", "tool_argument")
    (row,) = diagnosis_rows(out[:1])
    assert list(row) == columns
    assert json.loads(row["component"])["target"] == "get_account"
    assert json.loads(row["evidence"])["tool"] == "get_account"


@pytest.mark.parametrize(
    "key, value",
    [
        ("min_failures", 0),
        ("alpha", 0.0),
        ("min_lift", 1.0),
        ("min_version_support", 0),
        ("evidence_size", 0),
        ("latency_ratio", 1.0),
        ("reemit_growth", 0.0),
        ("window", 5),
    ],
)
def test_config_validation_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"diagnose.{key}"):
        Diagnoser(DiagnoseConfig(**{key: value}))


# -- the LLM path: the real openai client against a local fake endpoint


def _facts(body: dict[str, Any]) -> dict[str, Any]:
    user = body["messages"][1]["content"]
    return json.loads(user.split("\n\n")[0].removeprefix("Facts:\n"))


def _llm_run(
    responder: Any,
) -> tuple[Diagnoser, list[Diagnosis], list[Diagnosis], dict[str, TagRecord], FakeLLMServer]:
    """Rules first (the LLM's requests listed, not asked), then the LLM's answers:
    ``(diagnoser, rule diagnoses, reworded diagnoses, tags by trace, server)``."""
    with FakeLLMServer(responder) as srv:
        llm = LLM(
            LLMConfig(base_url=srv.base_url, api_key="k", model="m", timeout_s=5, max_retries=0)
        )
        tags = mixed(
            SyntheticStream(0),
            900,
            {**HEALTHY, "api_setup": 0.4},
            patterns={"api_setup": "repeated_ask"},
        )
        # the rewording alone (the failure analysis: test_analysis.py)
        d = Diagnoser(replace(CFG, llm_analysis_sample=0), llm_enabled=True)
        out = feed(d, tags)
        assert not srv.requests and d.llm_requests  # nothing asked in line
        better = d.improve(llm, 10**18)
    return d, out, better, {tr: t for t in tags for tr in t.conversation.trace_ids}, srv


def test_llm_diagnosis_backed_by_evidence_is_used() -> None:
    def answer(body: dict[str, Any]) -> str:
        facts = _facts(body)
        return json.dumps(
            {
                "summary": "users abandon api setup at turn 2: the agent re-asks for the API key",
                "root_cause": "the system prompt does not say to reuse the key from turn 1",
                "component": {
                    "type": "prompt",
                    "target": "system_prompt",
                    "detail": "reuse the API key",
                },
                "confidence": 0.8,
                "evidence_ids": [facts["trace_ids"][0], "given_turn"],
            }
        )

    d, out, better, by_trace, srv = _llm_run(answer)
    diag = better[0]
    assert (diag.intent_id, diag.rule, diag.component["target"], diag.source) == (
        "api_setup",
        "repeated_ask",
        "system_prompt",
        "llm",
    )
    # one diagnosis per finding: the rule's, reworded as its next version
    rule_diag = next(x for x in out if x.diagnosis_id == diag.diagnosis_id)
    assert rule_diag.source == "rules" and diag.version > rule_diag.version
    assert diag.evidence["rule_wording"]["summary"] == rule_diag.summary
    assert {x.diagnosis_id for x in d.open_diagnoses()} == {x.diagnosis_id for x in out}
    (tr,) = diag.trace_ids
    assert by_trace[tr].failed and by_trace[tr].intent_id == "api_setup"
    req = srv.requests[0]
    assert UNTRUSTED_RULE in req.body["messages"][0]["content"]
    assert (
        '<data label="finding_evidence">' in req.text()
        and "Please provide your API key" in req.text()
    )
    assert d.llm_rejections == []


@pytest.mark.parametrize(
    "bad, reason",
    [
        (
            {"component": {"type": "harness", "target": "drop_database", "detail": ""}},
            "not in the evidence",
        ),
        ({"evidence_ids": ["0123456789abcdef0123456789abcdef"]}, "unknown evidence ids"),
        ({"confidence": 3}, "confidence"),
    ],
)
def test_llm_claims_not_in_evidence_fall_back_to_rules(bad: dict[str, Any], reason: str) -> None:
    def answer(body: dict[str, Any]) -> str:
        good = {
            "summary": "s",
            "root_cause": "r",
            "confidence": 0.5,
            "evidence_ids": ["given_turn"],
            "component": {"type": "prompt", "target": "system_prompt", "detail": ""},
        }
        return json.dumps({**good, **bad})

    d, out, better, _, _ = _llm_run(answer)
    assert out and {x.rule for x in out} == {"repeated_ask"} and better == []
    assert all(x.source == "rules" for x in d.open_diagnoses())
    assert d.llm_rejections and all(reason in r for r in d.llm_rejections)


def test_llm_failure_falls_back_to_rules() -> None:
    d, out, better, _, _ = _llm_run(lambda body: (500, {"error": {"message": "boom"}}))
    assert out and {x.rule for x in out} == {"repeated_ask"} and better == []
    assert d.llm_rejections and "boom" in d.llm_rejections[0]


def test_agent_version_regression_points_at_the_harness() -> None:
    stream = SyntheticStream(6)
    d = Diagnoser(CFG)
    assert feed(d, mixed(stream, 1500, HEALTHY)) == []
    rates = {**HEALTHY, "refund": 0.4}
    after = []
    for _ in range(800):
        intent = stream.rng.choice(sorted(rates))
        failed = stream.rng.random() < rates[intent]
        after.append(stream.tag(intent, failed=failed, agent_version="2.0"))
    diag = only(feed(d, after))
    assert (diag.intent_id, diag.rule, diag.agent_version) == (
        "refund",
        "version_regression",
        "2.0",
    )
    assert diag.component["type"] == "harness" and diag.component["target"] == "agent_version"
    assert diag.component["detail"]["previous"] == ["1.0"]


@pytest.mark.parametrize(
    "intent, pattern, rule",
    [
        ("api_setup", "repeated_ask", "repeated_ask"),
        ("account_lookup", "tool_argument", "tool_argument"),
        ("cancel_subscription", "question", "abandon_after_question"),
        ("docs_search", "timeout", "latency"),
    ],
)
def test_a_rule_records_every_conversation_it_explains(
    intent: str, pattern: str, rule: str
) -> None:
    from processors.diagnose.contrast import conversation_rows

    _, out, by_trace = planted(intent, pattern)
    d = only(out)
    assert d.rule == rule
    by_id = {t.conversation_id: t for t in by_trace.values()}
    rows = conversation_rows([d])
    ids = [r["conversation_id"] for r in rows]
    assert len(ids) == len(set(ids)) > len(d.trace_ids)  # every one, not the sampled traces
    for r in rows:
        tag = by_id[r["conversation_id"]]
        assert (
            tag.failed and tag.intent_id == intent and r["trace_id"] in tag.conversation.trace_ids
        )
    sampled = {by_trace[tr].conversation_id for tr in d.trace_ids}
    assert sampled <= set(ids)
    if "conversation_count" in d.evidence:
        assert d.evidence["conversation_count"] == len(ids)


def balance_lookup(cid: str, account: str, error: str = "") -> Conversation:
    call = ToolCall(
        "get_account",
        arguments=json.dumps({"account_id": account}),
        result="" if error else "balance 10",
        error_type="ValidationError" if error else "",
        error_message=error,
        trace_id=f"trace-{cid}",
    )
    msgs = [
        Message("user", f"what is the balance of account {account}"),
        Message("tool", call.result or error, tool_name=call.name, tool_arguments=call.arguments,
                error=error, trace_id=call.trace_id),
        Message("assistant", "Sorry, I could not find it." if error else "Your balance is 10."),
    ]  # fmt: skip
    return Conversation(cid, messages=msgs, tool_calls=[call], trace_ids=[call.trace_id])


def balance_stream(rng: random.Random, first: int, n: int, successes_call: bool) -> list[TagRecord]:
    """Failures: the account id given in the wrong shape, the tool errs. Successes answer
    without the tool (the rule cannot tell the working shape yet) or call it rightly."""
    out = []
    for i in range(first, first + n):
        bad = balance_lookup(
            f"f{i}", f"ACC-{rng.randint(1000, 9999)}", "account_id must be 8 digits"
        )
        good = (
            balance_lookup(f"s{i}", str(rng.randint(10**7, 10**8 - 1)))
            if successes_call
            else Conversation(f"s{i}", messages=[Message("user", "my balance?"), Message("assistant", "10.")])
        )  # fmt: skip
        out += [
            TagRecord(f"f{i}", 1, "i1", "account balance", 1, failed=True, conversation=bad),
            TagRecord(f"s{i}", 1, "i1", "account balance", 1, failed=False, conversation=good),
        ]
    return out


def test_a_rule_diagnosis_takes_the_conversations_of_a_contrast_filed_before_it() -> None:
    # the contrast sees the tool errors first; once successes show the working shape the
    # tool_argument rule fires on the same conversations: one cause, one open diagnosis
    rng, d = random.Random(1), Diagnoser(CFG)
    early = [x for k, t in enumerate(balance_stream(rng, 0, 20, False)) for x in d.observe(t, k)]
    assert early and {x.rule for x in early} == {"contrast"}
    later = [
        x for k, t in enumerate(balance_stream(rng, 20, 30, True)) for x in d.observe(t, 50 + k)
    ]
    assert "tool_argument" in {x.rule for x in later}
    assert {x.rule for x in d.open_diagnoses()} == {"tool_argument"}
    last = {x.diagnosis_id: x for x in later if x.rule == "contrast"}
    assert set(last) == {x.diagnosis_id for x in early}
    assert all(x.status == "superseded" and not x.evidence["conversations"] for x in last.values())
    # its stored list says it explains none of them now (act withdraws its proposal)
    gone = {r["conversation_id"] for r in d.take_explanation_rows() if r["explained"] == 0}
    assert {c["conversation_id"] for x in early for c in x.evidence["conversations"]} <= gone
