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
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from processors.act.change import Change, normalize_path
from processors.act.fixes import propose_change, quote, redact_value
from processors.act.github import GitHubBackend
from processors.act.gitrepo import LocalGit
from processors.config import Config
from processors.errors import ActError, AlreadyApplied
from processors.llm import ChatJSON
from processors.records import Diagnosis, Proposal
from processors.redact import Redactor

log = logging.getLogger("closeloop.act")

BRANCH_PREFIX = "closeloop/"
NOTIFY_TIMEOUT_S = 5.0
MAX_TRACE_LINKS = 20
MAX_EVIDENCE_CHARS = 4000


class ChangeBackend(Protocol):
    """Where proposals are written: a local repository or GitHub."""

    name: str  # local | github
    repo: str
    base: str

    def read_files(self, paths: Sequence[str], ref: str | None = None) -> dict[str, str]: ...
    def file_history(self, path: str, limit: int = 5) -> list[str]: ...
    def existing(self, branch: str) -> dict[str, Any] | None: ...
    def open_or_update(
        self, fields: dict[str, Any], change: Change
    ) -> tuple[str, str, int, str]: ...
    def status(self, proposal: Proposal) -> dict[str, Any]: ...
    def merge(self, proposal: Proposal, reviewer: str, comment: str) -> str: ...
    def close(self, proposal: Proposal, reviewer: str, comment: str) -> None: ...
    def comment(self, proposal: Proposal, text: str) -> None: ...


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


def branch_name(diagnosis_id: str) -> str:
    return BRANCH_PREFIX + (
        re.sub(r"[^A-Za-z0-9._-]+", "-", diagnosis_id).strip(".-")[:80] or "diagnosis"
    )


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
    return "closeloop: " + (quote(diag.summary, redactor, 90) or f"{diag.rule} in {diag.intent_id}")


