"""``closeloop worker``: one faust worker running the stages, and (embedded) the store owner.

In the embedded stack this process owns the chDB store: it applies the migrations, serves
the store on the local ClickHouse-compatible HTTP endpoint (so ``closeloop sql``, Grafana
and the other processes read the live data) and writes every stage's rows directly.
Against a ClickHouse server, any number of workers run side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import faust
import mode

from processors.app import build_app
from processors.config import Config, config_for
from processors.credentials import ensure_sql_credentials, load_sql_credentials
from processors.embedded.procs import exit_when_orphaned, write_run_file
from processors.embedded.sqlserver import SqlLimits, SQLServer
from processors.errors import StoreError
from processors.heartbeat import HEARTBEAT_INTERVAL_S, heartbeat_name, prepare
from processors.runtime import Pipeline
from processors.stages import ALL_STAGES
from processors.store import Store, connect_http, open_store

log = logging.getLogger("closeloop.worker")
# after the stack's supervisor died: time for a clean stop (SIGTERM from the parent-death signal)
ORPHAN_GRACE_S = 30.0


def serve_store(cfg: Config, store: Store) -> SQLServer | None:
    """Embedded store: serve it on loopback and say where (run/sql.json)."""
    if not cfg.embedded_store:
        return None
    ch = cfg.clickhouse
    limits = SqlLimits(
        ch.sql_max_body_bytes,
        ch.sql_max_query_bytes,
        ch.sql_max_execution_s,
        ch.sql_max_memory_bytes,
    )
    creds = ensure_sql_credentials(cfg.run_dir())
    server = SQLServer(store, creds, "127.0.0.1", ch.sql_port, limits).start()
    write_run_file(cfg.run_dir(), "sql.json", {"url": server.url})
    return server


class Heartbeat(mode.Service):  # type: ignore[misc]  # mode is untyped
    """The worker's heartbeat (:mod:`processors.heartbeat`): a timer on the event loop, started
    with the faust worker before the app (so before its recovery). Its file stays while the
    worker stops: a stop gets ``worker.stall_timeout_s`` before it counts as frozen."""

    def __init__(self, run_dir: Path, **kwargs: Any) -> None:
        self.run_dir = run_dir
        self.failing = False  # said once, not every second
        super().__init__(**kwargs)

    @mode.Service.timer(HEARTBEAT_INTERVAL_S)  # type: ignore[misc]
    async def _beat(self) -> None:
        name = heartbeat_name(os.getpid())
        beat = {"mono_ns": time.monotonic_ns(), "ts_ns": time.time_ns()}
        try:
            write_run_file(self.run_dir, name, beat)
            self.failing = False
        except OSError as e:
            # a full disk: a worker waiting for the store is not frozen; touching the file
            # takes no space and says the same (processors.heartbeat.last_beat_ns)
            with contextlib.suppress(OSError):
                os.utime(self.run_dir / name)
            if not self.failing:
                log.warning("heartbeat not written in %s (touched instead): %s", self.run_dir, e)
            self.failing = True


def owner_endpoint(cfg: Config, timeout_s: float = 60.0) -> Store:
    """The embedded store through its owner's SQL endpoint, waiting for the owner to come up
    (never the chDB files themselves: only the owner may open them)."""
    url = f"http://127.0.0.1:{cfg.clickhouse.sql_port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return connect_http(url, load_sql_credentials(cfg.run_dir()).writer)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_worker(
    cfg: Config,
    bootstrap: str,
    stages: tuple[str, ...] = ALL_STAGES,
    *,
    through_owner: bool = False,
) -> None:
    """Run ``stages``; with ``through_owner`` (the capture processes of `closeloop up`) write
    through the embedded store's owner instead of owning and serving the store."""
    cfg.home_path.mkdir(parents=True, exist_ok=True)
    prepare(cfg.run_dir())
    sql = None
    if through_owner and cfg.embedded_store:
        store = owner_endpoint(cfg)
    else:
        store = open_store(cfg, owner=True)
        applied = store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        sql = serve_store(cfg, store)
    pipe = Pipeline(cfg=cfg, store=store, stages=stages, bootstrap=bootstrap)
    app = build_app(pipe, bootstrap)
    worker = faust.Worker(
        app,
        Heartbeat(cfg.run_dir()),
        loglevel="WARN",
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    finally:
        (cfg.run_dir() / heartbeat_name(os.getpid())).unlink(missing_ok=True)
        if pipe.llm is not None:  # waiting LLM items are dropped (their deterministic rows stand)
            pipe.llm.close()
        if sql is not None:
            sql.stop()
            (cfg.run_dir() / "sql.json").unlink(missing_ok=True)
        store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="closeloop worker", description=__doc__)
    p.add_argument("--config", help="closeloop.yaml (default: ./closeloop.yaml if present)")
    p.add_argument("--home", help="state directory (default ./.closeloop)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap)")
    p.add_argument(
        "--stages",
        default=",".join(ALL_STAGES),
        help=f"comma-separated stages to run (default: all: {','.join(ALL_STAGES)})",
    )
    p.add_argument(
        "--through-owner",
        action="store_true",
        help="write through the running embedded store's owner (capture processes of `closeloop up`)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = config_for(a.config, a.home)
    bootstrap = a.bootstrap or cfg.kafka.bootstrap
    if not bootstrap:
        raise SystemExit(
            "closeloop worker: no Kafka to read from; pass --bootstrap HOST:PORT or set CLOSELOOP_KAFKA"
        )
    exit_when_orphaned(ORPHAN_GRACE_S)
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip())
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        raise SystemExit(
            f"closeloop worker: unknown stages {sorted(unknown)}; known: {', '.join(ALL_STAGES)}"
        )
    run_worker(cfg, bootstrap, stages, through_owner=a.through_owner)


if __name__ == "__main__":
    main()
