"""A whole capture pipeline for integration tests, on loopback and free ports.

    OTel SDK / collector --OTLP--> Gateway (in process) --> tansu --> worker process --> chDB

A broker of its own per pipeline, so the worker's consumer group ("closeloop") and its
offsets start empty. Test modules hold one pipeline in a module-scoped fixture::

    @pytest.fixture(scope="module")
    def pipe(tmp_path_factory):
        with running_pipeline(tmp_path_factory.mktemp("pipe")) as p:
            yield p
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from processors.broker import EmbeddedBroker, ensure_topics
from processors.config import Config, load_config
from processors.gateway import Gateway
from processors.store import Store

from .worker_proc import WorkerProcess, wait_for

GROUP = "closeloop"             # the faust app id, which is the worker's consumer group
GROUP_JOIN_TIMEOUT_S = 60.0     # joining the worker's group to rewind it
ROWS_TIMEOUT_S = 90.0           # bound on waiting for rows to arrive (a busy 2-core machine)


@dataclass
class Pipeline:
    cfg: Config
    broker: EmbeddedBroker
    gateway: Gateway
    worker: WorkerProcess
    store: Store

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    def http_url(self, path: str = "/v1/traces") -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}{path}"

    def restart_worker(self, *, kill: bool = False) -> None:
        """Stop the worker (SIGTERM, or SIGKILL with ``kill``) and start a new one on the same home."""
        self.stop_worker(kill=kill)
        self.start_worker()

    def stop_worker(self, *, kill: bool = False) -> None:
        self.store.close()
        if kill:
            self.worker.kill()
        else:
            self.worker.stop()

    def start_worker(self) -> None:
        self.worker = WorkerProcess(self.worker.home, self.worker.bootstrap, self.worker.stages,
                                    self.worker.env).start()
        self.store = self.worker.store()

    def rewind_consumer_group(self, topics: list[str]) -> None:
        """Commit offset 0 for every partition of ``topics`` in the worker's group.

        Call it with the worker stopped. tansu refuses commits from outside the group
        (UNKNOWN_MEMBER_ID), so this joins the group as its only member first.
        """
        assigned: list[TopicPartition] = []
        c = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": GROUP,
                      "enable.auto.commit": False, "session.timeout.ms": 6000,
                      "max.poll.interval.ms": 7000})
        try:
            c.subscribe(topics, on_assign=lambda _c, parts: assigned.extend(parts))
            deadline = time.monotonic() + GROUP_JOIN_TIMEOUT_S
            while not assigned and time.monotonic() < deadline:
                c.poll(0.2)
            assert assigned, f"could not join consumer group {GROUP} in {GROUP_JOIN_TIMEOUT_S}s"
            c.commit(offsets=[TopicPartition(tp.topic, tp.partition, 0) for tp in assigned],
                     asynchronous=False)
        finally:
            c.close()

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.store.query(sql, parameters)

    def wait_rows(self, sql: str, n: int, parameters: dict[str, Any] | None = None,
                  timeout_s: float = ROWS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll ``sql`` until it returns at least ``n`` rows; return the last result."""
        last: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal last
            last = self.rows(sql, parameters)
            return len(last) >= n

        wait_for(enough, timeout_s)
        return last

    def wait_value(self, sql: str, want: Any, parameters: dict[str, Any] | None = None,
                   timeout_s: float = ROWS_TIMEOUT_S) -> Any:
        """Poll a scalar query until it equals ``want``; return the last value."""
        last: list[Any] = [None]

        def equal() -> bool:
            last[0] = self.store.scalar(sql, parameters)
            return last[0] == want

        wait_for(equal, timeout_s)
        return last[0]

    def all_rows_json(self) -> str:
        """Every row of every table of the store as JSONEachRow text (for leak scans)."""
        tables = [r["name"] for r in self.rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")]
        return "\n".join(self.store.raw(f"SELECT * FROM `{t}`", fmt="JSONEachRow").decode()
                         for t in tables)

    def turn_records(self) -> list[dict[str, Any]]:
        """Every turn record the capture stage sent on, read back from the turns topic."""
        out: list[dict[str, Any]] = []
        for value in topic_values(self.broker.bootstrap, self.cfg.topics.turns):
            body = json.loads(value)
            if isinstance(body, list):      # not the assemble stage's {"tick": ...} messages
                out += body
        return out

    def worker_log(self) -> str:
        return self.worker.log.read_text(errors="replace")


@contextmanager
def running_pipeline(tmp: Path, stages: str = "capture",
                     env: dict[str, str] | None = None) -> Iterator[Pipeline]:
    """Start tansu, the worker (``stages``) and the gateway; stop them all on exit."""
    home = tmp / "home"
    cfg = load_config(None, env={}, overrides={"home": str(home)})
    cfg.otlp.grpc_port = cfg.otlp.http_port = 0
    with EmbeddedBroker(log_dir=tmp / "broker") as broker:
        ensure_topics(broker.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        worker = WorkerProcess(home, broker.bootstrap, stages, env).start()
        gateway = Gateway(cfg, broker.bootstrap)
        pipe = Pipeline(cfg, broker, gateway, worker, worker.store())
        try:
            gateway.start()
            yield pipe
        finally:
            gateway.stop()
            pipe.stop_worker()


def topic_values(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[bytes]:
    """Every message value in ``topic``, all partitions from the start, up to its end."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[bytes] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = c.consume(1000, 0.5)
            for m in batch:
                if m.error() is None:
                    out.append(m.value())
                    at_end.discard(m.partition())
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
                else:
                    raise AssertionError(f"reading {topic}: {m.error()}")
            # tansu may report the end early (see DESIGN.md): stop only once a poll brings nothing
            if not batch and len(at_end) == len(parts):
                break
        return out
    finally:
        c.close()
