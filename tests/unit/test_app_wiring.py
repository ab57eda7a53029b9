"""The worker's faust app: every stage ends the worker when it raises, rather than letting
faust restart the stage without the batch it held (those events would never be redelivered)."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from processors import app as app_module
from processors.app import EXIT_STAGE_CRASHED, Pipeline, build_app, exit_on_crash
from processors.config import Config


def test_every_stage_exits_the_worker_when_it_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(home=str(tmp_path))
    cfg.understand.embedder = "hashing"
    agent = tmp_path / "agent"
    subprocess.run(["git", "init", "-q", "-b", "main", str(agent)], check=True)
    subprocess.run(["git", "-C", str(agent), "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q",
                    "--allow-empty", "-m", "start"], check=True)
    cfg.act.repo = str(agent)      # the act stage runs only with a target
    codes: list[int] = []
    monkeypatch.setattr(app_module.os, "_exit", codes.append)
    app = build_app(Pipeline(cfg, store=None), "127.0.0.1:1")   # nothing connects until started
    assert len(app.agents) == 5
    for agent in app.agents.values():
        # the hook faust calls when an agent raises (faust/agents/agent.py, _execute_actor)
        asyncio.run(agent._on_error(agent, RuntimeError("boom")))
    assert codes == [EXIT_STAGE_CRASHED] * 5


def test_exit_on_crash_ends_the_process_with_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []
    monkeypatch.setattr(app_module.os, "_exit", codes.append)
    asyncio.run(exit_on_crash(object(), RuntimeError("boom")))
    assert codes == [EXIT_STAGE_CRASHED]
