"""Diagnose's thin agent: tags in, diagnoses rows and records out."""

from __future__ import annotations

import time

import faust

from processors.diagnose.contrast import conversation_rows
from processors.diagnose.core import Diagnoser, diagnosis_rows
from processors.errors import InputError
from processors.llm import make_llm
from processors.records import TagRecord
from processors.runtime import RECORD_BATCH, TAKE_WITHIN_S, Checkpoint, Wiring, dead_letter


def register(w: Wiring) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    core = Diagnoser(cfg.diagnose, make_llm(cfg.llm))
    ckpt = Checkpoint("diagnose", pipe)

    @w.app.agent(w.tags, name="diagnose")
    async def diagnose_agent(stream: faust.StreamT) -> None:
        await ckpt.restore_into(core.restore)
        async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
            events = await ckpt.rewind_gaps(w.app.consumer, events)
            diags, dls = [], []
            with pipe.busy("diagnose"):
                for e in ckpt.fresh(events):
                    now = time.time_ns()
                    try:
                        diags += core.observe(TagRecord.from_json(e.message.value), now)
                    except (ValueError, TypeError, KeyError, InputError) as err:
                        dls.append(dead_letter("diagnose", "unusable tag record", e, now, str(err)))
                    pipe.counters["diagnose"].records_in += 1
            if diags:
                await pipe.write("diagnose", "diagnoses", diagnosis_rows(diags))
                await pipe.write("diagnose", "diagnosis_conversations", conversation_rows(diags))
                await w.send_all([(w.diagnoses, d.intent_id, d.to_json()) for d in diags])
                pipe.counters["diagnose"].records_out += len(diags)
            await w.send_deadletters("diagnose", dls)
            await ckpt.save(events, core.snapshot)
