"""Crash safety of the ordered stages: kill -9 the worker of the real embedded stack while the
demo agent's traffic flows through capture → assemble → understand → diagnose → act; the
supervisor restarts it; nothing is lost, nothing counts twice, the intent model comes back
from its checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from examples.support_agent import run_cycle
from processors.embedded.broker import committed_offsets
from processors.embedded.stack import wait_for

from .harness import Loop, conversation_intents, read_positions, running_loop

N = 300  # conversations per cycle: enough for diagnoses and proposals
SEED = int(os.environ.get("RELIABILITY_SEED", "7"))


def kill_worker_when(loop: Loop, ready: object, timeout_s: float = 150.0) -> int:
    """Wait until ``ready()`` holds, kill -9 the worker, let the supervisor restart it; the pid killed."""
    assert wait_for(ready, timeout_s, 0.2), "the pipeline never reached the kill point"
    worker = loop.stack.children["worker"]
    assert worker.proc is not None
    pid = worker.proc.pid
    os.kill(pid, signal.SIGKILL)
    worker.proc.wait()
    loop.stack.supervise_once()  # what `closeloop up` does every second
    assert worker.alive() and worker.proc.pid != pid
    return pid


def lost_after_capture(loop: Loop, conversations: list) -> None:
    """Fail when conversations were captured (their turns are stored) but never assembled or
    never published to understand after a kill -9 (the bug fixed in assemble: the table now
    records a close only after the conversation is published)."""
    tagged = conversation_intents(loop.store, [c.conversation_id for c in conversations])
    missing = {c.conversation_id for c in conversations} - set(tagged)
    captured = {
        r["conversation_id"] for r in loop.store.query("SELECT DISTINCT conversation_id FROM turns")
    }
    if missing and missing <= captured:
        assembled = {
            r["conversation_id"]
            for r in loop.store.query("SELECT conversation_id FROM conversations FINAL")
        }
        pytest.fail(
            f"conversations lost across kill -9: "
            f"{len(missing)} captured conversations never reached understand "
            f"({len(missing & assembled)} of them assembled): {sorted(missing)[:3]}\n"
            + where_they_are(loop, missing)
        )


def where_they_are(loop: Loop, missing: set[str]) -> str:
    """Where the missing conversations sit on closeloop.conversations, against the offsets the
    understand checkpoint covers: what a failure needs to be understood."""
    ckpt = loop.store.query("SELECT seq, offsets FROM checkpoints FINAL WHERE name = 'understand'")
    topic = loop.cfg.topics.conversations
    at = [
        (p, o)
        for p, o, v in read_positions(loop.stack.bootstrap, topic)
        if json.loads(v).get("conversation_id") in missing
    ]
    parts = [(topic, p) for p in range(loop.cfg.kafka.partitions)]
    committed = committed_offsets(loop.stack.bootstrap, "closeloop", parts)
    # in turn_records: capture sent their turns on; not there: capture never finished them
    recorded = {
        r["conversation_id"]
        for r in loop.store.query("SELECT DISTINCT conversation_id FROM turn_records")
    }
    return (
        f"on {topic} at (partition, offset) {sorted(at)[:20]}; understand checkpoint {ckpt}; "
        f"committed {committed}; {len(missing & recorded)} of them in turn_records"
    )


def majority_by_category(loop: Loop, conversations: list) -> dict[str, str]:
    got = conversation_intents(loop.store, [c.conversation_id for c in conversations])
    votes: dict[str, Counter] = defaultdict(Counter)
    for c in conversations:
        votes[c.intent][got.get(c.conversation_id, "")] += 1
    return {cat: v.most_common(1)[0][0] for cat, v in votes.items() if sum(v.values()) >= 10}


def run_with_kills(tmp: Path, cycles: int, rng: random.Random) -> dict:
    with running_loop(tmp) as loop:
        tags = "SELECT count() FROM conversation_tags FINAL"
        reports, crashes = [], 0
        for k in range(cycles):
            before = max(loop.count(tags), 0)
            # the same seed every cycle: the same customers with the same words, new conversation ids
            reports.append(run_cycle(loop.repo, loop.endpoint, n=N, seed=1, mode="scripted"))
            point = before + rng.randint(N // 10, 2 * N // 3)
            kill_worker_when(loop, lambda p=point: loop.count(tags) >= p)
            crashes += 1
            if k == 0:
                # a second kill while diagnose and act write (the first proposal is in)
                kill_worker_when(
                    loop, lambda: loop.count("SELECT count() FROM proposals FINAL") >= 1
                )
                crashes += 1
            got = loop.wait_count(tags, before + N)
            if got < before + N:
                lost_after_capture(loop, reports[-1].conversations)
            assert got == before + N, f"cycle {k + 1}: {got - before} of {N} conversations tagged"
        time.sleep(6)  # the last diagnoses and proposals of the last batch
        branches = loop.git(
            "for-each-ref", "--format=%(refname:short)", "refs/heads/closeloop/"
        ).split()
        return {
            "reports": reports,
            "crashes": crashes,
            "tags": loop.count(tags),
            "conversations": loop.count("SELECT count() FROM conversations FINAL"),
            "majorities": [majority_by_category(loop, r.conversations) for r in reports],
            "dup_diagnoses": loop.store.query(
                "SELECT diagnosis_id, count() AS n FROM diagnoses FINAL GROUP BY 1 HAVING n > 1"
            ),
            "diagnoses": loop.store.query(
                "SELECT diagnosis_id, intent_id, rule, JSONExtractString(component, 'target') AS target "
                "FROM diagnoses FINAL"
            ),
            "proposals": loop.store.query(
                "SELECT p.proposal_id AS proposal_id, p.diagnosis_id AS diagnosis_id, p.branch AS branch, "
                "p.version AS version, p.status AS status, d.version AS diagnosis_version, "
                "d.status AS diagnosis_status "
                "FROM (SELECT * FROM proposals FINAL) AS p "
                "INNER JOIN (SELECT * FROM diagnoses FINAL) AS d USING diagnosis_id"
            ),
            "dup_proposals": loop.store.query(
                "SELECT diagnosis_id, count() AS n FROM proposals FINAL GROUP BY 1 HAVING n > 1"
            ),
            "branches": branches,
            "withdrawn": loop.git(
                "for-each-ref", "--format=%(refname:lstrip=3)", "refs/closeloop/withdrawn/"
            ).split(),
            "commits": {b: int(loop.git("rev-list", "--count", f"main..{b}")) for b in branches},
            "intent_ids": {
                r["intent_id"] for r in loop.store.query("SELECT intent_id FROM intents FINAL")
            },
            "lineage": [
                (r["intent_id"], r["other_id"])
                for r in loop.store.query(
                    "SELECT intent_id, other_id FROM intent_changes FINAL WHERE change IN ('split', 'merged')"
                )
            ],
        }


def related(a: str, b: str, edges: list[tuple[str, str]]) -> bool:
    """Whether intent ``b`` descends from (or was merged with) ``a`` through recorded changes."""
    seen, todo = {a}, [a]
    while todo:
        x = todo.pop()
        for u, v in edges:
            for y in (v,) if u == x else (u,) if v == x else ():
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
    return b in seen


def check(run: dict) -> None:
    sent = sum(len(r.conversations) for r in run["reports"])
    # every conversation tagged exactly once in effect
    assert run["tags"] == sent and run["conversations"] == sent
    # the intent model came back from its checkpoint: the same words get the same intent ids, or
    # ids the model derived from them by a recorded split or merge (it keeps learning; a model
    # rebuilt from scratch would hand out ids with no such lineage)
    first, *later = run["majorities"]
    for m in later:
        moved = {
            cat: (first[cat], m[cat]) for cat in first.keys() & m.keys() if first[cat] != m[cat]
        }
        unexplained = {cat: ids for cat, ids in moved.items() if not related(*ids, run["lineage"])}
        # A learning model may move a borderline category to a neighbouring intent (int8
        # embeddings also vary slightly with batch composition); a model rebuilt from scratch
        # would move nearly all of them.
        assert len(unexplained) <= max(1, len(first) // 8), (
            f"intent ids changed after the restart: {unexplained}"
        )
        assert len(moved) <= len(first) // 4, f"most intents moved: {moved}"
    # no duplicate diagnoses: one row per id, and one id per (intent, rule, component target)
    assert run["dup_diagnoses"] == []
    diags = run["diagnoses"]
    assert diags, "no diagnosis at all: the loop did not run to diagnose"
    causes = Counter((d["intent_id"], d["rule"], d["target"]) for d in diags)
    assert all(n == 1 for n in causes.values()), f"one root cause under two ids: {causes}"
    # and no diagnosis on an intent id the restored model does not know (a model rebuilt from
    # scratch re-numbers its intents)
    assert {d["intent_id"] for d in diags} <= run["intent_ids"]
    # no duplicate proposals or branches: one proposal and one branch (one commit over main) per
    # diagnosis, still open unless its diagnosis was superseded (then withdrawn: closed, its
    # branch moved under refs/closeloop/withdrawn/), and no more proposal versions than
    # diagnosis versions: a redelivered diagnosis, or a version diagnose re-emits with other
    # evidence after a restart, does not update its proposal again
    props = run["proposals"]
    assert props and run["dup_proposals"] == []
    open_ = [p for p in props if p["status"] == "open"]
    withdrawn = [p for p in props if p["status"] != "open"]
    assert sorted(run["branches"]) == sorted(p["branch"] for p in open_)
    assert set(run["commits"].values()) == {1}
    assert all(p["status"] == "closed" and p["diagnosis_status"] == "superseded" for p in withdrawn)
    assert sorted(run["withdrawn"]) == sorted(p["branch"].split("/", 1)[1] for p in withdrawn)
    extra = {
        p["diagnosis_id"]: (p["version"], p["diagnosis_version"])
        for p in props
        if p["version"] > p["diagnosis_version"]
    }
    assert not extra, f"replayed diagnoses re-versioned their proposals: {extra}"


def test_kill9_of_the_ordered_stages_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, record_property
) -> None:
    run = run_with_kills(tmp_path, cycles=2, rng=random.Random(SEED))
    record_property("crashes_survived", run["crashes"])
    check(run)


@pytest.mark.soak
def test_soak_repeated_kill9(tmp_path: Path) -> None:
    run = run_with_kills(tmp_path, cycles=5, rng=random.Random(SEED + 1))
    check(run)
