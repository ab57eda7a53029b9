"""Layer 4: turn a diagnosis into a proposal — a branch and, on GitHub, a pull request.

:class:`Actor` reads the allowlisted files from the base branch, asks
:func:`~processors.act.fixes.propose_change` for a validated change, writes it through a
:class:`ChangeBackend` (one branch ``closeloop/<diagnosis_id>`` per diagnosis, updated in
place when the diagnosis comes back) and notifies. It never merges: that is layer 5's
job, on a named human's decision.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from processors.act.backend import ChangeBackend, branch_name
from processors.act.change import Change, normalize_path
from processors.act.fixes import llm_change, propose_change, quote
from processors.act.github import GitHubBackend
from processors.act.gitrepo import LocalGit
from processors.config import Config
from processors.errors import ActError, AlreadyApplied, LLMError
from processors.llm import ChatJSON
from processors.records import CLOSED_STATUSES, Diagnosis, Proposal
from processors.redact import Redactor, redact_value

log = logging.getLogger("closeloop.act")

NOTIFY_TIMEOUT_S = 5.0
MAX_TRACE_LINKS = 20
MAX_EVIDENCE_CHARS = 4000
# Why act closes a proposal by itself: its diagnosis' conversations are explained by another
# diagnosis of the intent now (diagnose marks it superseded), so its change answers nothing.
SUPERSEDED_NOTE = "diagnosis superseded by a later analysis"


def open_backend(cfg: Config) -> ChangeBackend:
    """The configured backend (``act.backend``: local or github)."""
    if cfg.act.backend == "github":
        return GitHubBackend(cfg.act)
    if not cfg.act.repo:
        raise ActError("act.repo is empty: set it to the path of the agent's git repository")
    return LocalGit(cfg.act.repo, cfg.act.base)


def proposal_id(diagnosis_id: str) -> str:
    """One proposal per diagnosis: a stable hash of its id."""
    return hashlib.sha256(f"proposal\x00{diagnosis_id}".encode()).hexdigest()[:16]


# -- rendering ---------------------------------------------------------------------------


def _fence(text: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _inline(text: str, redactor: Redactor, limit: int = 500) -> str:
    """Untrusted text for a Markdown paragraph: one line, redacted, no @mentions or HTML."""
    s = quote(text, redactor, limit)
    return re.sub(r"@(?=\w)", "@\u200b", s)


def _when(ns: int) -> str:
    if not ns:
        return "?"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def trace_link(trace_id: str, template: str) -> str:
    tid = re.sub(r"[^A-Za-z0-9_-]", "", trace_id)[:64]
    return f"[`{tid}`]({template.replace('{trace_id}', tid)})" if template else f"`{tid}`"


def render_title(diag: Diagnosis, redactor: Redactor) -> str:
    """The rule and the intent's name, redacted and cut: the summary may quote the agent."""
    name = quote(diag.intent_name, redactor, 60) or diag.intent_id
    return f"closeloop: {diag.rule.replace('_', ' ')} in {name}"


def render_body(
    diag: Diagnosis, change: Change, cfg: Config, *, version: int, pid: str, redactor: Redactor
) -> str:
    """The pull request description: what is wrong, the evidence, the change and how it will
    be verified. Every piece of conversation-derived text is redacted and neutralised, and the
    whole body is redacted once more before it leaves."""
    name = _inline(diag.intent_name, redactor, 80) or diag.intent_id
    lines = [
        *_summary_lines(diag, name, redactor),
        *_evidence_lines(diag, cfg, redactor),
        *_change_lines(change, redactor),
        *_verification_lines(diag, cfg, name, redactor),
        "---",
        (
            f"Proposal `{pid}` version {version} · diagnosis `{diag.diagnosis_id}`. closeloop never "
            "merges: a human reviewer decides."
        ),
    ]
    text, _ = redactor.redact("\n".join(lines))
    return text


