"""Layer 2's thin agents: assemble (turn bundles in, conversations out) and understand
(conversations in, tags and intents out)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from typing import Any

import faust
import orjson

from processors.embedded.broker import consumer_lags
from processors.errors import InputError, StoreError
from processors.feedback import answers_of, record_feedback, with_feedback
from processors.records import (
    RESPONSE_REF,
    Conversation,
    DeadLetter,
    TagRecord,
    TurnRecord,
    dumps,
)
from processors.runtime import (
    DEADLETTER_MAX_BYTES,
    FRAMING_BYTES,
    RECORD_BATCH,
    TAKE_WITHIN_S,
    Checkpoint,
    Wiring,
    dead_letter,
    partition_of,
)
from processors.stages import CAPTURE_ONLY, app_id
from processors.store import Store
from processors.understand import assemble
from processors.understand.core import Understand, UnderstandBatch, tag_row
from processors.understand.embed import make_embedder
from processors.understand.feedback import awaits_answer, rejoined, requeued
from processors.understand.naming import IntentName, llm_names
from processors.understand.signals import SignalResult, judge

log = logging.getLogger("closeloop.worker")

TICK_INTERVAL_S = 1.0
CAPTURE_LAG_EVERY_S = 5.0  # how often the ticks re-read capture's consumer lag
# Conversations with recent stored turn records that no tag covers (fewer tagged spans than
# stored): open, or assembled and not yet tagged, when the broker's topics were lost. Those
# assembled from all their stored records stay out while the conversations topic they were
# published to is still there ({published_kept}: understand reads them from it, however far
# behind). Those understand dead-lettered stay out: published again they would only fail
# again; so do evaluations named after an answer (RESPONSE_REF), never tagged under that name.
UNTAGGED_SQL = """
SELECT s.conversation_id AS conversation_id, s.records AS records
FROM (
    SELECT conversation_id, groupArray(record) AS records, uniqExact(span_id) AS spans
    FROM turn_records FINAL
    WHERE conversation_id IN (
        SELECT conversation_id FROM turn_records WHERE ingested_ns >= {since:UInt64}
    )
    GROUP BY conversation_id
) AS s
LEFT JOIN (
    SELECT conversation_id, max(conversation_version) AS tagged
    FROM conversation_tags GROUP BY conversation_id
) AS t ON s.conversation_id = t.conversation_id
LEFT JOIN (
    SELECT conversation_id, max(version) AS assembled FROM conversations GROUP BY conversation_id
) AS a ON s.conversation_id = a.conversation_id
WHERE s.spans > t.tagged
    AND ({published_kept:UInt8} = 0 OR s.spans > a.assembled)
    AND s.conversation_id NOT IN (SELECT key FROM deadletter WHERE stage = 'understand')
    AND NOT startsWith(s.conversation_id, {response_ref:String})
