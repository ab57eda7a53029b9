"""A poison record: a conversation that decodes but makes understand raise. The worker exits
(its batch is redelivered), fails the same way again, and then the batch is dead-lettered
(where each record is and why) and the stage moves on: no crash loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

from confluent_kafka import Producer

from processors.config import load_config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.errors import StoreError
from processors.records import Conversation, Message
from processors.runtime import EXIT_STAGE_CRASHED
from tests.integration.worker_proc import WorkerProcess, wait_for

GOOD = 20


def produce(bootstrap: str, topic: str) -> int:
    """Good conversations around one poison record; the poison's offset."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    offsets: dict[str, int] = {}

    def sent(err: object, msg: object) -> None:
        if msg.key() == b"poison":  # type: ignore[attr-defined]
            offsets["poison"] = msg.offset()  # type: ignore[attr-defined]

    now = time.time_ns()
    for i in range(GOOD):
        conv = Conversation(
            conversation_id=f"c{i}",
            messages=[Message(role="user", content=f"I need help with order {i}", ts_ns=now)],
            closed_reason="end",
        )
        producer.produce(topic, key=b"c%d" % i, value=conv.to_json(), partition=0)
        if i == GOOD // 2:  # content 5: decodes, then the tagger raises TypeError
            poison = {"conversation_id": "poison", "messages": [{"role": "user", "content": 5}]}
            producer.produce(
                topic,
                key=b"poison",
                value=json.dumps(poison).encode(),
                partition=0,
                on_delivery=sent,
            )
    producer.flush()
    return offsets["poison"]


def counts(worker: WorkerProcess) -> tuple[int, int]:
    """(conversations tagged, records dead-lettered), (-1, -1) while the store is away."""
    try:
        store = worker.store()
        return (
            int(store.scalar("SELECT count() FROM conversation_tags FINAL") or 0),
            int(store.scalar("SELECT count() FROM deadletter FINAL") or 0),
        )
    except (StoreError, AttributeError):
        return -1, -1


def test_a_poison_batch_is_dead_lettered_after_two_identical_failures(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = load_config(None, env={}, overrides={"home": str(home)})
    topic = cfg.topics.conversations
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:
        ensure_topics(broker.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        poison_offset = produce(broker.bootstrap, topic)
        crashes = 0
        for _ in range(4):  # what the supervisor does: start it again after each exit
            worker = WorkerProcess(home, broker.bootstrap, "understand")
            try:
                worker.start(timeout_s=180)
            except RuntimeError:  # exited before serving its store
                crashes += 1
                continue
            try:
                # every record accounted for: tagged, or dead-lettered with the poison batch
                done = wait_for(
                    lambda w=worker: w.proc.poll() is not None or sum(counts(w)) >= GOOD + 1, 240
                )
                if worker.proc.poll() is not None:
                    assert worker.proc.returncode == EXIT_STAGE_CRASHED, worker.log.read_text()
                    crashes += 1
                    continue
                assert done, worker.log.read_text()[-3000:]
                dls = worker.store().query(
                    "SELECT stage, reason, detail, topic, partition, offset, original_b64 "
                    "FROM deadletter FINAL ORDER BY offset"
                )
                # the stage moved on: what comes after the poison batch is tagged
                tagged = counts(worker)[0]
                produce_more(broker.bootstrap, topic)
                assert wait_for(lambda w=worker, n=tagged: counts(w)[0] >= n + 5, 240)
            finally:
                worker.stop()
            break
        else:
            raise AssertionError(f"still failing after {crashes} crashes")
    assert crashes == 2, crashes  # once, then the same way again: then it is poison
    assert poison_offset in {d["offset"] for d in dls}
    for d in dls:  # where each record is, and why; not its content
        assert d["stage"] == "understand" and d["reason"].startswith("poison"), d
        assert d["detail"].startswith("TypeError"), d
        assert (d["topic"], d["partition"]) == (topic, 0) and d["original_b64"] == ""
    assert "poison records dead-lettered" in worker.log.read_text()


def produce_more(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(5):
        conv = Conversation(
            conversation_id=f"later{i}",
            messages=[Message(role="user", content="where is my parcel", ts_ns=time.time_ns())],
            closed_reason="end",
        )
        producer.produce(
            topic, key=conv.conversation_id.encode(), value=conv.to_json(), partition=0
        )
    producer.flush()
