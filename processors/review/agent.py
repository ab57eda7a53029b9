"""Review's thin agent: a timer that polls decisions and verifies merged proposals."""

from __future__ import annotations

import logging
import time
from typing import Any

from processors.act import ChangeBackend
from processors.errors import ReviewError, StoreError
from processors.review.loop import load_proposal, merged_reviews, poll_open, verify
from processors.runtime import Pipeline, Wiring

log = logging.getLogger("closeloop.worker")

VERIFY_INTERVAL_S = 5.0


def verify_all(pipe: Pipeline, backend: ChangeBackend | None, now: int) -> list[Any]:
    """Poll GitHub for decisions, then verify every merged proposal: the outcomes."""
    if backend is not None and backend.name == "github":
        # decisions taken on GitHub (webhooks deliver them too; polling catches missed ones)
        try:
            poll_open(pipe.store, backend, now)
        except ReviewError as e:  # GitHub away: the next tick polls again
            log.warning("verify: polling GitHub failed: %s", e)
    outcomes = []
    for row in merged_reviews(pipe.store):
        prop = load_proposal(pipe.store, row["proposal_id"])
        result = verify(pipe.store, row, pipe.cfg, now, backend=backend, proposal=prop)
        outcomes += result.outcomes
        if result.regressed:
            log.warning(
                "verify: %s made intent %s worse; diagnose will see the new rates",
                row["proposal_id"],
                row["intent_id"],
            )
    return outcomes


async def verify_once(pipe: Pipeline, backend: ChangeBackend | None, now: int) -> int:
    """One verification pass; the number of outcomes. :func:`processors.review.loop.verify`
    writes the outcomes rows itself, so they are not written again here."""
    try:
        outcomes = await pipe.run(verify_all, pipe, backend, now, stage="verify")
    except StoreError as e:  # ClickHouse away: the next tick tries again
        log.warning("verify: %s", e)
        return 0
    pipe.counters["verify"].records_out += len(outcomes)
    return len(outcomes)


def register(w: Wiring, backend: ChangeBackend | None) -> None:
    @w.app.timer(VERIFY_INTERVAL_S)
    async def verify_tick() -> None:
        await verify_once(w.pipe, backend, time.time_ns())