"""


class Assembler:
    """The assemble stage's state: the open conversations (a faust table, so a restart
    restores them) and their deadlines."""

    def __init__(self, w: Wiring) -> None:
        self.w = w
        cfg = w.pipe.cfg
        # use_partitioner: the changelog partition comes from the key (the same partitioner
        # that keyed closeloop.turns), so writes work from batches taken off the stream.
        self.table = w.app.Table(
            "open_conversations",
            default=None,
            key_type=str,
            partitions=cfg.kafka.partitions,
            use_partitioner=True,
            # one open conversation is one changelog record: a long one passes 1 MB
            extra_topic_configs={
                "max.message.bytes": str(cfg.kafka.max_state_bytes + FRAMING_BYTES)
            },
        )
        self.deadlines = assemble.Deadlines(cfg.assemble)
        self.recovered = False
        # the conversations topic's id, recorded at each start once what had to be published
        # again is out: whether what was published before survived
        self.published = Checkpoint("assemble", w.pipe)
        self.published_kept: bool | None = None
        self.republishing: set[str] = set()  # rebuilt, not published yet, the topic new

    async def recover(self) -> None:
        """Once, on the first batch (the table restored by then): fold in the stored turn
        records of untagged recent conversations that the table lacks — all of them when a
        memory broker lost its topics (a clean stop, a crash of the whole tree), none when
        the broker kept them — so every conversation whose spans were stored closes and is
        tagged. One already published from all its records is left to understand while the
        topic it went to is still there (closed conversations leave the table after
        ``assemble.linger_s``, however far behind understand is)."""
        pipe = self.w.pipe
        now = time.time_ns()
        since = now - int(pipe.cfg.assemble.recover_horizon_s * 1e9)
        try:
            if self.published_kept is None:
                self.published_kept = await self.published.same_topics(
                    [pipe.cfg.topics.conversations]
                )
            params = {
                "since": since,
                "response_ref": RESPONSE_REF,
                "published_kept": int(self.published_kept),
            }
            rows = await pipe.run(pipe.store.query, UNTAGGED_SQL, params)
        except StoreError as e:
            log.warning("assemble: cannot read stored turns yet, retrying: %s", e)
            return
        rebuilt = self._rebuild(rows, now)
        if rebuilt:
            log.warning(
                "assemble: %d conversations rebuilt from the store (the broker lost them)",
                len(rebuilt),
            )
        self.recovered = True
        if not self.published_kept:
            # a crash before they are out finds the old id again and publishes them again
            self.republishing = rebuilt
        await self._record_when_republished()

    def _rebuild(self, rows: list[dict[str, Any]], now: int) -> set[str]:
        """Fold the stored records of ``rows`` (:data:`UNTAGGED_SQL`) of this worker's
        partitions into the table; the conversations that gained records."""
        cfg = self.w.pipe.cfg
        topic = cfg.topics.turns
        mine = {tp.partition for tp in self.w.app.consumer.assignment() if tp.topic == topic}
        rebuilt: set[str] = set()
        for row in rows:
            cid = row["conversation_id"]
            p = partition_of(cid, cfg.kafka.partitions)
            if p not in mine:
                continue
            self.deadlines.index(self.table, p, now)  # the restored table before new pushes
            try:
                stored = [orjson.loads(r) for r in row["records"]]
                state = assemble.with_stored_turns(self.table.get(cid), stored, now)
            except (ValueError, TypeError, KeyError) as err:
                log.error("assemble: cannot rebuild conversation %s: %s", cid[:100], err)
                continue
            if state is not None:  # as fold does with delivered records
                self.deadlines.delivered(p, stored, now)
                state["p"] = p
                self.table[cid] = state
                self.deadlines.push(cid, state)
                rebuilt.add(cid)
        return rebuilt

    async def _record_when_republished(self) -> None:
        if not self.republishing:
            await self.published.record_topics()

    def fold(self, events: list[Any]) -> tuple[list[assemble.Closed], list[DeadLetter]]:
        """Fold a batch of turn messages into the table; the conversations its ticks close."""
        closed: list[assemble.Closed] = []
        dls: list[DeadLetter] = []
        for e in events:
            now = time.time_ns()
            try:
                control, groups = assemble.parse_turn_message(e.message.value, e.key)
            except (ValueError, TypeError, KeyError, InputError) as err:
                dls.append(dead_letter("assemble", "undecodable turn record", e, now, str(err)))
                continue
            if isinstance(control, assemble.Progress):
                self.deadlines.watermarks.progressed(e.message.partition, control.newest)
                continue
            if control is not None:
                closed += self.close_due(e.message.partition, control)
                continue
            for cid, turns in groups.items():
                p = partition_of(cid, self.w.pipe.cfg.kafka.partitions)
                self.deadlines.index(self.table, p, now)  # the restored table before new pushes
                self.deadlines.delivered(p, turns, now)
                try:
                    state = assemble.add_turns(
                        self.table.get(cid), turns, now, self.deadlines.watermark(p, now)
                    )
                except (ValueError, TypeError, KeyError) as err:
                    dls.append(
                        dead_letter(
                            "assemble", f"unusable turn record of {cid[:100]}", e, now, str(err)
                        )
                    )
                    continue
                state["p"] = p
                self.table[cid] = state
                self.deadlines.push(cid, state)
                self.w.pipe.counters["assemble"].records_in += len(turns)
        return closed, dls

    def close_due(self, partition: int, tick: assemble.Tick) -> list[assemble.Closed]:
        closed = self.deadlines.close_due(self.table, partition, tick.ns, tick.lagging)
        for c in closed:
            if c.conversation is None:
                log.error("assemble: cannot build conversation %s: %s", c.conversation_id, c.error)
        return closed

    async def publish(self, closed: list[assemble.Closed]) -> None:
        """Write and send the closed conversations, then record the closing in the table."""
        pipe = self.w.pipe
        with pipe.busy("assemble"):
            convs = [c.conversation for c in closed if c.conversation is not None]
            # evaluations named after an answer (RESPONSE_REF) are no conversation of their
            # own: understand sends them to the answer's
            rows = [
                assemble.conversation_row(c)
                for c in convs
                if not c.conversation_id.startswith(RESPONSE_REF)
            ]
            messages = [(self.w.conversations, c.conversation_id, c.to_json()) for c in convs]
        await pipe.write_rows("assemble", "conversations", assemble.CONVERSATION_COLUMNS, rows)
        await self.w.send_all(messages)
        # Only now is the closing recorded in the table (and its changelog): a crash before
        # this point closes and publishes the same version again, harmlessly.
        for c in closed:
            current = self.table.get(c.conversation_id)
            if current is not None and len(current["turns"]) > len(c.state["turns"]):
                continue  # a span arrived meanwhile: it stays open, closes later
            self.table[c.conversation_id] = c.state
            self.deadlines.push(c.conversation_id, c.state)
        pipe.counters["assemble"].records_out += len(convs)
        if self.republishing:
            self.republishing -= {c.conversation_id for c in closed}
            await self._record_when_republished()


class CaptureBacklog:
    """The OTLP partitions on which capture has input it has not processed (its consumer lag),
    read at most every few seconds: they hold the watermark back (:class:`assemble.Watermarks`)."""

    def __init__(self, w: Wiring) -> None:
        self.w = w
        idle_s = w.pipe.cfg.assemble.idle_timeout_s
        self.every_s = max(TICK_INTERVAL_S, min(CAPTURE_LAG_EVERY_S, idle_s / 2))
        self._checked = float("-inf")
        self._lagging: frozenset[str] = frozenset()
        self._failing = False
        # capture in this worker reads in its group; else capture processes read in theirs
        stages = w.pipe.stages
        self.group = app_id(stages if "capture" in stages else CAPTURE_ONLY)
        topics = w.pipe.cfg.topics
        self.otlp_topics = [topics.otlp_spans, topics.otlp_logs]

    async def lagging(self) -> frozenset[str]:
        now = time.monotonic()
        if not self.w.pipe.bootstrap or now - self._checked < self.every_s:
            return self._lagging
        self._checked = now
        try:
            lags = await asyncio.to_thread(
                consumer_lags, self.w.pipe.bootstrap, self.group, self.otlp_topics
            )
        except Exception as e:  # the lag is a hint: unknown, the quiet rule alone decides
            if not self._failing:
                log.warning(
                    "assemble: cannot read capture's lag, idle closing goes by quiet: %s", e
                )
            self._failing, self._lagging = True, frozenset()
            return self._lagging
        self._failing = False
        self._lagging = frozenset(q for q, lag in lags.items() if lag > 0)
        return self._lagging


def register_assemble(w: Wiring) -> None:
    assembler = Assembler(w)
    guard = w.read_guard("assemble")

    @w.app.agent(w.turns, name="assemble")
    async def assemble_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
            events = await guard.contiguous(w.app.consumer, events)
            if not assembler.recovered:
                await assembler.recover()
            with w.pipe.busy("assemble"):
                closed, dls = assembler.fold(events)
            if closed:
                await assembler.publish(closed)
            await w.send_deadletters("assemble", dls)

    capture = CaptureBacklog(w)

    @w.app.timer(TICK_INTERVAL_S)
    async def assemble_tick() -> None:
        # Closing happens inside the stream (table writes need the event's partition):
        # a tick per partition drives it.
        lagging = sorted(await capture.lagging())
        value = json.dumps({"tick": time.time_ns(), "lagging": lagging}).encode()
        for p in range(w.pipe.cfg.kafka.partitions):
            await w.turns.send(key=None, value=value, partition=p)


async def ask_llm(w: Wiring, core: Understand, batch: UnderstandBatch) -> None:
    """Hand the batch's judge and naming requests to their LLM steps; their answers arrive
    later as new versions of the tag and intent rows (the batch itself is acknowledged now)."""
    pipe = w.pipe

    for tag in batch.judge_requests:
        conv = tag.conversation

        async def judged(verdict: SignalResult, tag: TagRecord = tag) -> None:
            better = await pipe.run_core("understand", core.apply_judgement, tag, verdict)
            await pipe.write("understand", "conversation_tags", [tag_row(better)])

        if conv is not None:
            w.llm_job("judge", functools.partial(judge, conv), judged)

    step = pipe.cfg.llm.naming_batch
    for i in range(0, len(batch.name_requests), step):
        chunk = batch.name_requests[i : i + step]
        ids = [r.intent_id for r in chunk]

        async def named(
            answer: tuple[dict[str, IntentName], list[str]], ids: list[str] = ids
        ) -> None:
            names, problems = answer
            for p in problems:
                log.warning("llm naming: unusable name, the keyphrase name stands: %s", p)
            better = await pipe.run_core("understand", core.apply_names, names, time.time_ns())
            await pipe.run_core(
                "understand", core.names_unanswered, [i for i in ids if i not in names]
            )
            await pipe.write("understand", "intents", better.intent_rows)
            await pipe.write("understand", "intent_changes", better.change_rows)

        async def unanswered(ids: list[str] = ids) -> None:
            await pipe.run_core("understand", core.names_unanswered, ids)

        job = functools.partial(llm_names, chunk)
        if not w.llm_job("naming", job, named, failed=unanswered):
            await unanswered()


async def late_feedback(w: Wiring, late: list[Conversation], now: int) -> list[DeadLetter]:
    """Evaluations that reached assemble after their conversation had left its state: they
    re-version the stored conversation's tags (as ``closeloop feedback`` does), not a new one."""
    dls = []
    for conv in late:
        try:
            tag = await w.pipe.run(
                record_feedback,
                w.pipe.store,
                w.pipe.cfg,
                conv.conversation_id,
                conv.evaluations,
                stage="understand",
            )
        except InputError as e:
            dls.append(
                _late_dead_letter(
                    w, conv, "evaluation for a conversation never tagged", e.reason, now
                )
            )
            continue
        await w.send_all([(w.tags, tag.conversation_id, tag.to_json())], stage="understand")
        w.pipe.counters["understand"].records_out += 1
    return dls


