"""The ``closeloop`` command line (the names are the user's interface: keep them)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from typing import Any

from processors.config import Config, config_for
from processors.credentials import sql_credentials_path
from processors.errors import CloseloopError

log = logging.getLogger("closeloop")


def _config(a: argparse.Namespace, **extra: Any) -> Config:
    return config_for(getattr(a, "config", None), getattr(a, "home", None), **extra)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="closeloop.yaml (default: CLOSELOOP_CONFIG, else <home>/closeloop.yaml, "
        "else ./closeloop.yaml, if present)",
    )
    p.add_argument("--home", help="state directory (default: ./.closeloop, or CLOSELOOP_HOME)")


# -- up --------------------------------------------------------------------------------------
def cmd_up(a: argparse.Namespace) -> int:
    from processors.embedded.stack import EmbeddedStack

    cfg = _config(
        a,
        **{
            "otlp.grpc_port": a.otlp_grpc_port,
            "otlp.http_port": a.otlp_http_port,
            "web.port": a.web_port,
        },
    )
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    print(f"closeloop: starting the embedded stack in {cfg.home_path} ...", flush=True)
    # a signal during the start raises (main's handler), and the start stops what it started
    stack = EmbeddedStack(cfg, config_file=a.config).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print_endpoints(stack)
        while not stopping:
            stack.supervise_once()
            time.sleep(0.5)
    finally:
        print("closeloop: stopping ...", flush=True)
        stack.stop()
        print("closeloop: stopped", flush=True)
    return 0


def _login_url(cfg: Config) -> str:
    try:
        return str(json.loads((cfg.run_dir() / "web.json").read_text())["login_url"])
    except (OSError, ValueError, KeyError):
        return f"http://{cfg.web.host}:{cfg.web.port}/  (token in {cfg.run_dir() / 'web-token'})"


def print_endpoints(stack: Any) -> None:
    cfg = stack.cfg
    rows = [
        ("OTLP gRPC", f"{cfg.otlp.host}:{cfg.otlp.grpc_port}"),
        ("OTLP HTTP", f"http://{cfg.otlp.host}:{cfg.otlp.http_port}  (/v1/traces, /v1/logs)"),
        ("Kafka", stack.bootstrap + ("  (embedded tansu)" if stack.broker else "")),
        ("ClickHouse", cfg.clickhouse_dsn),
        (
            "SQL (HTTP)",
            stack.sql_url + "  (ClickHouse HTTP interface; `closeloop sql` uses it; "
            f"users in {sql_credentials_path(cfg.run_dir())})",
        ),
        ("Review page", _login_url(cfg)),
        ("Logs", str(cfg.log_dir())),
    ]
    width = max(len(k) for k, _ in rows)
    print("closeloop is up:")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(
        f"Point an OTel SDK at it: OTEL_EXPORTER_OTLP_ENDPOINT=http://{cfg.otlp.host}:{cfg.otlp.http_port}"
        "   (Ctrl-C stops)",
        flush=True,
    )


# -- status ----------------------------------------------------------------------------------
def cmd_status(a: argparse.Namespace) -> int:
    from processors.embedded.stack import read_stack_file
    from processors.status import collect_status, format_status

    cfg = _config(a)
    info = read_stack_file(cfg)
    st = collect_status(cfg, info)
    if a.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_status(st))
    return 0


def cmd_health(a: argparse.Namespace) -> int:
    """Exit 0 when the home's workers write heartbeats within ``worker.stall_timeout_s`` (a
    liveness probe beside `closeloop worker`); 1, saying which, when one is silent or none
    runs."""
    from processors.heartbeat import health

    cfg = _config(a)
    ok, frozen = health(cfg, time.monotonic_ns())
    for line in ok + frozen:
        print(line)
    if not ok and not frozen:
        print(f"no worker heartbeat in {cfg.run_dir()} (none running, or still starting)")
    return 0 if ok and not frozen else 1


# -- sql / migrate ---------------------------------------------------------------------------
DEFAULT_SQL_FORMAT = "PrettyCompactMonoBlock"
# A trailing ``FORMAT <name>`` clause (the driver names the format itself, so it is taken out
# of the query and passed on).
_FORMAT_CLAUSE = re.compile(r"\s+FORMAT\s+([A-Za-z][A-Za-z0-9]*)\s*;?\s*$", re.IGNORECASE)


def split_format(query: str, option: str | None) -> tuple[str, str]:
    """``(query without its FORMAT clause, output format)``; the clause or ``--format``."""
    m = _FORMAT_CLAUSE.search(query)
    if not m:
        return query, option or DEFAULT_SQL_FORMAT
    if option and option.lower() != m.group(1).lower():
        raise CloseloopError(
            f"the query says FORMAT {m.group(1)} and --format says {option}: give one"
        )
    return query[: m.start()], m.group(1)


def cmd_sql(a: argparse.Namespace) -> int:
    from processors.store import open_store

    cfg = _config(a)
    query, fmt = split_format(a.query, a.format)
    store = open_store(cfg, read_only=True)
    try:
        out = store.raw(query, fmt=fmt)
    finally:
        store.close()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0


def cmd_migrate(a: argparse.Namespace) -> int:
    from processors.store import open_store

    cfg = _config(a)
    store = open_store(cfg, migrate=False)
    try:
        applied = store.migrate()
    finally:
        store.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    from processors import worker

    argv = []
    for flag in ("config", "home", "bootstrap", "stages"):
        v = getattr(a, flag, None)
        if v:
            argv += [f"--{flag}", v]
    worker.main(argv)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("closeloop")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="closeloop",
        description="closeloop: capture, understand, diagnose, "
        "act and review — the loop under a self-improving agent.",
    )
    p.add_argument("--version", action="version", version=f"closeloop {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start the embedded stack (broker, OTLP gateway, workers, store, page)"
    )
    _common(up)
    up.add_argument("--otlp-grpc-port", type=int, help="OTLP gRPC port (default: otlp.grpc_port)")
    up.add_argument("--otlp-http-port", type=int, help="OTLP HTTP port (default: otlp.http_port)")
    up.add_argument("--web-port", type=int, help="review page port (default: web.port)")
    up.set_defaults(fn=cmd_up)

    st = sub.add_parser(
        "status", help="what runs, topic offsets and lag, dead letters, rows per table"
    )
    _common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=cmd_status)

    hl = sub.add_parser(
        "health",
        help="exit 0 if the workers' event loops answer (heartbeats within "
        "worker.stall_timeout_s): a liveness probe",
    )
    _common(hl)
    hl.set_defaults(fn=cmd_health)

    sq = sub.add_parser("sql", help="run a query on the store (through the running stack if any)")
    _common(sq)
    sq.add_argument("query", help="SQL; a trailing FORMAT clause chooses the output format")
    sq.add_argument("--format", help=f"ClickHouse output format (default: {DEFAULT_SQL_FORMAT})")
    sq.set_defaults(fn=cmd_sql)

    mg = sub.add_parser("migrate", help="apply schemas/*.sql to the configured ClickHouse")
    _common(mg)
    mg.set_defaults(fn=cmd_migrate)

    wk = sub.add_parser("worker", help="run the stage processors (one faust worker)")
    _common(wk)
    wk.add_argument("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap)")
    wk.add_argument("--stages", help="comma-separated stages to run (default: all; e.g. capture)")
    wk.set_defaults(fn=cmd_worker)

    from processors import commands

    commands.register(sub, _common)

    dm = sub.add_parser("demo", help="run the whole loop on the embedded stack with the demo agent")
    _common(dm)
    dm.add_argument(
        "--approve-as", help="approve proposals non-interactively as this person (recorded)"
    )
    dm.add_argument(
        "--conversations", type=int, default=600, help="conversations per cycle (default 600)"
    )
    dm.add_argument(
        "--seed", type=int, default=1, help="seed of the demo's simulated users (default 1)"
    )
    dm.set_defaults(fn=_lazy("processors.demo:cmd_demo"))
    return p


def _lazy(fn_name: str) -> Any:
    def run(a: argparse.Namespace) -> int:
        import importlib

        mod, fn = fn_name.rsplit(":", 1)
        return int(getattr(importlib.import_module(mod), fn)(a) or 0)

    return run


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that ``finally`` blocks stop its children."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # commands that start children (demo) stop them on SIGTERM as on Ctrl-C; `up` has its own
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = args.fn(args)
    except CloseloopError as e:
        print(f"closeloop {args.command}: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except Terminated:
        code = 143
    sys.exit(code)


if __name__ == "__main__":
    main()
