"""The GitHub backend through real PyGithub against the local fake GitHub REST server."""

from __future__ import annotations

import dataclasses

import pytest

from processors.act import Actor
from processors.act.github import GitHubBackend
from processors.config import ActTarget, Config
from processors.errors import ActError
from processors.records import Diagnosis
from processors.review.core import apply
from processors.review.loop import approve, poll
from tests.fake_github import FakeGitHub

PROMPT = "You are the support agent of Acme.\n\nBe concise.\n"
CI = "on: push\njobs: {}\n"
T0 = 1_900_000_000 * 10**9


def diagnosis(**changes: object) -> Diagnosis:
    d = Diagnosis(
        diagnosis_id="diag-42",
        intent_id="i-setup",
        intent_name="API setup",
        rule="repeated_ask",
        summary="users abandon at turn 3: the agent asks again for the API key they gave at turn 1",
        root_cause="the prompt does not carry the API key forward",
        confidence=0.8,
        component={"type": "prompt", "target": "prompts/system.md"},
        evidence={"thing_name": "API key", "asked_turn": 3},
        trace_ids=["0af7651916cd43dd8448eb211c80319c"],
        support=100,
        failures=40,
        failure_rate=0.4,
        baseline_rate=0.05,
        prompt_version="p-7",
        agent_version="1.2.0",
        window_from_ns=T0,
        window_to_ns=T0 + 3600 * 10**9,
        updated_ns=T0,
    )
    return dataclasses.replace(d, **changes)


def config(gh: FakeGitHub) -> Config:
    cfg = Config()
    cfg.act.backend = "github"
    cfg.act.repo = "acme/agent"
    cfg.act.github_url = gh.base_url
    cfg.act.targets = [ActTarget("prompts/system.md", "prompt")]
    cfg.act.labels = ["closeloop", "agent-fix"]
    cfg.act.github_throttle_s = 0.0
    cfg.web.trace_url = "https://traces.example/{trace_id}"
    return cfg


def writes_to_base(gh: FakeGitHub) -> list:
    out = []
    for r in gh.writes():
        ref = (r.body or {}).get("ref", "") if isinstance(r.body, dict) else ""
        if (
            r.path.endswith("/git/refs/heads/main")
            or ref == "refs/heads/main"
            or "/merge" in r.path
            or "/contents/" in r.path
        ):
            out.append(r)
    return out


def test_pull_request_opened_updated_and_recorded_without_closeloop_merging() -> None:
    with FakeGitHub(
        "acme/agent", {"prompts/system.md": PROMPT, ".github/workflows/ci.yml": CI}
    ) as gh:
        cfg = config(gh)
        actor = Actor(cfg, GitHubBackend(cfg.act, token="test-token"))
        main_before = gh.refs["heads/main"]

        p1 = actor.propose(diagnosis(), T0 + 1)
        assert p1 is not None, actor.last_reason
        assert (p1.backend, p1.branch, p1.pr_number, p1.version) == (
            "github",
            "closeloop/diag-42",
            1,
            1,
        )
        assert p1.pr_url.endswith("/acme/agent/pull/1") and p1.status == "open"
        created = [r for r in gh.writes() if r.path.endswith("/git/refs")]
        assert [r.body["ref"] for r in created] == ["refs/heads/closeloop/diag-42"]
        (opened,) = [r for r in gh.writes() if r.path.endswith("/pulls")]
        assert opened.body["base"] == "main" and opened.body["head"] == "closeloop/diag-42"
        body = opened.body["body"]
        for expected in (
            "asks again for the API key",
            "40.0%",
            "baseline 5.0%",
            "`p-7`",
            "[`0af7651916cd43dd8448eb211c80319c`](https://traces.example/0af7651916cd43dd8448eb211c80319c)",
            "prompts/system.md | +2 -0",
            "at least **30** conversations",
        ):
            assert expected in body, expected
        assert gh.labels[1] == ["closeloop", "agent-fix"]
        assert "API key" in gh.file_at("closeloop/diag-42", "prompts/system.md")
        assert gh.file_at("closeloop/diag-42", ".github/workflows/ci.yml") == CI
        commit = gh.commits[p1.commit]
        assert commit["parents"] == [main_before] and "diag-42" in commit["message"]
        assert commit["author"]["name"] == "closeloop"

        # the diagnosis comes back with more evidence: same branch and PR, version 2
        n_requests = len(gh.requests)
        p2 = actor.propose(
            diagnosis(version=2, failures=55, failure_rate=0.55, updated_ns=T0 + 50), T0 + 60
        )
        assert p2 is not None, actor.last_reason
        assert (p2.branch, p2.pr_number, p2.version, p2.created_ns) == (p1.branch, 1, 2, T0 + 1)
        assert len(gh.pulls) == 1
        new = gh.requests[n_requests:]
        (forced,) = [r for r in new if r.method == "PATCH" and "/git/refs/" in r.path]
        assert (
            forced.path.endswith("/git/refs/heads/closeloop/diag-42")
            and forced.body["force"] is True
        )
        assert any(
            r.method == "PATCH" and r.path.endswith("/pulls/1") and "55.0%" in r.body["body"]
            for r in new
        )
        assert "version 2" in gh.comments[1][-1] and "55/100" in gh.comments[1][-1]

        # an exact replay writes nothing
        n_writes = len(gh.writes())
        p3 = actor.propose(
            diagnosis(version=2, failures=55, failure_rate=0.55, updated_ns=T0 + 50), T0 + 70
        )
        assert p3 is not None and p3.version == 2 and p3.commit == p2.commit
        assert len(gh.writes()) == n_writes

        # review: a human approves and merges on GitHub; closeloop only records it
        backend = actor.backend
        assert poll(p2, backend, T0 + 80) == []
        gh.add_review(1, "dave")
        merge_sha = gh.merge_pr(1, by="carol")
        records = poll(p2, backend, T0 + 90, diagnosis=diagnosis())
        assert [(r.decision, r.reviewer) for r in records] == [
            ("approved", "dave"),
            ("merged", "carol"),
        ]
        assert records[1].merged_commit == merge_sha and records[1].before_prompt_version == "p-7"
        merged = apply(apply(p2, records[0], T0 + 91), records[1], T0 + 92)
        assert merged.status == "merged"
        assert writes_to_base(gh) == []

        # once merged the diagnosis is not proposed again
        assert actor.propose(diagnosis(version=3, updated_ns=T0 + 100), T0 + 100) is None
        assert "already merged" in actor.last_reason


