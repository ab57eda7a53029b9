"""A checkpoint the running code cannot restore (an older release's snapshot) is skipped with a
warning and the stage starts over, on real chDB."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import pytest

from processors.config import Config
from processors.runtime import Checkpoint, Pipeline
from processors.store import Store


def _put(store: Store, name: str, data: bytes) -> None:
    store.insert_records(
        "checkpoints",
        [
            {
                "name": name,
                "seq": 7,
                "offsets": json.dumps({"closeloop.conversations:0": 41}),
                "data": base64.b64encode(data).decode(),
                "ts_ns": time.time_ns(),
            }
        ],
    )


def test_an_unreadable_snapshot_starts_the_stage_over(
    store: Store, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"diagnose-{unique}"
    _put(store, name, b"an older release's pickle")
    ckpt = Checkpoint(name, Pipeline(Config(), store=store))

    def refuse(data: bytes) -> None:
        raise ModuleNotFoundError("No module named 'processors.diagnose_old'")

    with caplog.at_level(logging.WARNING):
        asyncio.run(ckpt.restore_into(refuse))
    assert ckpt.offsets == {} and ckpt.seq == 0
    assert "cannot be restored" in caplog.text and "ModuleNotFoundError" in caplog.text


def test_a_readable_snapshot_is_restored_with_its_offsets(store: Store, unique: str) -> None:
    name = f"diagnose-{unique}"
    _put(store, name, b"state")
    ckpt = Checkpoint(name, Pipeline(Config(), store=store))
    got: list[bytes] = []
    asyncio.run(ckpt.restore_into(got.append))
    assert got == [b"state"] and ckpt.offsets == {"closeloop.conversations:0": 41}
    assert ckpt.seq == 7
