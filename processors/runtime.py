"""What every layer's thin agent runs on: the pipeline (store writes with retry, counters),
the checkpoint and read guard that keep offsets honest, dead letters, and sending with
acknowledgement (:class:`Wiring`).

Delivery: an agent takes a batch of events, writes ClickHouse (retrying with backoff while
ClickHouse is down, so offsets never pass unwritten rows), sends its outputs and waits for
their acknowledgement; only then are the input events acknowledged and their offsets
committed. Every write is keyed by content, so the redelivery after a crash is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2
from faust.transport.drivers.aiokafka import Producer as AIOKafkaProducer

from processors.bundles import fit
from processors.config import Config
from processors.embedded.broker import TopicState, topic_state
from processors.embedded.procs import write_run_file
from processors.errors import LLMError, StoreError
from processors.llm_work import LLMWork
from processors.poison import PoisonLog, failure_reason
from processors.records import DeadLetter
from processors.redact import Redactor
from processors.stages import ALL_STAGES
from processors.store import Store

log = logging.getLogger("closeloop.worker")

RECORD_BATCH = 500  # records per take of a stage after capture
TAKE_WITHIN_S = 0.2
STATS_INTERVAL_S = 5.0
DEADLETTER_MAX_BYTES = 64 * 1024
FRAMING_BYTES = 64 * 1024
_OUTAGE_WORDS = (
    "Timeout",
    "TimedOut",
    "Connection",
    "NotAvailable",
    "NotReady",
    "NotLeader",
)  # a Kafka record's key, headers and batch framing beyond its value
REFUSALS_BEFORE_SPLIT = 3


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
        # stages split and cut what they send under kafka.max_message_bytes (Wiring.send_all);
        # the producer's own limit is the state's (a changelog record holds one open
        # conversation whole), with room for the record's framing
        producer_max_request_size=cfg.kafka.max_state_bytes + FRAMING_BYTES,
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
    """The worker's shared parts: config, store, cores, counters, LLM steps.

    Threads: one for the store (inserts and queries), one per stage for its core
    (:meth:`run_core`: a stage's state changes in order, and a stage's long core step does
    not hold up another stage's inserts), and the LLM steps' own (:mod:`processors.llm_work`).
    """

    cfg: Config
    store: Store
    stages: tuple[str, ...] = ALL_STAGES
    bootstrap: str = ""  # the broker, for checkpoints to check which topics they cover
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    counters: dict[str, StageCounters] = field(default_factory=lambda: defaultdict(StageCounters))
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> store wait
    sources: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)
    _poison: dict[str, PoisonLog] = field(default_factory=dict, repr=False)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "store"))
    core_pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    llm: LLMWork | None = None

    def __post_init__(self) -> None:
        if self.llm is None:
            cap = self.cfg.capture
            self.llm = LLMWork(self.cfg.llm, Redactor(cap.redact, cap.extra_patterns))

    async def write(self, stage: str, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert rows, retrying with backoff while the store cannot take them — unreachable,
        disk full, read-only, a timeout: its state, not the rows' fault — so offsets never pass
        unwritten rows; the wait and its cause are published for `closeloop status`. When
        ClickHouse refuses the rows for their content (a parse or type error) a few times,
        they are written one by one and the ones it refuses become dead letters, so one bad
        row cannot stall the stage."""
        if not rows:
            return
        delay, refused = 0.5, 0
        while True:
            try:
                await self.run(self.store.insert_records, table, rows, stage=stage)
                self._resumed(stage)
                return
            except StoreError as e:
                self.counters[stage].write_errors += 1
                refused = refused + 1 if refused_for_content(e) else 0
                if refused >= REFUSALS_BEFORE_SPLIT:
                    await self._write_one_by_one(stage, table, rows)
                    return
                if not refused:
                    self._waiting(stage, table, e)
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

    async def read(self, stage: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` (a store read) on the store thread, retried with backoff while the
        store cannot answer, as :meth:`write` does: the stage waits rather than going on
        without what it needed to read."""
        delay = 0.5
        while True:
            try:
                result = await self.run(fn, *args, stage=stage)
                self._resumed(stage)
                return result
            except StoreError as e:
                self._waiting(stage, "reading", e)
                log.warning("%s: a store read failed, retrying in %.1fs: %s", stage, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def reading(self, stage: str, events: list[Any]) -> None:
        """The input batch ``stage`` works on: a row refused for its content is dead-lettered
        with this batch's topic, partition and first offset, where re-inject finds it."""
        ranges: dict[tuple[str, int], list[int]] = {}
        for e in events:
            m = e.message
            lo_hi = ranges.setdefault((m.topic, m.partition), [m.offset, m.offset])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], m.offset), max(lo_hi[1], m.offset)
        self.sources[stage] = [(t, p, lo, hi) for (t, p), (lo, hi) in sorted(ranges.items())]

    async def drop_poison(self, stage: str, events: list[Any]) -> list[Any]:
        """``events`` without the records found to be poison for ``stage``; those are
        dead-lettered (where they are and why; their content stays in the topic), counted
        and logged."""
        poison_log = self._poison.setdefault(stage, PoisonLog.of(self.cfg.run_dir(), stage))
        if not poison_log.poison:
            return events
        kept, dls, now = [], [], time.time_ns()
        for e in events:
            m = e.message
            why = poison_log.why(m.topic, m.partition, m.offset)
            if why is None:
                kept.append(e)
                continue
            dl = dead_letter(stage, "poison: the stage failed on it twice", e, now, why)
            dls.append(replace(dl, original_b64=""))  # unredacted input: it stays in its topic
        if dls:
            self.counters[stage].deadletters += len(dls)
            log.error(
                "%s: %d poison records dead-lettered and skipped (%s)",
                stage,
                len(dls),
                dls[0].detail,
            )
            await self.write(stage, "deadletter", [d.to_dict() for d in dls])
        return kept

    def _waiting(self, stage: str, table: str, e: StoreError) -> None:
        first = stage not in self.waiting
        self.waiting[stage] = {
            "stage": stage,
            "table": table,
            "since_ns": self.waiting.get(stage, {}).get("since_ns", time.time_ns()),
            "why": str(e)[:500],
        }
        if first:
            self._publish_waiting()

    def _resumed(self, stage: str) -> None:
        if self.waiting.pop(stage, None) is not None:
            log.info("%s: the store takes writes again", stage)
            self._publish_waiting()

    def _publish_waiting(self) -> None:
        """``run/waiting-<pid>.json``: the stages of this process waiting on the store, and
        why (a file, not a table: the store is what cannot be written)."""
        name = f"waiting-{os.getpid()}.json"
        try:
            if self.waiting:
                write_run_file(self.cfg.run_dir(), name, {"stages": list(self.waiting.values())})
            else:
                (self.cfg.run_dir() / name).unlink(missing_ok=True)
        except OSError as e:  # the disk that is full may be this one: the log says it anyway
            log.warning("cannot publish the store wait in %s: %s", self.cfg.run_dir(), e)

    async def _write_one_by_one(self, stage: str, table: str, rows: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        bad: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            try:
                await loop.run_in_executor(self.pool, self.store.insert_records, table, [row])
            except StoreError as e:
                if not refused_for_content(e):  # unreachable again: back to retrying the rest
                    await self.write(stage, table, rows[i:])
                    break
                now = time.time_ns()
                original = json.dumps(row, default=str, ensure_ascii=False).encode()[
                    :DEADLETTER_MAX_BYTES
                ]
                sources = self.sources.get(stage) or [("", 0, 0, 0)]
                topic, partition, first, _ = sources[0]
                batch = ", ".join(f"{t}:{p} {lo}..{hi}" for t, p, lo, hi in sources)
                bad.append(
                    DeadLetter(
                        stage=stage,
                        reason=f"ClickHouse refused a {table} row",
                        detail=f"{e}"[:1800] + f" (input batch: {batch})",
                        topic=topic,
                        partition=partition,
                        key=str(next(iter(row.values()), ""))[:200],
                        offset=first,
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

    async def run_core(self, stage: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on ``stage``'s own core thread, its CPU time counted to ``stage``."""
        pool = self.core_pools.get(stage)
        if pool is None:
            pool = self.core_pools[stage] = ThreadPoolExecutor(1, f"core-{stage}")

        def timed() -> Any:
            t = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.counters[stage].cpu_s += time.thread_time() - t

        return await asyncio.get_running_loop().run_in_executor(pool, timed)

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        """Count the CPU time of a synchronous stretch on the event loop to ``stage``."""
        t = time.thread_time()
        try:
            yield
        finally:
            self.counters[stage].cpu_s += time.thread_time() - t


# ClickHouse error codes that blame the rows themselves (parse and type errors): retrying the
# same rows cannot help. Every other code (NOT_ENOUGH_SPACE 243, TABLE_IS_READ_ONLY 242,
# TIMEOUT_EXCEEDED 159, TOO_MANY_PARTS 252, MEMORY_LIMIT_EXCEEDED 241, a file that cannot be
# opened or locked, a missing column: a migration not applied) is the store's state.
CONTENT_ERROR_CODES = frozenset(
    {6, 26, 27, 38, 41, 43, 53, 69, 70, 72, 117, 128, 131, 190, 321, 349, 376, 467}
)
_CODE = re.compile(r"\bCode: (\d+)")


def refused_for_content(e: StoreError) -> bool:
    """The rows were refused for their content (by ClickHouse, with a parse or type error
    code, or by the client's encoder), rather than the store being unable to take any rows."""
    from clickhouse_connect.driver.exceptions import OperationalError

    code = _CODE.search(str(e))
    if code:
        return int(code.group(1)) in CONTENT_ERROR_CODES
    return not isinstance(e.__cause__, (OperationalError, ConnectionError, TimeoutError, OSError))


EXIT_STAGE_CRASHED = 70  # EX_SOFTWARE: the supervisor restarts the worker


async def exit_on_crash(agent: Any, exc: BaseException, pipe: Pipeline | None = None) -> None:
    """End the worker when a stage raises. faust would restart just the agent, without the
    batch it held: those events are never acknowledged nor redelivered, and the next
    checkpoint would cover them — lost. A restarted worker resumes from the committed
    offsets instead, and every write is idempotent, so the redelivery is harmless. The crash
    is remembered: the same failure twice on the same input makes it poison
    (:mod:`processors.poison`), dead-lettered by the next worker instead of a crash loop."""
    stage = str(getattr(agent, "name", agent)).rsplit(".", 1)[-1]
    if pipe is not None and pipe.sources.get(stage):
        try:
            poison = PoisonLog.of(pipe.cfg.run_dir(), stage).record_crash(
                failure_reason(exc), pipe.sources[stage]
            )
            if poison:
                log.error(
                    "%s: the same failure twice on %s: poison, dead-lettered next", stage, poison
                )
        except OSError as e:
            log.error("%s: cannot remember the crash: %s", stage, e)
    log.critical(
        "stage %s crashed, exiting so the supervisor restarts the worker and the "
        "unacknowledged batch is redelivered: %r",
        getattr(agent, "name", agent),
        exc,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(EXIT_STAGE_CRASHED)


class AcknowledgedProducer(AIOKafkaProducer):
    """faust's producer whose ``flush`` returns only once every message handed to it is
    acknowledged by the broker.

    faust commits a consumer's offsets right after ``producer.flush()``, but its own flush gives
    up as soon as its buffer stalls 0.1 s (``ProducerBuffer.flush_atmost``): on a slow broker it
    returns with changelog writes still queued and the offsets of the events that made them are
    committed anyway. A kill then restores a table that misses counted events. Here the flush
    waits for the delivery of every message sent before it began (what a commit covers); a
    send that fails raises, so nothing is committed and the worker ends, restores from the
    changelog and is redelivered from the last good commit.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.unacknowledged: set[asyncio.Future[Any]] = set()

    def send_soon(self, fut: Any) -> None:
        self.unacknowledged.add(fut)
        fut.add_done_callback(self.unacknowledged.discard)
        super().send_soon(fut)

    async def flush(self) -> None:
        sent = set(self.unacknowledged)
        await super().flush()
        if sent:
            # asyncio.wait, not gather: a cancelled flush must not cancel the sends themselves
            await asyncio.wait(sent)
            for fut in sent:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]


class WorkerApp(faust.App):
    """The faust app of the worker: a stage that raises ends the worker (:func:`exit_on_crash`);
    offsets are committed only after the changelog writes they cover are acknowledged
    (:class:`AcknowledgedProducer`)."""

    def _new_producer(self) -> AcknowledgedProducer:
        return AcknowledgedProducer(self.transport, loop=self.loop, beacon=self.beacon)

    async def _on_agent_error(self, agent: Any, exc: BaseException) -> None:
        # faust's hook for every agent's error (agent(on_error=...) is taken by faust itself)
        await exit_on_crash(agent, exc, getattr(self, "closeloop_pipeline", None))


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


class FailingBatches:
    """Batches that crashed the worker, remembered across its restarts (a small JSON file
    under ``<home>/run``). A stage raises on a batch, the worker restarts and the batch is
    redelivered; if it fails again with the same kind of error it is dead-lettered rather
    than crash-looping forever. A batch is known by its stage and the first offset of each
    partition it holds (a redelivery starts at the committed offsets)."""

    def __init__(self, path: Any) -> None:
        self.path = path
        try:
            self._failed: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._failed = {}

    @staticmethod
    def key(stage: str, events: list[Any]) -> str:
        first: dict[str, int] = {}
        for e in events:
            k = _key(e.message)
            first[k] = min(first.get(k, e.message.offset), e.message.offset)
        return stage + "|" + ",".join(f"{k}:{o}" for k, o in sorted(first.items()))

    def failed_before(self, key: str, exc: BaseException) -> bool:
        return self._failed.get(key) == type(exc).__name__

    @staticmethod
    def is_outage(exc: BaseException) -> bool:
        """An error of the infrastructure (the store, the broker, the network): the batch is
        not at fault, the worker must keep restarting until the outage ends."""
        e: BaseException | None = exc
        while e is not None:
            if isinstance(e, (StoreError, OSError, asyncio.TimeoutError)) or any(
                w in type(e).__name__ for w in _OUTAGE_WORDS
            ):
                return True
            e = e.__cause__ or e.__context__
        return False

    def remember(self, key: str, exc: BaseException) -> None:
        self._failed[key] = type(exc).__name__
        self._save()

    def forget(self, key: str) -> None:
        if self._failed.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._failed))
        tmp.replace(self.path)


def partition_of(key: str, partitions: int) -> int:
    """The partition the producer's default partitioner (murmur2, as Kafka's Java client and
    aiokafka) gives ``key``: bundles sent to it keep every conversation where its table lives."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


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
    expects are the ones after what it processed since the worker started, and, for a
    partition's first batch, the group's committed offset. A (re)started worker's first fetch
    races the stages still producing to its input (capture redelivering its backlog): tansu
    can serve it from past the committed offset, and faust would commit over the hole."""

    def __init__(self, stage: str, pipe: Pipeline | None = None) -> None:
        self.stage = stage
        self.pipe = pipe
        self.expected: dict[str, int] = {}

    def forget(self, tps: Any) -> None:
        """Partitions this process no longer reads: another process may read them meanwhile,
        so what is expected of them next is unknown when they come back."""
        for tp in tps:
            self.expected.pop(_key(tp), None)

    async def contiguous(self, consumer: Any, events: list[Any]) -> list[Any]:
        self._expect_committed(consumer, events)
        kept = await contiguous(consumer, events, self.expected, self.stage, default=None)
        _advance(self.expected, kept)
        if self.pipe is None:
            return kept
        self.pipe.reading(self.stage, kept)
        return await self.pipe.drop_poison(self.stage, kept)

    def _expect_committed(self, consumer: Any, events: list[Any]) -> None:
        """Expect a partition not read yet to start at the offset its group committed (what
        faust sought to on assignment; none known: wherever it starts is trusted)."""
        committed = getattr(consumer, "_committed_offset", None) or {}
        for e in events:
            key = _key(e.message)
            if key not in self.expected:
                offset = committed.get(e.message.tp)
                if isinstance(offset, int) and offset > 0:
                    self.expected[key] = offset


def stale_offsets(
    offsets: dict[str, int], topic_ids: dict[str, str], now: TopicState
) -> dict[str, tuple[int, str]]:
    """The partitions whose checkpointed offset belongs to another incarnation of the topic,
    with the offset to read from instead (the topic's start) and why: the topic id changed,
    or the offset lies beyond the topic's end (a broker that forgot its topics)."""
    out = {}
    for key, next_offset in offsets.items():
        topic = key.rsplit(":", 1)[0]
        low, high = now.bounds.get(key, (0, 0))
        old, new = topic_ids.get(topic), now.topic_ids.get(topic)
        if old and new and old != new:
            out[key] = (low, f"{topic} is a new topic (id {old}, now {new})")
        elif next_offset > high:
            out[key] = (
                low,
                f"the checkpoint covers {key} up to {next_offset}, the topic ends at {high}",
            )
    return out


class Checkpoint:
    """A stage's model state with the input offsets it covers, kept in ClickHouse.

    Saved after every batch, before the batch is acknowledged: on restart the newest
    checkpoint is restored and the events it already covers are skipped, so a redelivery
    is neither lost nor learned twice. (Not a Kafka changelog: tansu misreports end offsets.)
    It records which incarnation of each topic it covers (:func:`stale_offsets`).
    """

    MAX_RESETS_KEPT = 10

    def __init__(self, name: str, pipe: Pipeline) -> None:
        self.name = name
        self.pipe = pipe
        self.offsets: dict[str, int] = {}
        self.seq = 0
        self.incarnation: dict[str, Any] = {"topic_ids": {}, "seen": {}, "resets": []}
        self._poisoned: set[int] = set()  # ids of the events of this batch found to be poison

    async def restore_into(self, apply: Any) -> None:
        """Put the newest checkpoint into the stage: ``apply(data)`` is its core's in-place
        ``restore``; no checkpoint leaves the core as built. Offsets of another incarnation
        of their topic are reset to its start, with a warning."""
        rows = await self.pipe.run(
            self.pipe.store.query,
            "SELECT seq, offsets, data, incarnation FROM checkpoints FINAL WHERE name = {n:String}",
            {"n": self.name},
        )
        if not rows:
            return
        row = rows[0]
        try:
            apply(base64.b64decode(row["data"]))
        except Exception as e:
            # A snapshot of an older release (its classes moved or its format changed) must not
            # keep the stage from starting: it starts over from the start of its topics, and the
            # tables' content keys make the replay harmless.
            log.warning(
                "%s: checkpoint #%s cannot be restored (%s: %s); starting from the beginning",
                self.name,
                row["seq"],
                type(e).__name__,
                e,
            )
            return
        self.offsets = json.loads(row["offsets"])
        self.seq = int(row["seq"])
        self.incarnation.update(json.loads(row["incarnation"] or "{}"))
        log.info("%s: restored checkpoint #%d covering %s", self.name, self.seq, self.offsets)
        if await self._reset_stale_offsets():
            await self._write(row["data"])

    async def _reset_stale_offsets(self) -> bool:
        if not self.pipe.bootstrap or not self.offsets:
            return False
        topics = sorted({k.rsplit(":", 1)[0] for k in self.offsets})
        now = await self.pipe.run(topic_state, self.pipe.bootstrap, topics)
        stale = stale_offsets(self.offsets, self.incarnation["topic_ids"], now)
        for key, (start, why) in sorted(stale.items()):
            log.warning(
                "%s: checkpoint offset %d of %s is not of this topic (%s); reading it from %d",
                self.name,
                self.offsets[key],
                key,
                why,
                start,
            )
            self.offsets[key] = start
            self.incarnation["seen"].pop(key, None)
        if stale:
            resets = self.incarnation["resets"] + [
                {
                    "at_ns": time.time_ns(),
                    "partitions": sorted(stale),
                    "why": "; ".join(sorted({why for _, why in stale.values()})),
                }
            ]
            self.incarnation["resets"] = resets[-self.MAX_RESETS_KEPT :]
        self.incarnation["topic_ids"].update(now.topic_ids)
        self.incarnation["cluster_id"] = now.cluster_id
        return bool(stale)

    def _next(self, m: Any) -> int:
        return self.offsets.get(_key(m), 0)

    async def rewind_gaps(self, consumer: Any, events: list[Any]) -> list[Any]:
        """:func:`contiguous` against the offsets the checkpoint covers (0 for a partition it
        has never seen): nothing past a hole is processed or covered until the hole is read."""
        kept = await contiguous(consumer, events, self.offsets, self.name, default=0)
        self.pipe.reading(self.name, kept)
        # poison is dead-lettered here and left out of fresh(); save() still covers it
        self._poisoned = {id(e) for e in kept} - {
            id(e) for e in await self.pipe.drop_poison(self.name, kept)
        }
        return kept

    def fresh(self, events: list[Any]) -> list[Any]:
        """The events the checkpoint does not cover yet."""
        out = []
        for e in events:
            m = e.message
            if m.offset >= self._next(m) and id(e) not in self._poisoned:
                out.append(e)
        return out

    async def save(self, events: list[Any], snapshot: Any) -> None:
        _advance(self.offsets, events)
        seen = self.incarnation["seen"]
        for e in events:
            k = _key(e.message)
            first = seen.get(k, [e.message.offset])[0]
            seen[k] = [min(first, e.message.offset), self.offsets[k]]
        await self._learn_topic_ids()
        if log.isEnabledFor(logging.DEBUG):
            ranges: dict[str, list[int]] = defaultdict(list)
            for e in events:
                ranges[_key(e.message)].append(e.message.offset)
            log.debug(
                "%s: checkpoint #%d after %s",
                self.name,
                self.seq + 1,
                ", ".join(f"{k} {min(o)}..{max(o)} ({len(o)})" for k, o in sorted(ranges.items())),
            )
        await self._write(base64.b64encode(await self.pipe.run_core(self.name, snapshot)).decode())

    async def _learn_topic_ids(self) -> None:
        """The ids of topics first read since the worker started (a first checkpoint)."""
        known = self.incarnation["topic_ids"]
        missing = sorted({k.rsplit(":", 1)[0] for k in self.offsets} - set(known))
        if not missing or not self.pipe.bootstrap:
            return
        try:
            now = await self.pipe.run(topic_state, self.pipe.bootstrap, missing)
        except Exception as e:  # the next checkpoint asks again
            log.warning("%s: cannot read the ids of %s: %s", self.name, missing, e)
            return
        known.update(now.topic_ids)
        self.incarnation["cluster_id"] = now.cluster_id

    async def same_topics(self, topics: list[str]) -> bool:
        """For a stage that keeps no model (assemble, of the topic it publishes to): whether
        ``topics`` are the incarnations this checkpoint recorded last (:meth:`record_topics`).
        False when that cannot be told (nothing recorded, ids unreadable)."""
        rows = await self.pipe.run(
            self.pipe.store.query,
            "SELECT seq, incarnation FROM checkpoints FINAL WHERE name = {n:String}",
            {"n": self.name},
        )
        before = json.loads(rows[0]["incarnation"] or "{}").get("topic_ids", {}) if rows else {}
        self.seq = int(rows[0]["seq"]) if rows else 0
        try:
            now = await self.pipe.run(topic_state, self.pipe.bootstrap, topics)
        except Exception as e:
            log.warning("%s: cannot read the ids of %s: %s", self.name, topics, e)
            return False
        self.incarnation.update(topic_ids=now.topic_ids, cluster_id=now.cluster_id)
        return all(before.get(t) and before.get(t) == now.topic_ids.get(t) for t in topics)

    async def record_topics(self) -> None:
        """Record the incarnations :meth:`same_topics` read."""
        await self._write("")

    async def _write(self, data_b64: str) -> None:
        self.seq += 1
        await self.pipe.write(
            self.name,
            "checkpoints",
            [
                dict(
                    name=self.name,
                    seq=self.seq,
                    offsets=json.dumps(self.offsets),
                    data=data_b64,
                    incarnation=json.dumps(self.incarnation),
                    ts_ns=time.time_ns(),
                )
            ],
        )


@dataclass
class Wiring:
    """What a layer's agent registers with: the app, the pipeline, the shared topics, and
    sending with acknowledgement. Each layer's ``agent.register(wiring)`` adds its agents."""

    app: faust.App
    pipe: Pipeline
    guards: list[ReadGuard] = field(default_factory=list)
    llm_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _answers_loaded: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        t = self.pipe.cfg.topics
        self.turns = self.topic(t.turns)
        self.conversations = self.topic(t.conversations)
        self.tags = self.topic(t.tags)
        self.diagnoses = self.topic(t.diagnoses)
        self.proposals = self.topic(t.proposals)
        self.deadletter = self.topic(t.deadletter)

        @self.app.on_partitions_revoked.connect
        async def forget_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
            for guard in self.guards:
                guard.forget(revoked)

    def topic(self, *names: str) -> faust.TopicT:
        return self.app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    def read_guard(self, stage: str) -> ReadGuard:
        """A :class:`ReadGuard` that forgets the partitions this process loses."""
        guard = ReadGuard(stage, self.pipe)
        self.guards.append(guard)
        return guard

    async def send_all(self, sends: list[tuple[Any, ...]], stage: str = "") -> None:
        """Send ``(topic, key, value[, partition])`` and wait for every acknowledgement
        (at-least-once towards the next stage). A value over ``kafka.max_message_bytes`` is
        cut to fit (:func:`processors.bundles.fit`); one that cannot fit is dead-lettered."""
        sends, unfit = self._fitted(sends, stage or "send")
        if unfit:
            await self.send_deadletters(stage or "send", unfit)
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

    def _fitted(
        self, sends: list[tuple[Any, ...]], stage: str
    ) -> tuple[list[tuple[Any, ...]], list[DeadLetter]]:
        limit = self.pipe.cfg.kafka.max_message_bytes
        if all(len(s[2]) <= limit for s in sends):
            return sends, []
        out, unfit = [], []
        for s in sends:
            value = s[2] if len(s[2]) <= limit else fit(orjson.loads(s[2]), limit)
            if value is None:
                unfit.append(
                    DeadLetter(
                        stage=stage,
                        reason="record over kafka.max_message_bytes",
                        detail=f"{len(s[2])} bytes > {limit}; nothing left to cut",
                        topic=s[0].get_topic_name(),
                        key=str(s[1] or "")[:200],
                        original_b64=base64.b64encode(s[2][:DEADLETTER_MAX_BYTES]).decode(),
                        ts_ns=time.time_ns(),
                    )
                )
            else:
                if value is not s[2]:
                    log.warning("%s: a %d-byte record was cut to fit %d", stage, len(s[2]), limit)
                out.append((s[0], s[1], value, *s[3:]))
        return out, unfit

    async def send_deadletters(self, stage: str, dls: list[DeadLetter]) -> None:
        if not dls:
            return
        self.pipe.counters[stage].deadletters += len(dls)
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
        await self.pipe.write(stage, "deadletter", [d.to_dict() for d in dls])
        await self.send_all([(self.deadletter, None, d.to_json()) for d in dls])

    async def load_llm_answers(self) -> None:
        """Put the stored LLM answers into the cache (once per process, before any stage asks):
        a redelivery or a restart finds the answers it already paid for."""
        work = self.pipe.llm
        if work is None or not work.steps:
            return
        if self._answers_loaded is None:
            self._answers_loaded = asyncio.Lock()
        async with self._answers_loaded:
            if len(work.cache):
                return
            rows = await self.pipe.run(
                self.pipe.store.query,
                "SELECT key, answer FROM (SELECT key, answer, ts_ns FROM llm_answers FINAL "
                "ORDER BY ts_ns DESC LIMIT {n:UInt32}) ORDER BY ts_ns",
                {"n": work.cache.cap},
            )
            work.cache.load(rows)
            log.info("llm: %d stored answers loaded", len(rows))

    def llm_job(self, step: str, job: Any, apply: Any, *, failed: Any = None) -> bool:
        """Run ``job(chat)`` on LLM step ``step`` beside the stream; when it answers,
        ``await apply(result)`` writes the improved rows (``await failed()`` when it fails).
        False: no LLM, or the step skipped the item (queue full, breaker open), and the
        deterministic result stands alone."""
        work = self.pipe.llm
        llm_step = work.step(step) if work is not None else None
        fut = llm_step.submit(job) if llm_step is not None else None
        if fut is None:
            return False
        task = asyncio.ensure_future(self._finish_llm_job(step, fut, apply, failed))
        self.llm_tasks.add(task)
        task.add_done_callback(self.llm_tasks.discard)
        return True

    async def _finish_llm_job(self, step: str, fut: Any, apply: Any, failed: Any) -> None:
        try:
            result = await asyncio.wrap_future(fut)
        except Exception as e:  # LLMError, or a job's own fault: the item only, never the worker
            if isinstance(e, LLMError):
                log.warning("llm %s: no answer, the deterministic result stands: %s", step, e)
            else:
                log.exception("llm %s: the job failed; the deterministic result stands", step)
            if failed is not None:
                await failed()
            return
        try:
            await apply(result)
        except Exception:  # an improvement lost must not end the worker: its rows stand as written
            log.exception(
                "llm %s: applying the answer failed; the deterministic result stands", step
            )

    def write_stats_every(self, interval_s: float) -> None:
        """A timer writing the stage counters (best effort: a failed write waits for the next)."""
        pipe = self.pipe

        @self.app.timer(interval_s)
        async def write_llm_stats() -> None:
            work = pipe.llm
            if work is None or not work.steps:
                return
            answers = work.cache.drain()
            try:
                await pipe.run(
                    pipe.store.insert_records,
                    "llm_stats",
                    work.rows(pipe.worker_id, time.time_ns()),
                )
                if answers:
                    await pipe.run(pipe.store.insert_records, "llm_answers", answers)
            except StoreError as e:  # best effort; answers not kept are asked again after a restart
                log.warning("llm stats or answers not written: %s", e)

        @self.app.timer(interval_s)
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
