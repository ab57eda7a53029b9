"""The review page over a real chDB store and a real local git repository: auth, CSRF,
same-origin, decisions (approve merges, reject closes) with attribution, escaping, the API."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from processors.act import Actor, proposal_rows
from processors.act.gitrepo import LocalGit
from processors.config import ActTarget, Config
from processors.diagnose.contrast import unexplained_rows
from processors.records import Diagnosis, Outcome, Proposal
from processors.review.core import outcome_rows
from processors.store import Store
from processors.web.pages import sparkline
from processors.web.server import WebServer

T0 = 1_900_000_000 * 10**9
HOUR = 3600 * 10**9
SCRIPT = "<script>alert('x')</script>"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "dev",
    "GIT_AUTHOR_EMAIL": "dev@localhost",
    "GIT_COMMITTER_NAME": "dev",
    "GIT_COMMITTER_EMAIL": "dev@localhost",
    "HOME": "/nonexistent",
    "PATH": os.environ["PATH"],
}


def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env=GIT_ENV,
        input=stdin,
    ).stdout.strip()


@dataclass
class Seeded:
    repo: Path
    diagnosis: Diagnosis
    proposal: Proposal
    intent_id: str
    small_intent_id: str
    conversation_id: (
        str  # failed, with a transcript, tool calls and model calls; diagnosis evidence
    )
    trace_id: str  # its trace: the diagnosis' first trace id


def trace_of(unique: str, n: int) -> str:
    """A trace id of this seed's own (the store is shared with other tests)."""
    return hashlib.sha256(f"{unique}-{n}".encode()).hexdigest()[:32]


def seed_conversation(store: Store, conversation_id: str, trace_id: str) -> None:
    """The failed conversation the diagnosis cites: a transcript with a tool call that failed and
    untrusted text in it, its model calls and its tool calls, as the pipeline stores them."""
    messages = [
        {"role": "user", "content": "My API key does not work", "trace_id": trace_id, "ts_ns": T0},
        {
            "role": "assistant",
            "tool_name": "check_key",
            "tool_call_id": "call_1",
            "tool_arguments": json.dumps({"key_prefix": "sk-live"}),
            "trace_id": trace_id,
            "ts_ns": T0 + 1,
        },
        {
            "role": "tool",
            "tool_name": "check_key",
            "tool_call_id": "call_1",
            "content": "",
            "error": "timeout after 30 s",
            "trace_id": trace_id,
            "ts_ns": T0 + 2,
        },
        {"role": "assistant", "content": f"Please paste your key again {SCRIPT}", "ts_ns": T0 + 3},
    ]
    common = {"conversation_id": conversation_id, "trace_id": trace_id}
    store.insert_records(
        "turns",
        [
            {
                **common,
                "span_id": f"s{n}",
                "parent_span_id": "",
                "span_kind": "llm",
                "operation": "chat",
                "provider": "openai",
                "request_model": "gpt-4o-mini",
                "response_model": "gpt-4o-mini-2024",
                "agent_name": "a",
                "agent_version": "1.0",
                "prompt_version": "p-1",
                "system_instructions": "",
                "input_messages": "[]",
                "output_messages": "[]",
                "input_tokens": 120 + n,
                "output_tokens": 30 + n,
                "start_ns": T0 + n,
                "end_ns": T0 + n + 10**9,
                "duration_ms": 850.0 + n,
                "status": "OK",
                "error_type": "",
                "error_message": "",
                "redactions": 0,
            }
            for n in (1, 3)
        ],
    )
    store.insert_records(
        "tool_calls",
        [
            {
                **common,
                "span_id": "s2",
                "call_id": "call_1",
                "name": "check_key",
                "arguments": json.dumps({"key_prefix": "sk-live"}),
                "result": "",
                "error_type": "TimeoutError",
                "error_message": "timeout after 30 s",
                "start_ns": T0 + 2,
                "duration_ms": 30000.0,
                "agent_version": "1.0",
                "prompt_version": "p-1",
            }
        ],
    )
    store.insert_records(
        "conversations",
        [
            {
                "conversation_id": conversation_id,
                "version": 2,
                "start_ns": T0,
                "end_ns": T0 + 90 * 10**9,
                "closed_reason": "idle",
                "prompt_version": "p-1",
                "model": "gpt-4o-mini",
                "agent_name": "a",
                "agent_version": "1.0",
                "trace_ids": [trace_id],
                "messages": json.dumps(messages),
                "n_messages": 4,
                "n_user_turns": 1,
                "n_tool_calls": 1,
                "llm_calls": 2,
                "errors": 1,
                "input_tokens": 244,
                "output_tokens": 64,
                "latency_ms": 1704.0,
            }
        ],
    )


