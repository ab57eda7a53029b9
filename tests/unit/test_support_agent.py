"""The demo agent (examples/support_agent): span shape, planted failures, fixes, determinism.

No closeloop stack: spans go to the SDK's InMemorySpanExporter; the agent's repository is a
temporary git repository; the LLM mode talks to the local fake OpenAI server.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from examples.support_agent import (
    END_ATTRIBUTE,
    INTENTS,
    CycleReport,
    SimulatedUser,
    SupportAgent,
    behaviour_from,
    init_agent_repo,
    load_utterances,
    run_conversation,
    run_cycle,
)
from examples.support_agent.policy import DIGITS_QUESTION
from examples.support_agent.repo import git
from examples.support_agent.users import HUMAN_REPLY
from processors.act.fixes import instruction
from processors.records import Diagnosis
from processors.redact import Redactor
from tests.llm_server import FakeLLMServer

START_NS = 1_767_600_000_000_000_000
KINDS = {name: i.kind for name, i in INTENTS.items()}


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "bankly-agent"
    init_agent_repo(path)
    return path


def cycle(repo: Path, n: int = 300, seed: int = 1) -> tuple[CycleReport, list[ReadableSpan]]:
    exporter = InMemorySpanExporter()
    report = run_cycle(
        repo, "http://127.0.0.1:9", n, seed, START_NS, exporter=exporter, mode="scripted"
    )
    return report, list(exporter.get_finished_spans())


def commit(repo: Path, edits: dict[str, str], message: str = "fix") -> None:
    """Apply ``{path: new content}`` and commit it on main, as a merge would land."""
    for rel, text in edits.items():
        (repo / rel).write_text(text)
    subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.name=Reviewer",
            "-c",
            "user.email=r@bankly.example",
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-qam",
            message,
        ],
        check=True,
    )


def appended(repo: Path, rel: str, paragraph: str) -> dict[str, str]:
    return {rel: (repo / rel).read_text().rstrip("\n") + "\n\n" + paragraph + "\n"}


def raised_timeout(repo: Path, value: str = "1.0") -> dict[str, str]:
    text = (repo / "config/agent.yaml").read_text()
    assert (
        "  get_exchange_rate:\n    description: The current interbank rate between two currencies.\n"
        "    timeout_s: 0.5\n" in text
    )
    return {"config/agent.yaml": text.replace("timeout_s: 0.5", f"timeout_s: {value}")}


def act_instruction(rule: str, evidence: dict) -> str:
    """closeloop's own templated fix for a diagnosis shaped like diagnose's."""
    diag = Diagnosis("d1", "i1", "intent", rule, "summary", "root cause", evidence=evidence)
    return instruction(diag, Redactor())


CARRY_FORWARD_FIX = (
    "Carry forward information the user already gave (for example the card's last "
    "four digits) and never ask for it again."
)
TRANSFER_FIX = (
    "Transfer references look like TR-55912: pass transfer_id to lookup_transfer in that form."
)


def rates(report: CycleReport, kind: str) -> float:
    convs = [c for c in report.conversations if KINDS[c.intent] == kind]
    return sum(c.outcome != "resolved" for c in convs) / len(convs)


def by_conversation(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = defaultdict(list)
    for s in spans:
        out[s.attributes["gen_ai.conversation.id"]].append(s)
    return out


def outputs(spans: list[ReadableSpan]) -> list[str]:
    """The text the agent said, over all chat spans."""
    return [
        p["content"]
        for s in spans
        if s.name.startswith("chat ")
        for m in json.loads(s.attributes["gen_ai.output.messages"])
        for p in m["parts"]
        if p["type"] == "text"
    ]


def tool_spans(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == f"execute_tool {name}"]


# -- the agent repository ---------------------------------------------------------------------


def test_init_agent_repo_creates_main_with_one_commit_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "agent"
    sha = init_agent_repo(path)
    assert git(path, "rev-parse", "main") == sha
    assert git(path, "rev-list", "--count", "main") == "1"
    assert git(path, "log", "-1", "--format=%an <%ae>") == "Bankly Dev <dev@bankly.example>"
    assert git(path, "ls-tree", "-r", "--name-only", "main").split() == [
        "README.md",
        "config/agent.yaml",
        "prompts/system.md",
    ]
    assert init_agent_repo(path) == sha
    assert git(path, "rev-list", "--count", "main") == "1"
    assert 20 <= len((path / "prompts/system.md").read_text().splitlines()) <= 35


def test_agent_reads_main_not_the_working_tree(repo: Path) -> None:
    before = SupportAgent(repo, exporter=InMemorySpanExporter(), mode="scripted")
    (repo / "prompts/system.md").write_text(CARRY_FORWARD_FIX + "\n")  # edited, not committed
    unmerged = SupportAgent(repo, exporter=InMemorySpanExporter(), mode="scripted")
    assert unmerged.version == before.version == git(repo, "rev-parse", "--short=7", "main")
    assert unmerged.behaviour.system_prompt == before.behaviour.system_prompt
    assert not unmerged.behaviour.carries_forward
    commit(repo, {})
    merged = SupportAgent(repo, exporter=InMemorySpanExporter(), mode="scripted")
    assert merged.version != before.version and merged.behaviour.carries_forward
    for a in (before, unmerged, merged):
        a.close()


# -- how the files steer the agent ------------------------------------------------------------

TEMPLATE = Path(__file__).parents[2] / "examples/support_agent/repo_template"
TEMPLATE_PROMPT = (TEMPLATE / "prompts/system.md").read_text()


@pytest.mark.parametrize(
    "extra, carries, transfer_format",
    [
        ("", False, False),  # the shipped prompt: both bugs
        (CARRY_FORWARD_FIX, True, False),
        ("Do not ask twice for details.", True, False),
        ("If the customer has already provided their card number, use it.", True, False),
        ("Never ask again for the card digits.", True, False),
        ("Ask for the last four digits of the card again if unsure.", False, False),
        (TRANSFER_FIX, False, True),
        ("When you call lookup_transfer, use the exact format of its schema.", False, True),
        ("lookup_transfer is useful. The format of answers is plain text.", False, False),
    ],
)
def test_behaviour_rules(extra: str, carries: bool, transfer_format: bool) -> None:
    config = (TEMPLATE / "config/agent.yaml").read_text()
    b = behaviour_from(TEMPLATE_PROMPT + "\n" + extra, config)
    assert (b.carries_forward, b.transfer_id_format) == (carries, transfer_format)
    assert b.model == "gpt-4o-mini" and b.timeout_s("get_exchange_rate") == 0.5
    assert b.timeout_s("lookup_transfer") == 2.0 and b.timeout_s("not_configured") == 5.0


def test_closeloop_act_templates_are_recognised() -> None:
    carry = act_instruction(
        "repeated_ask",
        {"thing": "card_last4", "thing_name": "card number", "agent_message": DIGITS_QUESTION},
    )
    shape = act_instruction(
        "tool_argument",
        {
            "tool": "lookup_transfer",
            "argument": "transfer_id",
            "failing_shape": {"transfer_id": "text"},
            "working_shape": {"transfer_id": "alnum-with-dash"},
        },
    )
    b = behaviour_from(TEMPLATE_PROMPT + "\n" + carry + "\n" + shape, "tools: {}")
    assert b.carries_forward and b.transfer_id_format


def test_config_tool_description_can_carry_the_format() -> None:
    config = "tools:\n  lookup_transfer:\n    description: Look up a transfer (TR-<digits>).\n"
    assert behaviour_from(TEMPLATE_PROMPT, config).transfer_id_format


def test_bad_config_is_refused() -> None:
    with pytest.raises(TypeError, match="'tools' must be a mapping"):
        behaviour_from("prompt", "tools: [a, b]")


# -- spans ------------------------------------------------------------------------------------


def test_spans_follow_the_genai_semantic_conventions(repo: Path) -> None:
    report, spans = cycle(repo, n=60, seed=7)
    version = git(repo, "rev-parse", "--short=7", "main")
    prompt = (repo / "prompts/system.md").read_text()
    assert report.agent_version == version and len(report.conversations) == 60
    convs = by_conversation(spans)
    assert set(convs) == {c.conversation_id for c in report.conversations}
    for c in report.conversations:
        own = convs[c.conversation_id]
        roots = sorted((s for s in own if s.parent is None), key=lambda s: s.start_time)
        # one trace per user turn, each rooted in invoke_agent
        assert len(roots) == c.turns == len({s.context.trace_id for s in own})
        assert all(s.name == "invoke_agent bankly-support" for s in roots)
        for r in roots:
            a = r.attributes
            assert a["gen_ai.operation.name"] == "invoke_agent"
            assert (a["gen_ai.agent.name"], a["gen_ai.agent.version"]) == (
                "bankly-support",
                version,
            )
            kids = [s for s in own if s.context.trace_id == r.context.trace_id and s is not r]
            assert kids and all(s.parent.span_id == r.context.span_id for s in kids)
            assert all(r.start_time <= s.start_time <= s.end_time <= r.end_time for s in kids)
        # the end marker: on the last turn, unless the user walked away
        ended = [r for r in roots if r.attributes.get(END_ATTRIBUTE) is True]
        assert ended == ([] if c.outcome == "abandoned" else [roots[-1]])
        assert roots[0].start_time == c.start_ns and roots[-1].end_time == c.end_ns
        # user think time between turns (simulated), seconds not milliseconds
        assert all(b.start_time - a.end_time >= 2_500_000_000 for a, b in itertools.pairwise(roots))
    chats = [s for s in spans if s.name.startswith("chat ")]
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    assert len(chats) + len(tools) + sum(c.turns for c in report.conversations) == len(spans)
    for s in chats:
        a = s.attributes
        assert s.name == "chat gpt-4o-mini" and a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.request.model"] == "gpt-4o-mini"
        assert a["gen_ai.response.model"].startswith("gpt-4o-mini")
        assert a["gen_ai.usage.input_tokens"] > 100 and a["gen_ai.usage.output_tokens"] > 0
        assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": prompt}]
        inputs, outs = (
            json.loads(a["gen_ai.input.messages"]),
            json.loads(a["gen_ai.output.messages"]),
        )
        assert inputs[0]["role"] == "user" and all(m["parts"] for m in inputs)
        assert len(outs) == 1 and outs[0]["role"] == "assistant"
        assert tuple(a["gen_ai.response.finish_reasons"]) == (outs[0]["finish_reason"],)
        part_types = {p["type"] for p in outs[0]["parts"]}
        assert part_types == (
            {"tool_call"} if outs[0]["finish_reason"] == "tool_calls" else {"text"}
        )
        assert 300e6 <= s.end_time - s.start_time <= 1500e6
    for s in tools:
        a = s.attributes
        assert a["gen_ai.operation.name"] == "execute_tool"
        assert s.name == f"execute_tool {a['gen_ai.tool.name']}"
        assert a["gen_ai.tool.call.id"].startswith("call_")
        assert isinstance(json.loads(a["gen_ai.tool.call.arguments"]), dict)
        if s.status.status_code is StatusCode.ERROR:
            assert a["error.type"] and s.status.description and "gen_ai.tool.call.result" not in a
        else:
            assert "error.type" not in a and isinstance(
                json.loads(a["gen_ai.tool.call.result"]), dict
            )
    # every tool call a chat span asked for ran, with the same id and arguments
    asked = {
        p["id"]: p["arguments"]
        for s in chats
        for m in json.loads(s.attributes["gen_ai.output.messages"])
        for p in m["parts"]
        if p["type"] == "tool_call"
    }
    ran = {
        s.attributes["gen_ai.tool.call.id"]: json.loads(s.attributes["gen_ai.tool.call.arguments"])
        for s in tools
    }
    assert asked == ran


def test_same_seed_same_spans_and_new_ids_for_a_new_version(repo: Path) -> None:
    def fingerprint(spans: list[ReadableSpan]) -> list[tuple]:
        return [
            (
                s.name,
                s.context.trace_id,
                s.context.span_id,
                s.start_time,
                s.end_time,
                tuple(sorted((k, str(v)) for k, v in s.attributes.items())),
            )
            for s in spans
        ]

    r1, s1 = cycle(repo, n=40, seed=3)
    r2, s2 = cycle(repo, n=40, seed=3)
    assert fingerprint(s1) == fingerprint(s2) and r1.conversations == r2.conversations
    r3, _ = cycle(repo, n=40, seed=4)
    assert [c.intent for c in r3.conversations] != [c.intent for c in r1.conversations]
    commit(repo, appended(repo, "prompts/system.md", "Be concise."))
    r4, s4 = cycle(repo, n=40, seed=3)
    # the same customers, but no id is reused by the new version
    assert [c.intent for c in r4.conversations] == [c.intent for c in r1.conversations]
    assert not {c.conversation_id for c in r4.conversations} & {
        c.conversation_id for c in r1.conversations
    }
    assert not {s.context.trace_id for s in s4} & {s.context.trace_id for s in s1}


# -- planted failures and their fixes ---------------------------------------------------------


def test_planted_failures_happen_with_the_shipped_files(repo: Path) -> None:
    report, spans = cycle(repo)
    convs = by_conversation(spans)
    assert rates(report, "card") >= 0.5
    assert rates(report, "transfer") >= 0.4
    assert rates(report, "fx") >= 0.7
    assert rates(report, "healthy") <= 0.12
    for c in report.conversations:
        own = convs[c.conversation_id]
        if KINDS[c.intent] == "card" and c.outcome == "abandoned" and c.turns == 3:
            # turn 3: asked for the digits the opening already held, and the user left
            assert outputs(own)[-1] == DIGITS_QUESTION
            opening = _user_texts(own)[0]
            assert "last four digits" in opening or "card number" in opening
    abandoned_at_ask = sum(
        KINDS[c.intent] == "card" and c.outcome == "abandoned" and c.turns == 3
        for c in report.conversations
    )
    assert abandoned_at_ask >= 0.4 * sum(KINDS[c.intent] == "card" for c in report.conversations)
    lookups = tool_spans(spans, "lookup_transfer")
    failed = [s for s in lookups if s.status.status_code is StatusCode.ERROR]
    assert failed
    for s in failed:
        assert s.attributes["error.type"] == "ValueError"
        assert s.status.description == "invalid transfer_id format: expected TR-<digits>"
        assert json.loads(s.attributes["gen_ai.tool.call.arguments"])["transfer_id"].startswith(
            "tr "
        )
    # references the user wrote as TR-<digits> work: the contrast diagnose needs
    assert len(lookups) > len(failed)
    rate_calls = tool_spans(spans, "get_exchange_rate")
    timeouts = [s for s in rate_calls if s.attributes.get("error.type") == "timeout"]
    assert len(timeouts) >= 0.7 * len(rate_calls)
    assert all(
        s.end_time - s.start_time == 500_000_000
        and "timed out after 0.5s" in s.status.description
        and "tools.get_exchange_rate.timeout_s" in s.status.description
        for s in timeouts
    )
    errored = {c.conversation_id for c in report.conversations if c.outcome == "errored"}
    assert errored and all(
        outputs(convs[cid])[-1].startswith("I'm sorry, I couldn't") for cid in errored
    )


@pytest.mark.parametrize(
    "fix, kind",
    [
        (lambda repo: appended(repo, "prompts/system.md", CARRY_FORWARD_FIX), "card"),
        (lambda repo: appended(repo, "prompts/system.md", TRANSFER_FIX), "transfer"),
        (lambda repo: raised_timeout(repo), "fx"),
    ],
)
def test_each_fix_removes_its_failure_and_nothing_else_changes(repo: Path, fix, kind: str) -> None:
    before, _ = cycle(repo)
    commit(repo, fix(repo))
    after, spans = cycle(repo)
    assert rates(before, kind) >= 0.4 and rates(after, kind) <= 0.12
    for b, a in zip(before.conversations, after.conversations, strict=True):
        assert b.intent == a.intent  # the same customers
        if KINDS[b.intent] != kind:
            assert (b.outcome, b.turns) == (a.outcome, a.turns)
    if kind == "card":
        assert all(
            DIGITS_QUESTION not in outputs(own)
            for cid, own in by_conversation(spans).items()
            if any(
                "last four digits of my card" in t or "card number" in t.lower()
                for t in _user_texts(own)
            )
        )
    if kind == "transfer":
        lookups = tool_spans(spans, "lookup_transfer")
        assert lookups and all(s.status.status_code is not StatusCode.ERROR for s in lookups)
    if kind == "fx":
        assert all("error.type" not in s.attributes for s in tool_spans(spans, "get_exchange_rate"))


def _user_texts(spans: list[ReadableSpan]) -> list[str]:
    return [
        p["content"]
        for s in spans
        if s.name.startswith("chat ")
        for m in json.loads(s.attributes["gen_ai.input.messages"])
        if m["role"] == "user"
        for p in m["parts"]
    ]


def test_closeloop_templated_fixes_work_on_the_agent(repo: Path) -> None:
    before, _ = cycle(repo)
    carry = act_instruction("repeated_ask", {"thing": "card_last4", "thing_name": "card number"})
    shape = act_instruction(
        "tool_argument",
        {
            "tool": "lookup_transfer",
            "argument": "transfer_id",
            "failing_shape": {"transfer_id": "text"},
            "working_shape": {"transfer_id": "alnum-with-dash"},
        },
    )
    commit(repo, appended(repo, "prompts/system.md", carry + "\n\n" + shape))
    commit(repo, raised_timeout(repo, "1"))  # act's latency fix: p99 0.5 s x 1.5, rounded up
    after, _ = cycle(repo)
    for kind in ("card", "transfer", "fx"):
        assert rates(before, kind) >= 0.4 and rates(after, kind) <= 0.12, kind
    assert abs(rates(after, "healthy") - rates(before, "healthy")) < 1e-9


# -- simulated users --------------------------------------------------------------------------


def test_users_open_with_real_banking77_utterances_and_their_details(repo: Path) -> None:
    utterances = load_utterances()
    report, spans = cycle(repo, n=120, seed=5)
    convs = by_conversation(spans)
    counts = Counter(c.intent for c in report.conversations)
    assert set(counts) == set(INTENTS) and 12 <= len(INTENTS) <= 15
    for c in report.conversations:
        opening = _user_texts(convs[c.conversation_id])[0]
        assert any(opening.startswith(u.rstrip(".")) for u in utterances[c.intent]), opening
        if KINDS[c.intent] == "transfer":
            assert "TR-" in opening or " tr " in opening
    card_openings = [
        _user_texts(convs[c.conversation_id])[0]
        for c in report.conversations
        if KINDS[c.intent] == "card"
    ]
    with_digits = [o for o in card_openings if "last four digits" in o or "card number" in o]
    assert 0.4 * len(card_openings) <= len(with_digits) < len(card_openings)


def test_user_replies() -> None:
    intent = INTENTS["card_arrival"]
    user = SimulatedUser(
        intent=intent,
        opening="Where is my card? My card number ends in 4821.",
        rng=random.Random(1),
        card_last4="4821",
        gave_card_last4=True,
    )
    assert user.reply(intent.questions[0]) in intent.replies[0]
    assert user.reply(intent.questions[1]) in intent.replies[1]
    assert user.reply(DIGITS_QUESTION) is None  # asked again: leaves
    patient = SimulatedUser(
        intent=intent,
        opening="x",
        rng=random.Random(1),
        card_last4="4821",
        gave_card_last4=True,
        answers_repeat_ask=True,
    )
    assert "4821" in patient.reply(DIGITS_QUESTION)
    asked_once = SimulatedUser(intent=intent, opening="x", rng=random.Random(1), card_last4="4821")
    assert "4821" in asked_once.reply(DIGITS_QUESTION)
    wants_human = SimulatedUser(
        intent=intent, opening="x", rng=random.Random(1), asks_for_human=True
    )
    assert wants_human.reply(intent.questions[0]) in HUMAN_REPLY


# -- the LLM mode -----------------------------------------------------------------------------


def test_llm_mode_uses_the_openai_client_and_records_the_same_spans(repo: Path) -> None:
    def responder(body: dict):
        last = body["messages"][-1]
        if last["role"] == "tool":
            return "Transfer TR-55912 completed yesterday; it should show for the recipient today."
        if sum(m["role"] == "user" for m in body["messages"]) == 1:
            return "When did you send it?"
        call = {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "lookup_transfer", "arguments": '{"transfer_id": "TR-55912"}'},
        }
        return 200, {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini-x",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                }
            ],
            "usage": {"prompt_tokens": 812, "completion_tokens": 17, "total_tokens": 829},
        }

    exporter = InMemorySpanExporter()
    with FakeLLMServer(responder) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        agent = SupportAgent(repo, exporter=exporter, mode="llm", llm_client=client)
        user = SimulatedUser(
            intent=INTENTS["pending_transfer"],
            rng=random.Random(2),
            opening="My transfer is pending (ref TR-55912)",
            transfer_ref="TR-55912",
        )
        result = run_conversation(agent, user, "conv-llm-1", START_NS, random.Random(3))
        agent.close()
        sent = srv.chat_requests()
    assert agent.mode == "llm" and (result.outcome, result.turns) == ("resolved", 2)
    assert len(sent) == 3
    prompt = (repo / "prompts/system.md").read_text()
    assert sent[0].body["messages"][0] == {"role": "system", "content": prompt}
    assert "lookup_transfer" in {t["function"]["name"] for t in sent[0].body["tools"]}
    tool_result = sent[2].body["messages"][-1]
    assert tool_result["role"] == "tool" and "TR-55912" in tool_result["content"]
    spans = exporter.get_finished_spans()
    assert [s.name for s in sorted(spans, key=lambda s: (s.start_time, s.parent is not None))] == [
        "invoke_agent bankly-support",
        "chat gpt-4o-mini",
        "invoke_agent bankly-support",
        "chat gpt-4o-mini",
        "execute_tool lookup_transfer",
        "chat gpt-4o-mini",
    ]
    tool_call = next(
        s
        for s in spans
        if s.name == "chat gpt-4o-mini"
        and "tool_calls" in s.attributes["gen_ai.response.finish_reasons"]
    )
    assert tool_call.attributes["gen_ai.usage.input_tokens"] == 812
    assert tool_call.attributes["gen_ai.response.model"] == "gpt-4o-mini-x"
    assert [s.attributes.get(END_ATTRIBUTE) for s in spans if s.parent is None] == [None, True]


# -- export over OTLP/HTTP ----------------------------------------------------------------------


class _Collector:
    """A loopback OTLP/HTTP receiver: keeps every span of every ``/v1/traces`` request."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    )
                    collector.spans += [(service, sp) for ss in rs.scope_spans for sp in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_run_cycle_exports_every_span_over_otlp_http_before_returning(repo: Path) -> None:
    collector = _Collector()
    collector.thread.start()
    try:
        report = run_cycle(repo, collector.endpoint, 300, 2, START_NS, mode="scripted")
        received = list(collector.spans)
    finally:
        collector.server.shutdown()
        collector.server.server_close()
    assert {service for service, _ in received} == {"bankly-support"}
    roots = [sp for _, sp in received if sp.name == "invoke_agent bankly-support"]
    assert len(roots) == sum(c.turns for c in report.conversations) > 600
    conv_ids = {
        a.value.string_value
        for _, sp in received
        for a in sp.attributes
        if a.key == "gen_ai.conversation.id"
    }
    assert conv_ids == {c.conversation_id for c in report.conversations}
    assert len(received) == len({sp.span_id for _, sp in received})
