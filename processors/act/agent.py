"""Act's thin agent: diagnoses in, proposals (a branch or pull request each) out."""

from __future__ import annotations

import logging
import time

import faust

from processors.act import Actor, ChangeBackend, proposal_rows
from processors.llm import make_llm
from processors.records import Diagnosis
from processors.runtime import TAKE_WITHIN_S, Checkpoint, Wiring, dead_letter

log = logging.getLogger("closeloop.worker")

DIAGNOSIS_BATCH = 50  # each diagnosis may write a branch: small takes


def register(w: Wiring, backend: ChangeBackend) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    actor = Actor(cfg, backend, make_llm(cfg.llm))
    # Offsets only (no model): a restart must not replay older diagnosis versions onto
    # their branches (each replay would re-version the proposal, a force-push on GitHub).
    ckpt = Checkpoint("act", pipe)

    @w.app.agent(w.diagnoses, name="act")
    async def act_agent(stream: faust.StreamT) -> None:
        await ckpt.restore_into(lambda data: None)
        async for events in stream.take_events(DIAGNOSIS_BATCH, within=TAKE_WITHIN_S):
            events = await ckpt.rewind_gaps(w.app.consumer, events)
            props, dls = [], []
            for e in ckpt.fresh(events):
                now = time.time_ns()
                try:
                    diag = Diagnosis.from_json(e.message.value)
                except (ValueError, TypeError, KeyError) as err:
                    dls.append(dead_letter("act", "undecodable diagnosis record", e, now, str(err)))
                    continue
                pipe.counters["act"].records_in += 1
                prop = await pipe.run(actor.propose, diag, now, stage="act")
                if prop is None:
                    log.info("act: no proposal for %s: %s", diag.diagnosis_id, actor.last_reason)
                    continue
                props.append(prop)
            if props:
                await pipe.write("act", "proposals", proposal_rows(props))
                # announced once, by Actor.propose when it writes the branch (never on a replay)
                await w.send_all([(w.proposals, p.diagnosis_id, p.to_json()) for p in props])
                pipe.counters["act"].records_out += len(props)
            await w.send_deadletters("act", dls)
            await ckpt.save(events, lambda: b"")
