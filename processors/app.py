"""The faust app: each layer's thin agent, registered on the shared topics. The logic lives
in the cores, the delivery rules in :mod:`processors.runtime`.

    otlp_spans, otlp_logs -> capture   -> spans/turns/tool_calls rows, closeloop.turns
    closeloop.turns       -> assemble  -> conversations rows, closeloop.conversations
    closeloop.conversations -> understand -> conversation_tags/intents rows, closeloop.tags
    closeloop.tags        -> diagnose  -> diagnoses rows, closeloop.diagnoses
    closeloop.diagnoses   -> act       -> proposals rows, closeloop.proposals
    (timer)               -> verify    -> outcomes rows (review layer)

A layer's agent module is imported only when its stage runs (a capture process loads no
embedder).
"""

from __future__ import annotations

import logging

import faust

from processors.runtime import STATS_INTERVAL_S, Pipeline, Wiring, WorkerApp, faust_settings
from processors.stages import app_id

log = logging.getLogger("closeloop.worker")


def build_app(pipe: Pipeline, bootstrap: str) -> faust.App:
    """The worker's app with the agents of ``pipe.stages`` registered."""
    w = Wiring(WorkerApp(app_id(pipe.stages), **faust_settings(pipe.cfg, bootstrap)), pipe)
    stages = pipe.stages
    if "capture" in stages:
        from processors.capture import agent as capture

        capture.register(w)
    if "assemble" in stages or "understand" in stages:
        from processors.understand import agent as understand

        if "assemble" in stages:
            understand.register_assemble(w)
        if "understand" in stages:
            understand.register_understand(w)
    if "diagnose" in stages:
        from processors.diagnose import agent as diagnose

        diagnose.register(w)
    if "act" in stages or "verify" in stages:
        register_act_and_review(w)
    w.write_stats_every(STATS_INTERVAL_S)
    w.app.closeloop_pipeline = pipe  # type: ignore[attr-defined]
    return w.app


def register_act_and_review(w: Wiring) -> None:
    """Act and review share the change backend (the target repository)."""
    from processors.act import open_backend

    cfg = w.pipe.cfg
    backend = open_backend(cfg) if cfg.act.repo else None
    if backend is None:
        log.warning(
            "act: no target repository configured (act.repo); diagnoses are kept, "
            "no proposals are opened"
        )
    if "act" in w.pipe.stages and backend is not None:
        from processors.act import agent as act

        act.register(w, backend)
    if "verify" in w.pipe.stages:
        from processors.review import agent as review

        review.register(w, backend)
