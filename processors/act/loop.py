"""Act's store side: a proposal read back from the ``proposals`` table, the one query for it
(act closes a superseded diagnosis' proposal from it; review, the CLI and the page show and
decide on it)."""

from __future__ import annotations

from typing import Any

from processors.records import Proposal
from processors.store import Store


def proposal_row(store: Store, proposal_id: str) -> dict[str, Any] | None:
    """The row of one proposal, its latest version."""
    rows = store.query(
        "SELECT * FROM proposals FINAL WHERE proposal_id = {p:String}", {"p": proposal_id}
    )
    return rows[0] if rows else None


def load_proposal(store: Store, proposal_id: str) -> Proposal | None:
    row = proposal_row(store, proposal_id)
    return Proposal.from_dict(row) if row else None
