"""Ports: the stack binds first and publishes what it got. A taken default port is replaced by
a free one; a taken port the user asked for is a clear error naming it and the flag."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from processors.config import DEFAULT_OTLP_HTTP_PORT
from processors.embedded.broker import free_port, port_in_use
from tests.integration.worker_proc import REPO, wait_for

from .test_supervisor import export_answer, hold_port, stack_file, status


def default_env(home: Path) -> dict[str, str]:
    """No port set anywhere: every port is a default the stack may replace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    return {**env, "PYTHONPATH": str(REPO), "CLOSELOOP_HOME": str(home)}


def up(home: Path, *flags: str) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "processors.cli", "up", "--home", str(home), *flags],
        env=default_env(home),
        stdout=open(home.parent / f"{home.name}.log", "wb"),
        stderr=subprocess.STDOUT,
        cwd=home.parent,
    )


def started(home: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``closeloop up`` wrote its stack file (or exited: a failure with its log)."""
    assert wait_for(lambda: (home / "run" / "stack.json").exists() or proc.poll() is not None, 240)
    assert proc.poll() is None, (home.parent / f"{home.name}.log").read_text()


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(120)


def test_two_stacks_started_at_once_both_serve_on_the_ports_they_publish(tmp_path: Path) -> None:
    homes = [tmp_path / "a", tmp_path / "b"]
    procs = [up(h) for h in homes]  # the same default ports, at the same moment
    try:
        for h, p in zip(homes, procs, strict=True):
            started(h, p)
        a, b = (stack_file(h) for h in homes)
        for key in ("otlp_grpc", "otlp_http", "sql", "web"):
            assert a[key] != b[key], key
        for h, info in zip(homes, (a, b), strict=True):
            assert export_answer(info["otlp_http"]) == 200
            st = status(h)
            assert st["deadletters"] == 0 and "spans" in st["tables"], st  # its own store
            assert st["endpoints"]["otlp_http"] == info["otlp_http"]
            printed = (h.parent / f"{h.name}.log").read_text()
            assert info["otlp_http"] in printed and info["sql"] in printed, printed
    finally:
        stop(*procs)


def test_a_taken_default_port_is_replaced_by_a_free_one(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a TIME_WAIT
    if not hold_port(blocker, DEFAULT_OTLP_HTTP_PORT):
        assert port_in_use(DEFAULT_OTLP_HTTP_PORT)  # something else listens there: taken anyway
    home = tmp_path / "home"
    proc = up(home)
    try:
        started(home, proc)
        info = stack_file(home)
        assert not info["otlp_http"].endswith(f":{DEFAULT_OTLP_HTTP_PORT}")
        assert export_answer(info["otlp_http"]) == 200
        assert "taken; using a free one" in (tmp_path / "home.log").read_text()
    finally:
        blocker.close()
        stop(proc)


def test_a_taken_port_the_user_asked_for_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        home = tmp_path / "home"
        proc = up(home, "--otlp-http-port", str(port))
        try:
            proc.wait(180)  # an exit, not a retry loop
        finally:
            stop(proc)
    out = (tmp_path / "home.log").read_text()
    assert proc.returncode == 2, out
    assert str(port) in out and "--otlp-http-port" in out and "CLOSELOOP_OTLP_HTTP_PORT" in out, out
    assert not (home / "run" / "stack.json").exists()
