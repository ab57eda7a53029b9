"""Review rows and verification through chDB: reviews/proposals round-trip, verdicts from conversation_tags."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
from pathlib import Path

import pytest

from processors.act import Actor, proposal_rows
from processors.act.gitrepo import LocalGit
from processors.config import Config
from processors.review.core import review_rows
from processors.review.loop import StaleProposal, approve, decide, verify
from processors.store import Store
from tests.integration.test_act_local import config, diagnosis, repo  # noqa: F401 (repo is a fixture)

# Far in the future (2150), so rows other tests put in the shared store never fall in these windows,
# and a separate 10-day block per test (verify counts "after" up to its now_ns).
BASE = 5_680_000_000 * 10**9
DAY = 86_400 * 10**9
_blocks = itertools.count()


def window() -> tuple[int, int, int]:
    """``(window start, merge time, verification time)`` of a fresh block."""
    w0 = BASE + next(_blocks) * 10 * DAY
    return w0, w0 + DAY, w0 + 2 * DAY


def tags(unique: str, intent: str, n: int, failures: int, prompt: str, start_ns: int) -> list[dict]:
    return [
        {
            "conversation_id": f"{unique}-{intent}-{prompt}-{start_ns}-{i}",
            "conversation_version": 1,
            "intent_id": f"{intent}-{unique}",
            "intent_name": intent,
            "taxonomy_version": 1,
            "signals": [],
            "outcome": "abandoned" if i < failures else "resolved",
            "outcome_turn": 3 if i < failures else -1,
            "failed": int(i < failures),
            "prompt_version": prompt,
            "model": "m",
            "agent_version": "1.0",
            "ts_ns": start_ns + i * 10**6,
        }
        for i in range(n)
    ]


def diagnosis_row(d) -> dict:
    """``d`` as a ``diagnoses`` row."""
    return {**d.to_dict(), "component": json.dumps(d.component), "evidence": json.dumps(d.evidence)}


def merged_proposal(repo: Path, unique: str, w0: int, merge: int):
    """A proposal for intent ``target-<unique>`` under prompt ``old-<unique>``, approved and merged at ``merge``."""
    d = diagnosis(
        diagnosis_id=f"d-{unique}",
        intent_id=f"target-{unique}",
        prompt_version=f"old-{unique}",
        window_from_ns=w0,
        window_to_ns=w0 + 3600 * 10**9,
    )
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(d, w0)
    assert p is not None, actor.last_reason
    rec = approve(p, "Ada", "ok", actor.backend, merge, diagnosis=d)
    return p, rec, actor.backend


def test_review_and_proposal_rows_round_trip(store: Store, repo: Path, unique: str) -> None:
    p, rec, _ = merged_proposal(repo, unique, *window()[:2])
    store.insert_records("reviews", review_rows([rec]))
    store.insert_records("proposals", proposal_rows([p]))
    (row,) = store.query(
        "SELECT * EXCEPT ts FROM reviews FINAL WHERE review_id = {r:String}", {"r": rec.review_id}
    )
    assert row == {k: v for k, v in rec.to_dict().items() if k != "v"}
    (prow,) = store.query(
        "SELECT * EXCEPT created_time FROM proposals FINAL WHERE proposal_id = {p:String}",
        {"p": p.proposal_id},
    )
    assert prow == {k: v for k, v in p.to_dict().items() if k != "v"}


def scenario(store: Store, repo: Path, unique: str, after_failures: int, after_n: int = 200):
    """A merged proposal and its conversations: target 60/200 failing before; controls steady."""
    w0, merge, now = window()
    old, new = f"old-{unique}", f"new-{unique}"
    rows = (
        tags(unique, "target", 200, 60, old, w0)
        + tags(unique, "target", after_n, after_failures, new, merge + 10**9)
        + tags(unique, "target", 50, 50, old, merge + 2 * 10**12)  # stragglers on the old version
        + tags(unique, "target", 50, 50, new, now + 10**9)  # after the verification time
        + tags(unique, "ctrl-a", 300, 60, old, w0)
        + tags(unique, "ctrl-a", 300, 61, new, merge + 10**9)
        + tags(unique, "ctrl-b", 300, 30, old, w0)
        + tags(unique, "ctrl-b", 300, 29, new, merge + 10**9)
    )
    store.insert_records("conversation_tags", rows)
    return (*merged_proposal(repo, unique, w0, merge), now)


def test_verify_fixed_writes_outcomes_and_comments_once(
    store: Store, repo: Path, unique: str
) -> None:
    p, rec, backend, now = scenario(store, repo, unique, after_failures=16)
    result = verify(store, review_rows([rec])[0], Config(), now, backend=backend, proposal=p)
    t = result.target
    assert (t.verdict, t.before_n, t.before_failures, t.after_n, t.after_failures) == (
        "fixed",
        200,
        60,
        200,
        16,
    )
    assert (t.before_version, t.after_version) == (f"old-{unique}", f"new-{unique}")
    assert t.diff_low < -0.22 + 0.001 < t.diff_high < 0 and t.p_value < 0.05
    assert not result.regressed and result.confounded == "" and result.commented
    assert {(c.intent_id, c.verdict) for c in result.controls} == {
        (f"ctrl-a-{unique}", "no_effect"),
        (f"ctrl-b-{unique}", "no_effect"),
    }
    stored = store.query(
        "SELECT intent_id, verdict, after_n FROM outcomes FINAL WHERE proposal_id = {p:String} "
        "ORDER BY intent_id",
        {"p": p.proposal_id},
    )
    assert [(r["intent_id"], r["verdict"]) for r in stored] == [
        (f"ctrl-a-{unique}", "no_effect"),
        (f"ctrl-b-{unique}", "no_effect"),
        (f"target-{unique}", "fixed"),
    ]
    notes = backend.comments(p)
    assert len(notes) == 1 and "closeloop verification: fixed" in notes[0] and "30.0%" in notes[0]
    again = verify(store, rec, Config(), now + 1, backend=backend, proposal=p)
    assert again.target.verdict == "fixed" and not again.commented and len(backend.comments(p)) == 1


def test_verify_regression_flags_a_new_diagnosis(store: Store, repo: Path, unique: str) -> None:
    p, rec, backend, now = scenario(store, repo, unique, after_failures=110)
    result = verify(store, rec, Config(), now, backend=backend, proposal=p)
    assert (result.target.verdict, result.confounded) == ("regressed", "") and result.regressed
    assert "A regression" in backend.comments(p)[0]


def test_verify_waits_for_enough_conversations(store: Store, repo: Path, unique: str) -> None:
    p, rec, backend, now = scenario(store, repo, unique, after_failures=0, after_n=12)
    result = verify(store, rec, Config(), now, backend=backend, proposal=p)
    assert result.target.verdict == "not_enough_data" and result.target.after_n == 12
    assert not result.commented and backend.comments(p) == []


def assert_target_fixed(
    store: Store,
    repo: Path,
    unique: str,
    times: tuple[int, int, int],
    counts: tuple[int, int, int, int],
    control: str,
) -> None:
    """Verify the merged proposal of ``target-<unique>``: fixed, measured on ``counts`` (before
    n, before failures, after n, after failures), with ``<control>-<unique>`` the only control."""
    w0, merge, now = times
    p, rec, backend = merged_proposal(repo, unique, w0, merge)
    result = verify(store, rec, Config(), now, backend=backend, proposal=p)
    t = result.target
    assert (t.intent_id, t.verdict) == (f"target-{unique}", "fixed")
    assert (t.before_n, t.before_failures, t.after_n, t.after_failures) == counts
    assert {c.intent_id for c in result.controls} == {f"{control}-{unique}"}


def test_an_intent_merged_since_is_measured_as_the_intent_it_joined(
    store: Store, repo: Path, unique: str
) -> None:
    """The fixed intent was merged into another after the diagnosis: the conversations after
    the merge carry the other's id. Both count for the fix, and the other is no control."""
    w0, merge, now = window()
    old, new = f"old-{unique}", f"new-{unique}"
    rows = (
        tags(unique, "target", 100, 60, old, w0)
        + tags(unique, "joined", 100, 50, old, w0 + 10**9)
        + tags(unique, "joined", 200, 10, new, merge + 10**9)
        + tags(unique, "ctrl", 300, 30, old, w0)
        + tags(unique, "ctrl", 300, 29, new, merge + 10**9)
    )
    store.insert_records("conversation_tags", rows)
    intent = {"description": "", "keywords": [], "examples": [], "size": 1, "created_ns": w0}
    store.insert_records(
        "intents",
        [
            {
                **intent,
                "intent_id": f"target-{unique}",
                "name": "t",
                "status": "merged",
                "parent_id": f"joined-{unique}",
                "taxonomy_version": 2,
                "updated_ns": merge,
            },
            {
                **intent,
                "intent_id": f"joined-{unique}",
                "name": "j",
                "status": "active",
                "parent_id": "",
                "taxonomy_version": 2,
                "updated_ns": merge,
            },
        ],
    )
    assert_target_fixed(store, repo, unique, (w0, merge, now), (200, 110, 200, 10), "ctrl")


