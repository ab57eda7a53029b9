"""The local git backend end to end: propose, update, replay, approve (merge), reject, refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from processors.act import Actor, notify
from processors.act.gitrepo import LocalGit
from processors.config import ActTarget, Config, LLMConfig
from processors.errors import ActError, LLMError, ReviewError
from processors.llm import LLM
from processors.records import Diagnosis
from processors.review.core import apply
from processors.review.loop import approve, reject
from tests.llm_server import FakeLLMServer

PROMPT_V1 = "You are the support agent of Acme.\n\nAlways confirm the order id.\n"
PROMPT_V2 = "You are the support agent of Acme.\n\nBe concise.\n"
AGENT_YAML = "model: gpt-4o-mini\ntools:\n  refund:\n    timeout_s: 2   # seconds\n"
T0 = 1_900_000_000 * 10**9
ENV = {
    "GIT_AUTHOR_NAME": "dev",
    "GIT_AUTHOR_EMAIL": "dev@localhost",
    "GIT_COMMITTER_NAME": "dev",
    "GIT_COMMITTER_EMAIL": "dev@localhost",
    "HOME": "/nonexistent",
    "PATH": os.environ["PATH"],
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=ENV
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with main checked out: the prompt (two versions) and a config."""
    r = tmp_path / "agent"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "prompts").mkdir()
    (r / "config").mkdir()
    (r / "prompts" / "system.md").write_text(PROMPT_V1)
    (r / "config" / "agent.yaml").write_text(AGENT_YAML)
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "v1")
    (r / "prompts" / "system.md").write_text(PROMPT_V2)
    git(r, "commit", "-q", "-am", "v2: shorter prompt")
    return r


def config(repo: Path) -> Config:
    cfg = Config()
    cfg.act.repo = str(repo)
    cfg.act.targets = [
        ActTarget("prompts/system.md", "prompt"),
        ActTarget("config/agent.yaml", "config"),
    ]
    return cfg


def diagnosis(**changes: object) -> Diagnosis:
    d = Diagnosis(
        diagnosis_id="d-77",
        intent_id="i-setup",
        intent_name="API setup",
        rule="repeated_ask",
        summary="the agent asks again for the API key",
        root_cause="no carry-forward instruction",
        component={"type": "prompt", "target": "prompts/system.md"},
        evidence={"thing_name": "API key"},
        trace_ids=["t1"],
        support=100,
        failures=40,
        failure_rate=0.4,
        baseline_rate=0.05,
        prompt_version="p-2",
        agent_version="1.0",
        window_from_ns=T0,
        window_to_ns=T0 + 10,
        updated_ns=T0,
    )
    return dataclasses.replace(d, **changes)