def _summary_lines(diag: Diagnosis, name: str, redactor: Redactor) -> list[str]:
    """The rule and the intent, then the summary and root cause fenced as data: they may
    quote the conversations (an agent's question)."""
    said = "\n".join(
        f"{label}: {quote(text, redactor, 500)}"
        for label, text in (("summary", diag.summary), ("root cause", diag.root_cause))
        if text
    )
    return [
        f"## `{diag.rule}` in {name}",
        "",
        (
            f"**Intent:** {name} (`{diag.intent_id}`) · **Rule:** `{diag.rule}` · "
            f"**Confidence:** {diag.confidence:.2f}"
        ),
        "",
        "Diagnosis (redacted, derived from user conversations: data, not instructions):",
        "",
        _fence(re.sub(r"@(?=\w)", "@\u200b", said or "-"), "text"),
        "",
    ]


def _evidence_lines(diag: Diagnosis, cfg: Config, redactor: Redactor) -> list[str]:
    """The evidence table, links to the conversations and the evidence itself (redacted)."""
    comp = diag.component or {}
    lines = [
        "### Evidence",
        "",
        "| | |",
        "|---|---|",
        f"| conversations of the intent in the window | {diag.support} |",
        f"| failing | {diag.failures} ({diag.failure_rate:.1%}; baseline {diag.baseline_rate:.1%}) |",
        f"| window | {_when(diag.window_from_ns)} → {_when(diag.window_to_ns)} |",
        f"| prompt version | `{quote(diag.prompt_version, redactor, 64) or '-'}` |",
        f"| agent version | `{quote(diag.agent_version, redactor, 64) or '-'}` |",
        (
            f"| component | {quote(comp.get('type', ''), redactor, 20)} "
            f"`{quote(comp.get('target', ''), redactor, 120)}` |"
        ),
        "",
    ]
    traces = diag.trace_ids[:MAX_TRACE_LINKS]
    if traces:
        more = (
            f" (+{len(diag.trace_ids) - len(traces)} more)"
            if len(diag.trace_ids) > len(traces)
            else ""
        )
        lines += [
            "Conversations showing the failure: "
            + ", ".join(trace_link(t, cfg.web.trace_url) for t in traces)
            + more,
            "",
        ]
    if diag.evidence:
        ev = json.dumps(
            redact_value(diag.evidence, redactor), ensure_ascii=False, indent=2, default=str
        )
        if len(ev) > MAX_EVIDENCE_CHARS:
            ev = ev[:MAX_EVIDENCE_CHARS] + "\n… (truncated)"
        lines += [
            "<details><summary>Evidence details (redacted, from user conversations)</summary>",
            "",
            _fence(re.sub(r"@(?=\w)", "@\u200b", ev), "json"),
            "",
            "</details>",
            "",
        ]
    return lines


def _change_lines(change: Change, redactor: Redactor) -> list[str]:
    return [
        "### The change",
        "",
        _inline(change.summary, redactor, 400)
        + f" ({'LLM' if change.source == 'llm' else 'templated'} fix)",
        "",
        _fence(change.diff_stat()),
        "",
        "<details><summary>Diff</summary>",
        "",
        _fence(change.diff(), "diff"),
        "",
        "</details>",
        "",
    ]


def _verification_lines(diag: Diagnosis, cfg: Config, name: str, redactor: Redactor) -> list[str]:
    return [
        "### What it should fix, and how closeloop will check",
        "",
        (
            f"It should lower the failure rate of **{name}** from {diag.failure_rate:.1%} towards the "
            f"baseline of {diag.baseline_rate:.1%}. Once this is merged, closeloop compares the intent's "
            f"conversations under the new prompt/agent version with those under "
            f"`{quote(diag.prompt_version or diag.agent_version, redactor, 64) or 'the current version'}`"
            f" in the window above. It gives a verdict (fixed / no effect / regressed) after at least "
            f"**{cfg.review.min_after}** conversations of the intent on the new version: a two-proportion "
            f"z-test and Fisher's exact test must both hold at α = {cfg.review.alpha}, the other intents "
            "serve as controls, and a regression raises a new diagnosis."
        ),
        "",
    ]


def commit_message(
    diag: Diagnosis,
    change: Change,
    *,
    title: str,
    pid: str,
    version: int,
    stamp: str,
    created_ns: int,
    redactor: Redactor,
) -> str:
    return (
        f"{title}\n\n"
        f"Diagnosis {diag.diagnosis_id} ({diag.rule}, intent {diag.intent_id}): "
        f"{quote(diag.summary, redactor, 300)}\n\n{quote(change.summary, redactor, 300)}\n\n"
        f"Closeloop-Proposal: {pid}\nCloseloop-Diagnosis: {diag.diagnosis_id}\n"
        f"Closeloop-Diagnosis-Version: {diag.version}\n"
        f"Closeloop-Version: {version}\nCloseloop-Stamp: {stamp}\nCloseloop-Created: {created_ns}\n"
    )


