"""Capture's thin agent: OTLP requests in, spans/turns/tool_calls rows and turn bundles out."""

from __future__ import annotations

import time
from collections import defaultdict

import faust

from processors.capture.core import Capture, CaptureBatch, RawMessage
from processors.records import SCHEMA_VERSION, TurnRecord, dumps
from processors.runtime import TAKE_WITHIN_S, Wiring, partition_of

CAPTURE_BATCH = 200  # OTLP requests per take (each holds many spans)


def register(w: Wiring) -> None:
    cfg, pipe = w.pipe.cfg, w.pipe
    core = Capture(
        cfg.capture, logs_topic=cfg.topics.otlp_logs, end_attribute=cfg.assemble.end_attribute
    )
    guard = w.read_guard("capture")

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
            batch = await pipe.run(core.process, raw, now, stage="capture")
            pipe.counters["capture"].records_in += len(raw)
            await pipe.write("capture", "spans", batch.span_rows)
            await pipe.write("capture", "turns", batch.turn_rows)
            await pipe.write("capture", "tool_calls", batch.tool_rows)
            with pipe.busy("capture"):
                messages = bundle_messages(w, batch)
            await w.send_all(messages)
            pipe.counters["capture"].records_out += len(batch.turns)
            await w.send_deadletters("capture", batch.deadletters)


def bundle_messages(w: Wiring, batch: CaptureBatch) -> list[tuple[object, ...]]:
    """One message per partition, bundling its conversations: one message per conversation
    would cost a produce round trip each (changelog-safe settings). orjson serialises the
    records (dataclasses) itself, in C."""
    partitions = w.pipe.cfg.kafka.partitions
    bundles: dict[int, dict[str, list[TurnRecord]]] = defaultdict(lambda: defaultdict(list))
    for tr in batch.turns:
        bundles[partition_of(tr.conversation_id, partitions)][tr.conversation_id].append(tr)
    return [
        (w.turns, None, dumps({"v": SCHEMA_VERSION, "conversations": b}), p)
        for p, b in bundles.items()
    ]