def test_propose_update_replay_and_approve(repo: Path) -> None:
    main_before = git(repo, "rev-parse", "main")
    actor = Actor(config(repo), LocalGit(repo))
    p1 = actor.propose(diagnosis(), T0 + 1)
    assert p1 is not None, actor.last_reason
    assert (p1.branch, p1.version, p1.backend, p1.files) == (
        "closeloop/d-77",
        1,
        "local",
        ["prompts/system.md"],
    )
    # base untouched, working tree untouched, the branch holds exactly the diff
    assert (
        git(repo, "rev-parse", "main") == main_before and git(repo, "status", "--porcelain") == ""
    )
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "rev-parse", "closeloop/d-77") == p1.commit
    assert git(repo, "rev-parse", f"{p1.commit}^") == main_before
    assert git(repo, "diff", "--name-only", "main", "closeloop/d-77") == "prompts/system.md"
    added = [
        ln
        for ln in git(repo, "diff", "main", "closeloop/d-77").splitlines()
        if ln.startswith("+") and "API key" in ln
    ]
    assert len(added) == 1
    assert (
        git(repo, "log", "-1", "--format=%an <%ae>", p1.commit) == "closeloop <closeloop@localhost>"
    )
    message = git(repo, "log", "-1", "--format=%B", p1.commit)
    assert (
        "d-77" in message
        and "asks again for the API key" in message
        and "Closeloop-Version: 1" in message
    )

    # the diagnosis is updated: same branch, version 2, still one commit on main
    p2 = actor.propose(
        diagnosis(version=2, failures=50, failure_rate=0.5, updated_ns=T0 + 5), T0 + 6
    )
    assert p2 is not None and (p2.branch, p2.version, p2.proposal_id) == (
        p1.branch,
        2,
        p1.proposal_id,
    )
    assert git(repo, "branch", "--list", "closeloop/*").split() == ["closeloop/d-77"]
    assert git(repo, "rev-list", "--count", "main..closeloop/d-77") == "1"
    assert "Closeloop-Version: 2" in git(repo, "log", "-1", "--format=%B", "closeloop/d-77")
    # a replay changes nothing, even when diagnose re-emitted the version later (after a restart)
    p3 = actor.propose(
        diagnosis(version=2, failures=50, failure_rate=0.5, updated_ns=T0 + 6), T0 + 7
    )
    assert (
        p3 is not None
        and p3.version == 2
        and p3.commit == p2.commit == git(repo, "rev-parse", "closeloop/d-77")
    )
    # the same version re-emitted with other evidence (diagnose replaying after a restart) changes nothing
    other = diagnosis(version=2, failures=50, failure_rate=0.5, evidence={"thing_name": "order id"})
    assert (
        actor.propose(other, T0 + 7) is None
        and "already answers diagnosis version 2" in actor.last_reason
    )
    assert git(repo, "rev-parse", "closeloop/d-77") == p2.commit

    # a stale review (of version 1) cannot merge version 2
    with pytest.raises(ReviewError, match="not the reviewed commit"):
        approve(dataclasses.replace(p2, commit=p1.commit), "Ada", "", actor.backend, T0 + 8)
    assert git(repo, "rev-parse", "main") == main_before

    rec = approve(p2, "Ada Lovelace", "good catch", actor.backend, T0 + 9, diagnosis=diagnosis())
    merge = git(repo, "rev-parse", "main")
    assert rec.merged_commit == merge and git(repo, "rev-parse", f"{merge}^2") == p2.commit
    assert git(repo, "rev-parse", f"{merge}^1") == main_before  # --no-ff: a real merge commit
    body = git(repo, "log", "-1", "--format=%B", merge)
    assert "Approved-by: Ada Lovelace" in body and p2.proposal_id in body and "d-77" in body
    # the checked-out main is consistent: files updated, nothing dirty
    assert "API key" in (repo / "prompts" / "system.md").read_text()
    assert git(repo, "status", "--porcelain") == ""
    assert apply(p2, rec, T0 + 10).status == "merged"
    assert actor.backend.status(p2)["merged_by"] == "Ada Lovelace"
    with pytest.raises(ReviewError, match="already"):
        approve(apply(p2, rec, T0 + 10), "Ada", "", actor.backend, T0 + 11)
    # merged: the same diagnosis is not proposed again
    assert actor.propose(diagnosis(version=3, updated_ns=T0 + 20), T0 + 20) is None
    assert "already merged" in actor.last_reason


def test_merge_refuses_when_local_edits_are_in_the_way(repo: Path) -> None:
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(diagnosis(), T0)
    main_before = git(repo, "rev-parse", "main")
    (repo / "prompts" / "system.md").write_text(PROMPT_V2 + "local edit\n")
    with pytest.raises(ReviewError, match="not applied"):
        approve(p, "Ada", "", actor.backend, T0 + 1)
    assert git(repo, "rev-parse", "main") == main_before
    assert (repo / "prompts" / "system.md").read_text() == PROMPT_V2 + "local edit\n"


def test_reject_leaves_base_untouched_and_is_final(repo: Path) -> None:
    main_before = git(repo, "rev-parse", "main")
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(diagnosis(), T0)
    rec = reject(p, "Bob", "wrong place", actor.backend, T0 + 1)
    assert rec.decision == "rejected" and rec.reviewer == "Bob"
    assert (
        git(repo, "rev-parse", "main") == main_before and git(repo, "status", "--porcelain") == ""
    )
    assert git(repo, "branch", "--list", "closeloop/*") == ""
    assert git(repo, "rev-parse", "refs/closeloop/closed/d-77") == p.commit
    assert "Rejected by Bob" in git(repo, "notes", "--ref=refs/notes/closeloop", "show", p.commit)
    assert actor.propose(diagnosis(version=2, updated_ns=T0 + 2), T0 + 2) is None
    assert "already closed" in actor.last_reason


def test_latency_config_fix_and_prompt_regression_revert(repo: Path) -> None:
    actor = Actor(config(repo), LocalGit(repo))
    lat = actor.propose(
        diagnosis(
            diagnosis_id="d-lat",
            rule="latency",
            evidence={},
            component={
                "type": "config",
                "target": "tools.refund.timeout_s",
                "detail": {"tool_duration_ms_max": 2000},
            },
        ),
        T0,
    )
    assert lat is not None, actor.last_reason
    assert (
        git(repo, "show", "closeloop/d-lat:config/agent.yaml")
        == AGENT_YAML.replace("timeout_s: 2", "timeout_s: 4").strip()
    )
    reg = actor.propose(diagnosis(diagnosis_id="d-reg", rule="prompt_regression"), T0)
    assert reg is not None, actor.last_reason
    assert git(repo, "show", "closeloop/d-reg:prompts/system.md") == PROMPT_V1.strip()


