"""The embedded stack: broker, worker (store owner + stages) and OTLP gateway, one process tree.

``closeloop up`` runs it in the foreground; ``closeloop demo`` and the e2e tests start it too.
Children are supervised: one that dies unexpectedly is restarted (with a back-off), and
stopping goes gateway → (on memory storage, capture storing what was acknowledged) → worker →
broker → the broker's storage, so nothing is accepted that cannot be written. A memory broker
grown past ``kafka.rotate_memory_mb`` is rotated: replaced by a new one once the stages have
consumed what it holds (:meth:`EmbeddedStack.rotate`).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from processors.config import Config
from processors.credentials import ensure_sql_credentials, load_sql_credentials
from processors.embedded.broker import (
    EmbeddedBroker,
    Record,
    consumer_lag,
    ensure_topics,
    port_in_use,
    produce,
    unconsumed,
)
from processors.embedded.httpd import HEALTH_PATH
from processors.embedded.procs import ManagedProcess, read_run_file, spawn
from processors.embedded.s3store import LocalS3
from processors.errors import CloseloopError
from processors.heartbeat import DUMP_SIGNAL, last_beat_ns, silent_past_limit
from processors.stages import ALL_STAGES, CAPTURE_ONLY, app_id
from processors.store import Store, connect_http, running_endpoint

log = logging.getLogger("closeloop.stack")

READY_TIMEOUT_S = 90.0
EXITED = "exited"  # what waiting for a child's ports returns when it exited instead
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


# a rotation put off (the stages did not catch up) is tried again this late, and the next one
# waits as long: the stages' rebuild (open and untagged conversations) refills a new broker, and
# a limit below what it refills would otherwise rotate it back to back
ROTATE_RETRY_S = 60.0
CRASH_LOOP_RESTARTS = 3  # this many restarts of one process ...
CRASH_LOOP_WINDOW_S = 300.0  # ... within this window is a crash loop (named by `closeloop status`)
MAX_BACKOFF_S = 30.0
# after asking a frozen worker for its threads' stacks: faulthandler writes them from its signal
# handler at once, once the process runs (a stopped one is continued first)
DUMP_WAIT_S = 1.0
# children that serve HTTP, and the port of theirs the supervisor asks HEALTH_PATH on: one that
# stops answering for worker.stall_timeout_s is frozen like a worker without heartbeats
PROBED = {"gateway": "otlp.http_port", "web": "web.port"}
PROBE_TIMEOUT_S = 1.0
ERROR_WORDS = re.compile(r"error|exception|fatal|panic|refused|denied|cannot", re.IGNORECASE)


# the ports the stack's children bind, and the variable that hands each to them
PORT_VARIABLES = {
    "clickhouse.sql_port": "CLOSELOOP_CLICKHOUSE_SQL_PORT",
    "otlp.grpc_port": "CLOSELOOP_OTLP_GRPC_PORT",
    "otlp.http_port": "CLOSELOOP_OTLP_HTTP_PORT",
    "web.port": "CLOSELOOP_WEB_PORT",
}
PUBLISHED = ("sql.json", "gateway.json", "web.json")  # what the children bound, in run/
PORT_FLAGS = {
    "otlp.grpc_port": "--otlp-grpc-port",
    "otlp.http_port": "--otlp-http-port",
    "web.port": "--web-port",
}


def _get(cfg: Config, dotted: str) -> int:
    section, key = dotted.split(".")
    return int(getattr(getattr(cfg, section), key))


def _set(cfg: Config, dotted: str, port: int) -> None:
    section, key = dotted.split(".")
    setattr(getattr(cfg, section), key, port)


def _host(cfg: Config, dotted: str) -> str:
    section = getattr(cfg, dotted.split(".")[0])
    return str(getattr(section, "host", "127.0.0.1"))


def _where(dotted: str) -> str:
    """Where a user chooses this port: the flag of `closeloop up`, the variable, the key."""
    flag = PORT_FLAGS.get(dotted)
    return " or ".join(([flag] if flag else []) + [PORT_VARIABLES[dotted], dotted])


def _stage(name: str) -> bool:
    """Whether the child ``name`` runs stages (the worker, a capture process)."""
    return name == "worker" or name.startswith("capture-")


def last_error_line(log_path: Path, tail_bytes: int = 16_384) -> str:
    """The last line of a log that reads like an error (else its last line), for status."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ERROR_WORDS.search(ln)]
    return (errors or lines or [""])[-1][:300]


