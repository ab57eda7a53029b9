"""Does the embedded broker (tansu, memory storage) free what it holds? Retention settings and
DeleteRecords, measured on the broker's resident memory.

    python -m bench.tansu_retention [--messages 20000] [--size 8000] [--wait 10]

A topic is created with ``retention.ms`` / ``retention.bytes``; ``messages`` records of
``size`` bytes are produced; then DeleteRecords is asked to drop all but the last 5 %. The
broker's RSS and the partition's low watermark are printed before, after producing, after
waiting ``wait`` seconds past the retention time, and after DeleteRecords.
"""

from __future__ import annotations

import argparse
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from processors.embedded.broker import EmbeddedBroker


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=8_000)
    ap.add_argument("--wait", type=float, default=10.0)
    a = ap.parse_args(argv)
    with EmbeddedBroker() as broker:
        assert broker.pid is not None
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        config = {"retention.ms": "1000", "retention.bytes": str(a.size * a.messages // 10)}
        for fut in admin.create_topics([NewTopic("retention", 1, 1, config=config)]).values():
            fut.result(10)
        tp = TopicPartition("retention", 0)
        reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench"})
        rows = [("empty", rss_mb(broker.pid), reader.get_watermark_offsets(tp))]
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
        for _ in range(a.messages):
            producer.produce("retention", b"x" * a.size)
            producer.poll(0)
        producer.flush()
        rows.append(("produced", rss_mb(broker.pid), reader.get_watermark_offsets(tp)))
        time.sleep(a.wait)
        rows.append((f"+{a.wait:g} s", rss_mb(broker.pid), reader.get_watermark_offsets(tp)))
        keep_from = a.messages - a.messages // 20
        try:
            for fut in admin.delete_records([TopicPartition("retention", 0, keep_from)]).values():
                fut.result(10)
            deleted = "DeleteRecords answered"
        except KafkaException as e:
            deleted = f"DeleteRecords failed: {e.args[0].str()}"
        time.sleep(2)
        rows.append(("after DeleteRecords", rss_mb(broker.pid), reader.get_watermark_offsets(tp)))
        reader.close()
    print(f"{a.messages} x {a.size} B, topic config {config}; {deleted}")
    print(f"{'moment':<22} {'broker RSS MB':>13}  watermarks (low, high)")
    for name, rss, wm in rows:
        print(f"{name:<22} {rss:>13}  {wm}")


if __name__ == "__main__":
    main()
