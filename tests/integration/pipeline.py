"""A whole capture pipeline for integration tests, on loopback and free ports.

    OTel SDK / collector --OTLP--> Gateway (in process) --> tansu --> worker process --> chDB

A broker of its own per pipeline, so the worker's consumer group (`app_id` of its stages) and its
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from processors.capture.gateway import Gateway
from processors.config import Config, load_config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.stages import app_id
from processors.store import Store

from .worker_proc import WorkerProcess, wait_for

GROUP_JOIN_TIMEOUT_S = 60.0  # joining the worker's group to rewind it
ROWS_TIMEOUT_S = 90.0  # bound on waiting for rows to arrive (a busy 2-core machine)
FIRST_READ_S = 2.0  # a new topic reader waits this long for its first messages;
QUIET_READ_S = 0.3  # a read stops at the first poll this long that brings nothing


@dataclass
class Pipeline:
    cfg: Config
    broker: EmbeddedBroker
    gateway: Gateway
    worker: WorkerProcess
    store: Store
    _turns_reader: Consumer | None = None
    _turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    def http_url(self, path: str = "/v1/traces") -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}{path}"

    def stop_worker(self, *, kill: bool = False) -> None:
        """SIGTERM the worker (it commits its offsets), or SIGKILL it with ``kill``."""
        self.store.close()
        if kill:
            self.worker.kill()
        else:
            self.worker.stop()

    def start_worker(self) -> None:
        """A new worker process on the same home (store, consumer group)."""
        self.worker = WorkerProcess(
            self.worker.home, self.worker.bootstrap, self.worker.stages, self.worker.env
        ).start()
        self.store = self.worker.store()

    def rewind_consumer_group(self, topics: list[str]) -> None:
        """Commit offset 0 for every partition of ``topics`` in the worker's group.

        Call it with the worker stopped. tansu refuses commits from outside the group
        (UNKNOWN_MEMBER_ID), so this joins the group as its only member first.
        """
        assigned: list[TopicPartition] = []
        group = app_id(tuple(self.worker.stages.split(",")))  # the worker's consumer group
        c = Consumer(
            {
                "bootstrap.servers": self.broker.bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "max.poll.interval.ms": 7000,
            }
        )
        try:
            c.subscribe(topics, on_assign=lambda _c, parts: assigned.extend(parts))
            deadline = time.monotonic() + GROUP_JOIN_TIMEOUT_S
            while not assigned and time.monotonic() < deadline:
                c.poll(0.2)
            assert assigned, f"could not join consumer group {group} in {GROUP_JOIN_TIMEOUT_S}s"
            c.commit(
                offsets=[TopicPartition(tp.topic, tp.partition, 0) for tp in assigned],
                asynchronous=False,
            )
        finally:
            c.close()

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.store.query(sql, parameters)

    def wait_rows(
        self,
        sql: str,
        n: int,
        parameters: dict[str, Any] | None = None,
        timeout_s: float = ROWS_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """Poll ``sql`` until it returns at least ``n`` rows; return the last result."""
        last: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal last
            last = self.rows(sql, parameters)
            return len(last) >= n

        wait_for(enough, timeout_s)
        return last

    def wait_value(
        self,
        sql: str,
        want: Any,
        parameters: dict[str, Any] | None = None,
        timeout_s: float = ROWS_TIMEOUT_S,
    ) -> Any:
        """Poll a scalar query until it equals ``want``; return the last value."""
        last: list[Any] = [None]

        def equal() -> bool:
            last[0] = self.store.scalar(sql, parameters)
            return last[0] == want

        wait_for(equal, timeout_s)
        return last[0]

    def all_rows_json(self) -> str:
        """Every row of every table of the store as JSONEachRow text (for leak scans)."""
        tables = [
            r["name"]
            for r in self.rows(
                "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name"
            )
        ]
        return "\n".join(
            self.store.raw(f"SELECT * FROM `{t}`", fmt="JSONEachRow").decode() for t in tables
        )

    def turn_records(self) -> list[dict[str, Any]]:
        """The turn records the capture stage sent on so far, read from the turns topic.

        One reader for the pipeline's life, so each call reads only what is new; it stops at
        the first quiet poll rather than at the end offset, which tansu misreports.
        """
        timeout = QUIET_READ_S
        if self._turns_reader is None:
            timeout = FIRST_READ_S
            self._turns_reader = Consumer(
                {
                    "bootstrap.servers": self.broker.bootstrap,
                    "group.id": f"read-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                }
            )
            topic = self.cfg.topics.turns
            parts = self._turns_reader.list_topics(topic, timeout=10).topics[topic].partitions
            self._turns_reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        while batch := self._turns_reader.consume(1000, timeout):
            timeout = QUIET_READ_S
            for m in batch:
                assert m.error() is None, m.error()
                body = json.loads(m.value())
                if isinstance(body, dict) and "conversations" in body:  # a bundle per partition
                    for turns in body["conversations"].values():
                        self._turns.extend(turns)
                elif isinstance(body, list):  # not the ticks nor capture's {"progress": ...}
                    self._turns.extend(body)
        return list(self._turns)

    def close(self) -> None:
        if self._turns_reader is not None:
            self._turns_reader.close()
            self._turns_reader = None

    def worker_log(self) -> str:
        return self.worker.log.read_text(errors="replace")


@contextmanager
def running_pipeline(
    tmp: Path, stages: str = "capture", env: dict[str, str] | None = None
) -> Iterator[Pipeline]:
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
            pipe.close()
