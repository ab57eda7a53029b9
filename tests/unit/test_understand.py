"""The understand combiner: intents + tags per conversation, replays not learned twice, checkpoints."""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from processors.config import LLMConfig, load_config
from processors.llm import LLM
from processors.records import Conversation, Message
from processors.understand.core import Understand, goal_text
from processors.understand.embed import HashingEmbedder
from processors.understand.intents import IntentModel
from tests.ddl import ddl_columns
from tests.llm_server import FakeLLMServer

REPO = Path(__file__).resolve().parents[2]


def _conversations(n: int, seed: int = 0) -> list[tuple[str, Conversation]]:
    """BANKING77 openings of three clearly different categories, as conversations."""
    wanted = {"card_arrival", "exchange_rate", "top_up_failed"}
    rows = [
        r
        for r in csv.DictReader(open(REPO / "examples/data/banking77/train.csv"))
        if r["category"] in wanted
    ]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.choice(rows)
        msgs = [
            Message(role="user", content=r["text"], ts_ns=1),
            Message(role="assistant", content="Sure.", ts_ns=2),
        ]
        out.append(
            (
                r["category"],
                Conversation(
                    conversation_id=f"c{seed}-{i}",
                    version=2,
                    messages=msgs,
                    closed_reason="end",
                    prompt_version="p1",
                ),
            )
        )
    return out


def _core(*, llm_enabled: bool = False, judge_rate: float = 0.05) -> Understand:
    cfg = load_config(None, env={})
    cfg.llm.judge_rate = judge_rate
    # a coarse threshold for the hashing embedder: the clustering itself is tested in test_intents.py
    return Understand(
        cfg,
        HashingEmbedder(),
        model=IntentModel(threshold=0.15, micro_threshold=0.5),
        llm_enabled=llm_enabled,
    )


def _model(body: dict[str, Any]) -> str:
    """A fake model: names every intent it is asked about, judges every conversation a bug."""
    user = body["messages"][1]["content"]
    if "Name each of these intents" in user:
        ks = [int(k) for k in re.findall(r"^Intent (\d+):$", user, re.M)]
        return json.dumps(
            {"intents": [{"intent": k, "name": f"llm name {k}", "description": "d"} for k in ks]}
        )
    return json.dumps({"tags": ["bug_report"], "outcome": "resolved"})


