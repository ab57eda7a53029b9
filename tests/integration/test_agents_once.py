"""Each effect of the act and review agents happens once: a proposal is announced once (also
when its diagnosis is delivered again), and a verification writes its outcomes once."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from processors.act import proposal_rows
from processors.act.gitrepo import LocalGit
from processors.config import Config
from processors.records import Diagnosis
from processors.review.agent import verify_once
from processors.review.core import review_rows
from processors.runtime import Pipeline
from processors.store import Store
from tests.integration.test_act_local import (  # noqa: F401 (repo is a fixture)
    diagnosis,
    git,
    repo,
)
from tests.integration.test_review_store import scenario

from . import pipeline as running
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


def act_config(tmp_path: Path, repo: Path, notify_webhook: str = "") -> dict[str, str]:
    """The act worker's environment: a closeloop.yaml proposing on ``repo``."""
    config = tmp_path / "closeloop.yaml"
    targets = [
        {"path": "prompts/system.md", "kind": "prompt"},
        {"path": "config/agent.yaml", "kind": "config"},
    ]
    act = {"repo": str(repo), "targets": targets, "notify_webhook": notify_webhook}
    config.write_text(yaml.safe_dump({"act": act}))
    return {"CLOSELOOP_CONFIG": str(config)}


def send(p: running.Pipeline, *diagnoses: Diagnosis) -> None:
    producer = Producer({"bootstrap.servers": p.broker.bootstrap})
    for d in diagnoses:
        producer.produce(p.cfg.topics.diagnoses, key=d.intent_id, value=d.to_json())
    producer.flush(10)


def wait_covered(p: running.Pipeline, n: int) -> None:
    """Until the act stage's checkpoint (saved after a batch's effects) covers ``n`` records."""

    def covered() -> int:
        rows = p.rows("SELECT offsets FROM checkpoints FINAL WHERE name = 'act'")
        return sum(json.loads(rows[0]["offsets"]).values()) if rows else 0

    assert wait_for(lambda: covered() >= n, ROWS_TIMEOUT_S), p.worker_log()[-3000:]


def test_the_act_agent_announces_a_proposal_once(
    tmp_path: Path, repo: Path, hook: tuple[str, list[str]]
) -> None:
    url, texts = hook
    with running_pipeline(tmp_path, "act", env=act_config(tmp_path, repo, url)) as p:
        d = diagnosis()
        send(p, d, d)  # the second delivery is a replay: the proposal exists already
        wait_covered(p, 2)
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


def test_the_act_agent_closes_the_proposal_of_a_superseded_diagnosis(
    tmp_path: Path, repo: Path
) -> None:
    """Closed from the stored proposal row, and from one made in the same batch."""
    with running_pipeline(tmp_path, "act", env=act_config(tmp_path, repo)) as p:
        stored, batched = diagnosis(), diagnosis(diagnosis_id="d-88", intent_id="i-other")
        send(p, stored)
        wait_covered(p, 1)
        (row,) = p.rows("SELECT status, version FROM proposals FINAL")
        assert (row["status"], row["version"]) == ("open", 1)
        later = [replace(d, version=2, status="superseded") for d in (stored, batched)]
        send(p, batched, *later, later[0])  # the last one a replay: nothing closes twice
        wait_covered(p, 5)
        rows = p.rows("SELECT branch, status, version FROM proposals FINAL ORDER BY branch")
    assert [(r["branch"], r["status"], r["version"]) for r in rows] == [
        ("closeloop/d-77", "closed", 2),
        ("closeloop/d-88", "closed", 2),
    ]
    assert git(repo, "branch", "--list", "closeloop/*") == ""
    backend = LocalGit(repo)
    for did in ("d-77", "d-88"):
        head = git(repo, "rev-parse", f"refs/closeloop/withdrawn/{did}")
        notes = git(repo, "notes", "--ref=refs/notes/closeloop", "show", head)
        assert notes == "Closed by closeloop: diagnosis superseded by a later analysis."
    assert backend.base_commit() == git(repo, "rev-parse", "main")
    assert git(repo, "rev-list", "--count", "main") == "2"  # nothing merged
