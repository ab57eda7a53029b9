"""Layer 5, review: a human approves or rejects; closeloop records who, and measures the effect.

A proposal moves through ``open → (approved | rejected) → merged | closed``; GitHub may also
go ``open → merged`` (a reviewer merged without a formal review) or ``open → closed``.
Every decision is a :class:`~processors.records.ReviewRecord` carrying the reviewer's name,
the versions in force before the change and the evidence it was based on.

Nothing merges without a person: :func:`approve` requires a reviewer name and is the only
caller of a backend's ``merge`` (local repositories); on GitHub the reviewer merges the pull
request and closeloop only *records* it (:func:`poll`, :func:`handle_webhook`).

:func:`verify` then compares the target intent's failure rate before and after the merge,
with every other intent as a control (:mod:`processors.stats`), writes ``outcomes`` rows and
comments the verdict on the proposal once there is one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.act.core import ChangeBackend
from processors.act.gitrepo import LocalGit, approver
from processors.config import Config
from processors.errors import ActError, AlreadyApplied, ReviewError
from processors.records import Diagnosis, Outcome, Proposal, ReviewRecord
from processors.stats import NOT_ENOUGH_DATA, REGRESSED, Counts, guarded_verdict, verdict
from processors.store import Store

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
BRANCH_PREFIX = "closeloop/"


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


def _person(name: str) -> str:
    """The reviewer's name, validated as the merge's ``Approved-by`` trailer will be."""
    if not str(name or "").strip():
        raise ReviewError("a decision needs the name of the human reviewer who takes it")
    try:
        return approver(name)
    except ActError as e:
        raise ReviewError(str(e)) from None


def _record(
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


def approve(
    proposal: Proposal,
    reviewer: str,
    comment: str,
    backend: ChangeBackend,
    now_ns: int,
    *,
    diagnosis: Diagnosis | None = None,
) -> ReviewRecord:
    """A named human approves. On the local backend this merges (``merged_commit`` is set);
    on GitHub it is recorded and commented, and the merge stays the reviewer's act there."""
    who = _person(reviewer)
    next_status(proposal.status, "approved")
    merged = ""
    try:
        if backend.name == "local":
            merged = backend.merge(proposal, who, comment)
        else:
            backend.comment(proposal, f"Approved by {who} in closeloop review. {comment}".strip())
    except AlreadyApplied as e:
        return approve_applied(proposal, who, comment, backend, now_ns, str(e), diagnosis=diagnosis)
    except ActError as e:
        raise ReviewError(f"approval of {proposal.proposal_id} not applied: {e}") from e
    log.info(
        "review: %s approved by %s%s",
        proposal.proposal_id,
        who,
        f", merged {merged}" if merged else "",
    )
    return _record(proposal, "approved", who, now_ns, diagnosis, comment, merged)


def approve_applied(
    proposal: Proposal,
    reviewer: str,
    comment: str,
    backend: ChangeBackend,
    now_ns: int,
    reason: str,
    *,
    diagnosis: Diagnosis | None = None,
) -> ReviewRecord:
    """An approval of a change the local base already holds (another intent's proposal made
    the very same edit): nothing is merged twice; the approval is recorded against the base
    commit that holds the change, so verification still measures this intent from now on."""
    if not isinstance(backend, LocalGit):
        raise ReviewError(f"approval of {proposal.proposal_id} not applied: {reason}")
    who = _person(reviewer)
    base = backend.base_commit()
    note = f"not merged: {backend.base} already holds this change at {base[:12]} ({reason})"
    backend.comment(proposal, f"Approved by {who}; {note}")
    log.info("review: %s approved by %s, %s", proposal.proposal_id, who, note)
    return _record(
        proposal,
        "approved",
        who,
        now_ns,
        diagnosis,
        f"{comment.strip()} — {note}".lstrip(" —"),
        base,
    )


