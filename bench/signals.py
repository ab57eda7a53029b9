"""Precision and recall of the rule-based signals on a hand-labelled sample.

    python -m bench.signals [--data tests/data/signals_labelled.jsonl]

The sample (``tests/data/signals_labelled.jsonl``): 270 conversations, their user turns only —
110 built the way the demo builds its customers (BANKING77 openings, card digits and transfer
references woven in, the short follow-ups its simulated users give), 60 BANKING77 utterances
from categories where signals are likely (closing an account, cards or top-ups not working,
passcodes, identity checks), and the 100 runs of tau-airline-dev (tasks 0-24, 4 trials each).
Each was read and labelled once by hand with the signals it shows, by the definitions of
``processors.understand.signals`` (bug report: the user says something in the product does not
work; feature request: asks for a capability the product lacks; churn risk: says they will
leave or close their account; setup friction: stuck verifying, logging in, installing or
configuring; confusion: says they do not follow the agent, or that the agent misunderstood
them). Only :func:`structural_signals` is measured (no LLM judge, no learner).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from processors.records import Conversation, Message
from processors.understand.signals import TAGS, structural_signals

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "tests" / "data" / "signals_labelled.jsonl"
GOAL_PRECISION = 0.8


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def predict(row: dict) -> set[str]:
    conv = Conversation(row["id"], messages=[Message("user", t) for t in row["user"]])
    return set(structural_signals(conv).tags)


def scores(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per signal: labelled, predicted, true positives, precision (1.0 when nothing fired), recall."""
    out = {}
    preds = [predict(r) for r in rows]
    for tag in TAGS:
        truth = [tag in r["labels"] for r in rows]
        said = [tag in p for p in preds]
        tp = sum(t and s for t, s in zip(truth, said))
        out[tag] = {
            "labelled": sum(truth),
            "predicted": sum(said),
            "tp": tp,
            "precision": tp / sum(said) if any(said) else 1.0,
            "recall": tp / sum(truth) if any(truth) else 1.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.signals", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT)
    args = ap.parse_args(argv)
    rows = load(args.data)
    lines = [
        f"Signals on {len(rows)} hand-labelled conversations "
        f"(`{args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data}`), "
        "rules only:",
        "",
        "| signal | labelled | fired | right | precision | recall | precision ≥ 0.8 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for tag, s in scores(rows).items():
        lines.append(
            f"| {tag} | {s['labelled']} | {s['predicted']} | {s['tp']} | {s['precision']:.2f} | "
            f"{s['recall']:.2f} | {'met' if s['precision'] >= GOAL_PRECISION else 'NOT met'} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