def update_comment(diag: Diagnosis, version: int, cfg: Config, redactor: Redactor) -> str:
    traces = ", ".join(trace_link(t, cfg.web.trace_url) for t in diag.trace_ids[:5])
    text = (
        f"closeloop updated this proposal to version {version} with new evidence: "
        f"{diag.failures}/{diag.support} conversations failing ({diag.failure_rate:.1%}, baseline "
        f"{diag.baseline_rate:.1%}) between {_when(diag.window_from_ns)} and "
        f"{_when(diag.window_to_ns)}." + (f" Examples: {traces}." if traces else "")
    )
    return redactor.redact(text)[0]


# -- the actor -----------------------------------------------------------------------------


class Actor:
    """Diagnoses in, proposals out. ``last_reason`` says why the last diagnosis got none, and
    ``already_applied`` whether that was because the base already holds its fix."""

    def __init__(self, cfg: Config, backend: ChangeBackend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.redactor = Redactor(cfg.capture.redact, cfg.capture.extra_patterns)
        self.last_reason = ""
        self.already_applied = False

    def _drop(self, diag: Diagnosis, reason: str) -> None:
        self.last_reason = reason
        log.info("act: diagnosis %s gets no proposal: %s", diag.diagnosis_id, reason)

    def propose(
        self,
        diag: Diagnosis,
        now_ns: int,
        *,
        rebuild: bool = False,
        change: Change | None = None,
    ) -> Proposal | None:
        """Open (or update) the proposal for ``diag``; ``None`` with ``last_reason`` if none.

        The change is the templated fix, or ``change`` (the LLM's validated edit, which
        replaces the templated one on the same branch as the proposal's next version).

        Replaying the same diagnosis version is a no-op that returns the existing proposal;
        a newer version of the diagnosis updates the branch and bumps the proposal version.
        A version the proposal already answers, re-emitted with other evidence (diagnose
        replays after a restart), changes nothing; ``rebuild`` (a reviewer's approval that
        no longer merges) builds it again on the current base. A proposal that was merged or
        closed by a reviewer is never reopened; one :meth:`withdraw` closed is, by a newer
        version of its diagnosis (found again after it was superseded).
        """
        self.last_reason, self.already_applied = "", False
        if diag.status in CLOSED_STATUSES:
            return self._drop(diag, f"the diagnosis is {diag.status}")
        if not self.cfg.act.targets:
            return self._drop(diag, "act.targets is empty: closeloop may not write any file")
        branch = branch_name(diag.diagnosis_id)
        try:
            prev = self.backend.existing(branch)
            if prev is not None and prev["state"] in ("merged", "closed"):
                return self._drop(diag, f"its proposal was already {prev['state']} by a reviewer")
            if prev is not None and prev["state"] == "withdrawn" and not _newer(diag, prev):
                return self._drop(diag, "its proposal was withdrawn: a later version superseded it")
            files, history = self._read_targets(diag)
        except ActError as e:
            return self._drop(diag, str(e))
        if change is None:
            change = self._change(diag, files, history)
        if change is None:
            return None
        # not updated_ns: diagnose re-emits the same version after a restart (replayed from its
        # checkpoint) at a later time, and that must not count as a new proposal version
        stamp = hashlib.sha256(
            json.dumps([diag.diagnosis_id, diag.version, change.diff()]).encode()
        ).hexdigest()[:16]
        if (
            prev is not None
            and prev["stamp"] != stamp
            and not rebuild
            and change.source != "llm"  # the LLM's edit, later, versions the same answer
            and prev.get("diagnosis_version", 0) >= diag.version
        ):
            return self._drop(
                diag, f"its proposal already answers diagnosis version {prev['diagnosis_version']}"
            )
        proposal = self._proposal(diag, change, branch, prev, stamp, now_ns)
        if prev is not None and prev["stamp"] == stamp:
            proposal.commit, proposal.pr_number, proposal.pr_url = (
                prev["commit"],
                prev["pr_number"],
                prev["pr_url"],
            )
            return proposal
        try:
            _, proposal.commit, proposal.pr_number, proposal.pr_url = self.backend.open_or_update(
                self._fields(diag, change, proposal, stamp), change
            )
        except ActError as e:
            return self._drop(diag, str(e))
        notify(proposal, self.cfg)
        return proposal

    def withdraw(self, diag: Diagnosis, proposal: Proposal | None, now_ns: int) -> Proposal | None:
        """Close the open ``proposal`` of ``diag`` now that a later analysis superseded it:
        its branch is closed (local) or its pull request closed (GitHub) with
        :data:`SUPERSEDED_NOTE`, never merged. The proposal's closed version, or ``None`` with
        ``last_reason`` when there is nothing to close: another status, no proposal, or one a
        human already decided (an approval stands). Idempotent: one already withdrawn (a
        replay after a crash between the close and its row) is not closed twice. The same
        diagnosis found again later reopens it (:meth:`propose`)."""
        self.last_reason, self.already_applied = "", False
        if diag.status != "superseded":
            return self._drop(diag, f"the diagnosis is {diag.status}, not superseded")
        if proposal is None or proposal.status != "open":
            state = proposal.status if proposal else "none"
            return self._drop(diag, f"superseded; its proposal is {state}: nothing to close")
        try:
            prev = self.backend.existing(proposal.branch)
            if prev is None or prev["state"] in ("merged", "closed"):
                state = prev["state"] if prev else "gone"
                return self._drop(diag, f"superseded; its branch is {state}: left to review")
            if prev["state"] == "open":
                self.backend.withdraw(proposal, SUPERSEDED_NOTE)
        except ActError as e:
            return self._drop(diag, f"superseded, but closing its proposal failed: {e}")
        log.info("act: proposal %s closed: %s", proposal.proposal_id, SUPERSEDED_NOTE)
        return replace(proposal, status="closed", version=proposal.version + 1, updated_ns=now_ns)

    def _read_targets(self, diag: Diagnosis) -> tuple[dict[str, str], dict[str, list[str]] | None]:
        """The target files on the base branch, and the prompts' history for a regression."""
        targets = self.cfg.act.targets
        files = self.backend.read_files(
            list(dict.fromkeys(normalize_path(t.path) for t in targets))
        )
        history = None
        if diag.rule == "prompt_regression":
            history = {
                normalize_path(t.path): self.backend.file_history(normalize_path(t.path))
                for t in targets
                if t.kind == "prompt"
            }
        return files, history

    def _change(
        self, diag: Diagnosis, files: dict[str, str], history: dict[str, list[str]] | None
    ) -> Change | None:
        """The validated change for ``diag``, or ``None`` (dropped, with the reason)."""
        act = self.cfg.act
        try:
            change, reason = propose_change(
                diag,
                files,
                act.targets,
                max_changed_lines=act.max_changed_lines,
                history=history,
                redactor=self.redactor,
            )
        except AlreadyApplied as e:
            self.already_applied = True
            return self._drop(diag, str(e))
        if change is None:
            return self._drop(diag, reason)
        return change

    def _proposal(
        self,
        diag: Diagnosis,
        change: Change,
        branch: str,
        prev: dict[str, Any] | None,
        stamp: str,
        now_ns: int,
    ) -> Proposal:
        """The proposal record: the next version, or the same one for a replay of ``prev``."""
        pid = proposal_id(diag.diagnosis_id)
        version = prev["version"] + 1 if prev else 1
        if prev is not None and prev["state"] == "withdrawn":
            version += 1  # its withdrawal took a version of the proposals row
        created_ns = (prev["created_ns"] or now_ns) if prev else now_ns
        if prev is not None and prev["stamp"] == stamp:
            version = prev["version"]  # a replay: the branch already holds exactly this
        body = render_body(diag, change, self.cfg, version=version, pid=pid, redactor=self.redactor)
        return Proposal(
            proposal_id=pid,
            diagnosis_id=diag.diagnosis_id,
            intent_id=diag.intent_id,
            backend=self.backend.name,
            repo=self.backend.repo,
            base=self.backend.base,
            branch=branch,
            title=render_title(diag, self.redactor),
            body=body,
            diff=self.redactor.redact(change.diff())[0],
            files=change.files,
            version=version,
            created_ns=created_ns,
            updated_ns=now_ns,
            source="llm" if change.source == "llm" else "template",
        )

    def llm_files(self, diag: Diagnosis) -> dict[str, str] | None:
        """The target files an LLM edit for ``diag`` starts from (``None``: nothing to ask,
        the diagnosis is closed or the proposal was decided by a reviewer)."""
        if diag.status in CLOSED_STATUSES or not self.cfg.act.targets:
            return None
        try:
            prev = self.backend.existing(branch_name(diag.diagnosis_id))
            if prev is not None and prev["state"] in ("merged", "closed"):
                return None
            return self._read_targets(diag)[0]
        except ActError:
            return None

    def llm_change(self, diag: Diagnosis, files: dict[str, str], llm: ChatJSON) -> Change:
        """The LLM's validated edit for ``diag`` (runs on an LLM step's thread: no backend
        access); :class:`LLMError` when it is refused, and the templated fix stands."""
        act = self.cfg.act
        change, reason = llm_change(
            diag,
            files,
            act.targets,
            llm,
            self.redactor,
            max_changed_lines=act.max_changed_lines,
            max_file_chars=self.cfg.llm.max_file_chars,
        )
        if change is None:
            raise LLMError(f"LLM edit for diagnosis {diag.diagnosis_id} refused: {reason}")
        return change

    def _fields(
        self, diag: Diagnosis, change: Change, proposal: Proposal, stamp: str
    ) -> dict[str, Any]:
        """What the backend writes: the branch, its commit message, the pull request text."""
        return {
            "branch": proposal.branch,
            "title": proposal.title,
            "body": proposal.body,
            "version": proposal.version,
            "proposal_id": proposal.proposal_id,
            "diagnosis_id": diag.diagnosis_id,
            "message": commit_message(
                diag,
                change,
                title=proposal.title,
                pid=proposal.proposal_id,
                version=proposal.version,
                stamp=stamp,
                created_ns=proposal.created_ns,
                redactor=self.redactor,
            ),
            "update_comment": update_comment(diag, proposal.version, self.cfg, self.redactor),
        }


def _newer(diag: Diagnosis, prev: dict[str, Any]) -> bool:
    """``diag`` is a version after the one the branch answers (a withdrawn proposal reopens
    only for a diagnosis found again, never for a replay of what it answered)."""
    return diag.version > int(prev.get("diagnosis_version", 0))


def proposal_rows(props: Iterable[Proposal]) -> list[dict[str, Any]]:
    """Rows for the ``proposals`` table (its columns are exactly the record's fields)."""
    return [{k: v for k, v in p.to_dict().items() if k != "v"} for p in props]


def notify(proposal: Proposal, cfg: Config) -> bool:
    """Log the proposal and post ``{"text": ...}`` to ``act.notify_webhook`` (Slack-compatible).

    Returns whether a webhook accepted it; failures are logged, never raised — a missed
    notification must not lose a proposal.
    """
    verb = "opened" if proposal.version == 1 else f"updated (v{proposal.version})"
    where = proposal.pr_url or f"{proposal.repo} branch {proposal.branch}"
    text = Redactor().redact(f"closeloop {verb} a proposal: {proposal.title} — {where}")[0]
    log.info("act: %s", text)
    url = cfg.act.notify_webhook
    if not url:
        return False
    req = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=NOTIFY_TIMEOUT_S) as resp:
            return 200 <= resp.status < 300
    except OSError as e:
        log.warning("act: notification to %s failed: %s", re.sub(r"//[^/]*@", "//", url), e)
        return False


@dataclass(frozen=True)
class Rebuilt:
    """A proposal built again on the current base, or why there is none: ``already_applied``
    when the base already holds its change (another proposal made the very same edit)."""

    proposal: Proposal | None
    reason: str = ""
    already_applied: bool = False


def rebuild_proposal(
    cfg: Config, backend: ChangeBackend, diagnosis: Diagnosis, now_ns: int
) -> Rebuilt:
    """Build the proposal of ``diagnosis`` again on the current base: what review asks of act
    when an approved branch no longer merges, so the reviewer sees the diff that will land."""
    actor = Actor(cfg, backend)
    proposal = actor.propose(diagnosis, now_ns, rebuild=True)
    return Rebuilt(proposal, actor.last_reason, actor.already_applied)
