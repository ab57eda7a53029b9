"""Stopping the child processes of the embedded stack (broker, its S3 store, workers)."""
from __future__ import annotations

import subprocess


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
