"""The local git backend of layer 4: proposal branches in a repository on this machine.

Everything goes through the ``git`` command line with explicit arguments (never a shell)
and git's plumbing with a temporary index, so proposing never touches the base branch,
the index or the working tree of the repository:

* a proposal is one commit on top of the base branch, on ``closeloop/<diagnosis_id>``
  (``read-tree`` into a temporary index, ``hash-object``, ``update-index``, ``write-tree``,
  ``commit-tree``, then ``update-ref`` with the expected old value, so a concurrent writer
  makes it fail instead of being overwritten); an update replaces the branch with a new
  commit on the current base, like a force-push of a pull request branch;
* review comments are git notes on the proposal commit (``refs/notes/closeloop``);
* a rejected proposal's branch is deleted and its commit kept under
  ``refs/closeloop/closed/<diagnosis_id>``, so the same diagnosis is not proposed again; one
  closeloop withdrew (its diagnosis superseded) goes to ``refs/closeloop/withdrawn/`` instead,
  and the same diagnosis found again opens the branch anew;
* a merge — only ever called by the review layer for a named human reviewer — builds a
  ``--no-ff`` merge commit with ``merge-tree --write-tree`` and ``commit-tree``. If the base
  branch is checked out in a worktree, the base is then advanced *in that worktree* with
  ``git merge --ff-only``, which updates its index and files and refuses (changing nothing)
  if uncommitted local edits would be overwritten; otherwise ``update-ref`` with the old
  value moves the branch.

Commit messages carry ``Closeloop-*`` trailers (proposal, diagnosis, version, stamp), which
is how an update finds the version it replaces after a restart.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processors.act.backend import WITHDRAWN_NOTE, approver, check_branch, diagnosis_of_branch
from processors.errors import ActError, AlreadyApplied

if TYPE_CHECKING:
    from processors.act.change import Change
    from processors.records import Proposal

AUTHOR_NAME = "closeloop"
AUTHOR_EMAIL = "closeloop@localhost"
CLOSED_PREFIX = "refs/closeloop/closed/"
WITHDRAWN_PREFIX = "refs/closeloop/withdrawn/"
NOTES_REF = "refs/notes/closeloop"
ZERO = "0" * 40
_TRAILER = re.compile(r"^(Closeloop-[A-Za-z-]+|Approved-by):\s*(.*)$", re.MULTILINE)


def trailers(message: str) -> dict[str, str]:
    """``Closeloop-*`` and ``Approved-by`` trailers of a commit message (last one wins), read as
    git reads trailers: from the message's last paragraph only, so a line in a reviewer's
    comment is never one."""
    last = message.strip().rsplit("\n\n", 1)[-1]
    return {k: v.strip() for k, v in _TRAILER.findall(last)}


def quoted(comment: str) -> str:
    """A reviewer's comment for a commit message: each line quoted (``> ``), so no line of it
    reads as a trailer (``Approved-by: ...``) to git or to :func:`trailers`."""
    lines = comment.strip().splitlines()
    return "\n".join("> " + line if line.strip() else ">" for line in lines)


def proposal_state(message: str, state: str, commit: str, **extra: Any) -> dict[str, Any]:
    """The ``existing()`` answer of a backend, from a branch head's commit message."""
    t = trailers(message)
    return {
        "commit": commit,
        "state": state,
        "version": int(t.get("Closeloop-Version", "0") or 0),
        "stamp": t.get("Closeloop-Stamp", ""),
        "created_ns": int(t.get("Closeloop-Created", "0") or 0),
        "diagnosis_version": int(t.get("Closeloop-Diagnosis-Version", "0") or 0),
        "pr_number": 0,
        "pr_url": "",
        **extra,
    }