def reject(
    proposal: Proposal,
    reviewer: str,
    comment: str,
    backend: ChangeBackend,
    now_ns: int,
    *,
    diagnosis: Diagnosis | None = None,
) -> ReviewRecord:
    """A named human rejects: the branch is closed (local) or the pull request closed (GitHub)."""
    who = _person(reviewer)
    next_status(proposal.status, "rejected")
    try:
        backend.close(proposal, who, comment)
    except ActError as e:
        raise ReviewError(f"rejection of {proposal.proposal_id} not applied: {e}") from e
    log.info("review: %s rejected by %s", proposal.proposal_id, who)
    return _record(proposal, "rejected", who, now_ns, diagnosis, comment)


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
        out.append(_record(proposal, "approved", ", ".join(approvers), now_ns, diagnosis))
        current = "approved"
    if status.get("merged") and "merged" in TRANSITIONS[current]:
        merged_by = str(status.get("merged_by") or "")
        if not merged_by:
            log.warning(
                "review: %s merged without a known merger; recorded as such", proposal.proposal_id
            )
        out.append(
            _record(
                proposal,
                "merged",
                merged_by or "unknown (merged outside closeloop)",
                status.get("merged_ns") or now_ns,
                diagnosis,
                merged_commit=str(status.get("merge_commit_sha") or ""),
            )
        )
    elif status.get("state") == "closed" and "closed" in TRANSITIONS[current]:
        out.append(_record(proposal, "closed", "closed on GitHub", now_ns, diagnosis))
    return out


def poll(
    proposal: Proposal, backend: ChangeBackend, now_ns: int, *, diagnosis: Diagnosis | None = None
) -> list[ReviewRecord]:
    """Read the pull request and record what humans did since the last poll."""
    try:
        status = backend.status(proposal)
    except ActError as e:
        raise ReviewError(f"cannot read the state of {proposal.proposal_id}: {e}") from e
    return records_from_status(proposal, status, now_ns, diagnosis)


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
    if not branch.startswith(BRANCH_PREFIX):
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
    target: Outcome | None
    regressed: bool = False
    confounded: str = ""
    commented: bool = False
    controls: list[Outcome] = field(default_factory=list)


_COUNTS_SQL = """
SELECT intent_id,
       countIf(b) AS before_n, countIf(b AND failed = 1) AS before_fail,
       countIf(a) AS after_n, countIf(a AND failed = 1) AS after_fail,
       arrayElement(topKIf(1)({version_col}, a), 1) AS after_version
FROM (
    SELECT intent_id, failed, prompt_version, agent_version,
           ({before}) AS b, ({after}) AS a
    FROM conversation_tags FINAL
    WHERE ts_ns >= {{from_ns:UInt64}}
)
GROUP BY intent_id
HAVING before_n > 0 OR after_n > 0
"""


def counts_query(review: ReviewRecord, now_ns: int) -> tuple[str, dict[str, Any]]:
    """Per-intent before/after counts around the merge of ``review``.

    Before: conversations from the evidence window's start up to the merge, under the
    versions in force when the diagnosis was made. After: conversations from the merge up to
    ``now_ns`` under a different version (the fix is deployed). Without recorded versions
    the split is by time alone.
    """
    bp, ba = review.before_prompt_version, review.before_agent_version
    before = ["ts_ns >= {from_ns:UInt64}", "ts_ns < {merge_ns:UInt64}"]
    changed = []
    if bp:
        before.append("prompt_version = {bp:String}")
        changed.append("prompt_version != {bp:String}")
    if ba:
        before.append("agent_version = {ba:String}")
        changed.append("agent_version != {ba:String}")
    after = "ts_ns >= {merge_ns:UInt64} AND ts_ns <= {now_ns:UInt64}" + (
        f" AND ({' OR '.join(changed)})" if changed else ""
    )
    sql = _COUNTS_SQL.format(
        before=" AND ".join(before),
        after=after,
        version_col="prompt_version" if bp or not ba else "agent_version",
    )
    return sql, {
        "from_ns": review.window_from_ns,
        "merge_ns": review.ts_ns,
        "now_ns": now_ns,
        "bp": bp,
        "ba": ba,
    }


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


