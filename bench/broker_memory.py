"""The embedded memory broker's RSS under sustained load, with broker rotation off and on.

    python -m bench.broker_memory [--rate 1000] [--seconds 180] [--limit-mb 256] [--spans 100]

For each setting of ``kafka.rotate_memory_mb`` (0: off, then ``--limit-mb``), starts the
embedded stack in a temp home under its supervisor (as ``closeloop up`` runs it; conversations
close by the default idle timeout, so every stage runs), sends OTLP/HTTP requests of
``--spans`` GenAI spans at ``--rate`` spans/s for ``--seconds`` from 4 connections, retrying
a 503 after its Retry-After as the OTel SDKs do, and samples the broker's RSS every second.
Then it waits until every acknowledged span is stored. Per setting: max and last RSS,
rotations (and put-offs) with the intake pauses, spans acknowledged, spans stored (and lost:
acknowledged, not stored) and stored spans/s (stored / from the first send until all were
stored); the ratio is against rotation off in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import logging
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.ingest import request_prefix, request_template, stamp, start_stack
from processors.embedded.stack import EmbeddedStack
from processors.errors import StoreError

THREADS = 4
SAMPLE_S = 1.0
STORE_TIMEOUT_S = 600.0
GIVE_UP_S = 60.0  # a request still refused after this long is counted as not acknowledged
PAUSE = re.compile(r"intake paused ([\d.]+) s")


@dataclass
class Result:
    limit_mb: int
    acked: int = 0
    refused: int = 0  # requests given up after GIVE_UP_S of 503s
    answers_503: int = 0
    stored: int = 0
    seconds_to_stored: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    rotations: int = 0
    put_off: str = ""
    pauses_s: list[float] = field(default_factory=list)

    @property
    def stored_per_s(self) -> float:
        return self.stored / self.seconds_to_stored if self.seconds_to_stored else 0.0


def send(url: str, rate: float, seconds: float, spans: int, res: Result) -> None:
    """POST requests of ``spans`` spans paced at ``rate`` spans/s; a 503 is retried after its
    Retry-After (for at most GIVE_UP_S), as an OTel SDK does."""
    host, port = url.split("//")[1].split(":")
    templates = [request_template(spans, seed) for seed in range(4)]
    seqs, lock, t0 = itertools.count(), threading.Lock(), time.perf_counter()

    def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, float]:
        conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
        r = conn.getresponse()
        r.read()
        return r.status, float(r.getheader("Retry-After") or 1)

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while True:
            with lock:
                k = next(seqs)
            slot = t0 + k * spans / rate
            if slot - t0 >= seconds:
                break
            time.sleep(max(0.0, slot - time.perf_counter()))
            body = stamp(templates[k % len(templates)], request_prefix(1, 0, k))
            given_up = time.perf_counter() + GIVE_UP_S
            while True:
                try:
                    status, retry = post(conn, body)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=120)
                    status, retry = 0, 1.0
                if status == 200 or time.perf_counter() > given_up:
                    break
                with lock:
                    res.answers_503 += status == 503
                time.sleep(retry)
            with lock:
                if status == 200:
                    res.acked += spans
                else:
                    res.refused += 1
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Pauses(logging.Handler):
    """The intake pause of every rotation, from the supervisor's log line."""

    def __init__(self, res: Result) -> None:
        super().__init__()
        self.res = res

    def emit(self, record: logging.LogRecord) -> None:
        m = PAUSE.search(record.getMessage())
        if m and "broker rotated" in record.getMessage():
            self.res.pauses_s.append(float(m.group(1)))


def run(limit_mb: int, rate: float, seconds: float, spans: int, home: Path) -> Result:
    res = Result(limit_mb)
    pauses = Pauses(res)
    logging.getLogger("closeloop.stack").addHandler(pauses)
    stack = start_stack(home, settings={"kafka": {"rotate_memory_mb": limit_mb}})
    try:
        url = f"http://127.0.0.1:{stack.cfg.otlp.http_port}"
        with stack.supervised():
            t0 = time.monotonic()
            sender = threading.Thread(target=send, args=(url, rate, seconds, spans, res))
            sender.start()
            while sender.is_alive():
                res.rss_mb.append(stack.broker.rss_mb() if stack.broker else 0.0)
                time.sleep(SAMPLE_S)
            res.stored = wait_stored(stack, res.acked)
            res.seconds_to_stored = time.monotonic() - t0
            res.rss_mb.append(stack.broker.rss_mb() if stack.broker else 0.0)
        res.rotations = stack.rotations.count
        res.put_off = stack.rotations.put_off_reason
    finally:
        stack.stop()
        logging.getLogger("closeloop.stack").removeHandler(pauses)
    return res


def wait_stored(stack: EmbeddedStack, acked: int) -> int:
    """Distinct stored spans, once they reach ``acked`` (or STORE_TIMEOUT_S has passed)."""
    store = stack.sql_store(read_only=True)
    deadline, n = time.monotonic() + STORE_TIMEOUT_S, 0
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError):  # the worker restarting after a rotation
            n = int(store.scalar("SELECT uniqExact(span_id) FROM spans") or 0)
        if n >= acked:
            break
        time.sleep(1.0)
    return n


def pauses(r: Result) -> str:
    if not r.pauses_s:
        return "–"
    return f"{statistics.median(r.pauses_s):.1f} / {max(r.pauses_s):.1f}"


def markdown(results: list[Result], command: str) -> str:
    off = results[0].stored_per_s or 1.0
    rows = [
        f"| {'off' if r.limit_mb == 0 else f'{r.limit_mb} MB'} | {max(r.rss_mb):,.0f} | "
        f"{r.rss_mb[-1]:,.0f} | {r.rotations} | {pauses(r)} | {r.answers_503} | {r.acked:,} | "
        f"{r.acked - r.stored:,} | {r.stored_per_s:,.0f} | {r.stored_per_s / off:.2f} |"
        for r in results
    ]
    return "\n".join(
        [
            f"`{command}`",
            "",
            "| kafka.rotate_memory_mb | broker RSS max MB | at the end MB | rotations | "
            "intake paused s (median / max) | 503 answers (retried) | spans acknowledged | "
            "lost | stored spans/s | ratio |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
        + [f"\nput off: {r.put_off}" for r in results if r.put_off]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1000.0, help="offered spans/s")
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--limit-mb", type=int, default=256, help="kafka.rotate_memory_mb when on")
    p.add_argument("--spans", type=int, default=100, help="spans per request")
    a = p.parse_args()
    results = []
    for limit in (0, a.limit_mb):
        with tempfile.TemporaryDirectory(prefix="closeloop-broker-memory-") as tmp:
            results.append(run(limit, a.rate, a.seconds, a.spans, Path(tmp) / "home"))
            print(results[-1], flush=True)
    command = (
        f"python -m bench.broker_memory --rate {a.rate:g} --seconds {a.seconds:g} "
        f"--limit-mb {a.limit_mb} --spans {a.spans}"
    )
    print(markdown(results, command))


if __name__ == "__main__":
    main()
