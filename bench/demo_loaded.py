"""`closeloop demo` beside a CPU hog: how many of N runs pass on a loaded machine.

    python -m bench.demo_loaded [--runs 4] [--hogs 2] [--conversations 600] [--seed 1]
                                [--timeout 1200]

Each run is ``closeloop demo --approve-as bench`` as a user starts it (a subprocess, a fresh home
in a temp folder, default ports: a taken one is replaced by a free one), while ``--hogs``
processes spin on the CPU for the whole run. A run passes when the demo exits 0 (a proposal
reviewed and merged, verified) within ``--timeout`` seconds. Prints each run's exit code, its
length and, for a failure, the last lines of its output; then the tally.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spin() -> None:
    while True:
        pass


def demo_once(conversations: int, seed: int, timeout_s: float) -> tuple[int | None, float, str]:
    """``(exit code or None on timeout, seconds, output tail)`` of one demo run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    with tempfile.TemporaryDirectory(prefix="demo-loaded-") as tmp:
        argv = [
            sys.executable,
            "-m",
            "processors.cli",
            "demo",
            "--home",
            str(Path(tmp) / "home"),
            "--approve-as",
            "bench",
            "--conversations",
            str(conversations),
            "--seed",
            str(seed),
        ]
        t0 = time.monotonic()
        log = Path(tmp) / "demo.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                code: int | None = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()  # the demo stops its children on SIGTERM
                proc.wait(60)
                code = None
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        return code, time.monotonic() - t0, tail


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--hogs", type=int, default=2, help="processes spinning on the CPU")
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1, help="the demo's seed, the same every run")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    a = ap.parse_args(argv)
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(a.hogs)]
    for h in hogs:
        h.start()
    passed = 0
    try:
        for i in range(a.runs):
            code, seconds, tail = demo_once(a.conversations, a.seed, a.timeout)
            ok = code == 0
            passed += ok
            status = "pass" if ok else ("timeout" if code is None else f"FAIL exit {code}")
            print(f"run {i + 1}/{a.runs}: {status} in {seconds:.0f} s", flush=True)
            if not ok:
                print("  " + tail.replace("\n", "\n  "), flush=True)
    finally:
        for h in hogs:
            h.terminate()
    print(
        f"{passed} of {a.runs} demo runs passed beside {a.hogs} CPU hogs "
        f"({os.cpu_count()} cores, {a.conversations} conversations per cycle)"
    )


if __name__ == "__main__":
    main()