@dataclass
class Health:
    """What the supervisor knows of one process's exits and restarts (in the stack file)."""

    restarts: int = 0
    restart_ns: list[int] = field(default_factory=list)  # within CRASH_LOOP_WINDOW_S
    last_code: int | None = None
    last_error: str = ""
    last_exit_ns: int = 0
    started_at: float = field(default_factory=time.monotonic)
    next_start: float = 0.0

    def recent(self, now_ns: int) -> int:
        self.restart_ns = [t for t in self.restart_ns if now_ns - t < CRASH_LOOP_WINDOW_S * 1e9]
        return len(self.restart_ns)

    def exited(self, code: int | None, error: str) -> None:
        """It died (or could not start): restart at once if it had run for longer than its
        back-off, else when the back-off (2 s doubling per recent restart) has passed."""
        self.last_code, self.last_error, self.last_exit_ns = code, error, time.time_ns()
        n = self.recent(time.time_ns())
        backoff = 0.0 if n == 0 else min(RESTART_BACKOFF_S * 2 ** (n - 1), MAX_BACKOFF_S)
        self.next_start = (
            self.started_at + backoff if code is not None else time.monotonic() + backoff
        )

    def delay_s(self) -> float:
        return max(0.0, self.next_start - time.monotonic())

    def due(self) -> bool:
        return time.monotonic() >= self.next_start

    def started(self) -> None:
        self.restarts += 1
        self.restart_ns.append(time.time_ns())
        self.started_at = time.monotonic()

    def restarted_for(self, reason: str) -> None:
        self.last_code, self.last_error, self.last_exit_ns = None, reason, time.time_ns()
        self.started()

    def to_json(self) -> dict[str, Any]:
        return {
            "restarts": self.restarts,
            "restart_ns": self.restart_ns,
            "last_exit_code": self.last_code,
            "last_error": self.last_error,
            "last_exit_ns": self.last_exit_ns,
        }


@dataclass
class Rotations:
    """The memory broker's planned restarts (``kafka.rotate_memory_mb``), for the stack file."""

    count: int = 0
    last_ns: int = 0
    last_reason: str = ""
    put_off_ns: int = 0  # the last rotation that did not happen, and why
    put_off_reason: str = ""
    next_try: float = 0.0  # monotonic: not before

    def to_json(self) -> dict[str, Any]:
        return {
            "rotations": self.count,
            "last_rotation_ns": self.last_ns,
            "last_rotation": self.last_reason,
            "rotation_put_off_ns": self.put_off_ns,
            "rotation_put_off": self.put_off_reason,
        }


