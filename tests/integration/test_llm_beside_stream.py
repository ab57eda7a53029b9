"""The worker with a real (fake-served) LLM that is slower than anything the stream waits on,
or failing: the stream never waits on it, no stage restarts, every conversation is tagged;
the LLM's names and judgements arrive later as new row versions; a failing LLM opens the
breaker and the deterministic results stand."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from examples.support_agent import init_agent_repo, run_cycle
from tests.integration.pipeline import running_pipeline
from tests.llm_server import FakeLLMServer

N = 30
STREAM_WAIT_S = 30.0  # faust's producer_request_timeout: the longest the stream waits on a send


def model(body: dict[str, Any]) -> str:
    user = body["messages"][1]["content"]
    if "Name each of these intents" in user:
        ks = [int(k) for k in re.findall(r"^Intent (\d+):$", user, re.M)]
        return json.dumps(
            {
                "intents": [
                    {"intent": k, "name": f"named by llm {k}", "description": "d"} for k in ks
                ]
            }
        )
    return json.dumps({"tags": ["confusion"], "outcome": "resolved"})


def _env(base_url: str, timeout_s: float) -> dict[str, str]:
    return {
        "CLOSELOOP_LLM_BASE_URL": base_url,
        "CLOSELOOP_LLM_TIMEOUT_S": str(timeout_s),
        "CLOSELOOP_LLM_JUDGE_RATE": "1.0",
        "CLOSELOOP_LLM_BREAKER_FAILURES": "3",
        "CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "3",
    }


def test_a_model_slower_than_the_stream_holds_nothing_up(tmp_path: Path) -> None:
    release = threading.Event()

    def gated(body: dict[str, Any]) -> str:
        release.wait(600)  # no answer before every conversation is tagged
        return model(body)

    repo = tmp_path / "repo"
    init_agent_repo(repo)
    with FakeLLMServer(gated, latency_s=STREAM_WAIT_S + 5) as srv:
        env = _env(srv.base_url, timeout_s=STREAM_WAIT_S * 4)
        with running_pipeline(tmp_path, stages="capture,assemble,understand", env=env) as pipe:
            run_cycle(
                repo, f"http://127.0.0.1:{pipe.gateway.http_port}", n=N, seed=3, mode="scripted"
            )
            got = pipe.wait_value("SELECT count() FROM conversation_tags FINAL", N, timeout_s=240)
            assert got == N and srv.answered == 0 and srv.chat_requests()  # asked, not waited on
            assert pipe.rows("SELECT DISTINCT source FROM conversation_tags FINAL") == [
                {"source": "structural"}
            ]
            release.set()
            judged = pipe.wait_rows(
                "SELECT conversation_id FROM conversation_tags FINAL WHERE source = 'llm'",
                1,
                timeout_s=300,
            )
            named = pipe.wait_rows(
                "SELECT name FROM intents FINAL WHERE source = 'llm'", 1, timeout_s=300
            )
            assert all(r["name"].startswith("named by llm") for r in named)
            assert len(judged) <= N
            assert pipe.rows("SELECT count() AS n FROM conversation_tags FINAL")[0]["n"] == N
            assert pipe.worker.proc.poll() is None  # the same worker all along
            log = pipe.worker_log()
    assert "crashed" not in log and "Traceback" not in log


def test_a_failing_model_opens_the_breaker_and_nothing_is_lost(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_agent_repo(repo)
    with FakeLLMServer(model, error_rate=1.0) as srv:
        env = _env(srv.base_url, timeout_s=5)
        with running_pipeline(tmp_path, stages="capture,assemble,understand", env=env) as pipe:
            run_cycle(
                repo, f"http://127.0.0.1:{pipe.gateway.http_port}", n=N, seed=4, mode="scripted"
            )
            got = pipe.wait_value("SELECT count() FROM conversation_tags FINAL", N, timeout_s=240)
            assert got == N
            pipe.wait_rows(
                "SELECT step FROM llm_stats FINAL WHERE step = 'judge' AND breaker = 'open'",
                1,
                timeout_s=60,
            )
            assert pipe.rows("SELECT DISTINCT source FROM conversation_tags FINAL") == [
                {"source": "structural"}
            ]
            assert {r["source"] for r in pipe.rows("SELECT source FROM intents FINAL")} == {
                "keyphrases"
            }
            asked = len(srv.chat_requests())
            assert 3 <= asked < N  # paused after 3 failures in a row, not asked for each
            assert pipe.worker.proc.poll() is None
            log = pipe.worker_log()
    assert "crashed" not in log and "Traceback" not in log
