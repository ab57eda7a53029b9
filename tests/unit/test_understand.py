"""The understand combiner: intents + tags per conversation, replays not learned twice, checkpoints."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from processors.config import load_config
from processors.records import Conversation, Message
from processors.understand.core import Understand, goal_text
from processors.understand.embed import HashingEmbedder
from processors.understand.intents import IntentModel

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


def _core() -> Understand:
    cfg = load_config(None, env={})
    # a coarse threshold for the hashing embedder: the clustering itself is tested in test_intents.py
    return Understand(
        cfg, HashingEmbedder(), model=IntentModel(threshold=0.15, micro_threshold=0.5)
    )


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
