"""Layer 4, act: a diagnosis becomes a small, validated change on a proposal branch or pull request.

``change`` holds the edit model and the rules every change passes, ``fixes`` turns a
diagnosis into a change (LLM or templates), ``core`` writes it through a backend
(:mod:`processors.act.gitrepo` or :mod:`processors.act.github`, behind the protocol of
:mod:`processors.act.backend`) and notifies; ``loop`` reads a proposal back from the store.

What this package exports is act's public surface: the review layer uses nothing else (it
reads proposals with :func:`load_proposal` and rebuilds a stale one with
:func:`rebuild_proposal`).
"""

from __future__ import annotations

from processors.act.backend import (
    BRANCH_PREFIX,
    ChangeBackend,
    approver,
    branch_name,
    is_proposal_branch,
)
from processors.act.change import Change, Component, FileEdit, normalize_path, validate_change
from processors.act.core import (
    Actor,
    Rebuilt,
    notify,
    open_backend,
    proposal_id,
    proposal_rows,
    rebuild_proposal,
    render_body,
)
from processors.act.fixes import propose_change, resolve_component
from processors.act.loop import load_proposal, proposal_row

__all__ = [
    "BRANCH_PREFIX",
    "Actor",
    "Change",
    "ChangeBackend",
    "Component",
    "FileEdit",
    "Rebuilt",
    "approver",
    "branch_name",
    "is_proposal_branch",
    "load_proposal",
    "normalize_path",
    "notify",
    "open_backend",
    "proposal_id",
    "proposal_row",
    "proposal_rows",
    "propose_change",
    "rebuild_proposal",
    "render_body",
    "resolve_component",
    "validate_change",
]
