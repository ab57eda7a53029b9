"""Capture's thin agent: OTLP requests in, spans/turns/tool_calls rows and turn bundles out."""

from __future__ import annotations

import time
from collections import defaultdict

import faust
import orjson

from processors.bundles import bundles
from processors.capture.core import Capture, CaptureBatch, RawMessage, turn_record_row
from processors.records import DeadLetter, TurnRecord
from processors.runtime import TAKE_WITHIN_S, FailingBatches, Wiring, dead_letter, partition_of

CAPTURE_BATCH = 200  # OTLP requests per take (each holds many spans)


def register(w: Wiring) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    core = Capture(
        cfg.capture, logs_topic=cfg.topics.otlp_logs, end_attribute=cfg.assemble.end_attribute
    )
    guard = w.read_guard("capture")
    failing = FailingBatches(cfg.run_dir() / "failing-batches-capture.json")

    @w.app.agent(w.topic(cfg.topics.otlp_spans, cfg.topics.otlp_logs), name="capture")
    async def capture_agent(stream: faust.StreamT) -> None:
        async for events in stream.take_events(CAPTURE_BATCH, within=TAKE_WITHIN_S):
            events = await guard.contiguous(w.app.consumer, events)
            now = time.time_ns()
            raw = [
                RawMessage(
                    e.message.topic,
                    e.message.partition,
                    e.message.offset,
                    e.message.key,
                    e.message.value,
                )
                for e in events
            ]
            key = failing.key("capture", events)
            try:
                await handle(raw, now)
            except Exception as e:
                if failing.is_outage(e) or not failing.failed_before(key, e):
                    failing.remember(key, e)
                    raise  # the worker restarts and the batch comes again
                # the same batch failed the same way twice: dead-letter it, move on
                await w.send_deadletters(
                    "capture",
                    [
                        dead_letter(
                            "capture", f"batch failed twice: {type(e).__name__}", ev, now, str(e)
                        )
                        for ev in events
                    ],
                )
            failing.forget(key)

    async def handle(raw: list[RawMessage], now: int) -> None:
        batch = await pipe.run(core.process, raw, now, stage="capture")
        pipe.counters["capture"].records_in += len(raw)
        await pipe.write("capture", "spans", batch.span_rows)
        await pipe.write("capture", "turns", batch.turn_rows)
        await pipe.write("capture", "tool_calls", batch.tool_rows)
        # before the turns are sent: what assemble may hold is always in the store
        await pipe.write("capture", "turn_records", [turn_record_row(t, now) for t in batch.turns])
        with pipe.busy("capture"):
            messages, unfit = bundle_messages(w, batch)
        await w.send_all(messages + progress_messages(w, batch), stage="capture")
        pipe.counters["capture"].records_out += len(batch.turns)
        await w.send_deadletters("capture", batch.deadletters + unfit)


def progress_messages(w: Wiring, batch: CaptureBatch) -> list[tuple[object, ...]]:
    """Capture's progress on each OTLP partition of the batch, to every partition of the turns
    topic after the batch's bundles: assemble's watermark of a turns partition is the least
    progress of the OTLP partitions capture has input left on (:class:`Watermarks`)."""
    if not batch.progress:
        return []
    body = orjson.dumps({"progress": batch.progress})
    return [(w.turns, None, body, p) for p in range(w.pipe.cfg.kafka.partitions)]


def bundle_messages(
    w: Wiring, batch: CaptureBatch
) -> tuple[list[tuple[object, ...]], list[DeadLetter]]:
    """Messages per partition bundling its conversations (one message per conversation would
    cost a produce round trip each), split under ``kafka.max_message_bytes``; a turn record
    too large even when cut is dead-lettered."""
    cfg = w.pipe.cfg
    groups: dict[int, dict[str, list[TurnRecord]]] = defaultdict(lambda: defaultdict(list))
    for tr in batch.turns:
        groups[partition_of(tr.conversation_id, cfg.kafka.partitions)][tr.conversation_id].append(
            tr
        )
    messages: list[tuple[object, ...]] = []
    dls: list[DeadLetter] = []
    now = time.time_ns()
    for p, group in groups.items():
        bodies, unfit = bundles(group, cfg.kafka.max_message_bytes)
        messages += [(w.turns, None, body, p) for body in bodies]
        dls += [
            DeadLetter(
                stage="capture",
                reason="turn record over kafka.max_message_bytes",
                detail=f"conversation {cid[:100]}, span {tr.span_id}: nothing left to cut",
                topic=cfg.topics.turns,
                key=cid[:200],
                ts_ns=now,
            )
            for cid, tr in unfit
        ]
    return messages, dls