def test_llm_names_and_judgements_arrive_as_new_versions_and_stay() -> None:
    core = _core(llm_enabled=True, judge_rate=0.2)
    data = [c for _, c in _conversations(300)]
    first = core.process(data[:100], now_ns=1)
    assert first.name_requests and first.judge_requests  # listed, not asked: no LLM in line
    assert all(t.source == "structural" for t in first.tags)
    assert {r["source"] for r in first.intent_rows} == {"keyphrases"}
    assert list(first.intent_rows[0]) == ddl_columns("intents")
    with FakeLLMServer(_model) as srv:
        better = core.improve(first, LLM(LLMConfig(base_url=srv.base_url, timeout_s=5)), 2)
    asked = {r.intent_id for r in first.name_requests}
    assert len(srv.chat_requests()) == len(first.judge_requests) + -(-len(asked) // 8)
    rows = {r["intent_id"]: r for r in better.intent_rows}
    assert set(rows) == asked and all(r["source"] == "llm" for r in rows.values())
    assert min(r["taxonomy_version"] for r in rows.values()) > max(
        r["taxonomy_version"] for r in first.intent_rows
    )
    judged = {t.conversation_id for t in first.judge_requests}
    for t in better.tags:
        if t.conversation_id in judged:
            assert t.source == "llm" and "bug_report" in t.signals
    # the intents grow several-fold: keyphrase renaming is due, but the LLM names stay; only
    # a merge or split asks the LLM again
    later = core.process(data[100:], now_ns=3)
    changed = {
        i
        for r in later.change_rows
        if r["change"] in ("merged", "split")
        for i in (r["intent_id"], r["other_id"])
    }
    again = {r.intent_id for r in later.name_requests} & asked
    assert again <= changed
    names = {r["intent_id"]: (r["name"], r["source"]) for r in later.intent_rows}
    kept = (asked & set(names)) - again
    assert kept
    for iid in kept:
        assert names[iid][1] == "llm" and names[iid][0].startswith("llm name")


def test_every_conversation_is_tagged_with_an_intent_and_outcome() -> None:
    core = _core()
    data = _conversations(300)
    batch = core.process([c for _, c in data], now_ns=10)
    assert [t.conversation_id for t in batch.tags] == [c.conversation_id for _, c in data]
    assert all(t.intent_id and t.outcome == "resolved" and not t.failed for t in batch.tags)
    assert all(t.ts_ns == 10 and t.prompt_version == "p1" for t in batch.tags)
    assert batch.intent_rows and {r["intent_id"] for r in batch.intent_rows} >= {
        t.intent_id for t in batch.tags
    }
    assert all(r["taxonomy_version"] == core.taxonomy_version for r in batch.intent_rows)


def test_replayed_conversation_is_not_learned_twice() -> None:
    core = _core()
    data = [c for _, c in _conversations(200)]
    first = core.process(data, now_ns=1)
    seen = core.model.n_seen
    again = core.process(data[:50], now_ns=2)
    assert core.model.n_seen == seen
    assert [t.intent_id for t in again.tags] == [
        core.model.resolve(t.intent_id) for t in first.tags[:50]
    ]


class _CountingEmbedder(HashingEmbedder):
    """The hashing embedder, keeping every text it was asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def embed(self, texts: list[str]) -> Any:
        self.asked += texts
        return super().embed(texts)


def test_each_distinct_goal_is_embedded_once() -> None:
    embedder = _CountingEmbedder()
    core = Understand(load_config(None, env={}), embedder, IntentModel(threshold=0.2))
    data = [c for _, c in _conversations(200)]
    goals = [goal_text(c, core.cfg.understand.goal_user_turns) for c in data]
    first = core.process(data, now_ns=1)
    assert sorted(embedder.asked) == sorted(set(goals))
    assert len(set(goals)) < len(goals)  # the sample repeats openings: the dedup is exercised
    embedder.asked.clear()
    again = core.process(data[:50], now_ns=2)  # a redelivery: tagged from memory, not embedded
    assert embedder.asked == []
    # new conversations opening with goals seen lately: their vectors are remembered
    later = [replace(c, conversation_id=c.conversation_id + "-later") for c in data[:50]]
    assert len(core.process(later, now_ns=3).tags) == 50 and embedder.asked == []
    assert [t.intent_id for t in again.tags] == [
        core.model.resolve(t.intent_id) for t in first.tags[:50]
    ]


def test_a_re_clustering_re_tags_the_conversations_it_moved() -> None:
    core = _core()
    data = [c for _, c in _conversations(1200)]
    given: dict[str, str] = {}
    retags = []
    for i in range(0, len(data), 100):
        before = core.model.reclusterings
        batch = core.process(data[i : i + 100], now_ns=i)
        given.update((t.conversation_id, t.intent_id) for t in batch.tags)
        assert batch.retags == [] or core.model.reclusterings > before
        for move in batch.retags:  # an earlier batch's conversation, moved to another intent
            assert move["intent_id"] != core.model.resolve(given[move["conversation_id"]])
            assert move["conversation_version"] == 2
            assert move["intent_name"] == core._name_of(move["intent_id"])
            given[move["conversation_id"]] = move["intent_id"]
        retags += batch.retags
    assert retags, "re-clusterings at doublings moved some early conversations"
    # a redelivery is tagged with the latest intent
    again = core.process(data[:50], now_ns=10**6)
    assert [t.intent_id for t in again.tags] == [
        core.model.resolve(given[c.conversation_id]) for c in data[:50]
    ]


def test_snapshot_restore_gives_the_same_tags() -> None:
    core = _core()
    core.process([c for _, c in _conversations(200)], now_ns=1)
    copy = _core()
    copy.restore(core.snapshot())
    probe = [c for _, c in _conversations(60, seed=9)]
    a = core.process(probe, now_ns=5)
    b = copy.process(probe, now_ns=5)
    assert [(t.intent_id, t.intent_name, t.signals) for t in a.tags] == [
        (t.intent_id, t.intent_name, t.signals) for t in b.tags
    ]


def test_goal_is_the_first_user_turns() -> None:
    conv = Conversation(
        conversation_id="x",
        messages=[
            Message(role="assistant", content="Hi, how can I help?"),
            Message(role="user", content="card lost"),
            Message(role="assistant", content="Which card?"),
            Message(role="user", content="the blue one"),
            Message(role="user", content="third"),
        ],
    )
    assert goal_text(conv, 2) == "card lost the blue one"


def test_a_restart_asks_again_for_names_that_never_came() -> None:
    core = _core(llm_enabled=True)
    batch = core.process([c for _, c in _conversations(100)], now_ns=1)
    asked = {r.intent_id for r in batch.name_requests}
    assert asked
    copy = _core(llm_enabled=True)
    copy.restore(core.snapshot())  # the answers were lost with the process
    again = copy.process([c for _, c in _conversations(60, seed=4)], now_ns=2)
    assert {r.intent_id for r in again.name_requests} & asked
