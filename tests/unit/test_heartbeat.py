"""The frozen-worker decision (pure, the time passed in) and `closeloop health` over real
heartbeat files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processors.cli import build_parser
from processors.config import load_config
from processors.embedded.procs import write_run_file
from processors.heartbeat import health, heartbeat_name, last_beat_ns, silent_past_limit
from processors.status import format_process

S = 1_000_000_000
STALL, START = 60.0, 300.0


@pytest.mark.parametrize(
    "now, started, beat, silent",
    [
        (100, 0, 50, None),  # a beat 50 s ago: under the stall limit
        (100, 0, 30, 70.0),  # 70 s ago: frozen
        (100, 0, None, None),  # no beat yet, 100 s after the start: still starting
        (400, 0, None, 400.0),  # no beat 400 s after the start: frozen while starting
        # a beat from before this start (an earlier process's) counts as none: 300 s after
        # the start is not past the start limit, 301 s is
        (400, 100, 50, None),
        (401, 100, 50, 301.0),
        (1000, 0, 999, None),  # a worker that answers stays
    ],
)
def test_silence_past_its_limit_is_frozen(
    now: int, started: int, beat: int | None, silent: float | None
) -> None:
    got = silent_past_limit(now * S, started * S, None if beat is None else beat * S, STALL, START)
    assert got == silent


def test_a_stall_limit_of_zero_turns_the_watch_off() -> None:
    assert silent_past_limit(10_000 * S, 0, None, 0, 0) is None
    assert silent_past_limit(10_000 * S, 0, 1 * S, 0, 0) is None


def test_health_names_a_silent_worker_and_passes_an_answering_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path)})  # stall limit 60 s
    args = build_parser().parse_args(["health", "--home", str(tmp_path)])
    run, now = cfg.run_dir(), time.monotonic_ns()
    assert health(cfg, now) == ([], [])
    assert args.fn(args) == 1  # nothing runs: not healthy
    assert "no worker heartbeat" in capsys.readouterr().out

    beat = {"mono_ns": now - 5 * S, "ts_ns": time.time_ns()}
    write_run_file(run, heartbeat_name(os.getpid()), beat)  # this process: alive
    ok, frozen = health(cfg, now)
    assert len(ok) == 1 and str(os.getpid()) in ok[0] and frozen == []
    assert args.fn(args) == 0

    write_run_file(run, heartbeat_name(os.getpid()), {**beat, "mono_ns": now - 90 * S})
    ok, frozen = health(cfg, now)
    assert ok == [] and "90 s ago" in frozen[0] and "frozen" in frozen[0]
    assert args.fn(args) == 1


def test_health_ignores_the_heartbeat_of_a_dead_worker(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path)})
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / heartbeat_name(pid)).write_text(f'{{"pid": {pid}, "mono_ns": 0}}')
    assert health(cfg, time.monotonic_ns()) == ([], [])


def test_status_shows_a_worker_silent_under_the_limit() -> None:
    now = time.time_ns()
    quiet = {"pid": 7, "alive": True, "silent_s": 2.0}
    assert "silent" not in format_process("worker", quiet, now)[0]  # a loaded machine's pause
    said = format_process("worker", {**quiet, "silent_s": 25.4}, now)[0]
    assert "silent 25 s (no heartbeat)" in said


def test_a_worker_that_cannot_write_its_heartbeat_touches_it(tmp_path: Path) -> None:
    cfg = load_config(None, env={}, overrides={"home": str(tmp_path)})
    path = write_run_file(
        cfg.run_dir(), heartbeat_name(os.getpid()), {"mono_ns": 7 * S, "ts_ns": 1000 * S}
    )
    os.utime(path, ns=(1030 * S, 1030 * S))  # a full disk: the file touched 30 s later
    assert last_beat_ns(cfg, os.getpid()) == 37 * S
    os.utime(path, ns=(900 * S, 900 * S))  # the wall clock stepped back: the written beat counts
    assert last_beat_ns(cfg, os.getpid()) == 7 * S
