"""`closeloop tag`: exported conversations in, one tag line per conversation out, same cores."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from .worker_proc import REPO

CATEGORIES = [
    "card_arrival",
    "exchange_rate",
    "top_up_failed",
    "lost_or_stolen_card",
    "pin_blocked",
]


def test_tag_round_trip(tmp_path: Path) -> None:
    rows = [
        r
        for r in csv.DictReader(open(REPO / "examples/data/banking77/train.csv"))
        if r["category"] in CATEGORIES
    ]
    random.Random(3).shuffle(rows)
    rows = rows[:400]
    src = tmp_path / "conversations.jsonl"
    with src.open("w") as f:
        for i, r in enumerate(rows):
            turns = [
                {"role": "user", "content": r["text"]},
                {"role": "assistant", "content": "Could you tell me more?"},
            ]
            f.write(
                json.dumps({"conversation_id": f"c{i}", "turns": turns, "closed_reason": "idle"})
                + "\n"
            )
        f.write("not json\n")
        f.write(json.dumps({"conversation_id": 5, "turns": []}) + "\n")
    out = tmp_path / "tags.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLOSELOOP_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-m", "processors.cli", "tag", "--input", str(src), "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "line 401" in run.stderr and "line 402" in run.stderr  # the two bad lines, named
    tags = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["conversation_id"] for t in tags] == [f"c{i}" for i in range(len(rows))]
    assert all(
        set(t) >= {"conversation_id", "intent_id", "intent_name", "signals", "outcome"}
        for t in tags
    )
    # the agent asked a question and the user left: abandoned
    assert Counter(t["outcome"] for t in tags)["abandoned"] == len(rows)
    # intents learned from the data: each category mostly in one intent
    by_cat: dict[str, Counter] = defaultdict(Counter)
    for r, t in zip(rows, tags):
        by_cat[r["category"]][t["intent_id"]] += 1
    for cat, ids in by_cat.items():
        assert ids.most_common(1)[0][1] >= 0.5 * sum(ids.values()), (cat, ids)
    assert len({ids.most_common(1)[0][0] for ids in by_cat.values()}) >= 4
