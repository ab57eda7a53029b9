"""A restart on a used home with a memory broker: the broker's topics start at offset 0
again while the checkpoints in the store remember offsets of the old topics. Nothing new may
be skipped: the checkpoints are reset to the start of the new topics, with a warning."""

from __future__ import annotations

from pathlib import Path

from examples.support_agent import run_cycle
from processors.embedded.stack import EmbeddedStack, read_stack_file
from processors.status import collect_status, format_status

from .harness import conversation_intents, running_loop

N = 40
TAGS = "SELECT count() FROM conversation_tags FINAL"


def test_restart_with_a_memory_broker_skips_no_new_conversation(tmp_path: Path) -> None:
    with running_loop(tmp_path) as loop:
        first = run_cycle(loop.repo, loop.endpoint, n=N, seed=5, mode="scripted")
        assert loop.wait_count(TAGS, N) == N
        loop.stack.stop()  # the broker's topics (memory storage) go with it

        loop.stack = EmbeddedStack(loop.cfg, config_file=loop.stack.config_file).start()
        try:
            loop.store = loop.stack.sql_store()
            second = run_cycle(loop.repo, loop.endpoint, n=N, seed=6, mode="scripted")
            ids = [c.conversation_id for c in first.conversations + second.conversations]
            assert loop.wait_count(TAGS, 2 * N) == 2 * N, "new conversations were skipped"
            assert set(conversation_intents(loop.store, ids)) == set(ids)

            log = (loop.cfg.log_dir() / "worker.log").read_text()
            assert "is not of this topic" in log  # said, not silent
            st = collect_status(loop.cfg, read_stack_file(loop.cfg))
            assert "understand" in {r["name"] for r in st["checkpoint_resets"]}, st
            assert "checkpoint understand reset" in format_status(st)
        finally:
            loop.stack.stop()
