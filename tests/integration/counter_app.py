"""A minimal faust app with closeloop's faust settings and app class and one changelog-backed table.

Run as a process by test_faust_table_restore.py and test_durable_broker.py: counts messages per key, dumps the table.
"""

from __future__ import annotations

import json
import os
import sys

import faust

from processors.config import load_config
from processors.runtime import WorkerApp, faust_settings

cfg = load_config(None, env={}, overrides={"home": os.environ["COUNTER_HOME"]})
cfg.home_path.mkdir(parents=True, exist_ok=True)
settings = faust_settings(cfg, os.environ["COUNTER_BOOTSTRAP"])
if os.environ.get("COUNTER_BATCHED") == "1":  # the setting the test proves necessary, undone
    settings.update(producer_max_batch_size=16384)
# COUNTER_FAUST_PRODUCER=1: faust's own producer, whose flush gives up on a stalled broker (the
# fix the slow-broker test proves necessary, undone)
app_class = faust.App if os.environ.get("COUNTER_FAUST_PRODUCER") == "1" else WorkerApp
app = app_class("counter", **settings)
source = app.topic(
    "counter-src", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
counts = app.Table("counts", default=int, partitions=cfg.kafka.partitions)


@app.agent(source)
async def count(stream):
    async for event in stream.events():
        counts[event.key.decode()] += 1


@app.timer(0.5)
async def dump() -> None:
    out = os.environ["COUNTER_OUT"]
    with open(out + ".tmp", "w") as f:
        json.dump(dict(counts.items()), f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
