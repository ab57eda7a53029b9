"""A durable embedded broker: tansu on s3:// storage in the local S3 server (files), killed and restarted.

tansu reports the last batch's first offset + 1 as a partition's end (DESIGN.md): every check of
an end here reads to the true end (``true_end_offsets``) or counts what a consumer got.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from processors.config import load_config
from processors.credentials import load_sql_credentials
from processors.embedded.broker import (
    EmbeddedBroker,
    committed_offsets,
    ensure_topics,
    free_port,
    true_end_offsets,
)
from processors.embedded.s3store import LocalS3
from processors.embedded.stack import wait_for
from processors.errors import ConfigError

from .worker_proc import REPO, alive


class DurableBroker:
    """tansu on the local S3 server, both restartable on the same data folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.s3 = LocalS3(tmp_path / "broker-s3", log_dir=tmp_path / "logs")
        self.broker: EmbeddedBroker | None = None
        self.logs = tmp_path / "logs"

    def start(self) -> str:
        self.s3.port = 0  # a fresh port each time: nothing may depend on the old one
        self.s3.start()
        self.broker = EmbeddedBroker(
            storage=self.s3.storage_url, env=self.s3.client_env(), log_dir=self.logs
        ).start()
        return self.broker.bootstrap

    def kill(self) -> None:
        """SIGKILL the broker and its S3 server: nothing is flushed on the way down."""
        assert self.broker is not None
        self.broker.kill()
        self.s3.kill()

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()
        self.s3.stop()


@pytest.fixture
def durable(tmp_path: Path):
    b = DurableBroker(tmp_path)
    yield b
    b.stop()


@pytest.mark.parametrize(
    "storage, ok",
    [("memory", True), ("s3", True), ("postgres", False), ("disk", False), ("", False)],
)
def test_kafka_storage_setting(storage: str, ok: bool) -> None:
    if ok:
        assert (
            load_config(None, env={"CLOSELOOP_KAFKA_STORAGE": storage}, overrides={}).kafka.storage
            == storage
        )
    else:
        with pytest.raises(ConfigError, match="kafka.storage"):
            load_config(None, env={"CLOSELOOP_KAFKA_STORAGE": storage}, overrides={})


def _consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "durable-g",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "max.poll.interval.ms": 7000,
        }
    )


def test_kill_9_keeps_acknowledged_messages_and_committed_offsets(durable: DurableBroker) -> None:
    n = 2000
    bootstrap = durable.start()
    ensure_topics(bootstrap, ["durable"], 2)
    p = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    acked: list[tuple[int, bytes]] = []
    for i in range(n):
        p.produce(
            "durable",
            f"m{i}".encode(),
            key=str(i).encode(),
            on_delivery=lambda err, msg: (
                acked.append((msg.partition(), msg.value())) if err is None else None
            ),
        )
        p.poll(0)
    assert p.flush(60) == 0
    assert len(acked) == n
    c = _consumer(bootstrap)
    c.subscribe(["durable"])
    first: list[bytes] = []
    wait_for(
        lambda: (
            first.extend(m.value() for m in c.consume(500, 0.5) if not m.error())
            or len(first) >= n // 2
        ),
        60,
        0,
    )
    c.commit(asynchronous=False)
    c.close()
    before = committed_offsets(bootstrap, "durable-g", [("durable", 0), ("durable", 1)])
    assert sum(max(o, 0) for o in before.values()) == len(
        first
    )  # negative: nothing committed there

    durable.kill()
    bootstrap = durable.start()

    assert committed_offsets(bootstrap, "durable-g", list(before)) == before
    assert sum(true_end_offsets(bootstrap, ["durable"]).values()) == n
    c = _consumer(bootstrap)
    c.subscribe(["durable"])
    rest: list[bytes] = []
    wait_for(
        lambda: (
            rest.extend(m.value() for m in c.consume(500, 0.5) if not m.error())
            or len(first) + len(rest) >= n
        ),
        60,
        0,
    )
    c.close()
    # resumed where the group had committed: every message once, none twice
    assert sorted(first + rest) == sorted(v for _, v in acked)

    # new writes go after the old ones, not over them
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    p.produce("durable", b"after", partition=0)
    assert p.flush(30) == 0
    assert (
        true_end_offsets(bootstrap, ["durable"])[("durable", 0)]
        == sum(1 for part, _ in acked if part == 0) + 1
    )


N_COUNTED = 500
N_MORE = 100
N_KEYS = 50


