"""Layer 5, review, applied: decisions go to the change backend and the store, and merged
changes are measured.

Nothing merges without a person: :func:`approve` requires a reviewer name and is the only
caller of a backend's ``merge`` (local repositories); on GitHub the reviewer merges the pull
request and closeloop only *records* it (:func:`poll`, :func:`ingest_webhook`).

:func:`verify` then compares the target intent's failure rate before and after the merge,
with every other intent as a control (:func:`processors.review.core.measure`), writes
``outcomes`` rows and comments the verdict on the proposal once there is one.

Of act, this uses only its public surface (:mod:`processors.act`): the backend protocol, the
proposal rows (written and read), and :func:`~processors.act.rebuild_proposal` for a stale
proposal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from processors.act import ChangeBackend, load_proposal, proposal_rows, rebuild_proposal
from processors.config import Config
from processors.errors import ActError, AlreadyApplied, ReviewError
from processors.records import Diagnosis, Proposal, ReviewRecord
from processors.review.core import (
    Verification,
    apply,
    decision_record,
    handle_webhook,
    measure,
    next_status,
    outcome_rows,
    records_from_event,
    records_from_status,
    review_rows,
    reviewer_name,
    verdict_comment,
)
from processors.stats import NOT_ENOUGH_DATA
from processors.store import Store

log = logging.getLogger("closeloop.review")


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
    who = reviewer_name(reviewer)
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
    return decision_record(proposal, "approved", who, now_ns, diagnosis, comment, merged)


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
    if backend.name != "local":
        raise ReviewError(f"approval of {proposal.proposal_id} not applied: {reason}")
    who = reviewer_name(reviewer)
    base = backend.base_commit()
    note = f"not merged: {backend.base} already holds this change at {base[:12]} ({reason})"
    backend.comment(proposal, f"Approved by {who}; {note}")
    log.info("review: %s approved by %s, %s", proposal.proposal_id, who, note)
    return decision_record(
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
    who = reviewer_name(reviewer)
    next_status(proposal.status, "rejected")
    try:
        backend.close(proposal, f"Rejected by {who} in closeloop review. {comment}".strip())
    except ActError as e:
        raise ReviewError(f"rejection of {proposal.proposal_id} not applied: {e}") from e
    log.info("review: %s rejected by %s", proposal.proposal_id, who)
    return decision_record(proposal, "rejected", who, now_ns, diagnosis, comment)


def poll(
    proposal: Proposal, backend: ChangeBackend, now_ns: int, *, diagnosis: Diagnosis | None = None
) -> list[ReviewRecord]:
    """Read the pull request and record what humans did since the last poll."""
    try:
        status = backend.status(proposal)
    except ActError as e:
        raise ReviewError(f"cannot read the state of {proposal.proposal_id}: {e}") from e
    return records_from_status(proposal, status, now_ns, diagnosis)


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


def measured_as(store: Store, fixed: list[str]) -> dict[str, str]:
    """Intent -> the intent its conversations are measured with (:func:`~.core.measure`): a
    merged intent -> the one it joined; an intent split off a ``fixed`` intent since that one
    was first diagnosed -> the fixed intent, since it holds part of the conversations the
    diagnosis was about (the re-clustering re-tagged them), so it is no control of the fix."""
    merged = store.query("SELECT intent_id, parent_id FROM intents FINAL WHERE status = 'merged'")
    split = store.query(
        "SELECT i.intent_id AS intent_id, i.parent_id AS parent_id FROM intents AS i FINAL "
        "INNER JOIN (SELECT intent_id, min(updated_ns) AS first_ns FROM diagnoses "
        "WHERE intent_id IN {fixed:Array(String)} GROUP BY intent_id) AS d "
        "ON d.intent_id = i.parent_id "
        "WHERE i.status != 'merged' AND i.created_ns >= d.first_ns",
        {"fixed": fixed},
    )
    return {r["intent_id"]: r["parent_id"] for r in [*merged, *split] if r["parent_id"]}


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
    fixed_elsewhere = {
        r["intent_id"]
        for r in store.query(
            "SELECT DISTINCT intent_id FROM reviews FINAL WHERE merged_commit != ''"
        )
    }
    fixed = sorted(fixed_elsewhere | {rec.intent_id})
    result = measure(rec, rows, fixed_elsewhere, cfg.review, now_ns, measured_as(store, fixed))
    target = result.target
    previous = store.query(
        "SELECT verdict FROM outcomes FINAL WHERE proposal_id = {p:String} AND intent_id = {i:String}",
        {"p": rec.proposal_id, "i": rec.intent_id},
    )
    already = any(r["verdict"] != NOT_ENOUGH_DATA for r in previous)
    store.insert_records("outcomes", outcome_rows(result.outcomes))
    if (
        target.verdict != NOT_ENOUGH_DATA
        and not already
        and backend is not None
        and proposal is not None
    ):
        try:
            backend.comment(proposal, verdict_comment(target, result.controls, result.confounded))
            result.commented = True
        except ActError as e:  # the verdict is stored; a missed comment is only logged
            log.warning("review: verdict comment on %s failed: %s", rec.proposal_id, e)
    log.info(
        "review: %s verified: %s (p=%.3g)%s",
        rec.proposal_id,
        target.verdict,
        target.p_value,
        f" — {result.confounded}" if result.confounded else "",
    )
    return result


# -- decisions taken through closeloop (CLI and review page) ----------------------------------


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


class MovedProposal(ReviewError):
    """The proposal changed while a human looked at it (a newer diagnosis re-versioned it):
    an approval covers the version the human saw, so ``proposal`` needs a fresh look."""

    def __init__(self, proposal: Proposal, seen: int | None) -> None:
        self.proposal = proposal
        super().__init__(
            f"proposal {proposal.proposal_id} moved while it was reviewed"
            + (f" (version {seen} was shown)" if seen is not None else "")
            + f"; it is now version {proposal.version}: review the new diff"
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
    version: int | None = None,
) -> tuple[ReviewRecord, Proposal]:
    """A human's decision on a proposal: applied to the backend, recorded in ``reviews``, and
    the proposal row moved on. ``decision`` is ``approve`` or ``reject``; nothing else merges.

    With ``cfg``, an approval whose branch no longer merges cleanly rebuilds the proposal on
    the current base (:class:`StaleProposal`), so the reviewer approves what will land; if
    the base already holds the very change (another intent's proposal made it), the approval
    is recorded against the base commit that holds it, and nothing is merged twice.
    ``version`` is the version the human was shown: a proposal that moved since (or whose
    branch moved under the approval) raises :class:`MovedProposal` instead of merging.
    """
    proposal = load_proposal(store, proposal_id)
    if proposal is None:
        raise ReviewError(f"no proposal {proposal_id!r}; `closeloop proposals` lists them")
    if version is not None and proposal.version != version:
        raise MovedProposal(proposal, version)
    diagnosis = load_diagnosis(store, proposal.diagnosis_id)
    if proposal.status == "closed" and diagnosis is not None and diagnosis.status == "superseded":
        raise ReviewError(
            f"proposal {proposal_id} was withdrawn by closeloop: a later analysis superseded "
            "its diagnosis, so its change answers nothing now; `closeloop proposals` lists "
            "the open ones"
        )
    if decision == "approve":
        try:
            record = approve(proposal, reviewer, comment, backend, now_ns, diagnosis=diagnosis)
        except ReviewError as e:
            if "not the reviewed commit" in str(e):  # re-versioned between the load and the merge
                raise MovedProposal(load_proposal(store, proposal_id) or proposal, version) from e
            if cfg is None or diagnosis is None or "merge cleanly" not in str(e):
                raise
            rebuilt = rebuild_proposal(cfg, backend, diagnosis, now_ns)
            if rebuilt.proposal is None and rebuilt.already_applied:
                record = approve_applied(
                    proposal,
                    reviewer,
                    comment,
                    backend,
                    now_ns,
                    rebuilt.reason,
                    diagnosis=diagnosis,
                )
            elif rebuilt.proposal is None:
                raise ReviewError(f"{e}; rebuilding it failed: {rebuilt.reason}") from e
            else:
                store.insert_records("proposals", proposal_rows([rebuilt.proposal]))
                raise StaleProposal(rebuilt.proposal) from e
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
