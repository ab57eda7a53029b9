"""The embedded stack: broker, worker (store owner + stages) and OTLP gateway, one process tree.

``closeloop up`` runs it in the foreground; ``closeloop demo`` and the e2e tests start it too.
Children are supervised: one that dies unexpectedly is restarted (with a back-off), and
stopping goes gateway → worker → broker → the broker's storage, so nothing is accepted that
cannot be written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from processors.config import Config
from processors.embedded.broker import EmbeddedBroker, ensure_topics, free_port, port_in_use
from processors.embedded.procs import ManagedProcess, spawn
from processors.embedded.s3store import LocalS3
from processors.errors import BrokerError, CloseloopError

log = logging.getLogger("closeloop.stack")

READY_TIMEOUT_S = 90.0
RESTART_BACKOFF_S = 2.0


def wait_for(fn: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll ``fn`` until it returns something truthy (returned) or time is up (its last value)."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval_s)
    return value


def wait_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclass
class Child(ManagedProcess):
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    restarts: int = 0
    STOP_TIMEOUT_S: ClassVar[float] = 20.0

    def start(self) -> Child:
        self.proc = spawn(self.argv, env=self.env, stdout=self._output(self.log_path))
        return self

    def stop(self, timeout_s: float | None = None) -> bool:
        killed = super().stop(timeout_s)
        if killed:
            log.warning(
                "%s did not stop within %.0fs; it was killed",
                self.name,
                self.STOP_TIMEOUT_S if timeout_s is None else timeout_s,
            )
        return killed


@dataclass
class EmbeddedStack:
    cfg: Config
    config_file: str | None = None
    broker: EmbeddedBroker | None = None
    broker_store: LocalS3 | None = None  # the broker's storage when kafka.storage is s3
    bootstrap: str = ""
    children: dict[str, Child] = field(default_factory=dict)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        cfg = self.cfg
        home = cfg.home_path
        (home / "logs").mkdir(parents=True, exist_ok=True)
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        for name in ("grpc_port", "http_port"):
            port = getattr(cfg.otlp, name)
            if port and port_in_use(port, cfg.otlp.host):
                raise CloseloopError(
                    f"OTLP port {port} is taken; pass --otlp-{name.split('_')[0]}-port "
                    "or stop what listens there"
                )
        if port_in_use(cfg.web.port, cfg.web.host) and cfg.web.port:
            raise CloseloopError(f"web port {cfg.web.port} is taken; pass --web-port")
        if cfg.kafka.bootstrap:
            self.bootstrap = cfg.kafka.bootstrap
        else:
            try:
                self.broker = EmbeddedBroker(port=cfg.kafka.broker_port, log_dir=cfg.log_dir())
                if cfg.kafka.storage == "s3":
                    self.broker_store = LocalS3(
                        home / "broker-s3", log_dir=cfg.log_dir(), fsync=cfg.kafka.storage_fsync
                    ).start()
                    self.broker.storage = self.broker_store.storage_url
                    self.broker.env = self.broker_store.client_env()
                self.broker.start()
            except BaseException:
                self.stop()
                raise
            self.bootstrap = self.broker.bootstrap
        ensure_topics(self.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        sql_port = cfg.clickhouse.sql_port or free_port()
        if cfg.embedded_store and port_in_use(sql_port):
            sql_port = free_port()
        env = self._child_env(sql_port)
        from processors.app import ALL_STAGES, CAPTURE_ONLY

        worker_cmd = [sys.executable, "-m", "processors.worker", "--bootstrap", self.bootstrap]
        captures = [f"capture-{i + 1}" for i in range(cfg.capture.processes)]
        if captures:  # capture moves out of the worker into processes of its own
            worker_cmd += ["--stages", ",".join(s for s in ALL_STAGES if s not in CAPTURE_ONLY)]
        self.children["worker"] = Child("worker", worker_cmd, env, cfg.log_dir() / "worker.log")
        for name in captures:
            self.children[name] = Child(
                name,
                [
                    sys.executable,
                    "-m",
                    "processors.worker",
                    "--bootstrap",
                    self.bootstrap,
                    "--stages",
                    ",".join(CAPTURE_ONLY),
                    "--through-owner",
                ],
                env,
                cfg.log_dir() / f"{name}.log",
            )
        self.children["gateway"] = Child(
            "gateway",
            [sys.executable, "-m", "processors.capture.gateway", "--bootstrap", self.bootstrap],
            env,
            cfg.log_dir() / "gateway.log",
        )
        self.children["web"] = Child(
            "web", [sys.executable, "-m", "processors.cli", "web"], env, cfg.log_dir() / "web.log"
        )
        try:
            self.children["worker"].start()
            if cfg.embedded_store and not wait_port("127.0.0.1", sql_port, READY_TIMEOUT_S):
                raise CloseloopError(
                    f"the worker did not come up; see {cfg.log_dir() / 'worker.log'}"
                )
            for name in captures:
                self.children[name].start()
            self.children["gateway"].start()
            if not wait_port(cfg.otlp.host, cfg.otlp.http_port, READY_TIMEOUT_S):
                raise CloseloopError(
                    f"the OTLP gateway did not come up; see {cfg.log_dir() / 'gateway.log'}"
                )
            self.children["web"].start()
            if not wait_port(cfg.web.host, cfg.web.port, READY_TIMEOUT_S):
                raise CloseloopError(
                    f"the review page did not come up; see {cfg.log_dir() / 'web.log'}"
                )
            web_file = cfg.run_dir() / "web.json"
            deadline = time.monotonic() + 5
            while not web_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.sql_url = f"http://127.0.0.1:{sql_port}"
            self._write_stack_file()
        except BaseException:
            self.stop()
            raise
        return self

    def _child_env(self, sql_port: int) -> dict[str, str]:
        cfg = self.cfg
        env = {k: v for k, v in os.environ.items()}
        env.update(
            {
                "CLOSELOOP_HOME": str(cfg.home_path),
                "CLOSELOOP_KAFKA": self.bootstrap,
                "CLOSELOOP_CLICKHOUSE_SQL_PORT": str(sql_port),
                "CLOSELOOP_OTLP_GRPC_PORT": str(cfg.otlp.grpc_port),
                "CLOSELOOP_OTLP_HTTP_PORT": str(cfg.otlp.http_port),
                "CLOSELOOP_WEB_PORT": str(cfg.web.port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.config_file:
            env["CLOSELOOP_CONFIG"] = str(Path(self.config_file).resolve())
        # the package must be importable by the children exactly as by this process
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent)]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        return env

    def _write_stack_file(self) -> None:
        cfg = self.cfg
        info = {
            "supervisor_pid": os.getpid(),
            "bootstrap": self.bootstrap,
            "broker_pid": self.broker.pid if self.broker else None,
            "broker_store_pid": self.broker_store.pid if self.broker_store else None,
            "children": {n: c.proc.pid for n, c in self.children.items() if c.proc},
            "otlp_grpc": f"{cfg.otlp.host}:{cfg.otlp.grpc_port}",
            "otlp_http": f"http://{cfg.otlp.host}:{cfg.otlp.http_port}",
            "sql": self.sql_url,
            "web": f"http://{cfg.web.host}:{cfg.web.port}",
            "clickhouse": cfg.clickhouse_dsn,
            "started_ns": time.time_ns(),
        }
        (cfg.run_dir() / "stack.json").write_text(json.dumps(info, indent=2))

    def supervise_once(self) -> None:
        """Restart children that died (called in the supervisor's loop)."""
        if self.broker_store is not None and not self.broker_store.alive():
            # its data is on disk and tansu retries its requests: a restart on the same port loses nothing
            log.warning("the broker's S3 server exited; restarting it")
            self.broker_store.start()
            self._write_stack_file()
        if (
            self.broker is not None
            and self.broker.proc is not None
            and self.broker.proc.poll() is not None
        ):
            raise BrokerError(
                f"the embedded broker exited (code {self.broker.proc.returncode}); "
                f"see {self.cfg.log_dir() / 'broker.log'}"
            )
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                child.restarts += 1
                log.warning(
                    "%s exited with code %s; restarting it (restart #%d)",
                    child.name,
                    code,
                    child.restarts,
                )
                child.stop()
                time.sleep(min(RESTART_BACKOFF_S * child.restarts, 30.0))
                child.start()
                self._write_stack_file()

    def stop(self) -> None:
        # the gateway first (nothing more is accepted), the store owner last
        order = [
            "gateway",
            "web",
            *(n for n in self.children if n.startswith("capture-")),
            "worker",
        ]
        for name in order:
            if name in self.children:
                self.children[name].stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.broker_store is not None:  # after the broker, which writes to it until it stops
            self.broker_store.stop()
            self.broker_store = None
        for f in ("stack.json", "sql.json"):
            (self.cfg.run_dir() / f).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_stack_file(cfg: Config) -> dict[str, object] | None:
    f = cfg.run_dir() / "stack.json"
    if not f.exists():
        return None
    try:
        info = json.loads(f.read_text())
    except ValueError:
        return None
    try:
        os.kill(int(info["supervisor_pid"]), 0)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return info