@dataclass
class Child(ManagedProcess):
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    started_ns: int = field(default=0, init=False)  # monotonic: its heartbeat is judged from here
    STOP_TIMEOUT_S: ClassVar[float] = 20.0

    def start(self) -> Child:
        self.proc = spawn(self.argv, env=self.env, stdout=self._output(self.log_path))
        self.started_ns = time.monotonic_ns()
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
    health: dict[str, Health] = field(default_factory=dict)  # restarts and last exit per process
    answered: dict[str, int] = field(default_factory=dict)  # PROBED child -> its last answer (mono)
    rotations: Rotations = field(default_factory=Rotations)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EmbeddedStack:
        """Start broker, worker (store owner), capture processes, gateway and page, each child
        binding its ports itself and publishing what it got (``run/*.json``); the stack file
        and the printed endpoints say the ports bound, never the ports hoped for."""
        cfg = self.cfg
        (cfg.home_path / "logs").mkdir(parents=True, exist_ok=True)
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        for f in PUBLISHED:  # left by a stack that crashed: only what the new children bind counts
            (cfg.run_dir() / f).unlink(missing_ok=True)
        for f in cfg.run_dir().glob("heartbeat-*.json"):  # and only the new workers' heartbeats
            f.unlink(missing_ok=True)
        ensure_sql_credentials(cfg.run_dir())  # the SQL endpoint's users, before anyone needs them
        try:
            self._start_broker()
            ensure_topics(self.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
            self._make_children()
            if cfg.embedded_store:
                self._start_bound("worker", ("clickhouse.sql_port",), self._sql_port)
            else:
                self.children["worker"].start()
            for name in self.children:
                if name.startswith("capture-"):
                    self.children[name].start()
            self._start_bound("gateway", ("otlp.grpc_port", "otlp.http_port"), self._otlp_ports)
            self._start_bound("web", ("web.port",), self._web_port)
            self.sql_url = f"http://127.0.0.1:{cfg.clickhouse.sql_port}"
            self._write_stack_file()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_broker(self) -> None:
        cfg = self.cfg
        if cfg.kafka.bootstrap:
            self.bootstrap = cfg.kafka.bootstrap
            return
        self.broker = EmbeddedBroker(
            port=cfg.kafka.broker_port, log_dir=cfg.log_dir(), binary=cfg.kafka.tansu_binary
        )
        if cfg.kafka.storage == "s3":
            self.broker_store = LocalS3(
                cfg.home_path / "broker-s3", log_dir=cfg.log_dir(), fsync=cfg.kafka.storage_fsync
            ).start()
            self.broker.storage = self.broker_store.storage_url
            self.broker.env = self.broker_store.client_env()
        self.broker.start()
        self.bootstrap = self.broker.bootstrap

    def _make_children(self) -> None:
        cfg = self.cfg
        logs = cfg.log_dir()
        stages = [sys.executable, "-m", "processors.worker", "--bootstrap", self.bootstrap]
        captures = [f"capture-{i + 1}" for i in range(cfg.capture.processes)]
        worker = stages.copy()
        if captures:  # capture moves out of the worker into processes of its own
            worker += ["--stages", ",".join(s for s in ALL_STAGES if s not in CAPTURE_ONLY)]
        self.children["worker"] = Child("worker", worker, self._child_env(), logs / "worker.log")
        for name in captures:
            argv = stages + ["--stages", ",".join(CAPTURE_ONLY), "--through-owner"]
            self.children[name] = Child(name, argv, self._child_env(), logs / f"{name}.log")
        gateway = [
            sys.executable,
            "-m",
            "processors.capture.gateway",
            "--bootstrap",
            self.bootstrap,
        ]
        self.children["gateway"] = Child(
            "gateway", gateway, self._child_env(), logs / "gateway.log"
        )
        web = [sys.executable, "-m", "processors.cli", "web"]
        self.children["web"] = Child("web", web, self._child_env(), logs / "web.log")

    def _start_bound(
        self, name: str, keys: tuple[str, ...], bound: Callable[[], dict[str, int] | None]
    ) -> None:
        """Start child ``name``, which binds the ports ``keys`` (dotted config keys) and
        publishes them (``bound()`` reads them, None until then). A default port that is taken
        is replaced by a free one (0: the child's kernel picks); a port the user asked for is
        an error naming it and where to change it. Then every child (and a restart of this
        one) gets the ports bound."""
        cfg, child = self.cfg, self.children[name]
        wanted = {k: _get(cfg, k) for k in keys}
        for k, port in wanted.items():
            if port and not cfg.asked_for(k) and port_in_use(port, _host(cfg, k)):
                log.warning("%s port %d is taken; using a free one (%s)", k, port, _where(k))
                wanted[k] = 0
        for attempt in range(2):
            for k, port in wanted.items():
                child.env[PORT_VARIABLES[k]] = str(port)
            child.start()
            got = wait_for(lambda: bound() or (not child.alive() and EXITED), READY_TIMEOUT_S, 0.1)
            if isinstance(got, dict):
                break
            error = last_error_line(child.log_path)
            child.stop()
            if attempt == 0 and got is EXITED and not any(cfg.asked_for(k) for k in keys):
                # a default port was taken between our check and its bind: any free port will do
                log.warning("%s could not bind %s (%s); trying free ports", name, wanted, error)
                wanted = dict.fromkeys(keys, 0)
                continue
            asked = [f"{_get(cfg, k)} ({_where(k)})" for k in keys if cfg.asked_for(k)]
            raise CloseloopError(
                f"{name} did not come up"
                + (f" on the port(s) asked for: {', '.join(asked)}" if asked else "")
                + (f": {error}" if error else "")
                + f"; see {child.log_path}"
            )
        assert isinstance(got, dict)
        for k, port in got.items():
            _set(cfg, k, port)
            for c in self.children.values():
                c.env[PORT_VARIABLES[k]] = str(port)

    def _sql_port(self) -> dict[str, int] | None:
        url = running_endpoint(self.cfg)
        return {"clickhouse.sql_port": int(url.rsplit(":", 1)[1])} if url else None

    def _otlp_ports(self) -> dict[str, int] | None:
        info = read_run_file(self.cfg, "gateway.json")
        if info is None:
            return None
        return {"otlp.grpc_port": int(info["grpc_port"]), "otlp.http_port": int(info["http_port"])}

    def _web_port(self) -> dict[str, int] | None:
        info = read_run_file(self.cfg, "web.json")
        return {"web.port": int(str(info["url"]).rsplit(":", 1)[1])} if info else None

    def _child_env(self) -> dict[str, str]:
        cfg = self.cfg
        env = {k: v for k, v in os.environ.items()}
        env.update(
            {
                "CLOSELOOP_HOME": str(cfg.home_path),
                "CLOSELOOP_KAFKA": self.bootstrap,
                **{var: str(_get(cfg, key)) for key, var in PORT_VARIABLES.items()},
                "PYTHONUNBUFFERED": "1",
                "CLOSELOOP_SUPERVISOR_PID": str(os.getpid()),
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
            "processes": self._processes(),
            "otlp_grpc": f"{cfg.otlp.host}:{cfg.otlp.grpc_port}",
            "otlp_http": f"http://{cfg.otlp.host}:{cfg.otlp.http_port}",
            "sql": self.sql_url,
            "web": f"http://{cfg.web.host}:{cfg.web.port}",
            "clickhouse": cfg.clickhouse_dsn,
            "started_ns": time.time_ns(),
        }
        (cfg.run_dir() / "stack.json").write_text(json.dumps(info, indent=2))

    def _processes(self) -> dict[str, dict[str, Any]]:
        """Per process: pid, restarts, the last exit code and error line (`closeloop status`)."""
        procs: dict[str, ManagedProcess | None] = {
            "broker-s3": self.broker_store,
            "broker": self.broker,
            **self.children,
        }
        out = {
            name: {"pid": p.pid, **self.health.get(name, Health()).to_json()}
            for name, p in procs.items()
            if p is not None
        }
        if "broker" in out:
            out["broker"].update(self.rotations.to_json())
        return out

    @contextmanager
    def supervised(self, interval_s: float = 0.5) -> Iterator[None]:
        """Run :meth:`supervise_once` in a thread while the block runs (`closeloop demo`, whose
        main thread drives the agent); the thread outlives every child it restarts."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(interval_s):
                try:
                    self.supervise_once()
                except Exception:  # one failed round must not end supervision
                    log.exception("supervising the stack failed; trying again")

        thread = threading.Thread(target=loop, name="stack-supervisor", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def supervise_once(self) -> None:
        """Restart what died (called in the supervisor's loop): the broker's S3 server, the
        broker, then the children; each after a back-off that grows while it keeps crashing. A
        worker whose heartbeat stopped is killed first, and restarted as if it had crashed."""
        changed = False
        if self.broker_store is not None and not self.broker_store.alive():
            # its data is on disk and tansu retries its requests: a restart on the same port loses nothing
            changed |= self._restart("broker-s3", self.broker_store, "broker-s3.log")
        if self.broker is not None and not self.broker.alive():
            changed |= self._restart("broker", self.broker, "broker.log")
            if self.broker.alive():
                self._after_broker_restart()
        for child in self.children.values():
            frozen = self._frozen(child)
            if frozen:
                self._kill_frozen(child, frozen)
            if not child.alive():
                changed |= self._restart(child.name, child, child.log_path.name, frozen)
        changed |= self._rotate_if_due()
        if changed:
            self._write_stack_file()

    def _frozen(self, child: Child) -> str:
        """Why a running child counts as frozen: a worker (the stages, a capture process) whose
        event loop wrote no heartbeat, or the gateway or the page not answering
        :data:`HEALTH_PATH`, for ``worker.stall_timeout_s`` (before the first: for
        ``worker.start_timeout_s`` since its start); "" when it is not."""
        w, pid = self.cfg.worker, child.pid
        if pid is None or not child.alive():
            return ""
        if _stage(child.name):
            beat, what = last_beat_ns(self.cfg, pid), "heartbeat"
        elif child.name in PROBED and w.stall_timeout_s > 0:
            beat, what = self._probe(child.name), f"answer on {HEALTH_PATH}"
        else:
            return ""
        silent = silent_past_limit(
            time.monotonic_ns(), child.started_ns, beat, w.stall_timeout_s, w.start_timeout_s
        )
        return f"frozen (no {what} for {silent:.0f} s)" if silent is not None else ""

    def _probe(self, name: str) -> int | None:
        """Ask child ``name`` (:data:`PROBED`) for :data:`HEALTH_PATH`; the monotonic time of
        its last answer (any HTTP answer: it serves), None before its first."""
        key = PROBED[name]
        host = _host(self.cfg, key)
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        conn = http.client.HTTPConnection(host, _get(self.cfg, key), timeout=PROBE_TIMEOUT_S)
        try:
            conn.connect()
            # closed with a reset, not a FIN: a probe a second must not leave the child's port
            # in TIME_WAIT (a socket bound without SO_REUSEADDR could not take it for a minute)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # "close": the child ends the connection after its answer instead of waiting for
            # another request on it (the reset would then land in its read, logged as an error)
            conn.request("GET", HEALTH_PATH, headers={"Connection": "close"})
            with conn.getresponse() as answer:
                answer.read()
            self.answered[name] = time.monotonic_ns()
        except (OSError, http.client.HTTPException):
            pass  # not yet up, or frozen: its silence is measured from its last answer
        finally:
            conn.close()
        return self.answered.get(name)

    def _kill_frozen(self, child: Child, why: str) -> None:
        """Ask ``child`` for its threads' stacks (into its log), then SIGKILL it; the caller
        restarts it as a crash."""
        assert child.proc is not None
        log.error(
            "%s (pid %d) is %s: it is blocked or the process is stopped "
            "(worker.stall_timeout_s %.0f); its threads' stacks go to %s; killing it",
            child.name,
            child.proc.pid,
            why,
            self.cfg.worker.stall_timeout_s,
            child.log_path,
        )
        try:
            os.kill(child.proc.pid, DUMP_SIGNAL)
            os.kill(child.proc.pid, signal.SIGCONT)  # a stopped process dumps once continued
            time.sleep(DUMP_WAIT_S)
        except OSError:  # it died meanwhile: nothing to dump
            pass
        child.proc.kill()
        child.proc.wait()

    def _restart(self, name: str, proc: ManagedProcess, log_name: str, why: str = "") -> bool:
        """Record the exit of ``proc`` (if it just died; ``why`` when the supervisor knows
        better than its log) and start it again once its back-off has passed; True if anything
        changed."""
        health = self.health.setdefault(name, Health())
        log_path = self.cfg.log_dir() / log_name
        if proc.proc is not None:  # it just died
            health.exited(proc.proc.returncode, why or last_error_line(log_path))
            log.warning(
                "%s exited with code %s (%s); restarting it%s",
                name,
                health.last_code,
                health.last_error or "no error in its log",
                f" in {health.delay_s():.0f}s" if health.delay_s() >= 1 else "",
            )
            proc.stop()
        if not health.due():
            return False
        try:
            proc.start()
        except CloseloopError as e:  # e.g. the broker's port was taken meanwhile: try again later
            health.exited(None, str(e))
            log.error("%s could not be restarted: %s", name, e)
            return True
        health.started()
        return True

    def _after_broker_restart(self) -> None:
        """A broker restarted on memory storage has lost its topics, their changelogs and the
        consumer groups: create the topics again and restart the stages, which rebuild their
        state from the store of record (their checkpoints) rather than from a broker that
        forgot it. On s3 storage the broker kept everything: clients reconnect by themselves."""
        assert self.broker is not None
        ensure_topics(self.bootstrap, self.cfg.topics.all(), self.cfg.kafka.partitions)
        if not self.broker.storage.startswith("memory"):
            return
        for child in self.children.values():
            if _stage(child.name):
                log.warning(
                    "restarting %s: the broker lost its topics (memory storage)", child.name
                )
                child.stop()
                child.start()
                self.health.setdefault(child.name, Health()).restarted_for("the broker restarted")

    # -- broker rotation ---------------------------------------------------------------------
    def _rotate_if_due(self) -> bool:
        """Rotate the memory broker once its RSS passes ``kafka.rotate_memory_mb``; True if it
        was tried."""
        limit, broker = self.cfg.kafka.rotate_memory_mb, self.broker
        if not limit or broker is None or not broker.storage.startswith("memory"):
            return False
        if time.monotonic() < self.rotations.next_try or not broker.alive():
            return False
        rss = broker.rss_mb()
        if rss < limit:
            return False
        self.rotate(f"broker RSS {rss:.0f} MB over kafka.rotate_memory_mb {limit}")
        return True

    def rotate(self, why: str) -> bool:
        """Replace the memory broker (tansu frees nothing it was sent) without losing a record:
        pause the gateway's intake (503, Retry-After) until the stages have consumed what the
        broker holds (at most ``capture.drain_timeout_s``, else put off and tried again later);
        stop them; pause the intake again, carry what is unconsumed (what arrived while they
        stopped, what their last moments produced) over to a new broker on the same port,
        reopen the intake and start the stages, which rebuild their state as after a broker
        restart. True if the broker was replaced."""
        assert self.broker is not None
        log.warning("rotating the broker: %s", why)
        t0, old_pid = time.monotonic(), self.broker.pid
        with self._intake_paused() as paused:
            late = self._drain() if paused else "the gateway did not pause"
        if late:
            return self._put_off(why, late)
        paused_s = time.monotonic() - t0
        # the intake is open while the stages stop (seconds): what arrives meanwhile stays
        # unconsumed and is carried over
        stages = self._stage_children()
        for child in reversed(stages):  # capture processes first, the store owner last
            child.stop()
        t1 = time.monotonic()
        with self._intake_paused() as paused:
            carried = self._unconsumed() if paused else "the gateway did not pause"
            if isinstance(carried, list):
                self._replace_broker(carried)
        paused_s += time.monotonic() - t1
        for child in stages:
            child.start()
        if isinstance(carried, str):
            return self._put_off(why, carried)
        r = self.rotations
        r.count, r.last_ns, r.next_try = r.count + 1, time.time_ns(), t0 + ROTATE_RETRY_S
        r.last_reason = (
            f"{why}; pid {old_pid} -> {self.broker.pid}, intake paused {paused_s:.1f} s, "
            f"{len(carried)} unconsumed records carried over"
        )
        log.warning("broker rotated: %s", r.last_reason)
        return True

    def _drain(self) -> str:
        """Wait (at most ``capture.drain_timeout_s``) until the stages have consumed what
        nothing else rebuilds; why not, or "" when they have."""
        timeout, t0 = self.cfg.capture.drain_timeout_s, time.monotonic()
        try:
            left = self._wait_consumed(self._rotation_inputs(), timeout)
        except Exception as e:  # the Kafka client's own errors: the broker not answering
            return f"cannot read the consumer lag: {e}"
        if left:
            return f"{left} records not consumed within {timeout:.0f} s"
        log.info(
            "rotation: the stages consumed what the broker holds in %.1f s", time.monotonic() - t0
        )
        return ""

    def _unconsumed(self) -> list[Record] | str:
        """What the stopped stages left unconsumed of the topics nothing else rebuilds, or why
        it cannot be read."""
        try:
            return [
                r
                for group, topics in self._rotation_inputs().items()
                for r in unconsumed(self.bootstrap, group, topics)
            ]
        except Exception as e:  # BrokerError, or the Kafka client's own
            return f"cannot read what the stages left: {e}"

    def _replace_broker(self, carried: list[Record]) -> None:
        """A new broker on the same port, its topics, and ``carried`` written to them. A
        broker that does not start is restarted by the supervisor's next round."""
        assert self.broker is not None
        # no grace: what it holds that matters was read, and tansu may not exit on SIGTERM
        # while clients are connected
        self.broker.stop(timeout_s=0)
        try:
            self.broker.start()
            ensure_topics(self.bootstrap, self.cfg.topics.all(), self.cfg.kafka.partitions)
            produce(self.bootstrap, carried)
        except Exception as e:  # BrokerError, or the Kafka client's own
            log.error(
                "the new broker did not take the %d unconsumed records carried over (lost): %s",
                len(carried),
                e,
            )

    def _put_off(self, why: str, because: str) -> bool:
        r = self.rotations
        r.put_off_ns, r.next_try = time.time_ns(), time.monotonic() + ROTATE_RETRY_S
        r.put_off_reason = f"{why}: put off, {because}; trying again in {ROTATE_RETRY_S:.0f} s"
        log.warning("broker rotation %s", r.put_off_reason)
        return False

    def _stage_children(self) -> list[Child]:
        """The worker, then the capture processes (the order they start in)."""
        return [c for n, c in self.children.items() if _stage(n)]

    def _rotation_inputs(self) -> dict[str, list[str]]:
        """Per consumer group, the topics whose unconsumed records nothing else could rebuild:
        the OTLP topics (acknowledged spans) and the inputs of diagnose and act. Assemble's and
        understand's inputs are left out: capture stores every turn record in ``turn_records``
        before sending it, and assemble rebuilds from there every conversation not yet tagged,
        so carrying them over would tag such a conversation twice (and assemble's timer ticks
        keep its input's lag above 0 anyway)."""
        t = self.cfg.topics
        otlp, later = [t.otlp_spans, t.otlp_logs], [t.tags]
        if self.cfg.act.repo:  # act runs only with a repository to propose changes to
            later.append(t.diagnoses)
        if self.cfg.capture.processes:
            return {app_id(CAPTURE_ONLY): otlp, app_id(ALL_STAGES): later}
        return {app_id(ALL_STAGES): otlp + later}

    @contextmanager
    def _intake_paused(self) -> Iterator[bool]:
        """Pause the gateway's intake for the block; yields whether it confirmed that the
        broker acknowledged all it accepted (a gateway that is not running accepts nothing)."""
        gateway = self.children.get("gateway")
        pid = gateway.pid if gateway is not None and gateway.alive() else None
        if pid is None or read_run_file(self.cfg, "gateway.json") is None:
            yield pid is None  # one starting may accept any moment
            return

        def paused() -> Any:
            return (read_run_file(self.cfg, "gateway.json") or {}).get("paused")

        # a pause just lifted must show first, so that "paused" is read from this pause
        wait_for(lambda: paused() is False, 2.0, 0.05)
        os.kill(pid, signal.SIGUSR1)
        try:
            yield bool(wait_for(paused, self.cfg.otlp.ack_timeout_s + 5.0, 0.05))
        finally:
            if gateway is not None and gateway.pid == pid:
                os.kill(pid, signal.SIGUSR2)

    def _wait_consumed(self, inputs: dict[str, list[str]], timeout_s: float) -> int:
        """Wait (at most ``timeout_s``) until every consumer group of ``inputs`` has consumed
        its topics; the records left (0: all consumed)."""
        lag: list[int] = []

        def consumed() -> bool:
            lag[:] = [sum(consumer_lag(self.bootstrap, g, ts) for g, ts in inputs.items())]
            return lag[0] == 0

        wait_for(consumed, timeout_s, 0.1)  # a reading takes ~0.5 s (true end offsets)
        return lag[0] if lag else -1

    def stop(self) -> None:
        # the gateway first (nothing more is accepted), the store owner last
        self._stop_children(["gateway", "web"])
        self._drain_capture()
        self._stop_children([*(n for n in self.children if n.startswith("capture-")), "worker"])
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.broker_store is not None:  # after the broker, which writes to it until it stops
            self.broker_store.stop()
            self.broker_store = None
        for f in ("stack.json", *PUBLISHED):
            (self.cfg.run_dir() / f).unlink(missing_ok=True)

    def _stop_children(self, names: list[str]) -> None:
        for name in names:
            if name in self.children:
                self.children[name].stop()

    def _drain_capture(self) -> None:
        """On memory storage the topics die with the broker: before capture stops, wait (at most
        ``capture.drain_timeout_s``) until it has stored every span the gateway acknowledged.
        Open conversations need no wait: assemble rebuilds them from ``turn_records``."""
        if self.broker is None or not self.broker.storage.startswith("memory"):
            return
        capturing = self._stage_children()
        if not capturing or not all(c.alive() for c in capturing):
            return  # a dead capture stores nothing: waiting would only delay the stop
        group = app_id(CAPTURE_ONLY if self.cfg.capture.processes else ALL_STAGES)
        topics = [self.cfg.topics.otlp_spans, self.cfg.topics.otlp_logs]
        try:
            left = self._wait_consumed({group: topics}, self.cfg.capture.drain_timeout_s)
            if left:
                log.warning(
                    "stopping with %d acknowledged OTLP records capture has not stored: they are "
                    "lost with memory storage (capture.drain_timeout_s %.0f s)",
                    left,
                    self.cfg.capture.drain_timeout_s,
                )
        except Exception as e:  # the broker not answering: nothing to wait for
            log.warning("stopping without waiting for capture: cannot read its lag: %s", e)

    def sql_store(self, *, read_only: bool = False) -> Store:
        """The store through the running stack's SQL endpoint, as the stages' writer or (with
        ``read_only``) as the reader."""
        creds = load_sql_credentials(self.cfg.run_dir())
        return connect_http(self.sql_url, creds.reader if read_only else creds.writer)

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
