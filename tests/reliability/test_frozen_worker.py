"""A frozen worker: alive, but its event loop silent (SIGSTOP stands in for a loop blocked on a
loaded machine). The supervisor kills it once its heartbeat is ``worker.stall_timeout_s`` old,
after asking for its threads' stacks, and restarts it as a crash with the reason "frozen";
`closeloop status` says so, and every conversation sent before and while it was frozen is
stored and tagged."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from examples.support_agent import run_cycle
from processors.embedded.stack import read_stack_file
from processors.heartbeat import last_beat_ns
from processors.status import collect_status, format_status
from tests.integration.worker_proc import wait_for

from .harness import conversation_intents, running_loop

N = 20
STALL_S = 8  # small for the test; the default (60 s) is above a loaded machine's loop pauses
TAGS = "SELECT count() FROM conversation_tags FINAL"


def test_a_frozen_worker_is_killed_and_restarted_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="closeloop.stack")
    with running_loop(tmp_path, {"worker": {"stall_timeout_s": STALL_S}}) as loop:
        stack, worker = loop.stack, loop.stack.children["worker"]
        before = run_cycle(loop.repo, loop.endpoint, n=N, seed=31, mode="scripted")
        assert loop.wait_count(TAGS, N) == N
        pid = worker.pid
        assert pid is not None
        assert wait_for(lambda: last_beat_ns(loop.cfg, pid) is not None, 30), "no heartbeat"
        stack.supervise_once()
        assert worker.pid == pid  # a worker whose loop answers is left alone

        os.kill(pid, signal.SIGSTOP)  # capture runs in the worker: the spans wait on the broker
        try:
            during = run_cycle(loop.repo, loop.endpoint, n=N, seed=32, mode="scripted")

            def replaced() -> bool:
                stack.supervise_once()  # what `closeloop up` does twice a second
                return worker.pid not in (None, pid)

            assert wait_for(replaced, STALL_S * 10), "the frozen worker was left running"
        finally:
            with contextlib.suppress(ProcessLookupError):  # left frozen: let the stop work
                os.kill(pid, signal.SIGCONT)

        health = stack.health["worker"]
        assert health.last_code == -signal.SIGKILL
        assert health.last_error.startswith("frozen (no heartbeat for "), health.last_error
        assert health.restarts == 1
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(f"worker (pid {pid}) is frozen" in m for m in said), said
        log_text = worker.log_path.read_text(errors="replace")
        assert "most recent call first" in log_text  # faulthandler's stacks, before the kill

        ids = {c.conversation_id for r in (before, during) for c in r.conversations}
        assert len(ids) == 2 * N
        assert loop.wait_count(TAGS, 2 * N) == 2 * N, "conversations were lost"
        assert set(conversation_intents(loop.store, list(ids))) == ids
        new_pid = worker.pid
        assert new_pid is not None
        assert wait_for(lambda: last_beat_ns(loop.cfg, new_pid) is not None, 60)

        # the stack file and `closeloop status` say which process froze, and count it
        info = json.loads((loop.cfg.run_dir() / "stack.json").read_text())
        assert info["processes"]["worker"]["last_error"] == health.last_error
        st = collect_status(loop.cfg, read_stack_file(loop.cfg))
        assert st["processes"]["worker"]["restarts"] == 1
        assert st["processes"]["worker"]["silent_s"] < STALL_S
        text = format_status(st)
        assert "last exit: killed by signal 9" in text and "frozen (no heartbeat for" in text


def test_a_frozen_gateway_or_page_is_killed_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway and the review page write no heartbeat: the supervisor asks them for
    ``/healthz``. Stopped (SIGSTOP: the kernel still accepts connections, nothing answers), each
    is killed after ``worker.stall_timeout_s`` and restarted on its port; the intake works again."""
    caplog.set_level(logging.ERROR, logger="closeloop.stack")
    with running_loop(tmp_path, {"worker": {"stall_timeout_s": STALL_S}}) as loop:
        stack = loop.stack
        for name in ("gateway", "web"):
            child = stack.children[name]
            pid = child.pid
            assert pid is not None
            stack.supervise_once()
            assert child.pid == pid  # it answers: left alone
            os.kill(pid, signal.SIGSTOP)
            try:

                def replaced(child=child, pid=pid) -> bool:
                    stack.supervise_once()
                    return child.pid not in (None, pid)

                assert wait_for(replaced, STALL_S * 10), f"the frozen {name} was left running"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            health = stack.health[name]
            assert health.last_error.startswith("frozen (no answer on /healthz for "), health
            # killed by a signal: SIGKILL, or its own crash while writing its stacks (CI saw the
            # page die of SIGSEGV between the SIGQUIT and the SIGKILL); the reason is the freeze
            assert health.restarts == 1 and (health.last_code or 0) < 0, health
            assert "most recent call first" in child.log_path.read_text(errors="replace")
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert any(f"{name} (pid {pid}) is frozen" in m for m in said), said

        # the new gateway serves on the same port: conversations sent now are stored and tagged
        run_cycle(loop.repo, loop.endpoint, n=N, seed=33, mode="scripted")
        assert loop.wait_count(TAGS, N) == N