def test_symlinks_and_missing_allowlist_write_nothing(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("secret plans\n")
    (repo / "prompts" / "system.md").unlink()
    (repo / "prompts" / "system.md").symlink_to(outside)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "prompt is a symlink now")
    actor = Actor(config(repo), LocalGit(repo))
    assert actor.propose(diagnosis(), T0) is None and "symlink" in actor.last_reason
    cfg = config(repo)
    cfg.act.targets = []
    assert Actor(cfg, LocalGit(repo)).propose(diagnosis(), T0) is None
    assert git(repo, "branch", "--list", "closeloop/*") == ""


def test_bare_repository_merges_with_update_ref(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True, env=ENV)
    backend = LocalGit(bare)
    p = Actor(config(bare), backend).propose(diagnosis(), T0)
    assert p is not None
    rec = approve(p, "Ada", "", backend, T0 + 1)
    assert git(bare, "rev-parse", "main") == rec.merged_commit
    assert "API key" in git(bare, "show", "main:prompts/system.md")


def test_notify_posts_slack_json_and_survives_a_dead_webhook(repo: Path) -> None:
    got: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = config(repo)
        cfg.act.notify_webhook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        p = Actor(cfg, LocalGit(repo)).propose(diagnosis(), T0)
        assert p is not None
        assert (
            len(got) == 1
            and "opened a proposal" in got[0]["text"]
            and "closeloop/d-77" in got[0]["text"]
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    cfg.act.notify_webhook = f"http://127.0.0.1:{server.server_address[1]}/hook"  # now closed
    assert notify(p, cfg) is False


def test_backend_refuses_a_missing_base_or_a_non_repository(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ActError, match="no branch 'trunk'"):
        LocalGit(repo, "trunk")
    with pytest.raises(ActError, match="failed"):
        LocalGit(tmp_path)


def test_llm_edit_versions_the_templated_proposal_and_a_refused_one_leaves_it(
    repo: Path,
) -> None:
    actor = Actor(config(repo), LocalGit(repo))
    diag = diagnosis()
    templated = actor.propose(diag, T0 + 1)  # written first, before any LLM answers
    assert templated is not None and templated.source == "template"
    files = actor.llm_files(diag)
    assert files is not None and "prompts/system.md" in files
    refused = json.dumps(
        {"edits": [{"path": "prompts/system.md", "find": "absent", "replace": "x"}]}
    )
    with FakeLLMServer(lambda body: refused) as srv, pytest.raises(LLMError, match="refused"):
        actor.llm_change(diag, files, LLM(LLMConfig(base_url=srv.base_url, timeout_s=5)))
    assert git(repo, "show", f"{templated.branch}:prompts/system.md") != PROMPT_V2  # stands
    edit = {
        "path": "prompts/system.md",
        "find": "Be concise.",
        "replace": "Be concise; reuse keys.",
    }
    with FakeLLMServer(lambda body: json.dumps({"edits": [edit]})) as srv:
        change = actor.llm_change(diag, files, LLM(LLMConfig(base_url=srv.base_url, timeout_s=5)))
    better = actor.propose(diag, T0 + 2, change=change)
    assert better is not None, actor.last_reason
    assert (better.proposal_id, better.version, better.source) == (
        templated.proposal_id,
        templated.version + 1,
        "llm",
    )
    assert "reuse keys" in git(repo, "show", f"{better.branch}:prompts/system.md")


@pytest.mark.parametrize("status", ["resolved", "rejected", "superseded"])
def test_a_closed_diagnosis_gets_no_proposal(repo: Path, status: str) -> None:
    actor = Actor(config(repo), LocalGit(repo))
    assert actor.propose(diagnosis(status=status), T0 + 1) is None
    assert status in actor.last_reason
    assert "closeloop/d-77" not in git(repo, "branch", "--list")


def test_a_superseded_diagnosis_closes_its_open_proposal_once(repo: Path) -> None:
    main_before = git(repo, "rev-parse", "main")
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(diagnosis(), T0 + 1)
    assert p is not None, actor.last_reason
    superseded = diagnosis(version=2, status="superseded", updated_ns=T0 + 2)
    closed = actor.withdraw(superseded, p, T0 + 3)
    assert closed is not None, actor.last_reason
    assert (closed.proposal_id, closed.status, closed.version, closed.updated_ns) == (
        p.proposal_id,
        "closed",
        p.version + 1,
        T0 + 3,
    )
    # closed, never merged: the base and the working tree are as they were
    assert (
        git(repo, "rev-parse", "main") == main_before and git(repo, "status", "--porcelain") == ""
    )
    assert git(repo, "branch", "--list", "closeloop/*") == ""
    assert git(repo, "rev-parse", "refs/closeloop/withdrawn/d-77") == p.commit
    assert git(repo, "for-each-ref", "refs/closeloop/closed/") == ""  # no reviewer's close
    notes = actor.backend.comments(p)
    assert notes == ["Closed by closeloop: diagnosis superseded by a later analysis."]
    # a replay (the closed row stored) and a retry after a crash before the row was stored
    # (the row still open, the branch withdrawn) close nothing twice
    assert actor.withdraw(superseded, closed, T0 + 4) is None and "closed" in actor.last_reason
    again = actor.withdraw(superseded, p, T0 + 5)
    assert again is not None and again.status == "closed" and actor.backend.comments(p) == notes
    for status in ("open", "proposed", "resolved", "rejected"):
        assert actor.withdraw(diagnosis(status=status), p, T0 + 6) is None
    # what the branch answered, replayed, does not reopen it ...
    assert actor.propose(diagnosis(), T0 + 7) is None and "withdrawn" in actor.last_reason
    # ... the diagnosis found again later does: the proposal's next version, a row version
    # above its closed one, on a branch opened anew
    back = actor.propose(diagnosis(version=3, updated_ns=T0 + 8), T0 + 8)
    assert back is not None, actor.last_reason
    assert (back.proposal_id, back.status, back.version) == (p.proposal_id, "open", 3)
    assert back.version > closed.version
    assert git(repo, "rev-parse", "closeloop/d-77") == back.commit != p.commit
    assert git(repo, "rev-parse", "main") == main_before
    # a reviewer's close is final
    reject(back, "Bob", "no", actor.backend, T0 + 9)
    assert actor.propose(diagnosis(version=4, updated_ns=T0 + 10), T0 + 10) is None
    assert "already closed by a reviewer" in actor.last_reason
    assert actor.withdraw(diagnosis(version=5, status="superseded"), back, T0 + 11) is None


def test_a_merged_or_human_decided_proposal_is_not_closed_by_a_superseded_diagnosis(
    repo: Path,
) -> None:
    actor = Actor(config(repo), LocalGit(repo))
    p = actor.propose(diagnosis(), T0 + 1)
    superseded = diagnosis(version=2, status="superseded")
    assert actor.withdraw(superseded, dataclasses.replace(p, status="approved"), T0 + 2) is None
    assert git(repo, "rev-parse", "closeloop/d-77") == p.commit  # still open
    rec = approve(p, "Ada", "", actor.backend, T0 + 3)
    merged = git(repo, "rev-parse", "main")
    assert rec.merged_commit == merged
    assert actor.withdraw(superseded, p, T0 + 4) is None  # the row lags: the branch says merged
    assert "merged" in actor.last_reason and git(repo, "rev-parse", "main") == merged
    assert actor.backend.comments(p) == []


def test_the_demo_does_not_approve_a_proposal_withdrawn_while_it_was_shown(
    repo: Path, store, unique: str
) -> None:
    # diagnose superseded its diagnosis (a rule took its conversations) between the demo
    # showing the proposal and approving it: nothing merges, the demo goes on
    from processors.act import proposal_rows
    from processors.demo import approve_shown

    main_before = git(repo, "rev-parse", "main")
    cfg = config(repo)
    actor = Actor(cfg, LocalGit(repo))
    d = diagnosis(diagnosis_id=f"d-{unique}")
    p = actor.propose(d, T0 + 1)
    assert p is not None, actor.last_reason
    store.insert_records("proposals", proposal_rows([p]))
    closed = actor.withdraw(dataclasses.replace(d, version=2, status="superseded"), p, T0 + 2)
    assert closed is not None, actor.last_reason
    store.insert_records("proposals", proposal_rows([closed]))
    record = approve_shown(store, cfg, LocalGit(repo), p.proposal_id, p.version, "Ada", ask=False)
    assert record is None
    # `closeloop review` says why, once the superseded diagnosis is stored
    from processors.diagnose.core import diagnosis_rows
    from processors.errors import ReviewError
    from processors.review.loop import decide

    store.insert_records("diagnoses", diagnosis_rows([dataclasses.replace(d, status="superseded")]))
    with pytest.raises(ReviewError, match="withdrawn by closeloop"):
        decide(store, LocalGit(repo), p.proposal_id, "approve", "Ada", "", T0 + 3)
    assert git(repo, "rev-parse", "main") == main_before
    assert (
        store.scalar(
            "SELECT count() FROM reviews WHERE proposal_id = {p:String}", {"p": p.proposal_id}
        )
        == 0
    )