def verify(
    store: Store,
    review: ReviewRecord | Mapping[str, Any],
    cfg: Config,
    now_ns: int,
    *,
    backend: ChangeBackend | None = None,
    proposal: Proposal | None = None,
) -> Verification:
    """Measure the merged change of ``review`` on its intent, with the other intents as controls.

    Writes one ``outcomes`` row per intent (re-running later rewrites them with more data),
    and comments on the proposal the first time the target reaches a verdict other than
    ``not_enough_data``.
    """
    rec = review if isinstance(review, ReviewRecord) else ReviewRecord.from_dict(dict(review))
    if not rec.merged_commit:
        raise ReviewError(
            f"proposal {rec.proposal_id} is not merged (decision {rec.decision!r}); "
            "nothing to verify yet"
        )
    sql, params = counts_query(rec, now_ns)
    rows = {r["intent_id"]: r for r in store.query(sql, params)}
    before_version = rec.before_prompt_version or rec.before_agent_version
    empty = {"before_n": 0, "before_fail": 0, "after_n": 0, "after_fail": 0, "after_version": ""}
    target_row = rows.get(rec.intent_id, empty)
    # Controls are the intents no merged change targets: several fixes merged together would
    # otherwise make each other's improvements look like a traffic-wide shift.
    fixed_elsewhere = {
        r["intent_id"]
        for r in store.query(
            "SELECT DISTINCT intent_id FROM reviews FINAL WHERE merged_commit != ''"
        )
    }
    others = {k: r for k, r in rows.items() if k != rec.intent_id and k not in fixed_elsewhere}

    def counts(r: Mapping[str, Any]) -> Counts:
        return Counts(
            int(r["before_n"]), int(r["before_fail"]), int(r["after_n"]), int(r["after_fail"])
        )

    rv = cfg.review
    v5 = guarded_verdict(
        counts(target_row),
        [counts(r) for r in others.values()],
        total_before=sum(int(r["before_n"]) for r in rows.values()),
        total_after=sum(int(r["after_n"]) for r in rows.values()),
        min_after=rv.min_after,
        alpha=rv.alpha,
    )
    target = _outcome(rec.proposal_id, rec.intent_id, before_version, target_row, v5[:4], now_ns)
    controls = [
        _outcome(
            rec.proposal_id,
            k,
            before_version,
            r,
            verdict(
                *(int(r[c]) for c in ("before_n", "before_fail", "after_n", "after_fail")),
                rv.min_after,
                rv.alpha,
            ),
            now_ns,
        )
        for k, r in sorted(others.items())
    ]
    previous = store.query(
        "SELECT verdict FROM outcomes FINAL WHERE proposal_id = {p:String} AND intent_id = {i:String}",
        {"p": rec.proposal_id, "i": rec.intent_id},
    )
    already = any(r["verdict"] != NOT_ENOUGH_DATA for r in previous)
    outcomes = [target, *controls]
    store.insert_records("outcomes", outcome_rows(outcomes))
    result = Verification(
        outcomes, target, regressed=target.verdict == REGRESSED, confounded=v5[4], controls=controls
    )
    if (
        target.verdict != NOT_ENOUGH_DATA
        and not already
        and backend is not None
        and proposal is not None
    ):
        try:
            backend.comment(proposal, verdict_comment(target, controls, v5[4]))
            result.commented = True
        except ActError as e:  # the verdict is stored; a missed comment is only logged
            log.warning("review: verdict comment on %s failed: %s", rec.proposal_id, e)
    log.info(
        "review: %s verified: %s (p=%.3g)%s",
        rec.proposal_id,
        target.verdict,
        target.p_value,
        f" — {v5[4]}" if v5[4] else "",
    )
    return result


# -- decisions taken through closeloop (CLI and review page) ----------------------------------


def load_proposal(store: Store, proposal_id: str) -> Proposal | None:
    rows = store.query(
        "SELECT * FROM proposals FINAL WHERE proposal_id = {p:String}", {"p": proposal_id}
    )
    return Proposal.from_dict(rows[0]) if rows else None


def load_diagnosis(store: Store, diagnosis_id: str) -> Diagnosis | None:
    rows = store.query(
        "SELECT * EXCEPT updated_time FROM diagnoses FINAL WHERE diagnosis_id = {d:String}",
        {"d": diagnosis_id},
    )
    if not rows:
        return None
    row = dict(rows[0])
    for key in ("component", "evidence"):
        try:
            row[key] = json.loads(row[key]) if row[key] else {}
        except ValueError:
            row[key] = {"raw": row[key]}
    return Diagnosis.from_dict(row)


class StaleProposal(ReviewError):
    """The branch no longer merges (another change landed first); it was rebuilt on the new
    base as ``proposal`` and needs a fresh look: an approval covers the diff the human saw."""

    def __init__(self, proposal: Proposal) -> None:
        self.proposal = proposal
        super().__init__(
            f"proposal {proposal.proposal_id} conflicted with a change merged since; it was "
            f"rebuilt on the current base as version {proposal.version}: review the new diff"
        )


