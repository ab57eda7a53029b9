"""Embedded broker throughput by storage: memory vs s3 (the local S3 server, files on disk), side by side.

For each storage a fresh tansu broker is started (for s3, on a fresh :class:`processors.embedded.s3store.LocalS3`
in a temp folder on the same disk as the home); for each workload a fresh topic (1 partition) is filled
by one idempotent producer (acks=all, so every message counted was acknowledged as written) and read
back from the start by one consumer. Workloads: small messages (100 B), OTLP
``ExportTraceServiceRequest`` protobufs of ``bench.ingest``'s GenAI spans (~10 KB and ~100 KB,
~1.1 KB a span), and
``unbatched``: one message per produce request, awaited before the next (what faust's changelogs do
with closeloop's settings), where the per-request latency of the storage shows.

    python -m bench.broker_storage [--small 20000] [--otlp 1000] [--unbatched 200] [--no-fsync]

``s3`` fsyncs every object and its folder before acknowledging (survives power loss);
``--no-fsync`` adds ``s3-nofsync`` (survives kill -9 of any process, not an OS crash).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.ingest import request
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.embedded.s3store import LocalS3

TIME_CAP_S = 120.0

SPANS_10KB, SPANS_100KB = 9, 88  # requests of ~10 KB and ~100 KB of bench.ingest traffic


@dataclass
class Workload:
    name: str
    count: int
    value: Callable[[int], bytes]
    spans: int = 0  # spans per message, for the spans/s column
    batched: bool = True  # False: wait for each message's acknowledgement before sending the next


@dataclass
class Result:
    produced: int
    produce_s: float
    consumed: int
    consume_s: float
    nbytes: int


def produce(bootstrap: str, topic: str, w: Workload) -> tuple[int, float, int]:
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5 if w.batched else 0,
            "compression.type": "none",
        }
    )
    values = [
        w.value(i) for i in range(min(w.count, 8))
    ]  # a few distinct bodies, built before timing
    acked = [0, 0]

    def delivered(err: object, msg: object) -> None:
        if err is None:
            acked[0] += 1
            acked[1] += len(msg.value())  # type: ignore[attr-defined]

    p.produce(topic, b"warm-up")  # connection and producer id set up before timing
    p.flush(TIME_CAP_S)
    t0 = time.perf_counter()
    for i in range(w.count):
        while True:
            try:
                p.produce(
                    topic, values[i % len(values)], key=str(i).encode(), on_delivery=delivered
                )
                break
            except BufferError:
                p.poll(0.05)
        if w.batched:
            p.poll(0)
        else:
            p.flush(TIME_CAP_S)
        if time.perf_counter() - t0 > TIME_CAP_S:
            break
    p.flush(TIME_CAP_S)
    return acked[0], time.perf_counter() - t0, acked[1]


def consume(bootstrap: str, topic: str, n: int) -> tuple[int, float]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{topic}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 << 20,
        }
    )
    c.assign([TopicPartition(topic, 0, 1)])  # after the warm-up message
    got = 0
    t0 = time.perf_counter()
    try:
        while got < n and time.perf_counter() - t0 < TIME_CAP_S:
            for m in c.consume(min(1000, n - got), 1.0):
                if not m.error():
                    got += 1
    finally:
        c.close()
    return got, time.perf_counter() - t0


@contextmanager
def broker_on(storage: str, tmp: Path) -> Iterator[EmbeddedBroker]:
    """A fresh broker on ``storage`` (with its own S3 server for s3 storages)."""
    s3 = None
    broker = EmbeddedBroker(log_dir=tmp / "logs")
    if storage.startswith("s3"):
        s3 = LocalS3(tmp / "broker-s3", log_dir=tmp / "logs", fsync=storage == "s3").start()
        broker.storage, broker.env = s3.storage_url, s3.client_env()
    try:
        yield broker.start()
    finally:
        broker.stop()
        if s3 is not None:
            s3.stop()


def run(storage: str, workloads: list[Workload], home: Path) -> dict[str, Result]:
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{storage}-", dir=home) as d,
        broker_on(storage, Path(d)) as broker,
    ):
        out = {}
        for w in workloads:
            topic = f"{w.name}-{time.time_ns()}"
            ensure_topics(broker.bootstrap, [topic], 1)
            n, ps, nbytes = produce(broker.bootstrap, topic, w)
            got, cs = consume(broker.bootstrap, topic, n)
            out[w.name] = Result(n, ps, got, cs, nbytes)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20000, help="100-byte messages to produce")
    ap.add_argument(
        "--otlp",
        type=int,
        default=1000,
        help="~10 KB OTLP messages to produce (a quarter as many ~100 KB)",
    )
    ap.add_argument(
        "--unbatched", type=int, default=200, help="~10 KB messages produced one request at a time"
    )
    ap.add_argument("--no-fsync", action="store_true", help="also measure s3 without fsync")
    ap.add_argument(
        "--dir", default=".", help="where the brokers' data goes (the disk a home would be on)"
    )
    args = ap.parse_args()
    workloads = [
        Workload("small-100B", args.small, lambda i: b"x" * 100),
        Workload("otlp-10KB", args.otlp, lambda i: request(i, SPANS_10KB, 10), spans=SPANS_10KB),
        Workload(
            "otlp-100KB",
            max(args.otlp // 4, 1),
            lambda i: request(i, SPANS_100KB, 10),
            spans=SPANS_100KB,
        ),
        Workload(
            "unbatched",
            args.unbatched,
            lambda i: request(i, SPANS_10KB, 10),
            spans=SPANS_10KB,
            batched=False,
        ),
    ]
    storages = ["memory", "s3"] + (["s3-nofsync"] if args.no_fsync else [])
    results = {s: run(s, workloads, Path(args.dir)) for s in storages}
    base = results["memory"]
    print(
        f"{'workload':<11} {'storage':<10} {'msgs':>6} {'produce msg/s':>13} {'MB/s':>6} {'spans/s':>8} "
        f"{'consume msg/s':>13} {'produce/mem':>11} {'consume/mem':>11}"
    )
    for w in workloads:
        for s in storages:
            x, b = results[s][w.name], base[w.name]
            rate, crate = x.produced / x.produce_s, x.consumed / x.consume_s
            spans = f"{rate * w.spans:>8.0f}" if w.spans else f"{'':>8}"
            print(
                f"{w.name:<11} {s:<10} {x.produced:>6} {rate:>13.0f} {x.nbytes / x.produce_s / 1e6:>6.1f} {spans} "
                f"{crate:>13.0f} {rate / (b.produced / b.produce_s):>11.2f} "
                f"{crate / (b.consumed / b.consume_s):>11.2f}"
                + ("" if x.consumed == x.produced else f"  (consumed {x.consumed} of {x.produced})")
            )


if __name__ == "__main__":
    main()
