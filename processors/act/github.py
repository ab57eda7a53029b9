"""The GitHub backend of layer 4 (PyGithub): one pull request per diagnosis, never merged here.

A proposal is one commit built with the git data API (a tree on top of the base commit's
tree, a commit whose parent is the base head) on ``closeloop/<diagnosis_id>``; the branch
ref is created, or force-updated when the diagnosis comes back with new evidence. The pull
request is opened once and then edited (body) and commented on (what changed). Nothing
here writes the base branch or merges: merging is a human's act on GitHub, which layer 5
records by polling :meth:`GitHubBackend.status` or from a webhook.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from github import (
    Auth,
    Github,
    GithubException,
    InputGitAuthor,
    InputGitTreeElement,
    UnknownObjectException,
)

from processors.act.backend import WITHDRAWN_NOTE, check_branch
from processors.act.gitrepo import AUTHOR_EMAIL, AUTHOR_NAME, proposal_state
from processors.config import ActConfig
from processors.errors import ActError

if TYPE_CHECKING:
    from processors.act.change import Change
    from processors.records import Proposal

TIMEOUT_S = 15


class GitHubBackend:
    """:class:`processors.act.ChangeBackend` over a GitHub (or GitHub Enterprise) repository."""

    name = "github"

    def __init__(self, cfg: ActConfig, token: str | None = None) -> None:
        token = token or os.environ.get("GITHUB_TOKEN", "")
        if not token:
            raise ActError(
                "GITHUB_TOKEN is not set; the github backend needs a token that may "
                "push branches and open pull requests"
            )
        if cfg.repo.count("/") != 1:
            raise ActError(f"act.repo {cfg.repo!r} must be owner/name for the github backend")
        self.repo = cfg.repo
        self.base = cfg.base
        self.labels = list(cfg.labels)
        self.owner = cfg.repo.split("/")[0]
        self._gh = Github(
            base_url=cfg.github_url,
            auth=Auth.Token(token),
            timeout=TIMEOUT_S,
            retry=None,
            seconds_between_requests=cfg.github_throttle_s / 4,
            seconds_between_writes=cfg.github_throttle_s,
        )
        try:
            self._repo = self._gh.get_repo(cfg.repo)
        except GithubException as e:
            raise ActError(f"cannot open {cfg.repo} at {cfg.github_url}: {_why(e)}") from e

    def _head_sha(self, branch: str) -> str | None:
        try:
            return self._repo.get_git_ref(f"heads/{branch}").object.sha
        except UnknownObjectException:
            return None

    def _pull(self, branch: str) -> Any:
        pulls = self._repo.get_pulls(state="all", head=f"{self.owner}:{branch}", base=self.base)
        return next(iter(pulls), None)

    # -- ChangeBackend -------------------------------------------------------------------
    def base_commit(self) -> str:
        """The commit the base branch is at."""
        sha = self._head_sha(self.base)
        if sha is None:
            raise ActError(f"the base branch {self.base!r} does not exist in {self.repo}")
        return sha

    def read_files(self, paths: Sequence[str], ref: str | None = None) -> dict[str, str]:
        """Contents of ``paths`` at ``ref`` (the base branch by default); absent files omitted."""
        out = {}
        for p in paths:
            try:
                c = self._repo.get_contents(p, ref=ref or self.base)
            except UnknownObjectException:
                continue
            except GithubException as e:
                raise ActError(f"cannot read {p} from {self.repo}: {_why(e)}") from e
            if isinstance(c, list) or c.type != "file":
                kind = "a directory" if isinstance(c, list) else f"a {c.type}"
                raise ActError(f"refused {p!r}: it is {kind} in {self.repo}, not a regular file")
            out[p] = c.decoded_content.decode()
        return out

    def file_history(self, path: str, limit: int = 5) -> list[str]:
        """Earlier committed contents of ``path`` on the base branch, newest first."""
        commits = list(
            itertools.islice(self._repo.get_commits(sha=self.base, path=path), limit + 1)
        )
        out = []
        for c in commits[1:]:
            out.extend(self.read_files([path], c.sha).values())
        return out

    def existing(self, branch: str) -> dict[str, Any] | None:
        """The proposal on ``branch``: its head's trailers and the pull request's state."""
        try:
            head = self._head_sha(branch)
            pr = self._pull(branch)
            if head is None and pr is None:
                return None
            sha = head or pr.head.sha
            message = self._repo.get_git_commit(sha).message
            state = "open"
            if pr is not None and pr.merged:
                state = "merged"
            elif pr is not None and pr.state == "closed":
                state = "withdrawn" if _withdrawn(pr) else "closed"
        except GithubException as e:
            raise ActError(f"cannot read {branch} of {self.repo}: {_why(e)}") from e
        return proposal_state(
            message, state, sha, pr_number=pr.number if pr else 0, pr_url=pr.html_url if pr else ""
        )

    def open_or_update(self, fields: dict[str, Any], change: Change) -> tuple[str, str, int, str]:
        """Commit ``change`` on the base head as ``fields['branch']`` and open or update its PR."""
        branch = fields["branch"]
        check_branch(branch, self.base)
        try:
            base_sha = self._head_sha(self.base)
            if base_sha is None:
                raise ActError(f"base branch {self.base!r} does not exist in {self.repo}")
            current = self.read_files(change.files, base_sha)
            for e in change.edits:
                if current.get(e.path, "") != e.old:
                    raise ActError(f"{e.path} changed on {self.base} since the change was computed")
            base_commit = self._repo.get_git_commit(base_sha)
            tree = self._repo.create_git_tree(
                [
                    InputGitTreeElement(e.path, "100644", "blob", content=e.new)
                    for e in change.edits
                ],
                base_commit.tree,
            )
            who = InputGitAuthor(AUTHOR_NAME, AUTHOR_EMAIL)
            commit = self._repo.create_git_commit(
                fields["message"], tree, [base_commit], author=who, committer=who
            )
            pr = self._pull(branch)
            if pr is not None and pr.state == "closed":
                if pr.merged or not _withdrawn(pr):
                    raise ActError(f"pull request #{pr.number} was closed by a reviewer")
                # withdrawn, and its diagnosis is back: reopened before its branch moves, as
                # GitHub reopens no pull request whose branch was force-pushed while closed
                pr.edit(state="open")
            if self._head_sha(branch) is None:
                self._repo.create_git_ref(f"refs/heads/{branch}", commit.sha)
            else:
                self._repo.get_git_ref(f"heads/{branch}").edit(commit.sha, force=True)
            if pr is None:
                pr = self._repo.create_pull(
                    base=self.base, head=branch, title=fields["title"], body=fields["body"]
                )
                if self.labels:
                    pr.add_to_labels(*self.labels)
            else:
                pr.edit(title=fields["title"], body=fields["body"])
                pr.create_issue_comment(fields["update_comment"])
        except GithubException as e:
            raise ActError(f"GitHub refused the proposal on {branch}: {_why(e)}") from e
        return branch, commit.sha, pr.number, pr.html_url

    def status(self, proposal: Proposal) -> dict[str, Any]:
        """The pull request's state, merge and reviews (what layer 5 records)."""
        try:
            pr = self._repo.get_pull(proposal.pr_number)
            reviews = [
                {
                    "user": r.user.login if r.user else "",
                    "state": r.state,
                    "body": r.body or "",
                    "commit_id": r.commit_id or "",
                    "submitted_ns": _ns(r.submitted_at),
                }
                for r in pr.get_reviews()
            ]
            merged = bool(pr.merged)
            return {
                "state": "merged" if merged else pr.state,
                "merged": merged,
                "head": pr.head.sha,
                "merge_commit_sha": (pr.merge_commit_sha or "") if merged else "",
                "merged_by": pr.merged_by.login if merged and pr.merged_by else "",
                "merged_ns": _ns(pr.merged_at) if merged else 0,
                "reviews": reviews,
            }
        except GithubException as e:
            raise ActError(f"cannot read pull request #{proposal.pr_number}: {_why(e)}") from e

    def merge(self, proposal: Proposal, reviewer: str, comment: str) -> str:
        raise ActError(
            "closeloop does not merge on GitHub: a reviewer merges the pull request there, "
            "and closeloop records it (poll or webhook)"
        )

    def withdraw(self, proposal: Proposal, reason: str) -> None:
        """:meth:`close` on closeloop's own account (its note starts with WITHDRAWN_NOTE)."""
        self.close(proposal, f"{WITHDRAWN_NOTE} {reason}.")

    def close(self, proposal: Proposal, note: str) -> None:
        """Close the pull request, ``note`` (who closed it and why) as its last comment."""
        try:
            pr = self._repo.get_pull(proposal.pr_number)
            pr.create_issue_comment(note)
            pr.edit(state="closed")
        except GithubException as e:
            raise ActError(f"cannot close pull request #{proposal.pr_number}: {_why(e)}") from e

    def comment(self, proposal: Proposal, text: str) -> None:
        try:
            self._repo.get_pull(proposal.pr_number).create_issue_comment(text)
        except GithubException as e:
            raise ActError(
                f"cannot comment on pull request #{proposal.pr_number}: {_why(e)}"
            ) from e


def _withdrawn(pr: Any) -> bool:
    """A closed pull request whose last word is closeloop's withdrawal (no one spoke since)."""
    last = list(pr.get_issue_comments())[-1:]
    return bool(last) and str(last[0].body or "").startswith(WITHDRAWN_NOTE)


def _ns(dt: Any) -> int:
    return int(dt.timestamp() * 1e9) if dt is not None else 0


def _why(e: GithubException) -> str:
    msg = e.data.get("message") if isinstance(e.data, dict) else e.data
    return f"HTTP {e.status}: {msg}"
