"""Layer 4, act: a diagnosis becomes a small, validated change on a proposal branch or pull request.

``change`` holds the edit model and the rules every change passes, ``fixes`` turns a
diagnosis into a change (LLM or templates), ``core`` writes it through a backend
(:mod:`processors.act.gitrepo` or :mod:`processors.act.github`) and notifies.
"""

from __future__ import annotations

from processors.act.change import Change, Component, FileEdit, normalize_path, validate_change
from processors.act.core import (
    Actor,
    ChangeBackend,
    branch_name,
    notify,
    open_backend,
    proposal_id,
    proposal_rows,
    render_body,
)
from processors.act.fixes import propose_change, resolve_component

__all__ = [
    "Actor",
    "Change",
    "ChangeBackend",
    "Component",
    "FileEdit",
    "branch_name",
    "normalize_path",
    "notify",
    "open_backend",
    "proposal_id",
    "proposal_rows",
    "propose_change",
    "render_body",
    "resolve_component",
    "validate_change",
]
