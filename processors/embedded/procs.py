"""The child processes of the embedded stack (broker, its S3 store, workers): starting them
so that they die with their parent, their log file, and stopping them."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Self

if TYPE_CHECKING:
    from processors.config import Config

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies
    (PR_SET_PDEATHSIG), so a parent killed with SIGKILL leaves no orphan holding ports.

    The signal fires when the *thread* that started the child exits: start children from the
    main thread or from a thread that outlives them (the stack's supervisor loop). Off Linux,
    children are stopped by the parent's own stop path only.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    stdout: IO[bytes] | int,
    death_signal: int = signal.SIGTERM,
    **kwargs: Any,
) -> subprocess.Popen[bytes]:
    """Start a child of the stack: no stdin, stderr with stdout, and ``death_signal`` sent to it
    if this process dies without stopping it (SIGTERM lets a Python child stop cleanly)."""
    return subprocess.Popen(
        list(argv),
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent(death_signal),
        **kwargs,
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; True if it had to be killed."""
    if proc is None or proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(timeout_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


@dataclass
class ManagedProcess:
    """A child process and its log file. Subclasses start it (writing to :meth:`_output`);
    this stops it (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``) or kills it, and makes it a
    context manager."""

    STOP_TIMEOUT_S: ClassVar[float] = 5.0
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> Self:
        raise NotImplementedError

    def _output(self, log_path: Path | None) -> IO[bytes] | int:
        """Where the process writes: ``log_path``, appended to (one file across restarts), or nowhere."""
        if log_path is None:
            return subprocess.DEVNULL
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self._log or open(log_path, "ab")
        return self._log

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float:
        """Resident memory in MB (``VmRSS``); 0 when not running or unknown (off Linux)."""
        if not self.alive():
            return 0.0
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        kb = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")), "0")
        return int(kb) / 1024

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the process and close its log; True if it had to be killed."""
        killed = stop_process(self.proc, self.STOP_TIMEOUT_S if timeout_s is None else timeout_s)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return killed

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exit_when_orphaned(grace_s: float) -> None:
    """Backstop for a child whose clean stop can hang (a faust worker whose broker died with
    the parent): once the parent is gone, exit ``grace_s`` later whatever the stop is doing.
    Only in a child of the stack (``CLOSELOOP_SUPERVISOR_PID`` names the parent)."""
    parent = os.environ.get("CLOSELOOP_SUPERVISOR_PID")
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        time.sleep(grace_s)
        os._exit(75)  # EX_TEMPFAIL: stopped from outside, not by its own error

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def write_run_file(run_dir: Path, name: str, info: dict[str, object]) -> Path:
    """Publish what a process bound (``run/<name>``, with its pid), atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def read_run_file(cfg: Config, name: str) -> dict[str, Any] | None:
    """What a live process published in ``run/<name>``; None if absent or its writer is gone."""
    try:
        info = json.loads((cfg.run_dir() / name).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None
