"""The faust app: every stage's thin agent, wired to its topics. The logic lives in the cores.

    otlp_spans, otlp_logs -> capture   -> spans/turns/tool_calls rows, closeloop.turns
    closeloop.turns       -> assemble  -> conversations rows, closeloop.conversations
    closeloop.conversations -> understand -> conversation_tags/intents rows, closeloop.tags
    closeloop.tags        -> diagnose  -> diagnoses rows, closeloop.diagnoses
    closeloop.diagnoses   -> act       -> proposals rows, closeloop.proposals
    (timer)               -> verify    -> outcomes rows (review layer)

Delivery: an agent takes a batch of events, writes ClickHouse (retrying with backoff while
ClickHouse is down, so offsets never pass unwritten rows), sends its outputs and waits for
their acknowledgement; only then are the input events acknowledged and their offsets
committed. Every write is keyed by content, so the redelivery after a crash is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import json
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2

from processors.config import Config
from processors.errors import InputError, ReviewError, StoreError
from processors.records import SCHEMA_VERSION, DeadLetter, TurnRecord, dumps
from processors.store import Store
from processors.understand import assemble

log = logging.getLogger("closeloop.worker")

ALL_STAGES = ("capture", "assemble", "understand", "diagnose", "act", "verify")
CAPTURE_ONLY = ("capture",)  # a capture process: its own consumer group, scaled out by partition
CAPTURE_BATCH = 200  # OTLP requests per take (each holds many spans)
RECORD_BATCH = 500
TAKE_WITHIN_S = 0.2
TICK_INTERVAL_S = 1.0
STATS_INTERVAL_S = 5.0
VERIFY_INTERVAL_S = 5.0
DEADLETTER_MAX_BYTES = 64 * 1024
REFUSALS_BEFORE_SPLIT = 3


def app_id(stages: tuple[str, ...]) -> str:
    """The faust app id (= consumer group) of a worker running ``stages``. Capture processes
    form their own group, so any number of them split the OTLP partitions among themselves
    while one worker runs the ordered stages."""
    return "closeloop-capture" if tuple(stages) == CAPTURE_ONLY else "closeloop"


def faust_settings(cfg: Config, bootstrap: str) -> dict[str, Any]:
    """faust settings that work on tansu and on Kafka (see docs/architecture.md, "tansu")."""
    return dict(
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        datadir=str(cfg.home_path / "faust"),
        # group joins in ~3 s instead of ~23 s
        broker_session_timeout=6.0,
        broker_rebalance_timeout=7.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        # tansu reports the last batch's first offset + 1 as the end offset; a changelog
        # written in multi-message batches then restores stale. One message per batch
        # makes the reported end true. Stages carry many records per message, so the cost is small.
        producer_max_batch_size=1,
        producer_linger=0.0,
        producer_acks=-1,
        # faust's default is 20 min: an acknowledgement that never comes would stall the stage
        # (and, through the shared consumer, every stage) that long. After 30 s the send fails,
        # the stage raises, the worker exits and restarts, and the batch is redelivered.
        producer_request_timeout=30.0,
        topic_partitions=cfg.kafka.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        stream_wait_empty=False,
    )


@dataclass
class StageCounters:
    records_in: int = 0
    records_out: int = 0
    deadletters: int = 0
    write_errors: int = 0
    cpu_s: float = 0.0  # CPU time of the stage's own work (its cores, its inserts)


@dataclass
class Pipeline:
    """The worker's shared parts: config, store, cores, counters."""

    cfg: Config
    store: Store
    stages: tuple[str, ...] = ALL_STAGES
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    counters: dict[str, StageCounters] = field(default_factory=lambda: defaultdict(StageCounters))
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "store"))

    async def write(self, stage: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows, retrying with backoff while ClickHouse is unreachable (never drops, never
        skips). When ClickHouse itself refuses the rows (it answered with an error code) a few
        times, they are written one by one and the ones it refuses become dead letters, so one
        bad row cannot stall the stage."""
        if not rows:
            return
        delay, refused = 0.5, 0
        while True:
            try:
                await self.run(self.store.insert_records, table, rows, stage=stage)
                return
            except StoreError as e:
                self.counters[stage].write_errors += 1
                refused = refused + 1 if _refused_by_server(e) else 0
                if refused >= REFUSALS_BEFORE_SPLIT:
                    await self._write_one_by_one(stage, table, rows)
                    return
                log.warning(
                    "%s: writing %d rows to %s failed, retrying in %.1fs: %s",
                    stage,
                    len(rows),
                    table,
                    delay,
                    e,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _write_one_by_one(self, stage: str, table: str, rows: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        bad: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            try:
                await loop.run_in_executor(self.pool, self.store.insert_records, table, [row])
            except StoreError as e:
                if not _refused_by_server(e):  # unreachable again: back to retrying the rest
                    await self.write(stage, table, rows[i:])
                    break
                now = time.time_ns()
                original = json.dumps(row, default=str, ensure_ascii=False).encode()[
                    :DEADLETTER_MAX_BYTES
                ]
                bad.append(
                    DeadLetter(
                        stage=stage,
                        reason=f"ClickHouse refused a {table} row",
                        detail=str(e)[:2000],
                        topic=table,
                        key=str(next(iter(row.values()), ""))[:200],
                        offset=now,
                        original_b64=base64.b64encode(original).decode(),
                        ts_ns=now,
                    ).to_dict()
                )
        if bad:
            self.counters[stage].deadletters += len(bad)
            log.error("%s: %d %s rows refused by ClickHouse, dead-lettered", stage, len(bad), table)
            await self.write(stage, "deadletter", bad)

    async def write_rows(
        self, stage: str, table: str, columns: tuple[str, ...], rows: list[list[Any]]
    ) -> None:
        await self.write(stage, table, [dict(zip(columns, r)) for r in rows])

    async def run(self, fn: Any, *args: Any, stage: str = "") -> Any:
        """``fn(*args)`` on the store thread; its CPU time counts to ``stage`` when given."""
        if not stage:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

        def timed() -> Any:
            t = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.counters[stage].cpu_s += time.thread_time() - t

        return await asyncio.get_running_loop().run_in_executor(self.pool, timed)

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        """Count the CPU time of a synchronous stretch on the event loop to ``stage``."""
        t = time.thread_time()
        try:
            yield
        finally:
            self.counters[stage].cpu_s += time.thread_time() - t


def _refused_by_server(e: StoreError) -> bool:
    """The rows were refused (by ClickHouse or the client's encoder), rather than ClickHouse
    not answering at all: retrying the same rows cannot help."""
    from clickhouse_connect.driver.exceptions import OperationalError

    return not isinstance(e.__cause__, (OperationalError, ConnectionError, TimeoutError))


EXIT_STAGE_CRASHED = 70  # EX_SOFTWARE: the supervisor restarts the worker


async def exit_on_crash(agent: Any, exc: BaseException) -> None:
    """End the worker when a stage raises. faust would restart just the agent, without the
    batch it held: those events are never acknowledged nor redelivered, and the next
    checkpoint would cover them — lost. A restarted worker resumes from the committed
    offsets instead, and every write is idempotent, so the redelivery is harmless."""
    log.critical(
        "stage %s crashed, exiting so the supervisor restarts the worker and the "
        "unacknowledged batch is redelivered: %r",
        getattr(agent, "name", agent),
        exc,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(EXIT_STAGE_CRASHED)


class WorkerApp(faust.App):
    """The faust app of the worker: a stage that raises ends the worker (:func:`exit_on_crash`)."""

    async def _on_agent_error(self, agent: Any, exc: BaseException) -> None:
        # faust's hook for every agent's error (agent(on_error=...) is taken by faust itself)
        await exit_on_crash(agent, exc)


def dead_letter(stage: str, reason: str, event: Any, now_ns: int, detail: str = "") -> DeadLetter:
    msg = event.message
    value = msg.value or b""
    return DeadLetter(
        stage=stage,
        reason=reason,
        detail=detail[:2000],
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=(msg.key or b"").decode("utf-8", "replace")[:200],
        original_b64=base64.b64encode(value[:DEADLETTER_MAX_BYTES]).decode(),
        ts_ns=now_ns,
    )


def partition_of(key: str, partitions: int) -> int:
    """The partition the producer's default partitioner (murmur2, as Kafka's Java client and
    aiokafka) gives ``key``: bundles sent to it keep every conversation where its table lives."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def _tag_row(tag: Any) -> dict[str, Any]:
    d = tag.to_dict()
    d.pop("conversation", None)
    d.pop("v", None)
    d["failed"] = int(bool(tag.failed))
    return d


def _key(m: Any) -> str:
    """``topic:partition`` of a message or a TP: how expected offsets are kept."""
    return f"{m.topic}:{m.partition}"


def _advance(expected: dict[str, int], events: list[Any]) -> None:
    """Expect, of each partition, the offset after the newest of ``events``."""
    for e in events:
        k = _key(e.message)
        expected[k] = max(expected.get(k, 0), e.message.offset + 1)


async def contiguous(
    consumer: Any, events: list[Any], expected: dict[str, int], stage: str, *, default: int | None
) -> list[Any]:
    """``events`` up to the first offset missing from each partition's sequence; the consumer
    is set back to read the rest again from that offset.

    ``expected`` holds the next offset each partition must bring (``default`` for one not in
    it; None trusts wherever the partition starts). A hole means the consumer skipped records:
    tansu can serve a fetch past a record it has not stored yet (concurrent produce), or a
    restarted consumer can start past the committed offsets, and faust counts skipped offsets
    as acknowledged. Read on, the records would be lost for good. Offsets the broker no
    longer holds (retention) are not a hole.
    """
    by_tp: dict[Any, list[int]] = defaultdict(list)
    for e in events:
        by_tp[e.message.tp].append(e.message.offset)
    holes: dict[Any, int] = {}
    for tp, offsets in by_tp.items():
        start = expected.get(_key(tp), default)
        want = min(offsets) if start is None else start
        for o in sorted(set(offsets)):
            if o == want:
                want += 1
            elif o > want:
                holes[tp] = want
                break
    if not holes:
        return events
    earliest = await consumer.earliest_offsets(*holes)
    cut: dict[Any, int] = {}
    for tp, want in holes.items():
        if want < (earliest.get(tp) or 0):
            continue  # retention removed them: nothing to read again
        log.warning(
            "%s: %s:%d skipped from offset %d; reading it again from there",
            stage,
            tp.topic,
            tp.partition,
            want,
        )
        await consumer.seek(tp, want)
        cut[tp] = want
    return [e for e in events if e.message.offset < cut.get(e.message.tp, e.message.offset + 1)]


class ReadGuard:
    """:func:`contiguous` for a stage without a checkpoint (capture, assemble): the offsets it
    expects are the ones after what it processed since the worker started."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.expected: dict[str, int] = {}

    def forget(self, tps: Any) -> None:
        """Partitions this process no longer reads: another process may read them meanwhile,
        so what is expected of them next is unknown when they come back."""
        for tp in tps:
            self.expected.pop(_key(tp), None)

    async def contiguous(self, consumer: Any, events: list[Any]) -> list[Any]:
        kept = await contiguous(consumer, events, self.expected, self.stage, default=None)
        _advance(self.expected, kept)
        return kept


class Checkpoint:
    """A stage's model state with the input offsets it covers, kept in ClickHouse.

    Saved after every batch, before the batch is acknowledged: on restart the newest
    checkpoint is restored and the events it already covers are skipped, so a redelivery
    is neither lost nor learned twice. (Not a Kafka changelog: tansu misreports end offsets.)
    """

    def __init__(self, name: str, pipe: Pipeline) -> None:
        self.name = name
        self.pipe = pipe
        self.offsets: dict[str, int] = {}
        self.seq = 0

    async def restore_into(self, apply: Any) -> None:
        rows = await self.pipe.run(
            self.pipe.store.query,
            "SELECT seq, offsets, data FROM checkpoints FINAL WHERE name = {n:String}",
            {"n": self.name},
        )
        if not rows:
            return
        row = rows[0]
        apply(base64.b64decode(row["data"]))
        self.offsets = json.loads(row["offsets"])
        self.seq = int(row["seq"])
        log.info("%s: restored checkpoint #%d covering %s", self.name, self.seq, self.offsets)

    def _next(self, m: Any) -> int:
        return self.offsets.get(_key(m), 0)

    async def rewind_gaps(self, consumer: Any, events: list[Any]) -> list[Any]:
        """:func:`contiguous` against the offsets the checkpoint covers (0 for a partition it
        has never seen): nothing past a hole is processed or covered until the hole is read."""
        return await contiguous(consumer, events, self.offsets, self.name, default=0)

    def fresh(self, events: list[Any]) -> list[Any]:
        """The events the checkpoint does not cover yet."""
        out = []
        for e in events:
            m = e.message
            if m.offset >= self._next(m):
                out.append(e)
        return out

    async def save(self, events: list[Any], snapshot: Any) -> None:
        _advance(self.offsets, events)
        self.seq += 1
        if log.isEnabledFor(logging.DEBUG):
            ranges: dict[str, list[int]] = defaultdict(list)
            for e in events:
                ranges[_key(e.message)].append(e.message.offset)
            log.debug(
                "%s: checkpoint #%d after %s",
                self.name,
                self.seq,
                ", ".join(f"{k} {min(o)}..{max(o)} ({len(o)})" for k, o in sorted(ranges.items())),
            )
        data = base64.b64encode(await self.pipe.run(snapshot, stage=self.name)).decode()
        await self.pipe.write(
            self.name,
            "checkpoints",
            [
                dict(
                    name=self.name,
                    seq=self.seq,
                    offsets=json.dumps(self.offsets),
                    data=data,
                    ts_ns=time.time_ns(),
                )
            ],
        )


def build_app(pipe: Pipeline, bootstrap: str) -> faust.App:
    cfg, t = pipe.cfg, pipe.cfg.topics
    app = WorkerApp(app_id(pipe.stages), **faust_settings(cfg, bootstrap))

    guards: list[ReadGuard] = []

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        for guard in guards:
            guard.forget(revoked)

    def topic(*names: str) -> faust.TopicT:
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    turns_topic = topic(t.turns)
    conversations_topic = topic(t.conversations)
    tags_topic = topic(t.tags)
    diagnoses_topic = topic(t.diagnoses)
    proposals_topic = topic(t.proposals)
    deadletter_topic = topic(t.deadletter)

    async def send_all(sends: list[tuple[Any, ...]]) -> None:
        """Send ``(topic, key, value[, partition])`` and wait for every acknowledgement
        (at-least-once towards the next stage)."""
        futs = [
            await s[0].send(
                key=s[1].encode() if s[1] is not None else None,
                value=s[2],
                partition=s[3] if len(s) > 3 else None,
            )
            for s in sends
        ]
        for f in futs:
            await f

    async def send_deadletters(stage: str, dls: list[DeadLetter]) -> None:
        if not dls:
            return
        pipe.counters[stage].deadletters += len(dls)
        for d in dls:
            log.warning(
                "%s: dead letter %s/%s@%s: %s %s",
                stage,
                d.topic,
                d.partition,
                d.offset,
                d.reason,
                d.detail[:200],
            )
        await pipe.write(stage, "deadletter", [d.to_dict() for d in dls])
        await send_all([(deadletter_topic, None, d.to_json()) for d in dls])

    # -- capture ---------------------------------------------------------------------------
    if "capture" in pipe.stages:
        from processors.capture.core import Capture, RawMessage

        capture_core = Capture(
            cfg.capture, logs_topic=t.otlp_logs, end_attribute=cfg.assemble.end_attribute
        )

        capture_guard = ReadGuard("capture")
        guards.append(capture_guard)

        @app.agent(topic(t.otlp_spans, t.otlp_logs), name="capture")
        async def capture_agent(stream: faust.StreamT) -> None:
            async for events in stream.take_events(CAPTURE_BATCH, within=TAKE_WITHIN_S):
                events = await capture_guard.contiguous(app.consumer, events)
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
                batch = await pipe.run(capture_core.process, raw, now, stage="capture")
                pipe.counters["capture"].records_in += len(raw)
                await pipe.write("capture", "spans", batch.span_rows)
                await pipe.write("capture", "turns", batch.turn_rows)
                await pipe.write("capture", "tool_calls", batch.tool_rows)
                # One message per partition, bundling its conversations: one message per
                # conversation would cost a produce round trip each (changelog-safe settings).
                # orjson serialises the records (dataclasses) itself, in C.
                with pipe.busy("capture"):
                    bundles: dict[int, dict[str, list[TurnRecord]]] = defaultdict(
                        lambda: defaultdict(list)
                    )
                    for tr in batch.turns:
                        bundles[partition_of(tr.conversation_id, cfg.kafka.partitions)][
                            tr.conversation_id
                        ].append(tr)
                    messages = [
                        (turns_topic, None, dumps({"v": SCHEMA_VERSION, "conversations": b}), p)
                        for p, b in bundles.items()
                    ]
                await send_all(messages)
                pipe.counters["capture"].records_out += len(batch.turns)
                await send_deadletters("capture", batch.deadletters)

    # -- assemble --------------------------------------------------------------------------
    if "assemble" in pipe.stages:
        # use_partitioner: the changelog partition comes from the key (the same partitioner
        # that keyed closeloop.turns), so writes work from batches taken off the stream.
        open_conversations = app.Table(
            "open_conversations",
            default=None,
            key_type=str,
            partitions=cfg.kafka.partitions,
            use_partitioner=True,
        )
        # Deadlines per partition (a heap with stale entries skipped on pop), so a tick looks
        # only at conversations that are due. Rebuilt from the table after a restart.
        deadlines: dict[int, list[tuple[int, str]]] = defaultdict(list)
        indexed: set[int] = set()

        assemble_guard = ReadGuard("assemble")
        guards.append(assemble_guard)

        @app.agent(turns_topic, name="assemble")
        async def assemble_agent(stream: faust.StreamT) -> None:
            async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
                events = await assemble_guard.contiguous(app.consumer, events)
                closed = []
                dls: list[DeadLetter] = []
                with pipe.busy("assemble"):
                    for e in events:
                        now = time.time_ns()
                        try:
                            body = orjson.loads(e.message.value)
                            if isinstance(body, dict) and "tick" in body:
                                closed += _close_due(e.message.partition, int(body["tick"]))
                                continue
                            if isinstance(body, dict) and isinstance(
                                body.get("conversations"), dict
                            ):
                                groups = body["conversations"]  # a bundle: {conversation id: turns}
                            elif isinstance(body, list):  # one conversation, keyed by its id
                                groups = {
                                    e.key.decode() if isinstance(e.key, bytes) else str(e.key): body
                                }
                            else:
                                raise InputError(
                                    "turn message is neither a bundle nor a list of turn records"
                                )
                            for turns in groups.values():
                                if not isinstance(turns, list) or not all(
                                    isinstance(d, dict) for d in turns
                                ):
                                    raise InputError("turn records must be JSON objects in a list")
                        except (ValueError, TypeError, KeyError, InputError) as err:
                            dls.append(
                                dead_letter("assemble", "undecodable turn record", e, now, str(err))
                            )
                            continue
                        for cid, turns in groups.items():
                            try:
                                state = assemble.add_turns(open_conversations.get(cid), turns, now)
                            except (ValueError, TypeError, KeyError) as err:
                                dls.append(
                                    dead_letter(
                                        "assemble",
                                        f"unusable turn record of {cid[:100]}",
                                        e,
                                        now,
                                        str(err),
                                    )
                                )
                                continue
                            state["p"] = partition_of(cid, cfg.kafka.partitions)
                            open_conversations[cid] = state
                            heapq.heappush(
                                deadlines[state["p"]],
                                (assemble.next_deadline(state, cfg.assemble), cid),
                            )
                            pipe.counters["assemble"].records_in += len(turns)
                if closed:
                    with pipe.busy("assemble"):
                        convs = [c for _, _, c in closed if c is not None]
                        rows = [assemble.conversation_row(c) for c in convs]
                        messages = [
                            (conversations_topic, c.conversation_id, c.to_json()) for c in convs
                        ]
                    await pipe.write_rows(
                        "assemble", "conversations", assemble.CONVERSATION_COLUMNS, rows
                    )
                    await send_all(messages)
                    # Only now is the closing recorded in the table (and its changelog): a crash
                    # before this point closes and publishes the same version again, harmlessly.
                    for cid, state, _ in closed:
                        current = open_conversations.get(cid)
                        if current is not None and len(current["turns"]) > len(state["turns"]):
                            continue  # a span arrived meanwhile: it stays open, closes later
                        open_conversations[cid] = state
                        heapq.heappush(
                            deadlines[state["p"]],
                            (assemble.next_deadline(state, cfg.assemble), cid),
                        )
                    pipe.counters["assemble"].records_out += len(convs)
                await send_deadletters("assemble", dls)

        def _close_due(partition: int, now: int) -> list[tuple[str, dict[str, Any], Any]]:
            """``(conversation id, its closed state, the conversation)`` for each one due now."""
            heap = deadlines[partition]
            if partition not in indexed:  # after a (re)start: index the restored table once
                for cid, state in list(open_conversations.items()):
                    if state is not None and state.get("p") == partition:
                        heapq.heappush(heap, (assemble.next_deadline(state, cfg.assemble), cid))
                indexed.add(partition)
            out = []
            while heap and heap[0][0] <= now:
                _, cid = heapq.heappop(heap)
                state = open_conversations.get(cid)
                if state is None or assemble.next_deadline(state, cfg.assemble) > now:
                    continue  # deleted, or updated since: a later entry exists
                reason = assemble.is_due(state, now, cfg.assemble)
                if reason:
                    # the table keeps the open state until the conversation is published
                    closed_state = {**state, "turns": dict(state["turns"])}
                    try:
                        out.append(
                            (cid, closed_state, assemble.close(cid, closed_state, reason, now))
                        )
                    except (ValueError, TypeError, KeyError, AttributeError) as err:
                        # a state the core cannot build: keep the pipeline going, keep the turns
                        log.error("assemble: cannot build conversation %s: %r", cid, err)
                        closed_state["closed_ns"] = now
                        out.append((cid, closed_state, None))
                elif assemble.is_expired(state, now):
                    del open_conversations[cid]
            return out

        @app.timer(TICK_INTERVAL_S)
        async def assemble_tick() -> None:
            # Closing happens inside the stream (table writes need the event's partition):
            # a tick per partition drives it.
            value = json.dumps({"tick": time.time_ns()}).encode()
            for p in range(cfg.kafka.partitions):
                await turns_topic.send(key=None, value=value, partition=p)

    # -- understand ------------------------------------------------------------------------
    if "understand" in pipe.stages:
        from processors.llm import make_llm
        from processors.records import Conversation
        from processors.understand.core import Understand
        from processors.understand.embed import make_embedder

        understand_core = Understand(
            cfg, make_embedder(cfg.understand, cfg.home_path / "models", cfg.llm), make_llm(cfg.llm)
        )
        understand_ckpt = Checkpoint("understand", pipe)

        @app.agent(conversations_topic, name="understand")
        async def understand_agent(stream: faust.StreamT) -> None:
            await understand_ckpt.restore_into(understand_core.restore)
            async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
                events = await understand_ckpt.rewind_gaps(app.consumer, events)
                now = time.time_ns()
                convs, dls = [], []
                with pipe.busy("understand"):
                    for e in understand_ckpt.fresh(events):
                        try:
                            convs.append(Conversation.from_json(e.message.value))
                        except (ValueError, TypeError, KeyError) as err:
                            dls.append(
                                dead_letter(
                                    "understand",
                                    "undecodable conversation record",
                                    e,
                                    now,
                                    str(err),
                                )
                            )
                if convs:
                    batch = await pipe.run(understand_core.process, convs, now, stage="understand")
                    pipe.counters["understand"].records_in += len(convs)
                    await pipe.write(
                        "understand", "conversation_tags", [_tag_row(tg) for tg in batch.tags]
                    )
                    await pipe.write("understand", "intents", batch.intent_rows)
                    await pipe.write("understand", "intent_changes", batch.change_rows)
                    await send_all(
                        [(tags_topic, tg.conversation_id, tg.to_json()) for tg in batch.tags]
                    )
                    pipe.counters["understand"].records_out += len(batch.tags)
                await send_deadletters("understand", dls)
                await understand_ckpt.save(events, understand_core.snapshot)

    # -- diagnose --------------------------------------------------------------------------
    if "diagnose" in pipe.stages:
        from processors.diagnose.core import Diagnoser, diagnosis_rows
        from processors.llm import make_llm
        from processors.records import TagRecord

        diagnose_state = {"core": Diagnoser(cfg.diagnose, make_llm(cfg.llm))}
        diagnose_ckpt = Checkpoint("diagnose", pipe)

        def _restore_diagnoser(data: bytes) -> None:
            diagnose_state["core"] = Diagnoser.restore(data, make_llm(cfg.llm))

        @app.agent(tags_topic, name="diagnose")
        async def diagnose_agent(stream: faust.StreamT) -> None:
            await diagnose_ckpt.restore_into(_restore_diagnoser)
            async for events in stream.take_events(RECORD_BATCH, within=TAKE_WITHIN_S):
                events = await diagnose_ckpt.rewind_gaps(app.consumer, events)
                core = diagnose_state["core"]
                diags, dls = [], []
                with pipe.busy("diagnose"):
                    for e in diagnose_ckpt.fresh(events):
                        now = time.time_ns()
                        try:
                            diags += core.observe(TagRecord.from_json(e.message.value), now)
                        except (ValueError, TypeError, KeyError, InputError) as err:
                            dls.append(
                                dead_letter("diagnose", "unusable tag record", e, now, str(err))
                            )
                        pipe.counters["diagnose"].records_in += 1
                if diags:
                    await pipe.write("diagnose", "diagnoses", diagnosis_rows(diags))
                    await send_all([(diagnoses_topic, d.intent_id, d.to_json()) for d in diags])
                    pipe.counters["diagnose"].records_out += len(diags)
                await send_deadletters("diagnose", dls)
                await diagnose_ckpt.save(events, lambda: diagnose_state["core"].snapshot())

    # -- act -------------------------------------------------------------------------------
    if "act" in pipe.stages or "verify" in pipe.stages:
        from processors.act import Actor, notify, open_backend, proposal_rows
        from processors.records import Diagnosis

        backend = open_backend(cfg) if cfg.act.repo else None
        if backend is None:
            log.warning(
                "act: no target repository configured (act.repo); diagnoses are kept, "
                "no proposals are opened"
            )

    if "act" in pipe.stages and backend is not None:
        from processors.llm import make_llm

        actor = Actor(cfg, backend, make_llm(cfg.llm))
        # Offsets only (no model): a restart must not replay older diagnosis versions onto
        # their branches (each replay would re-version the proposal, a force-push on GitHub).
        act_ckpt = Checkpoint("act", pipe)

        @app.agent(diagnoses_topic, name="act")
        async def act_agent(stream: faust.StreamT) -> None:
            await act_ckpt.restore_into(lambda data: None)
            async for events in stream.take_events(50, within=TAKE_WITHIN_S):
                events = await act_ckpt.rewind_gaps(app.consumer, events)
                props, dls = [], []
                for e in act_ckpt.fresh(events):
                    now = time.time_ns()
                    try:
                        diag = Diagnosis.from_json(e.message.value)
                    except (ValueError, TypeError, KeyError) as err:
                        dls.append(
                            dead_letter("act", "undecodable diagnosis record", e, now, str(err))
                        )
                        continue
                    pipe.counters["act"].records_in += 1
                    prop = await pipe.run(actor.propose, diag, now, stage="act")
                    if prop is None:
                        log.info(
                            "act: no proposal for %s: %s", diag.diagnosis_id, actor.last_reason
                        )
                        continue
                    props.append(prop)
                if props:
                    await pipe.write("act", "proposals", proposal_rows(props))
                    await send_all([(proposals_topic, p.diagnosis_id, p.to_json()) for p in props])
                    for p in props:
                        await pipe.run(notify, p, cfg)
                    pipe.counters["act"].records_out += len(props)
                await send_deadletters("act", dls)
                await act_ckpt.save(events, lambda: b"")

    # -- verify (review layer) ---------------------------------------------------------------
    if "verify" in pipe.stages:
        from processors.review.core import outcome_rows
        from processors.review.loop import load_proposal, merged_reviews, poll_open, verify

        def verify_all(now: int) -> list[Any]:
            if backend is not None and backend.name == "github":
                # decisions taken on GitHub (webhooks deliver them too; polling catches missed ones)
                try:
                    poll_open(pipe.store, backend, now)
                except ReviewError as e:  # GitHub away: the next tick polls again
                    log.warning("verify: polling GitHub failed: %s", e)
            outcomes = []
            for row in merged_reviews(pipe.store):
                prop = load_proposal(pipe.store, row["proposal_id"])
                result = verify(pipe.store, row, cfg, now, backend=backend, proposal=prop)
                outcomes += result.outcomes
                if result.regressed:
                    log.warning(
                        "verify: %s made intent %s worse; diagnose will see the new rates",
                        row["proposal_id"],
                        row["intent_id"],
                    )
            return outcomes

        @app.timer(VERIFY_INTERVAL_S)
        async def verify_tick() -> None:
            try:
                outcomes = await pipe.run(verify_all, time.time_ns(), stage="verify")
            except StoreError as e:  # ClickHouse away: the next tick tries again
                log.warning("verify: %s", e)
                return
            await pipe.write("verify", "outcomes", outcome_rows(outcomes))
            pipe.counters["verify"].records_out += len(outcomes)

    # -- stage counters --------------------------------------------------------------------
    @app.timer(STATS_INTERVAL_S)
    async def write_stats() -> None:
        now = time.time_ns()
        rows = [
            dict(
                ts_ns=now,
                worker=pipe.worker_id,
                stage=s,
                records_in=c.records_in,
                records_out=c.records_out,
                deadletters=c.deadletters,
                write_errors=c.write_errors,
                cpu_s=c.cpu_s,
            )
            for s, c in list(pipe.counters.items())
        ]
        try:
            await pipe.run(pipe.store.insert_records, "stage_stats", rows)
        except StoreError as e:  # counters are best effort: the next tick writes them again
            log.warning("stage stats not written: %s", e)

    app.closeloop_pipeline = pipe  # type: ignore[attr-defined]
    return app
