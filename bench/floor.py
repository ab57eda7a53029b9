"""The CPU floor of capture: what one span costs in the parts no capture code can make cheaper.

Run: ``python -m bench.floor [--spans 40000]``. Prints a table; no assertions.

The ≥ 50,000 spans/s goal on 2 cores leaves 40 µs of CPU per span for everything. This measures,
for the realistic GenAI spans with message content of ``bench/capture_core.py``, the CPU per span
of the parts that stay whatever capture's Python does:

- the broker (tansu, the embedded default ``memory`` storage): its process CPU while one
  idempotent producer (acks=all, as the gateway) writes the OTLP requests and one consumer reads
  them back (as capture does), both those of ``bench/broker_storage.py``;
- the Kafka clients (confluent-kafka, C): the producer's and the consumer's CPU in this process;
- ClickHouse (chDB) inserting capture's rows for those spans into ``spans``, ``turns`` and
  ``tool_calls``, handed over column by column (the cheapest way in: no per-row Python);
- for comparison, capture's own core (decode, normalise, redact, build rows) on the same spans.

The floor is the sum of the first three; ``2 cores / floor`` is the most any capture could store
on this machine with these parts, before its own code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.broker_storage import Workload, broker_on, consume, produce
from bench.capture_core import make_messages
from bench.ingest import cpu_seconds
from processors.capture.core import Capture, CaptureBatch
from processors.config import CaptureConfig
from processors.embedded.broker import ensure_topics
from processors.redact import Redactor
from processors.store import connect

TOPIC = "otlp_spans"
GOAL_SPANS_S = 50_000
CORES = 2


def broker_round_trip(messages: list[bytes], home: Path) -> tuple[float, float, float]:
    """CPU seconds of (broker, producer, consumer) to write ``messages`` and read them back."""
    with broker_on("memory", home) as broker:
        ensure_topics(broker.bootstrap, [TOPIC], 1)
        pid = broker.proc.pid
        b0, c0 = cpu_seconds(pid), time.process_time()
        sent, _, _ = produce(
            broker.bootstrap, TOPIC, Workload("otlp", len(messages), messages.__getitem__)
        )
        c1 = time.process_time()
        got, _ = consume(broker.bootstrap, TOPIC, sent)
        c2 = time.process_time()
        broker_s = cpu_seconds(pid) - b0
    assert sent == got == len(messages), (
        f"{sent} of {len(messages)} messages acknowledged, {got} read back"
    )
    return broker_s, c1 - c0, c2 - c1


def insert_cpu(batch: CaptureBatch, home: Path) -> float:
    """CPU seconds of this process (chDB runs in it) to insert the batch's rows column by column."""
    store = connect(f"chdb://{home / 'store'}")
    store.migrate()
    tables = {"spans": batch.span_rows, "turns": batch.turn_rows, "tool_calls": batch.tool_rows}
    columnar = {table: store.columns_of(table, rows) for table, rows in tables.items()}
    t0 = time.process_time()
    for table, cols in columnar.items():
        store.insert_columns(table, cols)
    spent = time.process_time() - t0
    assert store.scalar("SELECT count() FROM spans") == len(batch.span_rows)
    store.close()
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=40_000)
    ap.add_argument("--json", type=Path, help="also write the figures here (for python -m bench)")
    args = ap.parse_args(argv)
    n = args.spans
    raw = make_messages(n, content=True)
    cfg = CaptureConfig(redact=["secrets", "emails", "cards", "phones"])
    capture = Capture(cfg, Redactor(cfg.redact))
    capture_s = float("inf")
    for _ in range(3):  # the best of 3, as bench/capture_core.py
        t0 = time.process_time()
        batch = capture.process(raw, 0)
        capture_s = min(capture_s, time.process_time() - t0)
    assert len(batch.span_rows) == n and not batch.deadletters
    with tempfile.TemporaryDirectory() as tmp:
        broker_s, produce_s, consume_s = broker_round_trip([m.value for m in raw], Path(tmp))
        insert_s = insert_cpu(batch, Path(tmp))
    floor = {
        "broker (tansu: write, then read back)": broker_s,
        "producer (confluent-kafka, as the gateway)": produce_s,
        "consumer (confluent-kafka, as capture)": consume_s,
        "ClickHouse inserts (chDB, columnar)": insert_s,
    }
    print(
        f"{n:,} spans with message content, {sum(len(m.value) for m in raw) / n:,.0f} bytes/span on the wire, "
        f"{os.cpu_count()} cores\n"
    )
    print(f"{'part':<46} {'µs/span':>8} {'cores at 50k/s':>15}")
    for name, s in floor.items():
        print(f"{name:<46} {s / n * 1e6:>8.1f} {s / n * GOAL_SPANS_S:>15.2f}")
    total = sum(floor.values()) / n
    print(f"{'floor (sum of the above)':<46} {total * 1e6:>8.1f} {total * GOAL_SPANS_S:>15.2f}")
    print(
        f"{'capture core (decode, redact, rows; Python)':<46} {capture_s / n * 1e6:>8.1f} "
        f"{capture_s / n * GOAL_SPANS_S:>15.2f}"
    )
    left = CORES / GOAL_SPANS_S - total
    print(
        f"\nmost spans/s on {CORES} cores with the floor alone: {CORES / total:,.0f}; left for capture's own "
        f"code at {GOAL_SPANS_S:,}/s: "
        + (
            f"{left * 1e6:.1f} µs/span (its core takes {capture_s / n * 1e6:.0f}, {capture_s / n / left:.0f}x that)"
            if left > 0
            else "nothing (the floor alone is over the 2 cores)"
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "floor_us": total * 1e6,
                    "max_spans_s": CORES / total,
                    "insert_us": insert_s / n * 1e6,
                    "capture_core_us": capture_s / n * 1e6,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