def test_an_intent_split_off_since_the_diagnosis_is_measured_with_it(
    store: Store, repo: Path, unique: str
) -> None:
    """A re-clustering after the diagnosis split part of the fixed intent off (its conversations
    re-tagged, before the merge too): it is measured with the fixed intent, not as a control. An
    intent split off before the diagnosis was another intent when diagnosed: it stays a control."""
    w0, merge, now = window()
    old, new = f"old-{unique}", f"new-{unique}"
    diagnosed = w0 + 3600 * 10**9
    rows = (
        tags(unique, "target", 100, 60, old, w0)
        + tags(unique, "target", 100, 5, new, merge + 10**9)
        + tags(unique, "sliver", 50, 30, old, w0 + 10**9)
        + tags(unique, "sliver", 50, 2, new, merge + 10**9)
        + tags(unique, "older", 100, 60, old, w0)
        + tags(unique, "older", 100, 58, new, merge + 10**9)
    )
    store.insert_records("conversation_tags", rows)
    intent = {"description": "", "keywords": [], "examples": [], "size": 1, "name": "x"}
    child = {**intent, "status": "active", "parent_id": f"target-{unique}", "taxonomy_version": 3}
    store.insert_records(
        "intents",
        [
            {
                **child,
                "intent_id": f"sliver-{unique}",
                "created_ns": merge - 10**9,
                "updated_ns": merge,
            },
            {**child, "intent_id": f"older-{unique}", "created_ns": w0, "updated_ns": w0},
        ],
    )
    d = diagnosis(diagnosis_id=f"d-{unique}", intent_id=f"target-{unique}")
    store.insert_records("diagnoses", [{**diagnosis_row(d), "updated_ns": diagnosed}])
    assert_target_fixed(store, repo, unique, (w0, merge, now), (150, 90, 150, 7), "older")


