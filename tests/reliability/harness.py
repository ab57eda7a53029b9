"""The whole embedded stack (broker, worker, gateway, review page) on free loopback ports,
driven with the demo agent's traffic, for the reliability and security tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from examples.support_agent import init_agent_repo
from processors.config import Config, load_config
from processors.demo import demo_config
from processors.embedded.broker import free_port
from processors.embedded.stack import EmbeddedStack
from processors.errors import StoreError
from processors.store import Store

WAIT_S = 150.0  # bound on waiting for the pipeline on a busy 2-core machine


@dataclass
class Loop:
    stack: EmbeddedStack
    cfg: Config
    store: Store
    repo: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.cfg.otlp.http_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.web.port}"

    def count(self, sql: str, params: dict[str, Any] | None = None) -> int:
        """A count, or -1 while the store is unreachable (the worker is restarting)."""
        try:
            return int(self.store.scalar(sql, params) or 0)
        except StoreError:
            return -1

    def wait_count(
        self, sql: str, at_least: int, timeout_s: float = WAIT_S, stall_s: float = 45.0
    ) -> int:
        """Poll until the count reaches ``at_least``, or stops moving for ``stall_s``; the last count."""
        deadline = time.monotonic() + timeout_s
        last, moved = -2, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count(sql)
            if n >= at_least:
                return n
            if n != last:
                last, moved = n, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                break
            time.sleep(0.5)
        return self.count(sql)

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.repo), *args], capture_output=True, text=True, check=True
        ).stdout


@contextmanager
def running_loop(tmp: Path, settings: dict[str, Any] | None = None) -> Iterator[Loop]:
    """The demo's stack and agent repository; ``settings`` are closeloop.yaml sections."""
    home = tmp / "home"
    repo = home / "demo" / "bankly-agent"
    cfg_file = demo_config(home, repo, settings)
    cfg = load_config(
        cfg_file,
        env={},
        overrides={
            "otlp.grpc_port": free_port(),
            "otlp.http_port": free_port(),
            "web.port": free_port(),
            "clickhouse.sql_port": free_port(),
        },
    )
    init_agent_repo(repo)
    stack = EmbeddedStack(cfg, config_file=str(cfg_file)).start()
    loop = Loop(stack, cfg, stack.sql_store(), repo)
    try:
        yield loop
    finally:
        loop.stack.stop()  # a test may have restarted it: the stack running now


def conversation_intents(store: Store, ids: list[str]) -> dict[str, str]:
    # all rows, filtered here: Array parameters do not survive the embedded SQL endpoint (see README)
    wanted = set(ids)
    rows = store.query("SELECT conversation_id, intent_id FROM conversation_tags FINAL")
    return {r["conversation_id"]: r["intent_id"] for r in rows if r["conversation_id"] in wanted}


def read_topic(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[bytes]:
    """Every message of ``topic`` (partitions assigned, not subscribed: no group join to wait for)."""
    return [value for _, _, value in read_positions(bootstrap, topic, idle_s)]


def read_positions(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[tuple[int, int, bytes]]:
    """Every message of ``topic`` as ``(partition, offset, value)``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "reliability-reader",
            "enable.auto.commit": False,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[tuple[int, int, bytes]] = []
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < idle_s:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.partition(), msg.offset(), msg.value()))
                idle_since = time.monotonic()
    finally:
        consumer.close()
    return out
