"""The process tree of the embedded stack: whatever happens to the parent (`closeloop up`,
`closeloop demo`), no child is left running with its ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from processors.embedded.broker import free_port
from tests.integration.worker_proc import REPO, alive, wait_for


def stack_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CLOSELOOP_HOME": str(home),
        "CLOSELOOP_OTLP_GRPC_PORT": str(free_port()),
        "CLOSELOOP_OTLP_HTTP_PORT": str(free_port()),
        "CLOSELOOP_WEB_PORT": str(free_port()),
        "CLOSELOOP_CLICKHOUSE_SQL_PORT": "0",
    }


def start(args: list[str], home: Path, log: Path) -> subprocess.Popen[bytes]:
    """A ``closeloop`` command as a user runs it, once its stack file is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "processors.cli", *args, "--home", str(home)],
        env=stack_env(home),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=home.parent,
    )
    stack_file = home / "run" / "stack.json"
    assert wait_for(lambda: stack_file.exists() or proc.poll() is not None, 240), log.read_text()
    assert proc.poll() is None, log.read_text()
    return proc


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, grandchildren), from /proc."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def tree_of(proc: subprocess.Popen[bytes], home: Path) -> set[int]:
    info = json.loads((home / "run" / "stack.json").read_text())
    pids = descendants(proc.pid)
    # what the stack file names is part of the tree (the broker, every child)
    assert {info["broker_pid"], *info["children"].values()} <= pids, (info, pids)
    return pids


def test_up_killed_with_sigkill_leaves_no_child(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = start(["up"], home, tmp_path / "up.log")
    pids = tree_of(up, home)
    up.kill()  # a crash of the supervisor: no finally block runs
    up.wait()
    assert wait_for(lambda: not any(alive(p) for p in pids), 60), [p for p in pids if alive(p)]


def test_demo_stopped_with_sigterm_leaves_no_child(tmp_path: Path) -> None:
    home = tmp_path / "home"
    demo = start(
        ["demo", "--approve-as", "tester", "--conversations", "40"], home, tmp_path / "d.log"
    )
    pids = tree_of(demo, home)
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(120) == 143, (tmp_path / "d.log").read_text()
    assert wait_for(lambda: not any(alive(p) for p in pids), 60), [p for p in pids if alive(p)]
    assert not (home / "run" / "stack.json").exists()  # it stopped its stack, not just died


def test_demo_killed_with_sigkill_leaves_no_child(tmp_path: Path) -> None:
    home = tmp_path / "home"
    demo = start(
        ["demo", "--approve-as", "tester", "--conversations", "40"], home, tmp_path / "d.log"
    )
    pids = tree_of(demo, home)
    demo.kill()
    demo.wait()
    assert wait_for(lambda: not any(alive(p) for p in pids), 60), [p for p in pids if alive(p)]