def _open(store: Store, repo: Path, unique: str, tag: str, thing: str):
    d = diagnosis(
        diagnosis_id=f"d-{tag}-{unique}",
        intent_id=f"{tag}-{unique}",
        evidence={"thing_name": thing},
    )
    store.insert_records(
        "diagnoses",
        [diagnosis_row(d)],
    )
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(d, BASE)
    assert p is not None, actor.last_reason
    store.insert_records("proposals", proposal_rows([p]))
    return p


def test_conflicting_approval_is_rebuilt_for_a_fresh_look(
    store: Store, repo: Path, unique: str
) -> None:
    cfg, backend = config(repo), LocalGit(repo)
    first, second = (
        _open(store, repo, unique, "a", "API key"),
        _open(store, repo, unique, "b", "order id"),
    )
    decide(store, backend, first.proposal_id, "approve", "Ada", "ok", BASE + 1, cfg=cfg)
    # both append to the end of the prompt: the second no longer merges, and is never merged blind
    with pytest.raises(StaleProposal) as stale:
        decide(store, backend, second.proposal_id, "approve", "Ada", "ok", BASE + 2, cfg=cfg)
    assert (
        stale.value.proposal.version == second.version + 1
        and stale.value.proposal.commit != second.commit
    )
    record, updated = decide(
        store, backend, second.proposal_id, "approve", "Ada", "ok", BASE + 3, cfg=cfg
    )
    prompt = subprocess.run(
        ["git", "-C", str(repo), "show", "main:prompts/system.md"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "API key" in prompt
        and "order id" in prompt
        and updated.status == "merged"
        and record.merged_commit
    )


def test_approval_of_a_change_the_base_already_holds_is_recorded_not_merged(
    store: Store,
    repo: Path,
    unique: str,
) -> None:
    cfg, backend = config(repo), LocalGit(repo)
    first, same = (
        _open(store, repo, unique, "a", "API key"),
        _open(store, repo, unique, "b", "API key"),
    )
    rec1, _ = decide(store, backend, first.proposal_id, "approve", "Ada", "ok", BASE + 1, cfg=cfg)
    rec2, updated = decide(
        store, backend, same.proposal_id, "approve", "Grace", "ok", BASE + 2, cfg=cfg
    )
    assert rec2.merged_commit == rec1.merged_commit == backend.base_commit()
    assert (
        rec2.reviewer == "Grace"
        and "already holds this change" in rec2.comment
        and updated.status == "merged"
    )
    merges = subprocess.run(
        ["git", "-C", str(repo), "rev-list", "--merges", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert merges == [rec1.merged_commit]


def test_a_proposal_re_versioned_during_approval_is_shown_again_not_merged_blind(
    store: Store, repo: Path, unique: str
) -> None:
    from processors.review.loop import MovedProposal

    cfg, backend = config(repo), LocalGit(repo)
    shown = _open(store, repo, unique, "a", "API key")  # what the human looks at: version 1
    # meanwhile a newer diagnosis re-versions it: the branch moves first, its row after
    d = load_diagnosis_of(store, shown)
    newer = Actor(cfg, LocalGit(repo)).propose(
        dataclasses.replace(d, version=d.version + 1, evidence={"thing_name": "account id"}),
        BASE + 5,
    )
    assert newer is not None and newer.version == shown.version + 1

    def approve_version(version: int, now_ns: int):
        return decide(
            store,
            backend,
            shown.proposal_id,
            "approve",
            "Ada",
            "ok",
            now_ns,
            cfg=cfg,
            version=version,
        )

    with pytest.raises(MovedProposal):  # the branch is not the commit shown
        approve_version(shown.version, BASE + 6)
    store.insert_records("proposals", proposal_rows([newer]))
    with pytest.raises(MovedProposal) as moved:  # the row moved too: the new diff is handed back
        approve_version(shown.version, BASE + 7)
    assert (
        moved.value.proposal.version == newer.version and "account id" in moved.value.proposal.diff
    )
    assert git_show(repo, "main:prompts/system.md").count("account id") == 0  # nothing merged blind
    record, updated = approve_version(newer.version, BASE + 8)
    assert updated.status == "merged" and record.merged_commit
    assert "account id" in git_show(repo, "main:prompts/system.md")


def load_diagnosis_of(store: Store, proposal):
    from processors.review.loop import load_diagnosis

    d = load_diagnosis(store, proposal.diagnosis_id)
    assert d is not None
    return d


def git_show(repo: Path, what: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", what], capture_output=True, text=True, check=True
    ).stdout
