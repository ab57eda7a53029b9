"""The diagnose stage with a (fake-served) LLM, on the real broker and chDB: a bounded sample of
an intent's failed conversations is analysed beside the stream, the answers are kept in
``failure_analyses`` with their quotes, and the agreeing ones become a diagnosis whose rows
(``diagnoses``, ``diagnosis_conversations``) hold none of the quoted text."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Producer

from tests.integration.pipeline import running_pipeline
from tests.llm_server import FakeLLMServer
from tests.unit.test_analysis import CFG, scripted, stream


def test_the_stage_analyses_a_sample_and_files_a_diagnosis(tmp_path: Path) -> None:
    with FakeLLMServer(scripted("missing_action", "lookup_order")) as srv:
        env = {
            "CLOSELOOP_LLM_BASE_URL": srv.base_url,
            "CLOSELOOP_DIAGNOSE_MIN_SUPPORT": str(CFG.min_support),
            "CLOSELOOP_DIAGNOSE_MIN_FAILURES": str(CFG.min_failures),
            "CLOSELOOP_DIAGNOSE_CONTRAST_MIN_FAILURES": str(CFG.contrast_min_failures),
            "CLOSELOOP_DIAGNOSE_LLM_ANALYSIS_SAMPLE": str(CFG.llm_analysis_sample),
            "CLOSELOOP_DIAGNOSE_LLM_ANALYSIS_MIN_AGREE": str(CFG.llm_analysis_min_agree),
        }
        with running_pipeline(tmp_path, stages="diagnose", env=env) as pipe:
            producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
            for t in stream():
                producer.produce(pipe.cfg.topics.tags, key=b"orders", value=t.to_json())
            assert producer.flush(10) == 0
            found = pipe.wait_rows(
                "SELECT conversation_id, failure_kind, turn, tool, quote FROM failure_analyses "
                "FINAL",
                CFG.llm_analysis_sample,
            )
            (diag,) = pipe.wait_rows(
                "SELECT diagnosis_id, failure_kind, source, summary, evidence FROM diagnoses "
                "FINAL WHERE rule = 'llm_analysis'",
                1,
            )
            convs = pipe.wait_rows(
                "SELECT conversation_id, turn, tool, detail FROM diagnosis_conversations FINAL "
                "WHERE diagnosis_id = {d:String}",
                CFG.llm_analysis_sample,
                {"d": diag["diagnosis_id"]},
            )
            log = pipe.worker_log()
    assert len(found) == CFG.llm_analysis_sample == len(srv.chat_requests())  # bounded
    assert all(r["failure_kind"] == "missing_action" and r["turn"] == 3 for r in found)
    assert all("arrives soon" in r["quote"] for r in found)  # kept for people to read ...
    assert (diag["failure_kind"], diag["source"]) == ("missing_action", "llm")
    assert "arrives soon" not in diag["summary"] + diag["evidence"]  # ... and nowhere else
    assert {r["conversation_id"] for r in convs} == {r["conversation_id"] for r in found}
    assert all(r["tool"] == "lookup_order" and "arrives" not in r["detail"] for r in convs)
    assert "Traceback" not in log
