"""A new user's first commands, before `closeloop up` or `migrate`: the embedded chDB store
migrates itself on first use, so they answer (empty) instead of failing on missing tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _closeloop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")}
    env["CLOSELOOP_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "processors.cli", *args],
        cwd=home.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_first_commands_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for command in (["intents"], ["diagnoses"], ["proposals"], ["review", "list"]):
        r = _closeloop(home, *command)
        assert r.returncode == 0, f"{command}: {r.stderr}"
        assert "UNKNOWN_TABLE" not in r.stdout + r.stderr

    r = _closeloop(home, "sql", "SELECT count() FROM conversations FINAL FORMAT TSV")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0\n"  # the query's own FORMAT clause, not the default pretty table

    r = _closeloop(home, "status")
    assert r.returncode == 0, r.stderr
    assert "not running" in r.stdout
    assert "`closeloop up`" in r.stdout
    assert "dead letters: 0" in r.stdout
