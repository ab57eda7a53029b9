"""The diagnose stage on the real broker and chDB keeps ``diagnosis_conversations`` complete:
a conversation an analysis adds to a diagnosis, too few to make a new version of it
(``reemit_growth``), is stored as explained all the same."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Producer

from tests.integration.pipeline import running_pipeline
from tests.unit.test_contrast import missed_write_stream


def test_the_stored_list_holds_every_conversation_the_latest_analysis_explains(
    tmp_path: Path,
) -> None:
    tags = missed_write_stream(30)
    env = {"CLOSELOOP_DIAGNOSE_CONTRAST_MIN_COUNT": "1"}  # an analysis at each failure
    with running_pipeline(tmp_path, stages="diagnose", env=env) as pipe:
        producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
        for t in tags:
            producer.produce(pipe.cfg.topics.tags, key=b"i1", value=t.to_json())
        assert producer.flush(10) == 0
        listed = pipe.wait_rows(
            "SELECT diagnosis_id, conversation_id FROM diagnosis_conversations FINAL "
            "WHERE explained = 1",
            30,
        )
        (diag,) = pipe.rows("SELECT version, evidence FROM diagnoses FINAL")
        log = pipe.worker_log()
    assert {r["conversation_id"] for r in listed} == {f"f{i}" for i in range(30)}
    assert len({r["diagnosis_id"] for r in listed}) == 1
    assert diag["evidence"].count('"conversation_id"') < 30  # its last version lists fewer
    assert "Traceback" not in log
