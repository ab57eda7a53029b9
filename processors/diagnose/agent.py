"""Diagnose's thin agent: tags in, diagnoses rows and records out."""

from __future__ import annotations

import functools
import time
from typing import Any

import faust

from processors.diagnose.analysis import Analysis, AnalysisRequest, analysis_row, ask_analysis
from processors.diagnose.contrast import conversation_rows
from processors.diagnose.core import Diagnoser, diagnosis_rows
from processors.diagnose.llm import Refinement, ask_refinement
from processors.errors import InputError
from processors.records import DeadLetter, Diagnosis, TagRecord
from processors.runtime import RECORD_BATCH, TAKE_WITHIN_S, Checkpoint, Wiring, dead_letter


def observe_all(core: Diagnoser, events: list[Any]) -> tuple[list[Diagnosis], list[DeadLetter]]:
    """Fold a batch of tag records into the core (on its own thread, off the event loop)."""
    diags: list[Diagnosis] = []
    dls: list[DeadLetter] = []
    for e in events:
        now = time.time_ns()
        try:
            diags += core.observe(TagRecord.from_json(e.message.value), now)
        except (ValueError, TypeError, KeyError, InputError) as err:
            dls.append(dead_letter("diagnose", "unusable tag record", e, now, str(err)))
    return diags, dls


def register(w: Wiring) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    core = Diagnoser(cfg.diagnose, llm_enabled=bool(pipe.llm and pipe.llm.steps))
    ckpt = Checkpoint("diagnose", pipe)

    async def publish(diags: list[Diagnosis]) -> None:
        await pipe.write("diagnose", "diagnoses", diagnosis_rows(diags))
        await pipe.write("diagnose", "diagnosis_conversations", conversation_rows(diags))
        await w.send_all([(w.diagnoses, d.intent_id, d.to_json()) for d in diags], stage="diagnose")
        pipe.counters["diagnose"].records_out += len(diags)

    def ask_llm(req: Refinement) -> None:
        async def reworded(answer: dict[str, Any]) -> None:
            d = await pipe.run_core("diagnose", core.refine, req, answer, time.time_ns())
            if d is not None:
                await publish([d])

        w.llm_job("diagnose", functools.partial(ask_refinement, req.bundle), reworded)

    def ask_analysis_of(req: AnalysisRequest) -> None:
        async def analysed(a: Analysis) -> None:
            now = time.time_ns()
            await pipe.write("diagnose", "failure_analyses", [analysis_row(req, a, now)])
            diags = await pipe.run_core("diagnose", core.apply_analysis, req, a, now)
            if diags:
                await publish(diags)

        w.llm_job("analysis", functools.partial(ask_analysis, req), analysed)

    @w.app.agent(w.tags, name="diagnose")
    async def diagnose_agent(stream: faust.StreamT) -> None:
        await ckpt.restore_into(core.restore)
        await w.load_llm_answers()
        async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
            events = await ckpt.rewind_gaps(w.app.consumer, events)
            fresh = ckpt.fresh(events)
            diags, dls = await pipe.run_core("diagnose", observe_all, core, fresh)
            pipe.counters["diagnose"].records_in += len(fresh)
            if diags:
                await publish(diags)
            # after the diagnoses' own rows (a change at an equal version is the later row);
            # only this loop takes them, so none is written before its batch's diagnoses
            relisted = await pipe.run_core("diagnose", core.take_explanation_rows)
            if relisted:
                await pipe.write("diagnose", "diagnosis_conversations", relisted)
            for req in await pipe.run_core("diagnose", core.take_llm_requests):
                ask_llm(req)
            for areq in await pipe.run_core("diagnose", core.take_analysis_requests):
                ask_analysis_of(areq)
            await w.send_deadletters("diagnose", dls)
            await ckpt.save(events, core.snapshot)