class LocalGit:
    """:class:`processors.act.ChangeBackend` over a local repository (bare or not)."""

    name = "local"

    def __init__(self, repo: str | os.PathLike[str], base: str = "main") -> None:
        self.path = Path(repo).resolve()
        self.repo = str(self.path)
        self.base = base
        if not self.path.is_dir():
            raise ActError(f"act.repo {self.repo} is not a directory; point it at a git repository")
        self._git("rev-parse", "--absolute-git-dir")
        if self._rev(f"refs/heads/{base}") is None:
            raise ActError(
                f"{self.repo} has no branch {base!r}; set act.base to the branch to propose against"
            )

    # -- plumbing ------------------------------------------------------------------------
    def _run(
        self,
        *args: str,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        full_env.update(
            {
                "GIT_AUTHOR_NAME": AUTHOR_NAME,
                "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
                "GIT_COMMITTER_NAME": AUTHOR_NAME,
                "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
                "GIT_TERMINAL_PROMPT": "0",
                "LC_ALL": "C",
            }
        )
        full_env.update(env or {})
        try:
            return subprocess.run(
                ["git", "-C", str(cwd or self.path), *args],
                input=stdin,
                capture_output=True,
                env=full_env,
                check=False,
            )
        except FileNotFoundError:
            raise ActError("the git command is not installed; the local backend needs it") from None

    def _git(
        self,
        *args: str,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        check: bool = True,
    ) -> str:
        proc = self._run(*args, stdin=stdin, env=env, cwd=cwd)
        if check and proc.returncode != 0:
            raise ActError(
                f"git {' '.join(args[:3])} failed in {cwd or self.path}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout.decode(errors="surrogateescape")

    def _rev(self, ref: str) -> str | None:
        out = self._git(
            "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False
        ).strip()
        return out or None

    def _entry(self, ref: str, path: str) -> tuple[str, str] | None:
        """``(mode, object id)`` of ``path`` at ``ref``; refuses symlinks on the way there."""
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            out = self._git("ls-tree", "-z", ref, "--", prefix)
            if not out:
                return None
            mode, _, rest = out.rstrip("\x00").partition(" ")
            if mode == "120000":
                raise ActError(f"refused {path!r}: {prefix} is a symlink in {ref}")
        oid = rest.split("\t", 1)[0].split(" ")[-1]
        if mode not in ("100644", "100755"):
            raise ActError(f"refused {path!r}: not a regular file in {ref} (mode {mode})")
        return mode, oid

    def _checked_out(self) -> dict[str, Path]:
        """Branch ref -> worktree path, for every worktree with a branch checked out."""
        out: dict[str, Path] = {}
        wt: Path | None = None
        for line in self._git("worktree", "list", "--porcelain").splitlines():
            if line.startswith("worktree "):
                wt = Path(line[len("worktree ") :])
            elif line.startswith("branch ") and wt is not None:
                out[line[len("branch ") :]] = wt
        return out

    # -- ChangeBackend -------------------------------------------------------------------
    def read_files(self, paths: Sequence[str], ref: str | None = None) -> dict[str, str]:
        """Contents of ``paths`` at ``ref`` (the base branch by default); absent files omitted."""
        ref = ref or f"refs/heads/{self.base}"
        out = {}
        for p in paths:
            entry = self._entry(ref, p)
            if entry is not None:
                out[p] = self._git("cat-file", "blob", entry[1])
        return out

    def file_history(self, path: str, limit: int = 5) -> list[str]:
        """Earlier committed contents of ``path`` on the base branch, newest first."""
        commits = self._git(
            "log", "--format=%H", f"-n{limit + 1}", f"refs/heads/{self.base}", "--", path
        ).split()
        out = []
        for c in commits[1:]:
            try:
                out.extend(self.read_files([path], c).values())
            except ActError:
                continue
        return out

    def existing(self, branch: str) -> dict[str, Any] | None:
        """The proposal already on ``branch`` (state open/merged), or a closed (by a reviewer)
        or withdrawn (by closeloop) one, or ``None``."""
        did = diagnosis_of_branch(branch)
        head, state = self._rev(f"refs/heads/{branch}"), "open"
        for prefix, gone in ((CLOSED_PREFIX, "closed"), (WITHDRAWN_PREFIX, "withdrawn")):
            if head is None:
                head, state = self._rev(f"{prefix}{did}"), gone
        if head is None:
            return None
        if state == "open" and self._is_merged(head):
            state = "merged"
        return proposal_state(self._git("log", "-1", "--format=%B", head), state, head)

    def _is_merged(self, commit: str) -> bool:
        return (
            self._run("merge-base", "--is-ancestor", commit, f"refs/heads/{self.base}").returncode
            == 0
        )

    def open_or_update(self, fields: dict[str, Any], change: Change) -> tuple[str, str, int, str]:
        """Commit ``change`` on top of the base as the head of ``fields['branch']``."""
        branch = fields["branch"]
        check_branch(branch, self.base)
        ref = f"refs/heads/{branch}"
        if ref in self._checked_out():
            raise ActError(
                f"{branch} is checked out in a worktree; closeloop will not move it "
                "under someone's feet"
            )
        base_sha = self._rev(f"refs/heads/{self.base}")
        old = self._rev(ref) or ZERO
        with tempfile.TemporaryDirectory(prefix="closeloop-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self._git("read-tree", base_sha, env=env)
            for e in change.edits:
                entry = self._entry(base_sha, e.path)
                current = self._git("cat-file", "blob", entry[1]) if entry else ""
                if current != e.old:
                    raise ActError(f"{e.path} changed on {self.base} since the change was computed")
                blob = self._git("hash-object", "-w", "--stdin", stdin=e.new.encode()).strip()
                mode = entry[0] if entry else "100644"
                self._git(
                    "update-index", "--add", "--cacheinfo", f"{mode},{blob},{e.path}", env=env
                )
            tree = self._git("write-tree", env=env).strip()
        commit = self._git(
            "commit-tree", tree, "-p", base_sha, stdin=fields["message"].encode()
        ).strip()
        self._git("update-ref", "-m", "closeloop: proposal", ref, commit, old)
        return branch, commit, 0, ""

    def status(self, proposal: Proposal) -> dict[str, Any]:
        """``{"state", "merged", "head", "merge_commit_sha", "merged_by"}`` for a proposal."""
        info = self.existing(proposal.branch)
        if info is None:
            return {
                "state": "missing",
                "merged": False,
                "head": "",
                "merge_commit_sha": "",
                "merged_by": "",
            }
        merge_sha, merged_by = "", ""
        if info["state"] == "merged":
            for line in self._git(
                "log",
                "--merges",
                "--format=%H%x00%B%x01",
                f"refs/heads/{self.base}",
                "--ancestry-path",
                f"{info['commit']}..refs/heads/{self.base}",
            ).split("\x01"):
                sha, _, msg = line.strip().partition("\x00")
                if sha and trailers(msg).get("Closeloop-Proposal") == proposal.proposal_id:
                    merge_sha, merged_by = sha, trailers(msg).get("Approved-by", "")
        return {
            "state": info["state"],
            "merged": info["state"] == "merged",
            "head": info["commit"],
            "merge_commit_sha": merge_sha,
            "merged_by": merged_by,
            "reviews": [],
        }

    def base_commit(self) -> str:
        """The commit the base branch is at."""
        sha = self._rev(f"refs/heads/{self.base}")
        if sha is None:
            raise ActError(f"the base branch {self.base!r} does not exist in {self.path}")
        return sha

    def merge(self, proposal: Proposal, reviewer: str, comment: str) -> str:
        """Merge the reviewed proposal commit into the base (``--no-ff``); the merge commit id.

        Refuses when the branch head is not the commit that was reviewed, when the merge
        conflicts, or when the checked-out base has local edits in the way — in each case
        nothing changes.
        """
        approver(reviewer)  # a merge needs a valid name before anything happens
        ref = f"refs/heads/{proposal.branch}"
        head = self._rev(ref)
        if head is None or head != proposal.commit:
            raise ActError(
                f"{proposal.branch} is at {head or 'nothing'}, not the reviewed commit "
                f"{proposal.commit}; review the current version first"
            )
        base_ref = f"refs/heads/{self.base}"
        base_sha = self._rev(base_ref)
        res = self._run("merge-tree", "--write-tree", base_sha, head)
        if res.returncode != 0:
            raise ActError(
                f"{proposal.branch} does not merge cleanly into {self.base}: "
                f"{res.stdout.decode(errors='replace').strip()}"
            )
        tree = res.stdout.decode().split("\n", 1)[0].strip()
        if tree == self._git("rev-parse", f"{base_sha}^{{tree}}").strip():
            raise AlreadyApplied(f"{self.base} already holds every change of {proposal.branch}")
        message = self.with_trailers(
            f"Merge {proposal.branch}: {proposal.title}\n\n"
            + (f"{quoted(comment)}\n" if comment.strip() else ""),
            {
                "Closeloop-Proposal": proposal.proposal_id,
                "Closeloop-Diagnosis": proposal.diagnosis_id,
                "Approved-by": approver(reviewer),
            },
        )
        merge = self._git(
            "commit-tree", tree, "-p", base_sha, "-p", head, stdin=message.encode()
        ).strip()
        worktree = self._checked_out().get(base_ref)
        if worktree is not None:
            self._git("merge", "--ff-only", "--quiet", merge, cwd=worktree)
        else:
            self._git(
                "update-ref", "-m", f"closeloop: merge {proposal.branch}", base_ref, merge, base_sha
            )
        return merge

    def with_trailers(self, message: str, values: dict[str, str]) -> str:
        """``message`` with ``values`` added as trailers by git itself (``interpret-trailers``)."""
        args = ["interpret-trailers", "--no-divider"]
        for key, value in values.items():
            args += ["--trailer", f"{key}: {value}"]
        return self._git(*args, stdin=message.encode(), check=True)

    def close(self, proposal: Proposal, note: str) -> None:
        """Delete the proposal branch, keeping its commit under ``refs/closeloop/closed/``;
        ``note`` (who closed it and why) goes on the commit's notes."""
        self._put_away(proposal, note, CLOSED_PREFIX)

    def withdraw(self, proposal: Proposal, reason: str) -> None:
        """:meth:`close` on closeloop's own account: kept under ``refs/closeloop/withdrawn/``."""
        self._put_away(proposal, f"{WITHDRAWN_NOTE} {reason}.", WITHDRAWN_PREFIX)

    def _put_away(self, proposal: Proposal, note: str, prefix: str) -> None:
        check_branch(proposal.branch, self.base)
        ref = f"refs/heads/{proposal.branch}"
        head = self._rev(ref)
        if head is None:
            return
        if ref in self._checked_out():
            raise ActError(f"{proposal.branch} is checked out; switch away before closing it")
        self.comment(proposal, note)
        self._git("update-ref", prefix + diagnosis_of_branch(proposal.branch), head)
        self._git("update-ref", "-d", ref, head)

    def comment(self, proposal: Proposal, text: str) -> None:
        """Append ``text`` to the proposal commit's note (``git notes --ref closeloop``)."""
        target = proposal.commit or self._rev(f"refs/heads/{proposal.branch}")
        if not target:
            raise ActError(f"proposal {proposal.proposal_id} has no commit to comment on")
        self._git("notes", f"--ref={NOTES_REF}", "append", "-m", text, target)

    def comments(self, proposal: Proposal) -> list[str]:
        """The notes appended to the proposal commit, oldest first."""
        out = self._git("notes", f"--ref={NOTES_REF}", "show", proposal.commit, check=False)
        return [c.strip() for c in out.split("\n\n") if c.strip()]
