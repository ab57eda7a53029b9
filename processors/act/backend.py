"""Where act writes proposals: the :class:`ChangeBackend` protocol and the proposal branch names.

A proposal lives on one branch ``closeloop/<diagnosis_id>``; :data:`BRANCH_PREFIX` is the only
place that prefix is spelt, :data:`WITHDRAWN_NOTE` starts the note of a proposal closeloop closed
itself, and :func:`check_branch` keeps every backend off any other branch.
The backends are :mod:`processors.act.gitrepo` (a local repository) and
:mod:`processors.act.github` (pull requests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from processors.errors import ActError

if TYPE_CHECKING:
    from processors.act.change import Change
    from processors.records import Proposal

BRANCH_PREFIX = "closeloop/"
# How a proposal closed on closeloop's own account (``withdraw``: its diagnosis was superseded)
# is told from one a reviewer closed: ``existing()`` reports it ``withdrawn``, and the same
# diagnosis found again reopens it, where a reviewer's close is final.
WITHDRAWN_NOTE = "Closed by closeloop:"


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
    def close(self, proposal: Proposal, note: str) -> None: ...
    def withdraw(self, proposal: Proposal, reason: str) -> None: ...
    def comment(self, proposal: Proposal, text: str) -> None: ...
    def base_commit(self) -> str: ...


def branch_name(diagnosis_id: str) -> str:
    """The proposal branch of a diagnosis.

    >>> branch_name("repeated_ask/intent 7")
    'closeloop/repeated_ask-intent-7'
    """
    return BRANCH_PREFIX + (
        re.sub(r"[^A-Za-z0-9._-]+", "-", diagnosis_id).strip(".-")[:80] or "diagnosis"
    )


def diagnosis_of_branch(branch: str) -> str:
    """The part of a proposal branch after the prefix (the sanitised diagnosis id)."""
    return branch[len(BRANCH_PREFIX) :]


def is_proposal_branch(branch: str) -> bool:
    return branch.startswith(BRANCH_PREFIX)


def check_branch(branch: str, base: str) -> None:
    """Proposals live on ``closeloop/...`` branches only — never on the base branch."""
    if not is_proposal_branch(branch) or branch == base or ".." in branch:
        raise ActError(
            f"refused to write branch {branch!r}: proposals go to {BRANCH_PREFIX}<id>, "
            f"never to the base branch {base!r}"
        )


MAX_APPROVER_CHARS = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def approver(name: str) -> str:
    """The reviewer's name as a trailer value: one line of at most MAX_APPROVER_CHARS visible
    characters, no control or direction characters (a newline would forge a second
    ``Approved-by``); :class:`ActError` otherwise."""
    name = str(name or "").strip()
    if not name:
        raise ActError("a merge needs the name of the human who approved it")
    if _CONTROL.search(name):
        raise ActError("the approver's name holds a control character or line break; refused")
    if len(name) > MAX_APPROVER_CHARS:
        raise ActError(f"the approver's name is longer than {MAX_APPROVER_CHARS} characters")
    return " ".join(name.split())