def test_approving_in_closeloop_comments_and_never_merges() -> None:
    with FakeGitHub("acme/agent", {"prompts/system.md": PROMPT}) as gh:
        cfg = config(gh)
        backend = GitHubBackend(cfg.act, token="t")
        p = Actor(cfg, backend).propose(diagnosis(), T0)
        rec = approve(p, "Ada", "ship it", backend, T0 + 5)
        assert rec.decision == "approved" and rec.merged_commit == ""
        assert gh.comments[1][-1].startswith("Approved by Ada")
        assert gh.pulls[1]["merged"] is False and writes_to_base(gh) == []
        with pytest.raises(ActError, match="does not merge on GitHub"):
            backend.merge(p, "Ada", "")


def test_symlinked_target_is_refused() -> None:
    with FakeGitHub(
        "acme/agent",
        {"prompts/system.md": PROMPT},
        symlinks={"prompts/system.md": "../../secrets.env"},
    ) as gh:
        cfg = config(gh)
        actor = Actor(cfg, GitHubBackend(cfg.act, token="t"))
        assert actor.propose(diagnosis(), T0) is None
        assert "symlink" in actor.last_reason and gh.writes() == []


def test_missing_token_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    with pytest.raises(ActError, match="GITHUB_TOKEN"):
        GitHubBackend(Config().act)


def test_a_superseded_diagnosis_closes_its_pull_request_once_without_merging() -> None:
    with FakeGitHub("acme/agent", {"prompts/system.md": PROMPT}) as gh:
        cfg = config(gh)
        actor = Actor(cfg, GitHubBackend(cfg.act, token="t"))
        p = actor.propose(diagnosis(), T0)
        assert p is not None, actor.last_reason
        superseded = diagnosis(version=2, status="superseded", updated_ns=T0 + 1)
        closed = actor.withdraw(superseded, p, T0 + 2)
        assert closed is not None, actor.last_reason
        assert (closed.status, closed.version, closed.pr_number) == ("closed", 2, 1)
        assert gh.pulls[1]["state"] == "closed" and gh.pulls[1]["merged"] is False
        assert gh.comments[1] == ["Closed by closeloop: diagnosis superseded by a later analysis."]
        assert writes_to_base(gh) == []
        # review's poll sees the pull request closed; the stored row already says so
        assert poll(closed, actor.backend, T0 + 3) == []
        # a retry with the row still open writes nothing more to GitHub
        n_writes = len(gh.writes())
        again = actor.withdraw(superseded, p, T0 + 4)
        assert again is not None and again.status == "closed" and len(gh.writes()) == n_writes
        assert actor.propose(diagnosis(), T0 + 5) is None and len(gh.writes()) == n_writes

        # the diagnosis found again: the same pull request, reopened before its branch moves
        back = actor.propose(diagnosis(version=3, updated_ns=T0 + 6), T0 + 6)
        assert back is not None, actor.last_reason
        assert (back.pr_number, back.version, back.status) == (1, 3, "open")
        assert gh.pulls[1]["state"] == "open" and len(gh.pulls) == 1
        assert gh.refs["heads/closeloop/diag-42"] == back.commit != p.commit
        assert writes_to_base(gh) == []

        # closed by a reviewer on GitHub (their word last): final
        gh.pulls[1]["state"] = "closed"
        gh.comments[1].append("not this way")
        assert actor.propose(diagnosis(version=4, updated_ns=T0 + 7), T0 + 7) is None
        assert "already closed by a reviewer" in actor.last_reason
        assert gh.pulls[1]["state"] == "closed"
