"""LLM steps beside the stream: bounded, paused by a breaker, answers cached by content,
counted; the real openai client against tests/llm_server.py (slow and failing modes)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from processors.config import LLMConfig, LLMStepConfig
from processors.errors import LLMError
from processors.llm import LLM, ChatJSON
from processors.llm_work import LLM_STATS_COLUMNS, AnswerCache, Limits, LLMWork
from processors.records import TagRecord
from processors.redact import Redactor
from processors.status import format_status
from processors.understand.core import tag_row
from tests.ddl import ddl_columns
from tests.llm_server import FakeLLMServer


def _work(srv: FakeLLMServer, **over: Any) -> LLMWork:
    cfg = LLMConfig(base_url=srv.base_url, timeout_s=5, **over)
    return LLMWork(cfg, Redactor(), LLM(cfg))


def _ask(text: str) -> Any:
    def job(chat: ChatJSON) -> dict[str, Any]:
        return chat.chat_json("system", text, "{}", required=("ok",))

    return job


def test_answers_are_cached_by_content_and_survive_a_restart() -> None:
    with FakeLLMServer(lambda body: json.dumps({"ok": 1})) as srv:
        work = _work(srv)
        step = work.step("judge")
        assert step is not None
        for text in ("a", "b", "a", "a"):
            fut = step.submit(_ask(text))
            assert fut is not None and fut.result(10) == {"ok": 1}
        assert len(srv.chat_requests()) == 2 and step.stats.cached == 2
        stored = work.cache.drain()  # what the worker writes to llm_answers
        assert [r["step"] for r in stored] == ["judge", "judge"] and work.cache.drain() == []
        assert list(stored[0]) == ddl_columns("llm_answers")

        restarted = _work(srv)
        restarted.cache.load(stored)
        again = restarted.step("naming")
        assert again is not None
        fut = again.submit(_ask("b"))
        assert fut is not None and fut.result(10) == {"ok": 1}
        assert len(srv.chat_requests()) == 2  # answered from the stored answers
        work.close()
        restarted.close()


def test_a_failing_endpoint_opens_the_breaker_and_the_step_skips() -> None:
    with FakeLLMServer(lambda body: json.dumps({"ok": 1}), error_rate=1.0) as srv:
        work = _work(srv, breaker_failures=3, breaker_pause_s=600)
        step = work.step("diagnose")
        assert step is not None
        for k in range(3):
            fut = step.submit(_ask(f"q{k}"))
            assert fut is not None
            with pytest.raises(LLMError):
                fut.result(10)
        row = step.row("w", 1)
        assert row["breaker"] == "open" and (row["calls"], row["failures"]) == (3, 3)
        assert step.submit(_ask("q9")) is None  # skipped: the deterministic result stands
        assert step.stats.skipped == 1 and len(srv.chat_requests()) == 3
        assert list(row) == list(LLM_STATS_COLUMNS) == ddl_columns("llm_stats")
        work.close()


def test_a_slow_endpoint_times_out_once_and_the_queue_is_bounded() -> None:
    with FakeLLMServer(lambda body: json.dumps({"ok": 1}), latency_s=30) as srv:
        cfg = LLMConfig(base_url=srv.base_url, timeout_s=0.5, queue_max=2)
        cfg.act = LLMStepConfig(concurrency=1)
        work = LLMWork(cfg, Redactor(), LLM(cfg))
        step = work.step("act")
        assert step is not None
        first, second = step.submit(_ask("x")), step.submit(_ask("y"))
        assert first is not None and second is not None
        assert step.submit(_ask("z")) is None  # two waiting already
        for fut in (first, second):
            with pytest.raises(LLMError, match="timed out"):
                fut.result(10)
        assert len(srv.chat_requests()) == 2  # max_retries 0: one attempt each
        assert step.stats.queued == 0 and step.stats.failures == 2
        work.close()


def test_limits_space_calls_and_stop_at_the_token_budget() -> None:
    lim = Limits(LLMStepConfig(calls_per_min=120, tokens_per_hour=1000))
    assert [lim.reserve(0.0), lim.reserve(0.0), lim.reserve(0.0)] == [0.0, 0.5, 1.0]
    lim.took(10.0, 600)
    assert not lim.over_budget(11.0)
    lim.took(12.0, 500)
    assert lim.over_budget(13.0) and not lim.over_budget(12.0 + 3601)


def test_cache_keys_cover_everything_sent() -> None:
    k = AnswerCache.key("m", "sys", "user", "{}", ["a"])
    assert k == AnswerCache.key("m", "sys", "user", "{}", ["a"])
    assert k != AnswerCache.key("m2", "sys", "user", "{}", ["a"])
    assert k != AnswerCache.key("m", "sys", "user2", "{}", ["a"])


def test_no_endpoint_no_steps() -> None:
    assert LLMWork(LLMConfig(), Redactor()).steps == {}


def test_stored_answers_are_redacted() -> None:
    cache = AnswerCache(Redactor())
    cache.put("act", "k", {"edits": [{"replace": "key sk-proj-9fK2mQ7xLp3RvT8wZ1nB4cY6"}]}, 1)
    (row,) = cache.drain()
    assert "sk-proj" not in row["answer"] and "REDACTED" in row["answer"]
    assert "sk-proj" not in json.dumps(cache.get("k"))


def test_rows_with_a_source_match_their_tables() -> None:
    tag = TagRecord("c", 1, "i", "n", 1, source="llm")
    assert list(tag_row(tag)) == ddl_columns("conversation_tags")


def test_status_shows_each_step() -> None:
    st = {
        "home": "h",
        "running": True,
        "processes": {},
        "topics": {},
        "tables": {},
        "deadletters": 0,
        "errors": [],
        "llm": [
            dict(
                step="judge",
                calls=7,
                failures=5,
                cached=2,
                skipped=9,
                tokens=1234,
                median_latency_s=2.5,
                queued=3,
                breaker="open",
            ),
        ],
    }
    text = format_status(st)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("judge"))
    assert "7 calls" in line and "5 failed" in line and "2.50s" in line
    assert "queue    3" in line and "1234 tokens" in line and "breaker open" in line
