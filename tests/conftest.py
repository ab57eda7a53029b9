"""Shared fixtures: a real tansu broker and a real chDB store, one of each per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from processors.config import Config, load_config
from processors.embedded.broker import EmbeddedBroker, ensure_topics
from processors.store import Store, connect

# A program the integration tests start as a faust worker: it reads its setup from the
# environment when imported, so the doctest collector (--doctest-modules) must not import it.
collect_ignore = ["integration/counter_app.py"]

# Tests never read the developer's closeloop.yaml or CLOSELOOP_* variables.
for _name in [n for n in os.environ if n.startswith("CLOSELOOP_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A tansu broker on a free loopback port for the whole session."""
    broker = EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker-logs"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A migrated chDB store for the whole session (tests use unique ids, never truncate)."""
    path = tmp_path_factory.mktemp("chdb") / "clickhouse"
    s = connect(f"chdb://{path}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def unique() -> str:
    """A short unique token for ids and topic names, so tests sharing the broker/store never collide."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topic_factory(kafka: EmbeddedBroker, unique: str):
    """Create fresh topics on the session broker: ``topic_factory("spans") -> "spans-<unique>"``."""

    def make(name: str, partitions: int = 1) -> str:
        full = f"{name}-{unique}"
        ensure_topics(kafka.bootstrap, [full], partitions)
        return full

    return make


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config with its home in a temp dir and no file or environment influence."""
    return load_config(None, env={}, overrides={"home": str(tmp_path / "home")})
