"""Review core: state machine, human-only decisions, GitHub status and webhooks, rows."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from processors.act.gitrepo import quoted, trailers
from processors.errors import ReviewError
from processors.records import Diagnosis, Proposal
from processors.review.core import (
    apply,
    handle_webhook,
    next_status,
    records_from_event,
    records_from_status,
    review_id,
    review_rows,
)
from processors.review.loop import approve, counts_query, reject

SECRET = "whsec-test"


class RecordingBackend:
    """An in-memory stand-in for a ChangeBackend that records what review asked of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.repo, self.base = "acme/agent", "main"
        self.calls: list[tuple[str, Any]] = []

    def merge(self, proposal: Proposal, reviewer: str, comment: str) -> str:
        self.calls.append(("merge", reviewer))
        return "f" * 40

    def close(self, proposal: Proposal, note: str) -> None:
        self.calls.append(("close", note))

    def comment(self, proposal: Proposal, text: str) -> None:
        self.calls.append(("comment", text))


def proposal(status: str = "open", backend: str = "local") -> Proposal:
    return Proposal(
        proposal_id="p1",
        diagnosis_id="d1",
        intent_id="i1",
        backend=backend,
        repo="acme/agent",
        base="main",
        branch="closeloop/d1",
        title="closeloop: fix",
        body="",
        diff="",
        commit="c" * 40,
        pr_number=7,
        status=status,
    )


DIAG = Diagnosis(
    diagnosis_id="d1",
    intent_id="i1",
    intent_name="billing",
    rule="repeated_ask",
    summary="s",
    root_cause="r",
    trace_ids=["t1", "t2"],
    prompt_version="p-old",
    agent_version="a-old",
    window_from_ns=100,
    window_to_ns=200,
)


def test_state_machine() -> None:
    assert next_status("open", "approved") == "approved"
    assert next_status("approved", "merged") == "merged"
    assert next_status("open", "merged") == "merged"  # merged on GitHub without a formal review
    for status, decision in [
        ("merged", "approved"),
        ("rejected", "approved"),
        ("closed", "merged"),
        ("approved", "rejected"),
    ]:
        with pytest.raises(ReviewError, match="already"):
            next_status(status, decision)


def test_local_approve_merges_for_a_named_human_and_records_the_context() -> None:
    be = RecordingBackend("local")
    rec = approve(proposal(), "  Ada   Lovelace ", "looks right", be, 1_000, diagnosis=DIAG)
    assert be.calls == [("merge", "Ada Lovelace")]
    assert (
        rec.decision == "approved"
        and rec.reviewer == "Ada Lovelace"
        and rec.merged_commit == "f" * 40
    )
    assert (rec.before_prompt_version, rec.before_agent_version) == ("p-old", "a-old")
    assert rec.evidence_trace_ids == ["t1", "t2"] and (rec.window_from_ns, rec.window_to_ns) == (
        100,
        200,
    )
    assert rec.review_id == review_id("p1", "approved") != review_id("p1", "rejected")
    assert apply(proposal(), rec, 2_000).status == "merged"


def test_github_approve_never_merges() -> None:
    be = RecordingBackend("github")
    rec = approve(proposal(backend="github"), "ada", "", be, 1_000)
    assert [c[0] for c in be.calls] == ["comment"] and rec.merged_commit == ""
    assert apply(proposal(backend="github"), rec, 2).status == "approved"


@pytest.mark.parametrize("reviewer", ["", "   ", "\n"])
def test_no_decision_without_a_reviewer_name(reviewer: str) -> None:
    be = RecordingBackend("local")
    with pytest.raises(ReviewError, match="name of the human"):
        approve(proposal(), reviewer, "", be, 1)
    with pytest.raises(ReviewError, match="name of the human"):
        reject(proposal(), reviewer, "", be, 1)
    assert be.calls == []


@pytest.mark.parametrize(
    "reviewer",
    [
        "Mallory\nApproved-by: Alice (CISO)",
        "Mallory\rApproved-by: Alice",
        "Mallory\u2028Approved-by: Alice",
        "Eve\x00",
        "Eve\u202egnp.exe",
        "x" * 101,
    ],
)
def test_a_reviewer_name_cannot_forge_a_trailer(reviewer: str) -> None:
    be = RecordingBackend("local")
    with pytest.raises(ReviewError, match="control character|longer than"):
        approve(proposal(), reviewer, "", be, 1)
    assert be.calls == []


def test_trailers_are_read_from_the_last_paragraph_only() -> None:
    message = (
        "Merge closeloop/x: t\n\n> Approved-by: Mallory\nApproved-by: Eve\n\n"
        "Closeloop-Proposal: p1\nApproved-by: Ada Lovelace\n"
    )
    assert trailers(message) == {"Closeloop-Proposal": "p1", "Approved-by": "Ada Lovelace"}
    assert quoted("ok\n\nApproved-by: Mallory") == "> ok\n>\n> Approved-by: Mallory"


def test_decided_proposals_are_refused() -> None:
    be = RecordingBackend("local")
    for status in ("approved", "merged", "rejected", "closed"):
        with pytest.raises(ReviewError):
            approve(proposal(status), "ada", "", be, 1)
    with pytest.raises(ReviewError):
        reject(proposal("merged"), "ada", "", be, 1)
    assert be.calls == []