class Counter:
    """tests/integration/counter_app.py as a worker process on the durable broker."""

    def __init__(
        self, durable: DurableBroker, tmp_path: Path, faust_producer: bool = False
    ) -> None:
        self.durable = durable
        self.tmp_path = tmp_path
        self.out = tmp_path / "counts.json"
        self.log = tmp_path / "worker.log"
        self.faust_producer = faust_producer
        self.bootstrap = ""

    def produce(self, start: int, count: int) -> None:
        p = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
            }
        )
        for i in range(start, start + count):
            p.produce("counter-src", key=f"k{i % N_KEYS}".encode(), value=b"x")
        assert p.flush(60) == 0

    def total(self) -> int:
        """The worker's table as it last dumped it (every 0.5 s)."""
        try:
            return sum(json.loads(self.out.read_text()).values())
        except (OSError, ValueError):
            return 0

    def committed(self) -> int:
        return sum(
            max(o, 0)
            for o in committed_offsets(
                self.bootstrap, "counter", [("counter-src", p) for p in range(4)]
            ).values()
        )

    def worker(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "COUNTER_HOME": str(self.tmp_path / "home"),
            "COUNTER_BOOTSTRAP": self.bootstrap,
            "COUNTER_OUT": str(self.out),
            "COUNTER_BATCHED": "0",
            "COUNTER_FAUST_PRODUCER": "1" if self.faust_producer else "0",
        }
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("counter_app.py"))],
            env=env,
            cwd=self.tmp_path,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def restart_and_check(self) -> None:
        """Restart the broker and a worker: the table restores exactly what was counted and
        committed, then more messages count on top of it, none missing, none twice."""
        self.bootstrap = self.durable.start()
        self.out.unlink()
        assert self.committed() == N_COUNTED
        w = self.worker()
        try:
            # restored from the changelog, exactly: neither stale nor doubled (nothing new yet)
            assert wait_for(lambda: self.total() == N_COUNTED, 180), (self.total(), self.tail())
            self.produce(N_COUNTED, N_MORE)
            assert wait_for(
                lambda: (
                    self.committed() == N_COUNTED + N_MORE and self.total() >= N_COUNTED + N_MORE
                ),
                180,
            ), (self.total(), self.committed(), self.tail())
            # resumed at the committed offsets, not from the start (at-least-once: a rebalance
            # under load may count a message twice, so no exact equality here)
            assert N_COUNTED + N_MORE <= self.total() < 2 * N_COUNTED + N_MORE
        finally:
            w.kill()
            w.wait()


def test_faust_table_and_group_offsets_survive_kill_9_of_broker_and_worker(
    durable: DurableBroker, tmp_path: Path
) -> None:
    """A faust worker (aiokafka consumer group, changelog-backed table) on the durable broker.

    After the worker, the broker and its S3 server are all SIGKILLed and restarted, the table is
    restored exactly from its changelog and the group resumes at its committed offsets: more
    messages then count on top of the old state, none missing, none twice.
    """
    c = Counter(durable, tmp_path)
    c.bootstrap = durable.start()
    ensure_topics(c.bootstrap, ["counter-src"], 4)
    c.produce(0, N_COUNTED)
    w = c.worker()
    try:
        assert wait_for(lambda: c.total() == N_COUNTED and c.committed() == N_COUNTED, 180), (
            c.total(),
            c.committed(),
            c.tail(),
        )
    finally:
        w.kill()
        w.wait()
    durable.kill()
    c.restart_and_check()


class SlowBroker:
    """Makes every request to tansu take ~STOPPED_S: SIGSTOP, a short SIGCONT, again, until
    stopped. A round trip longer than faust's 0.1 s buffer stall is what a loaded machine gives."""

    STOPPED_S = 0.3
    RUNNING_S = 0.03

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            self.done.wait(self.STOPPED_S)
            os.kill(self.pid, signal.SIGCONT)
            self.done.wait(self.RUNNING_S)

    def __enter__(self) -> SlowBroker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        os.kill(self.pid, signal.SIGCONT)


@pytest.mark.parametrize(
    "faust_producer",
    [
        pytest.param(
            True,
            # the negative control: seen restoring 448 of 500 (stale); soak, as it takes minutes
            marks=[
                pytest.mark.soak,
                pytest.mark.xfail(
                    strict=True,
                    reason="faust's flush gives up after a 0.1 s stall and commits anyway",
                ),
            ],
        ),
        False,
    ],
)
def test_offsets_committed_on_a_slow_broker_cover_only_acknowledged_changelog_writes(
    durable: DurableBroker, tmp_path: Path, faust_producer: bool
) -> None:
    """The same kill -9 while the broker answers every request slowly (SIGSTOP/SIGCONT cycles).

    The worker is killed as soon as it has counted and committed everything, and the broker
    right after: a commit must come only after the changelog writes of the events it covers are
    acknowledged, or the restored table misses what was committed. With faust's own producer
    (``faust_producer``) the flush before a commit gives up after a 0.1 s stall
    (ProducerBuffer.flush_atmost) and the table restores stale: the test shows the fix is needed.
    """
    c = Counter(durable, tmp_path, faust_producer=faust_producer)
    c.bootstrap = durable.start()
    ensure_topics(c.bootstrap, ["counter-src"], 4)
    c.produce(0, N_COUNTED)
    w = c.worker()
    assert durable.broker is not None and durable.broker.proc is not None
    try:
        # the group joins on a quick broker; the counting and its changelog writes meet a slow one
        assert wait_for(lambda: c.total() > 0, 180), c.tail()
        with SlowBroker(durable.broker.proc.pid):
            assert wait_for(lambda: c.total() == N_COUNTED and c.committed() == N_COUNTED, 300), (
                c.total(),
                c.committed(),
                c.tail(),
            )
            w.kill()
            w.wait()
    finally:
        w.kill()
        w.wait()
    durable.kill()
    c.restart_and_check()


