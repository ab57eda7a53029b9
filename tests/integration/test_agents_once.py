"""Each effect of the act and review agents happens once: a proposal is announced once (also
when its diagnosis is delivered again), and a verification writes its outcomes once."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from processors.act import proposal_rows
from processors.config import Config
from processors.review.agent import verify_once
from processors.review.core import review_rows
from processors.runtime import Pipeline
from processors.store import Store
from tests.integration.test_act_local import diagnosis, repo  # noqa: F401 (repo is a fixture)
from tests.integration.test_review_store import scenario

from .pipeline import ROWS_TIMEOUT_S, running_pipeline
from .worker_proc import wait_for


@pytest.fixture
def hook() -> Iterator[tuple[str, list[str]]]:
    """A Slack-compatible webhook on loopback: its URL and the texts posted to it."""
    texts: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            texts.append(json.loads(body)["text"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", texts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_act_agent_announces_a_proposal_once(
    tmp_path: Path, repo: Path, hook: tuple[str, list[str]]
) -> None:
    url, texts = hook
    config = tmp_path / "closeloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "act": {
                    "repo": str(repo),
                    "targets": [
                        {"path": "prompts/system.md", "kind": "prompt"},
                        {"path": "config/agent.yaml", "kind": "config"},
                    ],
                    "notify_webhook": url,
                }
            }
        )
    )
    with running_pipeline(tmp_path, "act", env={"CLOSELOOP_CONFIG": str(config)}) as p:
        producer = Producer({"bootstrap.servers": p.broker.bootstrap})
        d = diagnosis()
        for _ in range(2):  # the second delivery is a replay: the proposal exists already
            producer.produce(p.cfg.topics.diagnoses, key=d.intent_id, value=d.to_json())
        producer.flush(10)

        def covered() -> int:  # the act stage's checkpoint: saved after the batch's effects
            rows = p.rows("SELECT offsets FROM checkpoints FINAL WHERE name = 'act'")
            return sum(json.loads(rows[0]["offsets"]).values()) if rows else 0

        assert wait_for(lambda: covered() >= 2, ROWS_TIMEOUT_S), p.worker_log()[-3000:]
        (row,) = p.rows("SELECT branch FROM proposals FINAL")
    assert row["branch"] == "closeloop/d-77"
    assert len([t for t in texts if "closeloop/d-77" in t]) == 1, texts
    assert "opened a proposal" in texts[0]


def test_a_verification_writes_its_outcomes_once(store: Store, repo: Path, unique: str) -> None:
    p, rec, backend, now = scenario(store, repo, unique, after_failures=16)
    store.insert_records("reviews", review_rows([rec]))
    store.insert_records("proposals", proposal_rows([p]))
    count = "SELECT count() FROM outcomes {final} WHERE proposal_id = {{p:String}}"
    store.command("SYSTEM STOP MERGES outcomes")  # every row written stays a row of its own
    try:
        n = asyncio.run(verify_once(Pipeline(Config(), store), backend, now))
        written = store.scalar(count.format(final=""), {"p": p.proposal_id})
        distinct = store.scalar(count.format(final="FINAL"), {"p": p.proposal_id})
    finally:
        store.command("SYSTEM START MERGES outcomes")
    assert distinct == 3  # the target and its two controls
    assert written == distinct and n >= distinct
