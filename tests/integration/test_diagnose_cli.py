"""`closeloop diagnose --intent` with an LLM configured analyses a sample of the intent's failed
conversations as the stream does (tests/integration/test_failure_analysis.py): the real CLI on
its own chDB store, the real openai client against the local OpenAI-compatible test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from processors.config import load_config
from processors.store import open_store
from processors.understand.assemble import CONVERSATION_COLUMNS, conversation_row
from processors.understand.core import tag_row
from tests.llm_server import FakeLLMServer
from tests.unit.test_analysis import CFG, scripted, stream

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {  # few rules and no contrast: what the analyses find stands out
    "CLOSELOOP_DIAGNOSE_MIN_SUPPORT": str(CFG.min_support),
    "CLOSELOOP_DIAGNOSE_MIN_FAILURES": str(CFG.min_failures),
    "CLOSELOOP_DIAGNOSE_CONTRAST_MIN_FAILURES": str(CFG.contrast_min_failures),
    "CLOSELOOP_DIAGNOSE_LLM_ANALYSIS_SAMPLE": str(CFG.llm_analysis_sample),
    "CLOSELOOP_DIAGNOSE_LLM_ANALYSIS_MIN_AGREE": str(CFG.llm_analysis_min_agree),
}


def seed(home: str) -> None:
    """The synthetic agent's tagged conversations, stored as understand stores them (run in a
    process of its own: one process owns a chDB store, and the tests' session holds one)."""
    store = open_store(load_config(None, env={}, overrides={"home": home}))
    tags = stream()
    convs = [conversation_row(t.conversation) for t in tags if t.conversation is not None]
    store.insert("conversations", convs, CONVERSATION_COLUMNS)
    store.insert_records("conversation_tags", [tag_row(t) for t in tags])
    store.close()


def closeloop(home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLOSELOOP_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, *args],
        cwd=home.parent,
        env={**base, "PYTHONPATH": str(REPO), "CLOSELOOP_HOME": str(home), **SETTINGS, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def sql(home: Path, query: str) -> list[dict]:
    r = closeloop(home, "-m", "processors.cli", "sql", query + " FORMAT JSONEachRow", env={})
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_diagnose_runs_the_llm_failure_analysis_when_an_llm_is_configured(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = closeloop(home, "-c", f"from {__name__} import seed; seed({str(home)!r})", env={})
    assert r.returncode == 0, r.stderr
    diagnose = ("-m", "processors.cli", "diagnose", "--intent", "orders")

    without = closeloop(home, *diagnose, env={})  # no LLM: the deterministic path alone
    assert without.returncode == 0, without.stderr
    assert "no diagnosis for orders" in without.stdout and "LLM" not in without.stdout
    assert sql(home, "SELECT count() AS n FROM failure_analyses") == [{"n": 0}]

    with FakeLLMServer(scripted("missing_action", "lookup_order")) as srv:
        run = closeloop(home, *diagnose, env={"CLOSELOOP_LLM_BASE_URL": srv.base_url})
        asked = len(srv.chat_requests())
    assert run.returncode == 0, run.stderr
    assert asked == CFG.llm_analysis_sample  # the bounded sample, as the stream asks
    assert (
        f"{CFG.llm_analysis_sample} failed conversation(s) of orders analysed, "
        "0 answer(s) refused" in run.stdout
    )
    assert "missing_action (llm_analysis)" in run.stdout
    found = sql(home, "SELECT conversation_id, failure_kind, tool, quote FROM failure_analyses")
    assert len(found) == CFG.llm_analysis_sample
    assert all((f["failure_kind"], f["tool"]) == ("missing_action", "lookup_order") for f in found)
    assert all("arrives soon" in f["quote"] for f in found)  # kept for people to read ...
    (diag,) = sql(
        home,
        "SELECT diagnosis_id, summary, evidence FROM diagnoses FINAL WHERE rule = 'llm_analysis'",
    )
    assert "arrives soon" not in diag["summary"] + diag["evidence"]  # ... and nowhere else
    explained = sql(
        home,
        "SELECT conversation_id FROM diagnosis_conversations FINAL "
        f"WHERE diagnosis_id = '{diag['diagnosis_id']}'",
    )
    assert {e["conversation_id"] for e in explained} == {f["conversation_id"] for f in found}