def decide(
    store: Store,
    backend: ChangeBackend,
    proposal_id: str,
    decision: str,
    reviewer: str,
    comment: str,
    now_ns: int,
    *,
    cfg: Config | None = None,
) -> tuple[ReviewRecord, Proposal]:
    """A human's decision on a proposal: applied to the backend, recorded in ``reviews``, and
    the proposal row moved on. ``decision`` is ``approve`` or ``reject``; nothing else merges.

    With ``cfg``, an approval whose branch no longer merges cleanly rebuilds the proposal on
    the current base (:class:`StaleProposal`), so the reviewer approves what will land; if
    the base already holds the very change (another intent's proposal made it), the approval
    is recorded against the base commit that holds it, and nothing is merged twice.
    """
    from processors.act.core import Actor, proposal_rows

    proposal = load_proposal(store, proposal_id)
    if proposal is None:
        raise ReviewError(f"no proposal {proposal_id!r}; `closeloop proposals` lists them")
    diagnosis = load_diagnosis(store, proposal.diagnosis_id)
    if decision == "approve":
        try:
            record = approve(proposal, reviewer, comment, backend, now_ns, diagnosis=diagnosis)
        except ReviewError as e:
            if cfg is None or diagnosis is None or "merge cleanly" not in str(e):
                raise
            actor = Actor(cfg, backend)
            refreshed = actor.propose(diagnosis, now_ns, rebuild=True)
            if refreshed is None and actor.already_applied:
                record = approve_applied(
                    proposal,
                    reviewer,
                    comment,
                    backend,
                    now_ns,
                    actor.last_reason,
                    diagnosis=diagnosis,
                )
            elif refreshed is None:
                raise ReviewError(f"{e}; rebuilding it failed: {actor.last_reason}") from e
            else:
                store.insert_records("proposals", proposal_rows([refreshed]))
                raise StaleProposal(refreshed) from e
    elif decision == "reject":
        record = reject(proposal, reviewer, comment, backend, now_ns, diagnosis=diagnosis)
    else:
        raise ReviewError(f"unknown decision {decision!r}; use approve or reject")
    updated = apply(proposal, record, now_ns)
    store.insert_records("reviews", review_rows([record]))
    store.insert_records("proposals", proposal_rows([updated]))
    return record, updated


def merged_reviews(store: Store) -> list[dict[str, Any]]:
    """Reviews whose change is merged: the ones verification measures."""
    return store.query(
        "SELECT * EXCEPT ts FROM reviews FINAL WHERE merged_commit != '' ORDER BY ts_ns"
    )


def _record_all(store: Store, proposal: Proposal, records: list[ReviewRecord], now_ns: int) -> None:
    from processors.act.core import proposal_rows

    for rec in records:
        proposal = apply(proposal, rec, now_ns)
    if records:
        store.insert_records("reviews", review_rows(records))
        store.insert_records("proposals", proposal_rows([proposal]))


def ingest_webhook(
    store: Store, headers: Mapping[str, str], body: bytes, secret: str, now_ns: int
) -> list[ReviewRecord]:
    """A signed GitHub delivery → the decisions it records on closeloop's pull requests."""
    out: list[ReviewRecord] = []
    for event in handle_webhook(headers, body, secret):
        rows = store.query(
            "SELECT proposal_id FROM proposals FINAL WHERE branch = {b:String} "
            "AND backend = 'github'",
            {"b": event.branch},
        )
        proposal = load_proposal(store, rows[0]["proposal_id"]) if rows else None
        if proposal is None:
            log.info("review: webhook for unknown branch %s ignored", event.branch)
            continue
        records = records_from_event(
            proposal, event, now_ns, load_diagnosis(store, proposal.diagnosis_id)
        )
        _record_all(store, proposal, records, now_ns)
        out += records
    return out


def poll_open(store: Store, backend: ChangeBackend, now_ns: int) -> list[ReviewRecord]:
    """Read every open pull request of the backend and record what humans did on GitHub."""
    out: list[ReviewRecord] = []
    rows = store.query(
        "SELECT proposal_id FROM proposals FINAL WHERE backend = {b:String} "
        "AND status IN ('open', 'approved')",
        {"b": backend.name},
    )
    for r in rows:
        proposal = load_proposal(store, r["proposal_id"])
        if proposal is None:
            continue
        records = poll(
            proposal, backend, now_ns, diagnosis=load_diagnosis(store, proposal.diagnosis_id)
        )
        _record_all(store, proposal, records, now_ns)
        out += records
    return out
