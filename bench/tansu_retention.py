"""Does the embedded broker (tansu) free what it holds? Retention settings and DeleteRecords,
measured on the broker's resident memory and, for s3 storage, on the disk its store uses.

    python -m bench.tansu_retention [--messages 20000] [--size 8000] [--wait 10] [--storage memory s3]

For each storage a fresh broker (s3: on its own local S3 server in a temp folder, fsync on); a
topic is created with ``retention.ms`` / ``retention.bytes``; ``messages`` records of ``size``
bytes are produced; then DeleteRecords is asked to drop all but the last 5 %. The broker's RSS,
the store's disk use and the partition's watermarks are printed before, after producing, after
waiting ``wait`` seconds past the retention time, and after DeleteRecords.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.broker_storage import broker_on


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def disk_mb(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) // 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=8_000)
    ap.add_argument("--wait", type=float, default=10.0)
    ap.add_argument("--storage", nargs="+", default=["memory", "s3"], choices=["memory", "s3"])
    a = ap.parse_args(argv)
    for storage in a.storage:
        with tempfile.TemporaryDirectory(prefix=f"retention-{storage}-") as d:
            measure(storage, Path(d), a)


def measure(storage: str, tmp: Path, a: argparse.Namespace) -> None:
    with broker_on(storage, tmp) as broker:
        assert broker.pid is not None
        pid = broker.pid

        def moment(name: str) -> tuple[str, int, int, tuple[int, int]]:
            return (name, rss_mb(pid), disk_mb(tmp), reader.get_watermark_offsets(tp))

        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        config = {"retention.ms": "1000", "retention.bytes": str(a.size * a.messages // 10)}
        for fut in admin.create_topics([NewTopic("retention", 1, 1, config=config)]).values():
            fut.result(10)
        tp = TopicPartition("retention", 0)
        reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench"})
        rows = [moment("empty")]
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        t0 = time.perf_counter()
        for _ in range(a.messages):
            while True:
                try:
                    producer.produce("retention", b"x" * a.size)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush()
        produce_s = time.perf_counter() - t0
        rows.append(moment("produced"))
        time.sleep(a.wait)
        rows.append(moment(f"+{a.wait:g} s"))
        keep_from = a.messages - a.messages // 20
        try:
            for fut in admin.delete_records([TopicPartition("retention", 0, keep_from)]).values():
                fut.result(10)
            deleted = "DeleteRecords answered"
        except KafkaException as e:
            deleted = f"DeleteRecords failed: {e.args[0].str()}"
        time.sleep(2)
        rows.append(moment("after DeleteRecords"))
        reader.close()
    print(
        f"storage {storage}: {a.messages} x {a.size} B in {produce_s:.1f} s, topic config {config}"
    )
    print(f"  {deleted}")
    print(f"  {'moment':<22} {'broker RSS MB':>13} {'disk MB':>8}  watermarks (low, high)")
    for name, rss, disk, wm in rows:
        print(f"  {name:<22} {rss:>13} {disk:>8}  {wm}")


if __name__ == "__main__":
    main()
