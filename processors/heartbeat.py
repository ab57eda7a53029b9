"""A worker's proof that its event loop runs: ``<home>/run/heartbeat-<pid>.json``, rewritten every
second by a timer on that loop, so a loop that is blocked (or a process that is stopped) stops it.
The embedded stack's supervisor kills and restarts a worker silent for ``worker.stall_timeout_s``
(:func:`silent_past_limit`); ``closeloop health`` answers the same question for a probe.

Times are ``CLOCK_MONOTONIC`` (one clock for every process of the machine, never stepped by
NTP), so a clock adjustment can neither freeze nor hide a worker; ``ts_ns`` is for people.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

from processors.config import Config
from processors.embedded.procs import read_run_file

HEARTBEAT_INTERVAL_S = 1.0
# what makes a worker write every thread's Python stack into its log (faulthandler, from C, so a
# loop blocked in Python or C still answers): not SIGUSR1/SIGUSR2 (mode's worker owns them), and
# SIGQUIT is the usual "dump your threads" (`kill -QUIT <pid>` by hand works too)
DUMP_SIGNAL = signal.SIGQUIT
# status says "silent" past this (a loaded machine's loop pauses stay under it)
SILENT_AFTER_S = 10.0


def heartbeat_name(pid: int) -> str:
    return f"heartbeat-{pid}.json"


def dump_stacks_on_signal() -> None:
    """Write every thread's Python stack to stderr (the process' log) on :data:`DUMP_SIGNAL`:
    what the supervisor asks of a frozen child before it kills it."""
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True)


def prepare(run_dir: Path) -> None:
    """At a worker's start: stacks on :data:`DUMP_SIGNAL`, and no heartbeat left by an earlier
    process with this pid (a container restarted keeps its files, and its pids)."""
    dump_stacks_on_signal()
    (run_dir / heartbeat_name(os.getpid())).unlink(missing_ok=True)


def last_beat_ns(cfg: Config, pid: int) -> int | None:
    """The monotonic time of live ``pid``'s last heartbeat; None when it has written none. A
    worker that cannot write it (a full disk) touches the file instead: its mtime moving past
    the ``ts_ns`` written moves the beat as far."""
    info = read_run_file(cfg, heartbeat_name(pid))
    if info is None:
        return None
    try:
        touched_ns = (cfg.run_dir() / heartbeat_name(pid)).stat().st_mtime_ns
        return int(info["mono_ns"]) + max(0, touched_ns - int(info["ts_ns"]))
    except (OSError, KeyError, TypeError, ValueError):
        return None


def silent_s(now_ns: int, started_ns: int, beat_ns: int | None) -> float:
    """Seconds without a heartbeat: since the last one, or since the start before the first (a
    beat older than the start is an earlier process's)."""
    since = beat_ns if beat_ns is not None and beat_ns >= started_ns else started_ns
    return max(0, now_ns - since) / 1e9


def silent_past_limit(
    now_ns: int,
    started_ns: int,
    beat_ns: int | None,
    stall_timeout_s: float,
    start_timeout_s: float,
) -> float | None:
    """How long a worker has been silent when that is past its limit (it is frozen), else None:
    ``stall_timeout_s`` after a heartbeat, ``start_timeout_s`` before its first; 0 is off.

    >>> s = 1_000_000_000
    >>> silent_past_limit(100 * s, 0, 50 * s, 60, 300) is None
    True
    >>> silent_past_limit(100 * s, 0, 30 * s, 60, 300)
    70.0
    >>> silent_past_limit(100 * s, 0, None, 60, 300) is None  # still starting
    True
    """
    if stall_timeout_s <= 0:
        return None
    starting = beat_ns is None or beat_ns < started_ns
    silent = silent_s(now_ns, started_ns, beat_ns)
    return silent if silent > (start_timeout_s if starting else stall_timeout_s) else None


def health(cfg: Config, now_ns: int) -> tuple[list[str], list[str]]:
    """``closeloop health``: a line per live worker of the home, those silent for
    ``worker.stall_timeout_s`` in the second list (healthy: some in the first, none there)."""
    ok, frozen = [], []
    for f in sorted(cfg.run_dir().glob("heartbeat-*.json")):
        pid = f.stem.removeprefix("heartbeat-")
        beat_ns = last_beat_ns(cfg, int(pid)) if pid.isdigit() else None
        if beat_ns is None:
            continue  # a worker that died: its supervisor or orchestrator restarts it
        silent = silent_s(now_ns, 0, beat_ns)
        limit = cfg.worker.stall_timeout_s
        line = f"worker pid {pid}: last heartbeat {silent:.0f} s ago"
        if limit > 0 and silent > limit:
            frozen.append(f"{line}, over worker.stall_timeout_s {limit:.0f} s: frozen")
        else:
            ok.append(line)
    return ok, frozen
