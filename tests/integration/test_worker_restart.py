"""The worker survives kill -9: faust table state and ClickHouse rows come back exactly.

tansu misreports a partition's end offset (the last batch's first offset + 1); a faust table
restored from a changelog written in multi-message batches came back stale in a trial. The
worker writes changelogs one message per batch; this test catches a stale restore.
"""

from __future__ import annotations

import json
import time

from confluent_kafka import Producer

from processors.config import load_config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.records import Message, TurnRecord

from .worker_proc import WorkerProcess, wait_for

N_CONV = 50
TURNS_BEFORE_KILL = 40


def _turn(cid: str, k: int, t0: int, end: bool = False) -> dict:
    return TurnRecord(
        conversation_id=cid,
        trace_id=f"{cid}-t{k}",
        span_id=f"{cid}-s{k}",
        span_kind="llm",
        start_ns=t0 + k * 10**9,
        end_ns=t0 + k * 10**9 + 10**8,
        input_messages=[Message(role="user", content=f"{cid} question {k}")],
        output_messages=[Message(role="assistant", content=f"answer {k}")],
        end_of_conversation=end,
    ).to_dict()


def test_assemble_table_survives_kill9(tmp_path) -> None:
    # A broker of its own: the worker's consumer group and changelog must start empty.
    with EmbeddedBroker(log_dir=tmp_path / "logs") as broker:
        cfg = load_config(None, env={}, overrides={"home": str(tmp_path / "home")})
        ensure_topics(broker.bootstrap, cfg.topics.all(), cfg.kafka.partitions)
        env = {"CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "600"}
        w = WorkerProcess(tmp_path / "home", broker.bootstrap, "assemble", env).start()
        p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
        t0 = time.time_ns()
        # Many turns per conversation, in separate messages, so the table is updated many times.
        for k in range(TURNS_BEFORE_KILL):
            for i in range(N_CONV):
                cid = f"conv{i:04d}"
                p.produce(
                    cfg.topics.turns,
                    key=cid.encode(),
                    value=json.dumps([_turn(cid, k, t0)]).encode(),
                )
            p.flush()
        time.sleep(10)  # processed and changelogged; nothing is closed (idle timeout 600 s)
        store = w.store()
        assert store.scalar("SELECT count() FROM conversations") == 0
        w.kill()

        w2 = WorkerProcess(tmp_path / "home", broker.bootstrap, "assemble", env).start()
        # One more turn ends every conversation: each must close with all of its turns.
        last = TURNS_BEFORE_KILL
        for i in range(N_CONV):
            cid = f"conv{i:04d}"
            p.produce(
                cfg.topics.turns,
                key=cid.encode(),
                value=json.dumps([_turn(cid, last, t0, end=True)]).encode(),
            )
        p.flush()
        store = w2.store()
        wait_for(lambda: store.scalar("SELECT count() FROM conversations FINAL") == N_CONV, 90)
        rows = store.query("SELECT conversation_id, version, n_user_turns FROM conversations FINAL")
        w2.stop()
    assert len(rows) == N_CONV
    stale = [r for r in rows if r["version"] != last + 1 or r["n_user_turns"] != last + 1]
    assert not stale, f"{len(stale)} conversations restored stale, e.g. {stale[:3]}"
