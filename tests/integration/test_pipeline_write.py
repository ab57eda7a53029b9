"""Stage writes: a row ClickHouse refuses becomes a dead letter, the rest of the batch lands."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from processors.config import Config
from processors.records import Conversation
from processors.runtime import Pipeline
from processors.store import Store
from processors.understand import assemble


def test_refused_row_is_dead_lettered_and_the_batch_still_lands(
    store: Store, config: Config, unique: str
) -> None:
    pipe = Pipeline(cfg=config, store=store, stages=("assemble",))
    good = [
        dict(
            zip(
                assemble.CONVERSATION_COLUMNS,
                assemble.conversation_row(
                    Conversation(
                        conversation_id=f"{unique}-{i}", version=1, start_ns=time.time_ns()
                    )
                ),
            )
        )
        for i in range(5)
    ]
    bad = dict(good[0], conversation_id=f"{unique}-bad", version="not a number")
    # the input batch the rows came from: the dead letter names where re-inject finds it
    pipe.reading(
        "assemble",
        [
            SimpleNamespace(message=SimpleNamespace(topic="closeloop.turns", partition=2, offset=o))
            for o in (41, 40, 45)
        ],
    )
    asyncio.run(pipe.write("assemble", "conversations", [*good, bad]))
    got = store.scalar(
        "SELECT count() FROM conversations FINAL WHERE startsWith(conversation_id, {u:String})",
        {"u": unique},
    )
    assert got == 5
    (dl,) = store.query(
        "SELECT stage, reason, topic, partition, offset FROM deadletter FINAL WHERE key = {k:String}",
        {"k": f"{unique}-bad"},
    )
    assert dl == {
        "stage": "assemble",
        "reason": "ClickHouse refused a conversations row",
        "topic": "closeloop.turns",
        "partition": 2,
        "offset": 40,
    }
    assert pipe.counters["assemble"].deadletters == 1
    assert pipe.counters["assemble"].write_errors >= 3
