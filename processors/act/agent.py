"""Act's thin agent: diagnoses in, proposals (a branch or pull request each) out; a superseded
diagnosis closes its open proposal."""

from __future__ import annotations

import functools
import logging
import time

import faust

from processors.act import Actor, ChangeBackend, load_proposal, proposal_id, proposal_rows
from processors.act.change import Change
from processors.records import Diagnosis, Proposal
from processors.runtime import TAKE_WITHIN_S, Checkpoint, Wiring, dead_letter

log = logging.getLogger("closeloop.worker")

DIAGNOSIS_BATCH = 50  # each diagnosis may write a branch: small takes


def register(w: Wiring, backend: ChangeBackend) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    actor = Actor(cfg, backend)
    # Offsets only (no model): a restart must not replay older diagnosis versions onto
    # their branches (each replay would re-version the proposal, a force-push on GitHub).
    ckpt = Checkpoint("act", pipe)
    llm_on = bool(pipe.llm and pipe.llm.steps)

    async def publish(props: list[Proposal]) -> None:
        await pipe.write("act", "proposals", proposal_rows(props))
        # announced once, by Actor.propose when it writes the branch (never on a replay)
        await w.send_all([(w.proposals, p.diagnosis_id, p.to_json()) for p in props], stage="act")
        pipe.counters["act"].records_out += len(props)

    async def ask_llm(diag: Diagnosis) -> None:
        """The LLM's edit beside the stream; when valid, the proposal's next version."""
        files = await pipe.run_core("act", actor.llm_files, diag)
        if not files:
            return

        async def edited(change: Change) -> None:
            prop = await pipe.run_core(
                "act", functools.partial(actor.propose, change=change), diag, time.time_ns()
            )
            if prop is None:
                log.info(
                    "act: LLM edit for %s not proposed: %s", diag.diagnosis_id, actor.last_reason
                )
            else:
                await publish([prop])

        w.llm_job("act", functools.partial(actor.llm_change, diag, files), edited)

    async def answer(diag: Diagnosis, now: int, made: dict[str, Proposal]) -> Proposal | None:
        """A proposal opened or updated, or closed when the diagnosis was superseded."""
        if diag.status != "superseded":
            return await pipe.run_core("act", actor.propose, diag, now)
        pid = proposal_id(diag.diagnosis_id)
        current = made.get(pid) or await pipe.read("act", load_proposal, pipe.store, pid)
        return await pipe.run_core("act", actor.withdraw, diag, current, now)

    @w.app.agent(w.diagnoses, name="act")
    async def act_agent(stream: faust.StreamT) -> None:
        await ckpt.restore_into(lambda data: None)
        await w.load_llm_answers()
        async for events in stream.take_events(DIAGNOSIS_BATCH, within=TAKE_WITHIN_S):
            events = await ckpt.rewind_gaps(w.app.consumer, events)
            made: dict[str, Proposal] = {}  # this batch's, by proposal id: not stored yet
            dls = []
            for e in ckpt.fresh(events):
                now = time.time_ns()
                try:
                    diag = Diagnosis.from_json(e.message.value)
                except (ValueError, TypeError, KeyError) as err:
                    dls.append(dead_letter("act", "undecodable diagnosis record", e, now, str(err)))
                    continue
                pipe.counters["act"].records_in += 1
                prop = await answer(diag, now, made)
                if llm_on and not actor.already_applied:
                    await ask_llm(diag)
                if prop is None:
                    log.info("act: no proposal for %s: %s", diag.diagnosis_id, actor.last_reason)
                    continue
                made[prop.proposal_id] = prop
            if made:
                await publish(list(made.values()))
            await w.send_deadletters("act", dls)
            await ckpt.save(events, lambda: b"")