def seed(store: Store, cfg: Config, root: Path, unique: str) -> Seeded:
    """A git repository with a real proposal branch (made by the local act backend) and the rows
    of every layer around it, with untrusted ``<script>`` text planted in examples and evidence."""
    repo = root / "agent"
    (repo / "prompts").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "prompts" / "system.md").write_text(
        "You are the support agent of Acme.\n\nBe concise.\n"
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v1")
    cfg.act.repo = str(repo)
    cfg.act.targets = [ActTarget("prompts/system.md", "prompt")]
    intent, small = f"i-{unique}", f"i-small-{unique}"
    diag = Diagnosis(
        diagnosis_id=f"d-{unique}",
        intent_id=intent,
        intent_name="API setup",
        rule="repeated_ask",
        summary="the agent asks again for the API key",
        root_cause="no carry-forward instruction",
        component={"type": "prompt", "target": "prompts/system.md"},
        evidence={
            "item": "API key",
            "turn": 3,
            "agent_message_before_abandon": f"Please paste your key {SCRIPT}",
            "trace_ids": [trace_of(unique, 0)],
            "conversation_ids": [f"c-{unique}-0"],
        },
        trace_ids=[trace_of(unique, 0), trace_of(unique, 1)],
        support=100,
        failures=40,
        failure_rate=0.4,
        baseline_rate=0.05,
        prompt_version="p-1",
        agent_version="1.0",
        window_from_ns=T0,
        window_to_ns=T0 + 10 * HOUR,
        updated_ns=T0 + 10 * HOUR,
    )
    prop = Actor(cfg, LocalGit(repo)).propose(diag, T0 + 11 * HOUR)
    assert prop is not None
    store.insert_records("diagnoses", [{k: v for k, v in diag.to_dict().items() if k != "v"}])
    store.insert_records("proposals", proposal_rows([prop]))
    store.insert_records(
        "intents",
        [
            {
                "intent_id": intent,
                "name": f"API setup {SCRIPT}",
                "description": "connecting the API",
                "keywords": ["api", "key"],
                "examples": [f"how do I set my key {SCRIPT}"],
                "size": 40,
                "status": "active",
                "parent_id": "",
                "taxonomy_version": 3,
                "created_ns": T0,
                "updated_ns": T0,
            },
            {
                "intent_id": small,
                "name": "rare thing",
                "description": "",
                "keywords": [],
                "examples": ["my name is Jane Doe and my order is 555"],
                "size": 2,
                "status": "active",
                "parent_id": "",
                "taxonomy_version": 3,
                "created_ns": T0,
                "updated_ns": T0,
            },
        ],
    )
    store.insert_records(
        "intent_changes",
        [
            {
                "taxonomy_version": 3,
                "intent_id": intent,
                "change": "renamed",
                "name": "API setup",
                "other_id": "",
                "ts_ns": T0,
            }
        ],
    )
    store.insert_records(
        "conversation_tags",
        [
            {
                "conversation_id": f"c-{unique}-{i}",
                "conversation_version": 1,
                "intent_id": intent,
                "intent_name": "API setup",
                "taxonomy_version": 3,
                "signals": ["setup_friction"] if i % 2 else ["setup_friction", "churn_risk"],
                "outcome": "abandoned" if i < 4 else "resolved",
                "outcome_turn": 3,
                "failed": int(i < 4),
                "prompt_version": "p-1" if i < 6 else "p-2",
                "model": "m",
                "agent_version": "1.0",
                "ts_ns": T0 + i * HOUR,
            }
            for i in range(10)
        ],
    )
    store.insert_records(
        "conversations",
        [
            {
                "conversation_id": f"c-{unique}-{i}",
                "version": 1,
                "start_ns": T0 + i * HOUR,
                "end_ns": T0 + i * HOUR,
                "closed_reason": "end",
                "prompt_version": "p-1",
                "model": "m",
                "agent_name": "a",
                "agent_version": "1.0",
                "trace_ids": [],
                "messages": "[]",
                "n_messages": 0,
                "n_user_turns": 0,
                "n_tool_calls": 0,
                "llm_calls": 0,
                "errors": 0,
                "input_tokens": 0,
                "output_tokens": 0,
                "latency_ms": 0.0,
            }
            for i in range(1, 10)
        ],
    )
    seed_conversation(store, f"c-{unique}-0", trace_of(unique, 0))
    store.insert_records(
        "outcomes",
        outcome_rows(
            [
                Outcome(
                    proposal_id=prop.proposal_id,
                    intent_id=intent,
                    before_version="p-1",
                    after_version="p-2",
                    before_n=100,
                    before_failures=40,
                    after_n=80,
                    after_failures=8,
                    rate_before=0.4,
                    rate_after=0.1,
                    diff_low=-0.41,
                    diff_high=-0.19,
                    p_value=0.00002,
                    verdict="fixed",
                    ts_ns=T0 + 20 * HOUR,
                ),
                Outcome(
                    proposal_id=prop.proposal_id,
                    intent_id=small,
                    before_version="p-1",
                    after_version="p-2",
                    before_n=50,
                    before_failures=5,
                    after_n=45,
                    after_failures=5,
                    rate_before=0.1,
                    rate_after=0.111,
                    diff_low=-0.1,
                    diff_high=0.12,
                    p_value=0.8,
                    verdict="no_effect",
                    ts_ns=T0 + 20 * HOUR,
                ),
            ]
        ),
    )
    return Seeded(repo, diag, prop, intent, small, f"c-{unique}-0", trace_of(unique, 0))


# -- HTTP without a browser ------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    method: str = "GET",
    path: str = "/",
    *,
    cookie: str = "",
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One request, redirects not followed (so Set-Cookie and Location can be checked)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    hdrs = dict(headers or {})
    if cookie:
        hdrs["Cookie"] = cookie
    body = None
    if form is not None:
        body = urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    out = Response(resp.status, resp.headers, resp.read().decode())
    conn.close()
    return out


@pytest.fixture
def site(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> Iterator[tuple[WebServer, Seeded]]:
    config.web.trace_url = "https://traces.example/trace/{trace_id}"
    config.web.reviewer = "Ada Lovelace"  # the identity behind the page's token
    seeded = seed(store, config, tmp_path, unique)
    server = WebServer(
        config, store, backend_factory=lambda: LocalGit(seeded.repo), host="127.0.0.1", port=0
    )
    server.start()
    yield server, seeded
    server.stop()


def login(server: WebServer) -> str:
    r = call(
        server.url, path=urlsplit(server.login_url).path + "?" + urlsplit(server.login_url).query
    )
    assert r.status == 303 and r.headers["Location"] == "/"
    return r.headers["Set-Cookie"].split(";", 1)[0]


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, "no CSRF field on the page"
    return m.group(1)


def origin(server: WebServer) -> dict[str, str]:
    return {"Origin": server.url}


def review_rows(store: Store, pid: str) -> list[dict[str, Any]]:
    return store.query("SELECT * FROM reviews FINAL WHERE proposal_id = {p:String}", {"p": pid})


def proposal_row(store: Store, pid: str) -> dict[str, Any]:
    return store.query(
        "SELECT status, version FROM proposals FINAL WHERE proposal_id = {p:String}", {"p": pid}
    )[0]


# -- tests ----------------------------------------------------------------------------------


def test_everything_needs_the_token(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    token_file = server.cfg.run_dir() / "web-token"
    assert token_file.read_text().strip() == server.token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    for path in ("/", "/intents", f"/proposals/{s.proposal.proposal_id}"):
        r = call(server.url, path=path)
        assert r.status == 401 and str(token_file) in r.body
    r = call(server.url, path="/api/proposals")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "error" in r.json()
    assert (
        call(server.url, path="/api/proposals", headers={"Authorization": "Bearer nope"}).status
        == 401
    )
    assert call(server.url, path="/login?token=nope").status == 401
    assert (
        call(server.url, path="/", cookie=f"{server.cookie_name}=1.forged.deadbeef").status == 401
    )
    week = 7 * 24 * 3600
    stale = server.new_session(now_s=1_000_000)
    assert server.check_session(stale, now_s=1_000_000 + week - 1)
    assert server.check_session(stale, now_s=1_000_000 + week) is None
    assert call(server.url, path="/", cookie=f"{server.cookie_name}={stale}").status == 401
    # the liveness probe alone answers without it, and says nothing of the store
    r = call(server.url, path="/healthz")
    assert r.status == 200 and r.json() == {"status": "serving"}
    assert call(server.url, path="/healthz/../api/proposals").status == 401


def test_the_compose_health_check_of_the_page_passes_against_it(
    site: tuple[WebServer, Seeded],
) -> None:
    import sys

    import yaml

    server, _ = site
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    web = compose["services"]["web"]
    port = str(web["environment"]["CLOSELOOP_WEB_PORT"])
    test = web["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    argv = [sys.executable, *(a.replace(port, str(server.port)) for a in test[2:])]
    assert subprocess.run(argv, timeout=30).returncode == 0
    argv_closed = [a.replace(str(server.port), "1") for a in argv]  # nothing answers: fails
    assert subprocess.run(argv_closed, timeout=30, capture_output=True).returncode != 0


def test_login_sets_a_strict_httponly_cookie(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    r = call(server.url, path=f"/login?token={server.token}")
    assert r.status == 303
    attrs = [a.strip() for a in r.headers["Set-Cookie"].split(";")]
    assert "HttpOnly" in attrs and "SameSite=Strict" in attrs and "Path=/" in attrs
    cookie = attrs[0]
    page = call(server.url, path="/", cookie=cookie)
    assert page.status == 200 and s.proposal.title in page.body
    assert (
        "script-src" not in page.headers["Content-Security-Policy"]
    )  # default-src 'none': no scripts at all
    for path in (
        "/intents",
        "/diagnoses",
        "/proposals",
        "/outcomes",
        f"/diagnoses/{s.diagnosis.diagnosis_id}",
    ):
        r = call(server.url, path=path, cookie=cookie)
        assert r.status == 200 and "<h1>" in r.body, path
    assert s.proposal.title in call(server.url, path="/proposals", cookie=cookie).body
    assert call(server.url, path="/proposals/nope", cookie=cookie).status == 404


def test_post_without_csrf_token_is_refused(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    for form in ({"reviewer": "Mallory"}, {"reviewer": "Mallory", "csrf": "0" * 64}):
        r = call(
            server.url,
            "POST",
            f"/proposals/{pid}/approve",
            cookie=cookie,
            form=form,
            headers=origin(server),
        )
        assert r.status == 403
    assert (
        call(
            server.url,
            "POST",
            f"/proposals/{pid}/approve",
            form={"reviewer": "Mallory"},
            headers=origin(server),
        ).status
        == 401
    )
    assert (
        review_rows(server.store, pid) == [] and proposal_row(server.store, pid)["status"] == "open"
    )


def test_post_from_another_origin_is_refused(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    form = {
        "reviewer": "Mallory",
        "csrf": csrf_of(call(server.url, path=f"/proposals/{pid}", cookie=cookie).body),
    }
    for headers in (
        {"Origin": "http://evil.example"},
        {"Referer": "http://evil.example/x"},
        {},
        {"Origin": server.url.replace("http:", "https:")},
    ):
        r = call(
            server.url,
            "POST",
            f"/proposals/{pid}/approve",
            cookie=cookie,
            form=form,
            headers=headers,
        )
        assert r.status == 403, headers
    assert review_rows(server.store, pid) == []
    assert git(s.repo, "rev-parse", "main") == git(s.repo, "rev-parse", f"{s.proposal.commit}^")


def test_get_never_changes_state(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    r = call(server.url, path=f"/proposals/{pid}/approve?reviewer=Ada", cookie=cookie)
    assert r.status == 404
    assert (
        review_rows(server.store, pid) == [] and proposal_row(server.store, pid)["status"] == "open"
    )


def test_approve_merges_and_records_the_reviewer(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    base_before = git(s.repo, "rev-parse", "main")
    csrf = csrf_of(call(server.url, path=f"/proposals/{pid}", cookie=cookie).body)
    r = call(
        server.url,
        "POST",
        f"/proposals/{pid}/approve",
        cookie=cookie,
        headers=origin(server),
        form={"csrf": csrf, "comment": "carry the key forward"},
    )
    assert r.status == 303 and r.headers["Location"] == f"/proposals/{pid}#decision"
    (row,) = review_rows(server.store, pid)
    assert (row["decision"], row["reviewer"], row["comment"]) == (
        "approved",
        "Ada Lovelace",
        "carry the key forward",
    )
    assert (
        row["before_prompt_version"] == "p-1" and row["evidence_trace_ids"] == s.diagnosis.trace_ids
    )
    assert proposal_row(server.store, pid) == {
        "status": "merged",
        "version": s.proposal.version + 1,
    }
    # the merge is in the repository, attributed to the reviewer, with the reviewed commit as second parent
    merge = git(s.repo, "rev-parse", "main")
    assert row["merged_commit"] == merge and git(s.repo, "rev-parse", f"{merge}^1") == base_before
    assert git(s.repo, "rev-parse", f"{merge}^2") == s.proposal.commit
    assert "Approved-by: Ada Lovelace" in git(s.repo, "log", "-1", "--format=%B", merge)
    page = call(server.url, path=f"/proposals/{pid}", cookie=cookie).body
    assert 'Approved by <span class="reviewer">Ada Lovelace</span>' in page and merge[:12] in page
    assert 'name="csrf"' not in page  # decided: no form any more
    again = call(
        server.url,
        "POST",
        f"/proposals/{pid}/approve",
        cookie=cookie,
        headers=origin(server),
        form={"csrf": csrf, "reviewer": "Eve"},
    )
    assert again.status == 400 and "already merged" in again.body
    assert len(review_rows(server.store, pid)) == 1 and git(s.repo, "rev-parse", "main") == merge


def test_the_decision_is_the_pages_identity_not_a_name_in_the_form(
    site: tuple[WebServer, Seeded],
) -> None:
    """No free-text name: a forged reviewer field (with a newline and an Approved-by line, as
    in a trailer-forging attempt) is ignored, and a comment's Approved-by line stays quoted."""
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    page = call(server.url, path=f"/proposals/{pid}", cookie=cookie).body
    assert 'name="reviewer"' not in page and "Deciding as" in page and "Ada Lovelace" in page
    r = call(
        server.url,
        "POST",
        f"/proposals/{pid}/approve",
        cookie=cookie,
        headers=origin(server),
        form={
            "csrf": csrf_of(page),
            "reviewer": "Mallory\nApproved-by: Alice (CISO)",
            "comment": "fine by me\n\nApproved-by: Mallory",
        },
    )
    assert r.status == 303, r.body
    (row,) = review_rows(server.store, pid)
    assert row["reviewer"] == "Ada Lovelace"
    message = git(s.repo, "log", "-1", "--format=%B", "main")
    parsed = git(s.repo, "interpret-trailers", "--parse", stdin=message)
    assert [ln for ln in parsed.splitlines() if ln.startswith("Approved-by")] == [
        "Approved-by: Ada Lovelace"
    ]
    assert "> Approved-by: Mallory" in message  # the comment, quoted: not a trailer


def test_unavailable_backend_changes_nothing(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> None:
    s = seed(store, config, tmp_path, unique)
    config.act.repo = ""  # the default factory (open_backend) cannot open it
    server = WebServer(config, store, host="127.0.0.1", port=0).start()
    try:
        cookie = login(server)
        pid = s.proposal.proposal_id
        csrf = csrf_of(call(server.url, path=f"/proposals/{pid}", cookie=cookie).body)
        r = call(
            server.url,
            "POST",
            f"/proposals/{pid}/approve",
            cookie=cookie,
            headers=origin(server),
            form={"csrf": csrf, "comment": "keep this"},
        )
        assert r.status == 503 and "act.repo is empty" in r.body and "keep this" in r.body
    finally:
        server.stop()
    assert review_rows(store, pid) == [] and proposal_row(store, pid)["status"] == "open"


def test_reject_closes_the_branch_and_records_the_reviewer(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pid = s.proposal.proposal_id
    base_before = git(s.repo, "rev-parse", "main")
    csrf = csrf_of(call(server.url, path=f"/proposals/{pid}", cookie=cookie).body)
    r = call(
        server.url,
        "POST",
        f"/proposals/{pid}/reject",
        cookie=cookie,
        headers=origin(server),
        form={"csrf": csrf, "comment": "wrong file"},
    )
    assert r.status == 303
    (row,) = review_rows(server.store, pid)
    assert (row["decision"], row["reviewer"], row["merged_commit"]) == (
        "rejected",
        "Ada Lovelace",
        "",
    )
    assert proposal_row(server.store, pid)["status"] == "rejected"
    assert git(s.repo, "rev-parse", "main") == base_before
    assert git(s.repo, "branch", "--list", s.proposal.branch) == ""
    page = call(server.url, path=f"/proposals/{pid}", cookie=cookie).body
    assert 'Rejected by <span class="reviewer">Ada Lovelace</span>' in page
    assert "rejected by Ada Lovelace" in call(server.url, path="/proposals", cookie=cookie).body


def test_untrusted_text_is_escaped_everywhere(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    pages = {
        p: call(server.url, path=p, cookie=cookie)
        for p in ("/intents", f"/diagnoses/{s.diagnosis.diagnosis_id}", "/outcomes")
    }
    for path, r in pages.items():
        assert r.status == 200, path
        assert "<script" not in r.body, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in r.body, path
    diag = pages[f"/diagnoses/{s.diagnosis.diagnosis_id}"].body
    assert f'href="https://traces.example/trace/{s.trace_id}"' in diag
    assert f'href="/traces/{s.trace_id}"' in diag  # and to the conversation, on this page
    assert f'href="/conversations/{s.conversation_id}"' in diag
    assert "Please paste your key" in diag and "carry-forward" in diag


def test_intents_page_withholds_examples_of_small_intents(site: tuple[WebServer, Seeded]) -> None:
    server, _ = site
    body = call(server.url, path="/intents", cookie=login(server)).body
    assert "how do I set my key" in body and "Jane Doe" not in body
    assert '<svg class="spark"' in body and "renamed" in body


def test_api_json_shape(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    auth = {"Authorization": f"Bearer {server.token}"}
    r = call(server.url, path="/api/intents", headers=auth)
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    by_id = {i["intent_id"]: i for i in r.json()["intents"]}
    big, small = by_id[s.intent_id], by_id[s.small_intent_id]
    assert (big["conversations"], big["failures"], big["failure_rate"]) == (10, 4, 0.4)
    assert big["signal_rates"] == {"churn_risk": 0.5, "setup_friction": 1.0}
    assert sum(n for n, _ in big["series"]) == 10 and sum(f for _, f in big["series"]) == 4
    assert (
        big["examples"] == [f"how do I set my key {SCRIPT}"]
        and big["changes"][0]["change"] == "renamed"
    )
    assert small["examples"] == [] and small["examples_withheld"] is True
    props = {
        p["proposal_id"]: p
        for p in call(server.url, path="/api/proposals", headers=auth).json()["proposals"]
    }
    p = props[s.proposal.proposal_id]
    assert (p["status"], p["files"], p["last_decision"]) == ("open", ["prompts/system.md"], None)
    one = call(server.url, path=f"/api/proposals/{s.proposal.proposal_id}", headers=auth).json()
    assert (
        one["diff"] == s.proposal.diff
        and one["reviews"] == []
        and one["outcome"]["verdict"] == "fixed"
    )
    diags = {
        d["diagnosis_id"]: d
        for d in call(server.url, path="/api/diagnoses", headers=auth).json()["diagnoses"]
    }
    assert diags[s.diagnosis.diagnosis_id]["status"] == "open"
    d = call(server.url, path=f"/api/diagnoses/{s.diagnosis.diagnosis_id}", headers=auth).json()
    assert d["evidence"]["turn"] == 3 and d["component"]["target"] == "prompts/system.md"
    groups = {
        g["proposal_id"]: g
        for g in call(server.url, path="/api/outcomes", headers=auth).json()["outcomes"]
    }
    g = groups[s.proposal.proposal_id]
    assert g["target"]["verdict"] == "fixed" and [c["verdict"] for c in g["controls"]] == [
        "no_effect"
    ]
    over = call(server.url, path="/api/overview", headers=auth).json()
    assert over["counts"]["open_proposals"] >= 1 and over["verdicts"].get("fixed", 0) >= 1
    assert call(server.url, path="/api/proposals/nope", headers=auth).status == 404


def test_outcomes_page_shows_the_verdict_with_ci_and_p_value(
    site: tuple[WebServer, Seeded],
) -> None:
    server, s = site
    body = call(server.url, path="/outcomes", cookie=login(server)).body
    row = body[body.index(f'href="/proposals/{s.proposal.proposal_id}"') :]
    assert 'class="badge b-fixed">fixed' in row and "40.0%" in row and "10.0%" in row
    assert "-30.0%" in row and "[-41.0%, -19.0%]" in row and "2e-05" in row
    assert 'class="badge b-no_effect">no effect' in row


def test_conversation_page_shows_the_stored_conversation(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    r = call(server.url, path=f"/conversations/{s.conversation_id}", cookie=cookie)
    assert r.status == 200
    body = r.body
    assert "<script" not in body and "Please paste your key again &lt;script&gt;" in body
    assert "My API key does not work" in body  # the transcript, in order
    assert body.index("My API key does not work") < body.index("Please paste your key again")
    assert "check_key" in body and "sk-live" in body and "timeout after 30 s" in body
    assert "TimeoutError" in body and "30000 ms" in body  # the tool call with its error
    assert "gpt-4o-mini-2024" in body and "851 ms" in body and "121" in body  # model calls
    assert "244 in · 64 out" in body and "1.7 s" in body  # tokens, latency
    assert 'class="badge b-failed">failed' in body and "abandoned" in body  # the outcome
    assert f'href="/intents/{s.intent_id}"' in body
    assert f'href="https://traces.example/trace/{s.trace_id}"' in body

    # a trace id leads to its conversation; an unknown one says so
    r = call(server.url, path=f"/traces/{s.trace_id}", cookie=cookie)
    assert r.status == 303 and r.headers["Location"] == f"/conversations/{s.conversation_id}"
    assert call(server.url, path=f"/traces/{'0' * 32}", cookie=cookie).status == 404
    assert call(server.url, path="/conversations/nope", cookie=cookie).status == 404
    auth = {"Authorization": f"Bearer {server.token}"}
    api = call(server.url, path=f"/api/conversations/{s.conversation_id}", headers=auth).json()
    assert [m["role"] for m in api["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert api["tool_calls"][0]["error_type"] == "TimeoutError" and api["tag"]["failed"] == 1


def test_trace_ids_link_to_conversations_everywhere(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    cookie = login(server)
    proposal = call(server.url, path=f"/proposals/{s.proposal.proposal_id}", cookie=cookie).body
    assert f'href="/traces/{s.trace_id}"' in proposal  # the proposal's body cites the trace
    intent = call(server.url, path=f"/intents/{s.intent_id}", cookie=cookie).body
    assert f'href="/conversations/{s.conversation_id}"' in intent
    intents = call(server.url, path="/intents", cookie=cookie).body
    assert f'href="/intents/{s.intent_id}"' in intents and "0.00 h" not in intents


def test_intent_page_charts_the_failure_rate_with_axes_and_versions(
    site: tuple[WebServer, Seeded],
) -> None:
    server, s = site
    body = call(server.url, path=f"/intents/{s.intent_id}", cookie=login(server)).body
    svg = body[body.index('<svg class="chart"') : body.index("</svg>")]
    for label in ("0%", "50%", "100%"):  # the failure-rate axis
        assert f">{label}</text>" in svg
    assert re.search(r">\d\d-\d\d \d\d:\d\d</text>", svg)  # time on the x axis
    assert '<g class="version">' in svg and ">p-2</text>" in svg  # the prompt change, marked
    assert svg.count("<circle") == 10  # one point per hour of conversations
    assert "10 conversations tagged, 4 failed (40.0%)" in body
    # failed conversations first
    rows = re.findall(r'href="/conversations/([^"]+)"', body)
    assert rows[:4] == [f"c-{s.diagnosis.diagnosis_id[2:]}-{i}" for i in (3, 2, 1, 0)]


def test_control_rows_are_folded(site: tuple[WebServer, Seeded]) -> None:
    server, s = site
    body = call(server.url, path="/outcomes", cookie=login(server)).body
    row = body[body.index(f'href="/proposals/{s.proposal.proposal_id}"') :]
    folded = row[row.index('<tr class="controls">') :]
    assert "<details><summary>1 control intent: 1 with enough data, 0 moved</summary>" in folded
    assert f'href="/intents/{s.small_intent_id}"' in folded


def test_sparkline_scales_volume_and_failure_rate() -> None:
    svg = sparkline([[4, 0], [2, 2], [0, 0], [4, 1]], width=40, height=30)
    assert re.findall(r'<rect x="([\d.]+)" y="([\d.]+)"', svg) == [
        ("0.0", "0.0"),
        ("10.0", "15.0"),
        ("30.0", "0.0"),
    ]
    assert (
        '<polyline points="5.0,29.0 15.0,1.0 35.0,22.0"' in svg
    )  # 0%, 100%, 25%; the empty bucket skipped
    assert "no data" in sparkline([[0, 0], [0, 0]])


def test_github_webhook_is_authenticated_by_signature_and_recorded(store, config, unique) -> None:
    """POST /webhooks/github: no session needed, the HMAC signature is; a merge is recorded with its merger."""
    import hashlib
    import hmac
    import json as _json
    import urllib.error
    import urllib.request

    from processors.act import proposal_rows
    from processors.records import Proposal
    from processors.web.server import WebServer

    config.review.webhook_secret = "s3cret-" + unique
    p = Proposal(
        proposal_id=f"gh-{unique}",
        diagnosis_id=f"d-{unique}",
        intent_id="i",
        backend="github",
        repo="acme/agent",
        base="main",
        branch=f"closeloop/{unique}",
        title="t",
        body="b",
        diff="d",
        pr_number=7,
        status="open",
    )
    store.insert_records("proposals", proposal_rows([p]))
    payload = _json.dumps(
        {
            "action": "closed",
            "number": 7,
            "repository": {"full_name": "acme/agent"},
            "pull_request": {
                "number": 7,
                "merged": True,
                "merged_by": {"login": "grace"},
                "merge_commit_sha": "abc123",
                "head": {"ref": p.branch},
            },
        }
    ).encode()
    server = WebServer(config, store, port=0).start()
    try:

        def deliver(sig: str) -> tuple[int, bytes]:
            req = urllib.request.Request(
                f"{server.url}/webhooks/github",
                data=payload,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "X-GitHub-Event": "pull_request",
                    "X-Hub-Signature-256": sig,
                },
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert deliver("sha256=" + "0" * 64)[0] == 401
        assert deliver("")[0] == 401
        assert (
            store.scalar(
                "SELECT count() FROM reviews FINAL WHERE proposal_id = {p:String}",
                {"p": p.proposal_id},
            )
            == 0
        )
        good = (
            "sha256="
            + hmac.new(config.review.webhook_secret.encode(), payload, hashlib.sha256).hexdigest()
        )
        status, body = deliver(good)
        assert status == 200, body
    finally:
        server.stop()
    (row,) = store.query(
        "SELECT decision, reviewer, merged_commit FROM reviews FINAL WHERE proposal_id = {p:String}",
        {"p": p.proposal_id},
    )
    assert row == {"decision": "merged", "reviewer": "grace", "merged_commit": "abc123"}
    assert (
        store.scalar(
            "SELECT status FROM proposals FINAL WHERE proposal_id = {p:String}",
            {"p": p.proposal_id},
        )
        == "merged"
    )


def explained_row(s: Seeded, detail: str) -> dict:
    """The seeded conversation as its diagnosis explains it (a ``diagnosis_conversations`` row)."""
    return {
        "diagnosis_id": s.diagnosis.diagnosis_id,
        "conversation_id": s.conversation_id,
        "intent_id": s.intent_id,
        "failure_kind": "tool_error",
        "trace_id": s.trace_id,
        "turn": 2,
        "tool": "check_key",
        "arguments": "{}",
        "detail": detail,
        "version": 1,
        "updated_ns": T0,
    }


def test_conversation_page_shows_feedback_and_the_diagnoses_that_explain_it(
    store: Store, site: tuple[WebServer, Seeded]
) -> None:
    server, s = site
    cookie = login(server)
    before = call(server.url, path=f"/conversations/{s.conversation_id}", cookie=cookie).body
    assert "None received." in before and "Explained by" not in before
    store.insert_records(
        "feedback",
        [
            {
                "conversation_id": s.conversation_id,
                "name": "user_rating",
                "score": 0.0,
                "label": "thumbs_down",
                "explanation": "still broken <img src=x onerror=alert(1)>",
                "source": "feedback",
                "ts_ns": T0 + 3_600_000_000_000,
            }
        ],
    )
    store.insert_records("diagnosis_conversations", [explained_row(s, "timed out")])
    body = call(server.url, path=f"/conversations/{s.conversation_id}", cookie=cookie).body
    assert "thumbs_down" in body and "user_rating" in body
    assert "<img" not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "Explained by" in body and f'href="/diagnoses/{s.diagnosis.diagnosis_id}"' in body
    assert "tool_error" in body and "turn 2" in body
    # a later analysis grouped it elsewhere, short of a new version: the row at the same
    # version written after it says so, and the page no longer lists the diagnosis
    moved = replace(s.diagnosis, version=1, updated_ns=T0 + 1)
    store.insert_records("diagnosis_conversations", unexplained_rows(moved, [s.conversation_id]))
    body = call(server.url, path=f"/conversations/{s.conversation_id}", cookie=cookie).body
    assert "thumbs_down" in body and "Explained by" not in body
