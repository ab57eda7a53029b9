"""The supervisor of `closeloop up`: a crashed broker is restarted (the stack does not exit),
and `closeloop status` tells restarts, the last exit, and a crash loop with its error line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.worker_proc import REPO, alive, wait_for

from .test_process_tree import stack_env, start


def status(home: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "processors.cli", "status", "--home", str(home), "--json"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
        cwd=home.parent,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stack_file(home: Path) -> dict[str, Any]:
    return json.loads((home / "run" / "stack.json").read_text())


def export_answer(url: str) -> int:
    """The status of an empty (valid) OTLP/HTTP export, 0 when nothing answers."""
    req = urllib.request.Request(
        f"{url}/v1/traces", data=b"", headers={"Content-Type": "application/x-protobuf"}
    )
    try:
        return urllib.request.urlopen(req, timeout=15).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_a_crashed_broker_is_restarted_and_the_stack_serves_on(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = start(["up"], home, tmp_path / "up.log")
    try:
        info = stack_file(home)
        assert export_answer(info["otlp_http"]) == 200
        os.kill(info["broker_pid"], signal.SIGKILL)
        assert wait_for(
            lambda: (
                stack_file(home)["processes"]["broker"]["restarts"] >= 1 or up.poll() is not None
            ),
            60,
        )
        assert up.poll() is None, (tmp_path / "up.log").read_text()  # not BrokerError and exit
        after = stack_file(home)
        assert after["broker_pid"] != info["broker_pid"] and alive(after["broker_pid"])
        assert after["bootstrap"] == info["bootstrap"]  # same port: clients reconnect
        # memory storage lost the topics: the stages were restarted to rebuild from the store
        assert after["processes"]["worker"]["restarts"] >= 1
        assert wait_for(lambda: export_answer(info["otlp_http"]) == 200, 60)
        st = status(home)
        broker = st["processes"]["broker"]
        assert broker["alive"] and broker["restarts"] == 1
        assert broker["last_exit_code"] == -signal.SIGKILL
        assert not broker["crash_loop"]
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(90)
    assert up.returncode == 0


def test_a_crash_loop_is_named_in_status_with_its_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = start(["up"], home, tmp_path / "up.log")
    blocker = socket.socket()
    try:
        info = stack_file(home)
        web_port = int(info["web"].rsplit(":", 1)[1])
        os.kill(info["children"]["web"], signal.SIGKILL)
        # hold the review page's port: every restart of it fails the same way
        assert wait_for(lambda: hold_port(blocker, web_port), 30), "the port was not released"
        assert wait_for(lambda: status(home)["processes"]["web"]["crash_loop"], 180), status(home)
        st = status(home)
        web = st["processes"]["web"]
        assert web["restarts"] >= 3 and web["last_exit_code"] not in (None, 0)
        assert "already in use" in web["last_error"].lower(), web["last_error"]
        assert st["deadletters"] == 0  # counted: the store is reachable while the page loops
        text = subprocess.run(
            [sys.executable, "-m", "processors.cli", "status", "--home", str(home)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert "CRASH LOOP" in text and "already in use" in text.lower(), text
        assert "dead letters: 0" in text, text
        blocker.close()  # the cause goes away: the page comes back by itself
        assert wait_for(lambda: status(home)["processes"]["web"]["alive"], 120)
    finally:
        blocker.close()
        up.send_signal(signal.SIGTERM)
        up.wait(90)


def hold_port(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return True
    except OSError:
        return False


def test_status_with_nothing_running_says_how_to_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    text = subprocess.run(
        [sys.executable, "-m", "processors.cli", "status", "--home", str(home)],
        env={**stack_env(home), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    ).stdout
    assert "not running" in text and f"closeloop up --home {home}" in text, text
