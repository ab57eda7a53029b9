"""Layer 5, review, the decisions: what a human's decision does to a proposal, and the verdicts.

A proposal moves through ``open → (approved | rejected) → merged | closed``; GitHub may also
go ``open → merged`` (a reviewer merged without a formal review) or ``open → closed``.
Every decision is a :class:`~processors.records.ReviewRecord` carrying the reviewer's name,
the versions in force before the change and the evidence it was based on.

Everything here is pure (no store, no backend, no clock: ``now_ns`` is passed in); applying
decisions to a backend and the store is :mod:`processors.review.loop`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.act import approver, is_proposal_branch
from processors.config import ReviewConfig
from processors.errors import ActError, ReviewError
from processors.records import Diagnosis, Outcome, Proposal, ReviewRecord
from processors.stats import NOT_ENOUGH_DATA, REGRESSED, Counts, guarded_verdict, verdict

log = logging.getLogger("closeloop.review")

# status -> decisions allowed from it, and the status each leads to
TRANSITIONS: dict[str, dict[str, str]] = {
    "open": {
        "approved": "approved",
        "rejected": "rejected",
        "merged": "merged",
        "closed": "closed",
    },
    "approved": {"merged": "merged", "closed": "closed"},
    "rejected": {"closed": "closed"},
    "merged": {},
    "closed": {},
}


def review_id(proposal_id: str, decision: str) -> str:
    """One record per proposal and decision: a replayed decision rewrites the same row."""
    return hashlib.sha256(f"review\x00{proposal_id}\x00{decision}".encode()).hexdigest()[:16]


def next_status(status: str, decision: str) -> str:
    """The proposal status after ``decision``; :class:`ReviewError` when it is not allowed."""
    allowed = TRANSITIONS.get(status)
    if allowed is None:
        raise ReviewError(f"unknown proposal status {status!r}")
    if decision not in allowed:
        raise ReviewError(f"the proposal is already {status}; it cannot be {decision} now")
    return allowed[decision]


def reviewer_name(name: str) -> str:
    """The name of the human taking a decision, validated as the merge's ``Approved-by``
    trailer will be (one line, no control characters, bounded); none is an error."""
    if not str(name or "").strip():
        raise ReviewError("a decision needs the name of the human reviewer who takes it")
    try:
        return approver(name)
    except ActError as e:
        raise ReviewError(str(e)) from None


def decision_record(
    proposal: Proposal,
    decision: str,
    reviewer: str,
    now_ns: int,
    diagnosis: Diagnosis | None,
    comment: str = "",
    merged_commit: str = "",
) -> ReviewRecord:
    d = diagnosis
    return ReviewRecord(
        review_id=review_id(proposal.proposal_id, decision),
        proposal_id=proposal.proposal_id,
        diagnosis_id=proposal.diagnosis_id,
        intent_id=proposal.intent_id,
        decision=decision,
        reviewer=reviewer,
        comment=comment,
        merged_commit=merged_commit,
        before_prompt_version=d.prompt_version if d else "",
        before_agent_version=d.agent_version if d else "",
        evidence_trace_ids=list(d.trace_ids) if d else [],
        window_from_ns=d.window_from_ns if d else 0,
        window_to_ns=d.window_to_ns if d else 0,
        ts_ns=now_ns,
    )


def apply(proposal: Proposal, record: ReviewRecord, now_ns: int) -> Proposal:
    """The proposal after ``record`` (status moved, version bumped for the table)."""
    decision = "merged" if record.merged_commit else record.decision
    status = next_status(proposal.status, record.decision)
    if decision == "merged" and status != "merged":
        status = next_status(status, "merged")
    return Proposal.from_dict(
        {
            **proposal.to_dict(),
            "status": status,
            "version": proposal.version + 1,
            "updated_ns": now_ns,
        }
    )


def records_from_status(
    proposal: Proposal, status: Mapping[str, Any], now_ns: int, diagnosis: Diagnosis | None = None
) -> list[ReviewRecord]:
    """New decisions visible in a backend's :meth:`status` (GitHub reviews, merge, close).

    Approvals count only for the commit under review; a merge is attributed to the login
    that merged. Decisions the proposal's status already reflects are skipped.
    """
    out: list[ReviewRecord] = []
    current = proposal.status
    approvers = sorted(
        {
            r["user"]
            for r in status.get("reviews", [])
            if str(r.get("state", "")).upper() == "APPROVED"
            and r.get("user")
            and r.get("commit_id", proposal.commit) in ("", proposal.commit)
        }
    )
    if approvers and "approved" in TRANSITIONS[current]:
        out.append(decision_record(proposal, "approved", ", ".join(approvers), now_ns, diagnosis))
        current = "approved"
    if status.get("merged") and "merged" in TRANSITIONS[current]:
        merged_by = str(status.get("merged_by") or "")
        if not merged_by:
            log.warning(
                "review: %s merged without a known merger; recorded as such", proposal.proposal_id
            )
        out.append(
            decision_record(
                proposal,
                "merged",
                merged_by or "unknown (merged outside closeloop)",
                status.get("merged_ns") or now_ns,
                diagnosis,
                merged_commit=str(status.get("merge_commit_sha") or ""),
            )
        )
    elif status.get("state") == "closed" and "closed" in TRANSITIONS[current]:
        out.append(decision_record(proposal, "closed", "closed on GitHub", now_ns, diagnosis))
    return out


# -- webhooks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    """A review-relevant GitHub event on a closeloop pull request."""

    kind: str  # approved | merged | closed
    repo: str  # owner/name
    pr_number: int
    branch: str
    reviewer: str
    commit: str = ""  # approved: the reviewed commit; merged: the merge commit
    ts: str = ""


def verify_signature(headers: Mapping[str, str], body: bytes, secret: str) -> None:
    """Check ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body); :class:`ReviewError` if not."""
    if not secret:
        raise ReviewError("review.webhook_secret is not set; unsigned webhooks are refused")
    lower = {k.lower(): v for k, v in headers.items()}
    sig = lower.get("x-hub-signature-256", "")
    if not sig.startswith("sha256="):
        raise ReviewError("missing X-Hub-Signature-256 header; configure the webhook with a secret")
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), sig.strip().encode()):
        raise ReviewError(
            "X-Hub-Signature-256 does not match the body; check review.webhook_secret"
        )


def handle_webhook(headers: Mapping[str, str], body: bytes, secret: str) -> list[WebhookEvent]:
    """Verify and parse a GitHub webhook delivery into review events (others give ``[]``)."""
    verify_signature(headers, body, secret)
    kind = {k.lower(): v for k, v in headers.items()}.get("x-github-event", "")
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise ReviewError(f"webhook body is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ReviewError("webhook body is not a JSON object")
    pr = payload.get("pull_request") or {}
    branch = str((pr.get("head") or {}).get("ref") or "")
    if not is_proposal_branch(branch):
        return []
    repo = str((payload.get("repository") or {}).get("full_name") or "")
    number = int(pr.get("number") or payload.get("number") or 0)
    action = payload.get("action")
    if kind == "pull_request" and action == "closed":
        if pr.get("merged"):
            return [
                WebhookEvent(
                    "merged",
                    repo,
                    number,
                    branch,
                    str((pr.get("merged_by") or {}).get("login") or ""),
                    str(pr.get("merge_commit_sha") or ""),
                    str(pr.get("merged_at") or ""),
                )
            ]
        return [
            WebhookEvent(
                "closed",
                repo,
                number,
                branch,
                "closed on GitHub",
                ts=str(pr.get("closed_at") or ""),
            )
        ]
    if kind == "pull_request_review" and action == "submitted":
        review = payload.get("review") or {}
        if str(review.get("state", "")).lower() == "approved":
            return [
                WebhookEvent(
                    "approved",
                    repo,
                    number,
                    branch,
                    str((review.get("user") or {}).get("login") or ""),
                    str(review.get("commit_id") or ""),
                    str(review.get("submitted_at") or ""),
                )
            ]
    return []


def records_from_event(
    proposal: Proposal, event: WebhookEvent, now_ns: int, diagnosis: Diagnosis | None = None
) -> list[ReviewRecord]:
    """The decision a webhook event means for its proposal (none if already reflected)."""
    if event.kind == "approved":
        status: dict[str, Any] = {
            "reviews": [{"user": event.reviewer, "state": "APPROVED", "commit_id": event.commit}]
        }
    elif event.kind == "merged":
        status = {"merged": True, "merged_by": event.reviewer, "merge_commit_sha": event.commit}
    else:
        status = {"state": "closed"}
    return records_from_status(proposal, status, now_ns, diagnosis)


def review_rows(records: Iterable[ReviewRecord]) -> list[dict[str, Any]]:
    """Rows for the ``reviews`` table (its columns are exactly the record's fields)."""
    return [{k: v for k, v in r.to_dict().items() if k != "v"} for r in records]


# -- verification -----------------------------------------------------------------------------


@dataclass
class Verification:
    """The outcomes of one verification; ``regressed`` asks the caller for a new diagnosis."""

    outcomes: list[Outcome]
    target: Outcome
    regressed: bool = False
    confounded: str = ""
    commented: bool = False
    controls: list[Outcome] = field(default_factory=list)


def _outcome(
    pid: str,
    intent: str,
    before_version: str,
    row: Mapping[str, Any],
    v: tuple[Any, ...],
    now_ns: int,
) -> Outcome:
    bn, bf, an, af = (int(row[k]) for k in ("before_n", "before_fail", "after_n", "after_fail"))
    return Outcome(
        proposal_id=pid,
        intent_id=intent,
        before_version=before_version,
        after_version=str(row.get("after_version") or ""),
        before_n=bn,
        before_failures=bf,
        after_n=an,
        after_failures=af,
        rate_before=bf / bn if bn else 0.0,
        rate_after=af / an if an else 0.0,
        diff_low=v[2],
        diff_high=v[3],
        p_value=v[1],
        verdict=v[0],
        ts_ns=now_ns,
    )


def outcome_rows(outcomes: Iterable[Outcome]) -> list[dict[str, Any]]:
    """Rows for the ``outcomes`` table (its columns are exactly the record's fields)."""
    return [{k: v for k, v in o.to_dict().items() if k != "v"} for o in outcomes]


def verdict_comment(target: Outcome, controls: list[Outcome], confounded: str) -> str:
    moved = [c for c in controls if c.verdict not in (NOT_ENOUGH_DATA, "no_effect")]
    text = (
        f"**closeloop verification: {target.verdict.replace('_', ' ')}.** Failure rate of intent "
        f"`{target.intent_id}` went from {target.rate_before:.1%} ({target.before_failures}/"
        f"{target.before_n}, `{target.before_version or '-'}`) to {target.rate_after:.1%} "
        f"({target.after_failures}/{target.after_n}, `{target.after_version or '-'}`); difference "
        f"{target.rate_after - target.rate_before:+.1%}, 95% CI [{target.diff_low:+.1%}, "
        f"{target.diff_high:+.1%}], p = {target.p_value:.3g}. Controls: {len(controls)} other intents, "
        f"{len(moved)} of which changed significantly."
    )
    if confounded:
        text += f" Not attributed to this change: {confounded}."
    if target.verdict == REGRESSED:
        text += " A regression: closeloop raises a new diagnosis."
    return text


def _counts(row: Mapping[str, Any]) -> Counts:
    return Counts(
        int(row["before_n"]), int(row["before_fail"]), int(row["after_n"]), int(row["after_fail"])
    )


def _verdict(c: Counts, cfg: ReviewConfig) -> tuple[str, float, float, float]:
    return verdict(c.before_n, c.before_fail, c.after_n, c.after_fail, cfg.min_after, cfg.alpha)


_COUNTS = ("before_n", "before_fail", "after_n", "after_fail")


def _no_counts() -> dict[str, Any]:
    """The counts of an intent without conversations in either period."""
    return {**dict.fromkeys(_COUNTS, 0), "after_version": ""}


def survivor(intent_id: str, measured_as: Mapping[str, str]) -> str:
    """The intent ``intent_id``'s conversations are measured with: the one it was merged into
    (or split from, see :func:`measure`), followed to the end of the chain."""
    seen = {intent_id}
    while intent_id in measured_as and measured_as[intent_id] not in seen:
        intent_id = measured_as[intent_id]
        seen.add(intent_id)
    return intent_id


def fold(
    rows: Mapping[str, Mapping[str, Any]], measured_as: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Per-intent counts with an intent's counted under the one it is measured with (a merged
    intent's tags stored before the merge still name it)."""
    out: dict[str, dict[str, Any]] = {}
    for k, r in sorted(rows.items()):
        into = out.setdefault(survivor(k, measured_as), _no_counts())
        for c in _COUNTS:
            into[c] += int(r[c])
        into["after_version"] = into["after_version"] or str(r.get("after_version") or "")
    return out


def measure(
    review: ReviewRecord,
    rows: Mapping[str, Mapping[str, Any]],
    fixed_elsewhere: set[str],
    cfg: ReviewConfig,
    now_ns: int,
    measured_as: Mapping[str, str] | None = None,
) -> Verification:
    """The verdict on the intent of ``review`` and on every control intent, from the per-intent
    before/after counts of :func:`processors.review.loop.counts_query` (keyed by intent).

    ``measured_as`` (intent -> the intent it is measured with, :func:`.loop.measured_as`): a
    merged intent is measured as the intent it joined, since its conversations after the merge
    are tagged with that one; an intent split off a fixed intent after its diagnosis is
    measured with the fixed intent, since it holds conversations the diagnosis was about.

    Controls are the intents no merged change targets (``fixed_elsewhere`` are the others):
    several fixes merged together would otherwise make each other's improvements look like a
    traffic-wide shift.
    """
    measured_as = measured_as or {}
    rows = fold(rows, measured_as)
    fixed = {survivor(i, measured_as) for i in fixed_elsewhere}
    before_version = review.before_prompt_version or review.before_agent_version
    measured_on = survivor(review.intent_id, measured_as)
    target_row = rows.get(measured_on) or _no_counts()
    others = {k: r for k, r in rows.items() if k != measured_on and k not in fixed}
    v5 = guarded_verdict(
        _counts(target_row),
        [_counts(r) for r in others.values()],
        total_before=sum(int(r["before_n"]) for r in rows.values()),
        total_after=sum(int(r["after_n"]) for r in rows.values()),
        min_after=cfg.min_after,
        alpha=cfg.alpha,
    )
    pid = review.proposal_id
    target = _outcome(pid, review.intent_id, before_version, target_row, v5[:4], now_ns)
    controls = [
        _outcome(
            pid,
            k,
            before_version,
            r,
            _verdict(_counts(r), cfg),
            now_ns,
        )
        for k, r in sorted(others.items())
    ]
    return Verification(
        [target, *controls],
        target,
        regressed=target.verdict == REGRESSED,
        confounded=v5[4],
        controls=controls,
    )
