"""The child processes of the embedded stack (broker, its S3 store, workers): their log file,
and stopping them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Self


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