def test_reject_closes() -> None:
    be = RecordingBackend("local")
    rec = reject(proposal(), "bob", "wrong fix", be, 5)
    assert (
        be.calls == [("close", "Rejected by bob in closeloop review. wrong fix")]
        and rec.decision == "rejected"
        and rec.comment == "wrong fix"
    )
    assert apply(proposal(), rec, 6).status == "rejected"


def test_records_from_github_status() -> None:
    p = proposal(backend="github")
    status = {
        "state": "closed",
        "merged": True,
        "merged_by": "carol",
        "merge_commit_sha": "m" * 40,
        "merged_ns": 9_000,
        "reviews": [
            {"user": "dave", "state": "APPROVED", "commit_id": "c" * 40},
            {"user": "erin", "state": "APPROVED", "commit_id": "0" * 40},  # a stale version
            {"user": "frank", "state": "CHANGES_REQUESTED", "commit_id": "c" * 40},
        ],
    }
    recs = records_from_status(p, status, 10_000, DIAG)
    assert [(r.decision, r.reviewer) for r in recs] == [("approved", "dave"), ("merged", "carol")]
    assert recs[1].merged_commit == "m" * 40 and recs[1].ts_ns == 9_000
    # already merged: nothing new
    assert records_from_status(proposal("merged", "github"), status, 10_000) == []
    closed = records_from_status(p, {"state": "closed", "merged": False, "reviews": []}, 1)
    assert [r.decision for r in closed] == ["closed"] and closed[0].merged_commit == ""


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def merged_event() -> bytes:
    return json.dumps(
        {
            "action": "closed",
            "number": 7,
            "repository": {"full_name": "acme/agent"},
            "pull_request": {
                "number": 7,
                "merged": True,
                "merged_by": {"login": "carol"},
                "merge_commit_sha": "m" * 40,
                "head": {"ref": "closeloop/d1"},
            },
        }
    ).encode()


def test_webhook_signature_is_required_and_checked() -> None:
    body = merged_event()
    with pytest.raises(ReviewError, match="missing"):
        handle_webhook({"X-GitHub-Event": "pull_request"}, body, SECRET)
    with pytest.raises(ReviewError, match="does not match"):
        handle_webhook(
            {"X-GitHub-Event": "pull_request", "X-Hub-Signature-256": sign(body, "other")},
            body,
            SECRET,
        )
    with pytest.raises(ReviewError, match="does not match"):
        handle_webhook(
            {"X-GitHub-Event": "pull_request", "X-Hub-Signature-256": sign(body)},
            body + b" ",
            SECRET,
        )
    with pytest.raises(ReviewError, match="webhook_secret is not set"):
        handle_webhook(
            {"X-GitHub-Event": "pull_request", "X-Hub-Signature-256": sign(body, "")}, body, ""
        )


def test_webhook_merged_and_approved_events() -> None:
    body = merged_event()
    (ev,) = handle_webhook(
        {"x-github-event": "pull_request", "x-hub-signature-256": sign(body)}, body, SECRET
    )
    assert (ev.kind, ev.pr_number, ev.branch, ev.reviewer, ev.commit) == (
        "merged",
        7,
        "closeloop/d1",
        "carol",
        "m" * 40,
    )
    (rec,) = records_from_event(proposal("approved", "github"), ev, 50, DIAG)
    assert rec.decision == "merged" and rec.reviewer == "carol" and rec.merged_commit == "m" * 40

    review = json.dumps(
        {
            "action": "submitted",
            "repository": {"full_name": "acme/agent"},
            "review": {"state": "approved", "user": {"login": "dave"}, "commit_id": "c" * 40},
            "pull_request": {"number": 7, "head": {"ref": "closeloop/d1"}},
        }
    ).encode()
    (ev,) = handle_webhook(
        {"X-GitHub-Event": "pull_request_review", "X-Hub-Signature-256": sign(review)},
        review,
        SECRET,
    )
    assert (ev.kind, ev.reviewer) == ("approved", "dave")
    other = json.dumps(
        {"action": "closed", "pull_request": {"merged": True, "head": {"ref": "feature/x"}}}
    ).encode()
    assert (
        handle_webhook(
            {"X-GitHub-Event": "pull_request", "X-Hub-Signature-256": sign(other)}, other, SECRET
        )
        == []
    )


def test_counts_query_splits_by_version_and_merge_time() -> None:
    rec = approve(proposal(), "ada", "", RecordingBackend("local"), 5_000, diagnosis=DIAG)
    sql, params = counts_query(rec, 9_000)
    assert "conversation_tags FINAL" in sql and "prompt_version != {bp:String}" in sql
    assert params == {
        "from_ns": 100,
        "merge_ns": 5_000,
        "now_ns": 9_000,
        "bp": "p-old",
        "ba": "a-old",
    }


def test_review_rows_match_the_reviews_columns() -> None:
    sql = (Path(__file__).resolve().parents[2] / "schemas" / "003_loop.sql").read_text()
    block = sql.split("CREATE TABLE IF NOT EXISTS reviews\n(", 1)[1].split("\n)", 1)[0]
    columns = [ln.split()[0] for ln in block.strip().splitlines() if "MATERIALIZED" not in ln]
    rec = reject(proposal(), "bob", "", RecordingBackend("local"), 5)
    assert list(review_rows([rec])[0]) == columns