async def rejoin_answers(w: Wiring, named: list[Conversation], now: int) -> list[DeadLetter]:
    """Evaluations known only by the ``gen_ai.response.id`` of the answer they judge, taken by a
    capture process that had not seen that answer (their conversation id is
    :data:`RESPONSE_REF` + the response id): the store says where the answer is, and they go
    to its conversation through ``closeloop.turns`` like a late span (assemble adds them to
    it, open or closed; one that left assemble's state gets them as late feedback). An answer
    not stored yet (its span is still on its way, or behind in another capture process) is
    waited for: the evaluations go back to their stand-in, which closes again and brings
    them here again, until ``understand.answer_wait_s`` after them."""
    cfg = w.pipe.cfg
    ids = [c.conversation_id.removeprefix(RESPONSE_REF) for c in named]
    found = await w.pipe.read("understand", answers_of, w.pipe.store, ids)
    groups: dict[str, list[TurnRecord]] = {}
    dls = []
    for conv, response_id in zip(named, ids, strict=True):
        answer = found.get(response_id)
        if answer is not None:
            groups.setdefault(answer[0], []).extend(rejoined(conv, answer))
        elif awaits_answer(conv, now, cfg.understand.answer_wait_s):
            groups.setdefault(conv.conversation_id, []).extend(requeued(conv))
        else:
            why = (
                f"no captured span has gen_ai.response.id {response_id[:200]!r} within "
                f"{cfg.understand.answer_wait_s:g} s of the evaluation"
            )
            dls.append(_late_dead_letter(w, conv, "evaluation for an unknown answer", why, now))
    # one conversation's turn records, keyed by it: a message of closeloop.turns as capture's
    # bundles are (one too large is cut or dead-lettered by send_all)
    messages = [
        (w.turns, cid, dumps(turns), partition_of(cid, cfg.kafka.partitions))
        for cid, turns in groups.items()
    ]
    await w.send_all(messages, stage="understand")
    return dls


