"""Capture progressing unevenly across the OTLP partitions (real broker, real chDB): a
conversation whose next trace waits on a lagging OTLP partition is not closed because another
OTLP partition moved far ahead.

A conversation's traces land on different OTLP partitions (they are keyed by trace id), and
all of them on one partition of ``closeloop.turns`` (keyed by conversation id). The worker runs
assemble only; the test plays capture: it delivers turns and capture's progress per OTLP
partition, as capture does, while a record waits unprocessed on OTLP partition 1 (capture's
lag there, which assemble's ticks report). Partition 0 races minutes of span time ahead over
several idle timeouts of wall time; the conversation closes only once capture's progress on
partition 1 passes it, from all its spans.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from processors.embedded.broker import consumer_lags
from processors.records import Conversation
from processors.runtime import partition_of
from processors.stages import CAPTURE_ONLY, app_id
from tests.integration.pipeline import Pipeline, running_pipeline

from .harness import read_topic
from .test_capture_held_back import IDLE_S, T0, S, turn

LAG_READ_S = 5  # assemble reads capture's lag every second here (half the idle timeout)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    env = {"CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": str(IDLE_S)}
    with running_pipeline(tmp_path_factory.mktemp("uneven"), stages="assemble", env=env) as p:
        yield p


def published(pipe: Pipeline, cid: str) -> list[Conversation]:
    values = read_topic(pipe.broker.bootstrap, pipe.cfg.topics.conversations, idle_s=1.0)
    return [c for c in map(Conversation.from_json, values) if c.conversation_id == cid]


def test_a_conversation_waits_for_its_lagging_otlp_partition(pipe: Pipeline) -> None:
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
    topics = pipe.cfg.topics
    parts = pipe.cfg.kafka.partitions
    a, b = (
        next(f"{x}{i}" for i in range(1000) if partition_of(f"{x}{i}", parts) == 0) for x in "ab"
    )
    fast, slow = f"{topics.otlp_spans}:0", f"{topics.otlp_spans}:1"

    def deliver(cid: str, turns: list[dict[str, object]], source: str) -> None:
        """As capture does: the turns read from ``source``, then its progress there."""
        producer.produce(topics.turns, json.dumps(turns).encode(), cid, partition=0)
        newest = max(int(str(t["end_ns"])) for t in turns)
        producer.produce(topics.turns, json.dumps({"progress": {source: newest}}), partition=0)
        producer.flush(30)

    # a record waits on OTLP partition 1, unprocessed: capture lags there, and only there
    producer.produce(topics.otlp_spans, b"a trace of a, not read yet", b"k", partition=1)
    producer.flush(30)
    lags = consumer_lags(pipe.broker.bootstrap, app_id(CAPTURE_ONLY), [topics.otlp_spans])
    assert {q for q, lag in lags.items() if lag} == {slow}
    time.sleep(LAG_READ_S)  # assemble's ticks now carry it

    deliver(a, [turn(a, "a1", T0)], slow)  # a's first trace, read from partition 1
    # partition 0 races ahead: a minute of span time, over many idle timeouts of wall time
    started = time.monotonic()
    for k in range(1, 13):
        deliver(b, [turn(b, f"b{k}", T0 + 5 * k * S)], fast)
        time.sleep(0.5)
    time.sleep(2 * IDLE_S)
    assert time.monotonic() - started > 4 * IDLE_S  # the old watermark would have closed a
    assert published(pipe, a) == []

    # capture reaches a's next trace on partition 1, and moves on there
    deliver(a, [turn(a, "a2", T0 + S)], slow)
    deliver(b, [turn(b, "b-last", T0 + 70 * S)], slow)
    sql = "SELECT version FROM conversations FINAL WHERE conversation_id = {cid:String}"
    rows = pipe.wait_rows(sql, 1, {"cid": a})
    assert [r["version"] for r in rows] == [2]
    assert [(c.version, c.closed_reason) for c in published(pipe, a)] == [(2, "idle")]