def _spans_request(seed: int, spans: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="durable-agent"))
    )
    ss = rs.scope_spans.add()
    for i in range(spans):
        s = ss.spans.add()
        s.trace_id = (seed * 1000 + i // 5 + 1).to_bytes(16, "big")
        s.span_id = (seed * 1000 + i + 1).to_bytes(8, "big")
        s.name = "chat gpt-4o-mini"
        s.start_time_unix_nano = 1_700_000_000_000_000_000 + seed * 1000 + i
        s.end_time_unix_nano = s.start_time_unix_nano + 1_000_000
        s.attributes.append(
            KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat"))
        )
    return req.SerializeToString()


def _send_spans(otlp_http: str, seeds: range, spans: int = 25) -> int:
    """OTLP/HTTP requests; the spans acknowledged (a 200 means every span is on the broker)."""
    acknowledged = 0
    for seed in seeds:
        req = urllib.request.Request(
            f"{otlp_http}/v1/traces",
            data=_spans_request(seed, spans),
            headers={"Content-Type": "application/x-protobuf"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                acknowledged += spans if r.status == 200 else 0
        except urllib.error.HTTPError:
            pass  # refused: not acknowledged, not counted
    return acknowledged


def _sql(url: str, query: str, home: Path) -> str:
    reader = load_sql_credentials(home / "run").reader
    req = urllib.request.Request(
        f"{url}/?query={urllib.parse.quote(query + ' FORMAT TSV')}",
        headers={"X-ClickHouse-User": reader.user, "X-ClickHouse-Key": reader.password},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode().strip()


def _up(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``closeloop up`` as a user runs it; returns once its stack file is written."""
    stack_file = home / "run" / "stack.json"
    stack_file.unlink(missing_ok=True)  # a crashed stack leaves its file behind
    up = subprocess.Popen(
        [sys.executable, "-m", "processors.cli", "up", "--home", str(home)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=home.parent,
    )
    assert wait_for(lambda: stack_file.exists() or up.poll() is not None, 180), (
        "closeloop up did not start"
    )
    assert up.poll() is None, f"closeloop up exited with {up.returncode}; see {home / 'logs'}"
    return up


def _stack(home: Path) -> dict:
    return json.loads((home / "run" / "stack.json").read_text())


def test_whole_stack_kill_9_and_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CLOSELOOP_KAFKA_STORAGE": "s3",
        "CLOSELOOP_OTLP_GRPC_PORT": str(free_port()),
        "CLOSELOOP_OTLP_HTTP_PORT": str(free_port()),
        "CLOSELOOP_WEB_PORT": str(free_port()),
        "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0",
    }
    up = _up(home, env)
    info = _stack(home)
    acknowledged = _send_spans(info["otlp_http"], range(20))

    # The S3 server alone crashes: the supervisor starts it again on its data, and the stack goes on.
    os.kill(info["broker_store_pid"], signal.SIGKILL)
    assert wait_for(lambda: _stack(home)["broker_store_pid"] != info["broker_store_pid"], 30), (
        "the supervisor did not restart the S3 server"
    )
    after_restart = _send_spans(info["otlp_http"], range(20, 40))
    assert after_restart > 0, "nothing was accepted after the S3 server restarted"
    acknowledged += after_restart

    # the crash lands mid-stream, once the worker has committed some offsets
    groups = [("otlp_spans", p) for p in range(4)]
    before = wait_for(
        lambda: {
            tp: o
            for tp, o in committed_offsets(info["bootstrap"], "closeloop", groups).items()
            if o >= 0
        },
        60,
    )
    assert before, "the worker committed no offset"

    # Whole-stack crash: SIGKILL the supervisor and every process it started, the S3 server included.
    info = _stack(home)
    pids = [
        info["supervisor_pid"],
        info["broker_pid"],
        info["broker_store_pid"],
        *info["children"].values(),
    ]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    up.wait()
    assert wait_for(lambda: not any(alive(p) for p in pids), 10), "a process survived SIGKILL"

    up = _up(home, env)
    try:
        info = _stack(home)
        after = committed_offsets(info["bootstrap"], "closeloop", list(before))
        assert all(after[tp] >= o for tp, o in before.items()), (
            before,
            after,
        )  # resumed, not restarted
        assert wait_for(
            lambda: int(_sql(info["sql"], "SELECT count() FROM spans FINAL", home)) >= acknowledged,
            120,
        )
        assert int(_sql(info["sql"], "SELECT count() FROM spans FINAL", home)) == acknowledged
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