def render_body(
    diag: Diagnosis, change: Change, cfg: Config, *, version: int, pid: str, redactor: Redactor
) -> str:
    """The pull request description: what is wrong, the evidence, the change and how it will
    be verified. Every piece of conversation-derived text is redacted and neutralised, and the
    whole body is redacted once more before it leaves."""
    name = _inline(diag.intent_name, redactor, 80) or diag.intent_id
    comp = diag.component or {}
    lines = [
        f"## {_inline(diag.summary, redactor, 200) or diag.rule}",
        "",
        (
            f"**Intent:** {name} (`{diag.intent_id}`) · **Rule:** `{diag.rule}` · "
            f"**Confidence:** {diag.confidence:.2f}"
        ),
        "",
        f"**Root cause:** {_inline(diag.root_cause, redactor) or 'see evidence'}",
        "",
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
    lines += [
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
        "---",
        (
            f"Proposal `{pid}` version {version} · diagnosis `{diag.diagnosis_id}`. closeloop never "
            "merges: a human reviewer decides."
        ),
    ]
    text, _ = redactor.redact("\n".join(lines))
    return text


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

    def __init__(self, cfg: Config, backend: ChangeBackend, llm: ChatJSON | None = None) -> None:
        self.cfg = cfg
        self.backend = backend
        self.llm = llm
        self.redactor = Redactor(cfg.capture.redact, cfg.capture.extra_patterns)
        self.last_reason = ""
        self.already_applied = False

    def _drop(self, diag: Diagnosis, reason: str) -> None:
        self.last_reason = reason
        log.info("act: diagnosis %s gets no proposal: %s", diag.diagnosis_id, reason)

    def propose(self, diag: Diagnosis, now_ns: int, *, rebuild: bool = False) -> Proposal | None:
        """Open (or update) the proposal for ``diag``; ``None`` with ``last_reason`` if none.

        Replaying the same diagnosis version is a no-op that returns the existing proposal;
        a newer version of the diagnosis updates the branch and bumps the proposal version.
        A version the proposal already answers, re-emitted with other evidence (diagnose
        replays after a restart), changes nothing; ``rebuild`` (a reviewer's approval that
        no longer merges) builds it again on the current base. A proposal that was merged or
        closed by a reviewer is never reopened.
        """
        self.last_reason, self.already_applied = "", False
        act = self.cfg.act
        if diag.status in ("resolved", "rejected"):
            return self._drop(diag, f"the diagnosis is {diag.status}")
        if not act.targets:
            return self._drop(diag, "act.targets is empty: closeloop may not write any file")
        paths = list(dict.fromkeys(normalize_path(t.path) for t in act.targets))
        branch = branch_name(diag.diagnosis_id)
        try:
            prev = self.backend.existing(branch)
            if prev is not None and prev["state"] in ("merged", "closed"):
                return self._drop(diag, f"its proposal was already {prev['state']} by a reviewer")
            files = self.backend.read_files(paths)
            history = None
            if diag.rule == "prompt_regression":
                history = {
                    normalize_path(t.path): self.backend.file_history(normalize_path(t.path))
                    for t in act.targets
                    if t.kind == "prompt"
                }
        except ActError as e:
            return self._drop(diag, str(e))
        try:
            change, reason = propose_change(
                diag,
                files,
                act.targets,
                self.llm,
                max_changed_lines=act.max_changed_lines,
                history=history,
                redactor=self.redactor,
            )
        except AlreadyApplied as e:
            self.already_applied = True
            return self._drop(diag, str(e))
        if change is None:
            return self._drop(diag, reason)
        pid = proposal_id(diag.diagnosis_id)
        # not updated_ns: diagnose re-emits the same version after a restart (replayed from its
        # checkpoint) at a later time, and that must not count as a new proposal version
        stamp = hashlib.sha256(
            json.dumps([diag.diagnosis_id, diag.version, change.diff()]).encode()
        ).hexdigest()[:16]
        if (
            prev is not None
            and prev["stamp"] != stamp
            and not rebuild
            and prev.get("diagnosis_version", 0) >= diag.version
        ):
            return self._drop(
                diag, f"its proposal already answers diagnosis version {prev['diagnosis_version']}"
            )
        title = render_title(diag, self.redactor)
        version = prev["version"] + 1 if prev else 1
        created_ns = (prev["created_ns"] or now_ns) if prev else now_ns
        if prev is not None and prev["stamp"] == stamp:
            version = prev["version"]  # a replay: the branch already holds exactly this
        body = render_body(diag, change, self.cfg, version=version, pid=pid, redactor=self.redactor)
        proposal = Proposal(
            proposal_id=pid,
            diagnosis_id=diag.diagnosis_id,
            intent_id=diag.intent_id,
            backend=self.backend.name,
            repo=self.backend.repo,
            base=self.backend.base,
            branch=branch,
            title=title,
            body=body,
            diff=self.redactor.redact(change.diff())[0],
            files=change.files,
            version=version,
            created_ns=created_ns,
            updated_ns=now_ns,
        )
        if prev is not None and prev["stamp"] == stamp:
            proposal.commit, proposal.pr_number, proposal.pr_url = (
                prev["commit"],
                prev["pr_number"],
                prev["pr_url"],
            )
            return proposal
        fields = {
            "branch": branch,
            "title": title,
            "body": body,
            "version": version,
            "proposal_id": pid,
            "diagnosis_id": diag.diagnosis_id,
            "message": commit_message(
                diag,
                change,
                title=title,
                pid=pid,
                version=version,
                stamp=stamp,
                created_ns=created_ns,
                redactor=self.redactor,
            ),
            "update_comment": update_comment(diag, version, self.cfg, self.redactor),
        }
        try:
            _, proposal.commit, proposal.pr_number, proposal.pr_url = self.backend.open_or_update(
                fields, change
            )
        except ActError as e:
            return self._drop(diag, str(e))
        notify(proposal, self.cfg)
        return proposal


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
