"""What a broker rotation carries over to the new broker: the records a consumer group has not
consumed, read from one tansu broker and written to another, partition by partition in order,
with their keys, values and headers."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from processors.embedded.broker import (
    EmbeddedBroker,
    consumer_lag,
    ensure_topics,
    produce,
    unconsumed,
)


def test_unconsumed_records_move_to_a_new_broker_in_order(
    kafka: EmbeddedBroker, topic_factory, unique: str, tmp_path: Path
) -> None:
    topic = topic_factory("tags", 2)
    p = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(20):
        p.produce(
            topic,
            value=f"v{i}".encode(),
            key=f"k{i}".encode(),
            partition=i % 2,
            headers=[("n", str(i).encode())],
        )
    assert p.flush(10) == 0
    group = f"diagnose-{unique}"
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group})
    # partition 0 consumed up to offset 4 (of 10), partition 1 to its end
    c.commit(
        offsets=[TopicPartition(topic, 0, 4), TopicPartition(topic, 1, 10)], asynchronous=False
    )
    c.close()
    assert consumer_lag(kafka.bootstrap, group, [topic]) == 6

    left = unconsumed(kafka.bootstrap, group, [topic])
    assert [(r.partition, r.key, r.value) for r in left] == [
        (0, f"k{i}".encode(), f"v{i}".encode()) for i in range(8, 20, 2)
    ]
    assert [r.headers for r in left] == [[("n", str(i).encode())] for i in range(8, 20, 2)]

    with EmbeddedBroker(log_dir=tmp_path) as new:
        ensure_topics(new.bootstrap, [topic], 2)
        produce(new.bootstrap, left)
        # a new group there (the stages' groups start afresh on a new broker) reads exactly them
        assert unconsumed(new.bootstrap, group, [topic]) == left
