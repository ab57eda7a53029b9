"""Convert tau-bench trajectories (a JSON list of runs) to the JSONL `closeloop import` reads.

    python bench/tau_to_jsonl.py RUNS.json OUT.jsonl [--no-rewards]

This script knows the tau-bench format; closeloop does not. Each run becomes one line: the
trajectory's messages (OpenAI chat format), the system prompt, the reward as a 0/1 score named
``reward`` (left out with ``--no-rewards``), and tool results starting with "Error" marked as
tool errors (tau-bench's own convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START = 1_767_225_600  # 2026-01-01T00:00:00Z: runs are spaced an hour apart from here


def conversation_id(run: dict[str, Any]) -> str:
    return f"tau-{run['task_id']}-{run['trial']}"


def convert(run: dict[str, Any], index: int, rewards: bool) -> dict[str, Any]:
    msgs = []
    for m in run["traj"]:
        m = dict(m)
        if m["role"] == "tool" and str(m.get("content", "")).startswith("Error"):
            m["error"] = True
        msgs.append(m)
    line: dict[str, Any] = {
        "id": conversation_id(run),
        "messages": msgs,
        "model": "gpt-4o",
        "agent_name": "tau-agent",
        "start_time": START + 3600 * index,
    }
    if rewards:
        line.update(score=float(run["reward"]), evaluation_name="reward")
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--no-rewards", action="store_true")
    a = p.parse_args(argv)
    runs = json.loads(a.runs.read_text())
    with a.out.open("w") as f:
        for i, run in enumerate(runs):
            f.write(json.dumps(convert(run, i, not a.no_rewards)) + "\n")
    print(f"{len(runs)} conversations -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
