"""Run `closeloop worker` as a real process against the test broker (kill -9 included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from processors.credentials import load_sql_credentials
from processors.embedded.procs import stop_process
from processors.embedded.stack import wait_for, wait_port  # noqa: F401 (wait_for: used by the tests)
from processors.store import Store, connect_http

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(
        self, home: Path, bootstrap: str, stages: str, env: dict[str, str] | None = None
    ) -> None:
        self.home = home
        self.bootstrap = bootstrap
        self.stages = stages
        self.env = {
            **os.environ,
            "CLOSELOOP_HOME": str(home),
            "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "worker.log"

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        sql = self.home / "run" / "sql.json"
        sql.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processors.worker",
                "--bootstrap",
                self.bootstrap,
                "--stages",
                self.stages,
            ],
            env=self.env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if sql.exists():
                url = json.loads(sql.read_text())["url"]
                port = int(url.rsplit(":", 1)[1])
                if wait_port("127.0.0.1", port, 5):
                    self.url = url
                    return self
            time.sleep(0.1)
        raise RuntimeError(
            "worker did not serve its store in time:\n" + self.log.read_text()[-3000:]
        )

    def store(self) -> Store:
        return connect_http(self.url, load_sql_credentials(self.home / "run").writer)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 30)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