def _late_dead_letter(
    w: Wiring, conv: Conversation, reason: str, detail: str, now: int
) -> DeadLetter:
    return DeadLetter(
        stage="understand",
        reason=reason,
        detail=detail,
        topic=w.pipe.cfg.topics.conversations,
        key=conv.conversation_id[:200],
        original_b64=base64.b64encode(conv.to_json()[:DEADLETTER_MAX_BYTES]).decode(),
        ts_ns=now,
    )


def retagged_rows(store: Store, retags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New versions of the stored tag rows of ``retags`` (``UnderstandBatch.retags``) with their
    new intent; the rest of each row as stored, so a judge's signals or a late outcome stay.
    A conversation whose stored row is another version (or none) is left alone."""
    moves = {(r["conversation_id"], r["conversation_version"]): r for r in retags}
    rows = store.query(
        "SELECT * EXCEPT ts FROM conversation_tags FINAL WHERE conversation_id IN {ids:Array(String)}",
        {"ids": sorted({cid for cid, _ in moves})},
    )
    out = []
    for row in rows:
        move = moves.get((row["conversation_id"], row["conversation_version"]))
        if move is not None:
            out.append({**row, **move})
    return out


def register_understand(w: Wiring) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    core = Understand(
        cfg,
        make_embedder(cfg.understand, cfg.home_path / "models", cfg.llm),
        llm_enabled=bool(pipe.llm and pipe.llm.steps),
    )
    ckpt = Checkpoint("understand", pipe)

    @w.app.agent(w.conversations, name="understand")
    async def understand_agent(stream: faust.StreamT) -> None:
        await ckpt.restore_into(core.restore)
        await w.load_llm_answers()
        async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
            events = await ckpt.rewind_gaps(w.app.consumer, events)
            now = time.time_ns()
            convs, dls = [], []
            with pipe.busy("understand"):
                for e in ckpt.fresh(events):
                    try:
                        convs.append(Conversation.from_json(e.message.value))
                    except (ValueError, TypeError, KeyError) as err:
                        dls.append(
                            dead_letter(
                                "understand", "undecodable conversation record", e, now, str(err)
                            )
                        )
            late = [c for c in convs if not c.messages and c.evaluations]
            if late:
                convs = [c for c in convs if c.messages or not c.evaluations]
                named = [c for c in late if c.conversation_id.startswith(RESPONSE_REF)]
                dls += await rejoin_answers(w, named, now)
                rest = [c for c in late if not c.conversation_id.startswith(RESPONSE_REF)]
                dls += await late_feedback(w, rest, now)
            if convs:
                # feedback recorded after an earlier version closed outlives this version's tags
                convs = await pipe.read("understand", with_feedback, pipe.store, convs)
                batch = await pipe.run_core("understand", core.process, convs, now)
                pipe.counters["understand"].records_in += len(convs)
                await pipe.write(
                    "understand", "conversation_tags", [tag_row(t) for t in batch.tags]
                )
                if batch.retags:
                    moved = await pipe.read("understand", retagged_rows, pipe.store, batch.retags)
                    await pipe.write("understand", "conversation_tags", moved)
                await pipe.write("understand", "intents", batch.intent_rows)
                await pipe.write("understand", "intent_changes", batch.change_rows)
                await w.send_all([(w.tags, t.conversation_id, t.to_json()) for t in batch.tags])
                pipe.counters["understand"].records_out += len(batch.tags)
                await ask_llm(w, core, batch)
            await w.send_deadletters("understand", dls)
            await ckpt.save(events, core.snapshot)
