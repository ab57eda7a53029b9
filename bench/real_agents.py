"""Real agents: the loop on runs of an agent nobody here wrote (tau-bench airline, gpt-4o).

    python -m bench.real_agents [--data DIR] [--out F.md] [--json F.json]

Imports the development set's runs as `closeloop import` would (transcripts -> GenAI OTLP
spans -> capture -> assemble -> understand -> diagnose (its rules and the contrastive
analysis) -> proposals, the cores in one process, no LLM), twice: with the runs' rewards attached as evaluation events, and
without them (the outcome heuristic alone). It reports

* outcome agreement: the share of runs whose ``failed`` tag matches reward == 0;
* coverage: the share of failed runs (reward 0) explained by a diagnosis of the right
  ``failure_kind`` (as its ``diagnosis_conversations`` rows list them once the stream ends);
  precision: the share of (run, diagnosis) explanations whose kind is right
  (an explained run with reward 1 is wrong whatever the kind);
* proposals: templated changes made against the agent's system prompt, per diagnosed intent;
* time from the start of the import to the first diagnosis.

The right kinds of a failed run are derived here, from the run's gold actions (this bench
may know tau-bench's format; closeloop does not): a state-changing call the gold run does
not make is ``unauthorized_action`` (a hand-off: ``unnecessary_escalation``), a gold action
never taken is ``missing_action``, a gold action's tool called with other arguments is
``wrong_tool_arguments``. State-changing tools are tau-bench airline's write tools
(:data:`WRITES`, as its README lists them: book, cancel, update, send, and the hand-off).

The data folder holds ``gpt-4o-airline-tasks-0-24.json`` (``--data``, or
``CLOSELOOP_TAU_DATA``); without it the section says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.tau_to_jsonl import conversation_id, convert
from processors.act import propose_change
from processors.capture.core import Capture, RawMessage
from processors.capture.transcripts import parse_line, to_request
from processors.config import ActTarget, Config, load_config
from processors.diagnose.contrast import conversation_rows
from processors.diagnose.core import Diagnoser
from processors.records import Diagnosis
from processors.understand.assemble import build_conversation
from processors.understand.core import Understand
from processors.understand.embed import make_embedder

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tau-airline-dev"
RUNS_FILE = "gpt-4o-airline-tasks-0-24.json"
HANDOFF = "transfer_to_human_agents"
WRITES = {
    "book_reservation",
    "cancel_reservation",
    "update_reservation_flights",
    "update_reservation_baggages",
    "update_reservation_passengers",
    "send_certificate",
    HANDOFF,
}
GOALS = {"agreement_with_rewards": 1.0, "coverage": 0.5, "precision": 0.7}


def _calls(run: dict[str, Any], writes: set[str]) -> list[tuple[str, Any]]:
    return [
        (tc["function"]["name"], json.loads(tc["function"]["arguments"]))
        for m in run["traj"]
        if m["role"] == "assistant"
        for tc in m.get("tool_calls") or []
        if tc["function"]["name"] in writes
    ]


def right_kinds(run: dict[str, Any], writes: set[str]) -> set[str]:
    """The failure kinds a failed run shows, from its gold actions vs the calls it made."""
    taken = _calls(run, writes)
    gold = [(a["name"], a["kwargs"]) for a in run["info"]["task"]["actions"] if a["name"] in writes]
    gold_names, taken_names = {g for g, _ in gold}, {t for t, _ in taken}
    kinds = set()
    for t in taken:
        if t in gold:
            continue
        if t[0] in gold_names:
            kinds.add("wrong_tool_arguments")
        else:
            kinds.add("unnecessary_escalation" if t[0] == HANDOFF else "unauthorized_action")
    kinds |= {"missing_action" for g, _ in gold if g not in taken_names}
    return kinds


def run_loop(cfg: Config, runs: list[dict[str, Any]], rewards: bool) -> dict[str, Any]:
    """The cores on every run: tags, diagnoses (with the runs they explain), proposals."""
    t0 = time.perf_counter()
    now = time.time_ns()
    capture = Capture(cfg.capture)
    convs = []
    for i, run in enumerate(runs):
        tr = parse_line(json.dumps(convert(run, i, rewards)), now)
        batch = capture.process(
            [RawMessage("otlp_spans", 0, i, None, to_request(tr).SerializeToString())], now
        )
        if batch.deadletters:
            raise SystemExit(f"capture dead-lettered run {i}: {batch.deadletters[0].reason}")
        convs.append(
            build_conversation(tr.conversation_id, [t.to_dict() for t in batch.turns], "end")
        )
    embedder = make_embedder(cfg.understand, cfg.home_path / "models", cfg.llm)
    tags = Understand(cfg, embedder).process(convs, now).tags
    diagnoser = Diagnoser(cfg.diagnose)
    latest: dict[str, Diagnosis] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}  # diagnosis_conversations, as stored
    first_diagnosis_s = float("nan")
    for t in tags:  # the diagnose stage's stream, as the worker feeds it
        diags = diagnoser.observe(t, now)
        for r in conversation_rows(diags) + diagnoser.take_explanation_rows():
            key = (r["diagnosis_id"], r["conversation_id"])
            if key not in rows or r["version"] >= rows[key]["version"]:  # ReplacingMergeTree
                rows[key] = r
        for d in diags:
            latest[d.diagnosis_id] = d
            if first_diagnosis_s != first_diagnosis_s:  # nan: the first one
                first_diagnosis_s = time.perf_counter() - t0
    found = [d for d in latest.values() if d.status != "superseded"]
    system = next(m["content"] for m in runs[0]["traj"] if m["role"] == "system")
    files = {"prompts/system.md": system}
    targets = [ActTarget("prompts/system.md", "prompt")]
    proposals = defaultdict(int)
    for d in found:
        change, _why = propose_change(d, files, targets)
        proposals[d.intent_id] += change is not None
    listed: dict[str, set[str]] = defaultdict(set)
    for (did, cid), r in rows.items():
        if r["explained"]:
            listed[did].add(cid)
    return {
        "tags": tags,
        "found": found,
        "listed": listed,
        "proposals": proposals,
        "first_s": first_diagnosis_s,
    }


def measure(runs: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
    writes = WRITES
    by_id = {conversation_id(r): r for r in runs}
    failed_tag = {t.conversation_id: t.failed for t in out["tags"]}
    agree = sum(failed_tag[cid] == (r["reward"] == 0) for cid, r in by_id.items())
    kinds = {cid: right_kinds(r, writes) for cid, r in by_id.items() if r["reward"] == 0}
    explained: dict[str, set[str]] = defaultdict(set)
    pairs = right_pairs = 0
    per_diagnosis = []
    for d in out["found"]:
        cids = out["listed"][d.diagnosis_id]
        right = sum(d.failure_kind in kinds.get(cid, set()) for cid in cids)
        for cid in cids:
            explained[cid].add(d.failure_kind)
        pairs += len(cids)
        right_pairs += right
        ev = d.evidence
        tested = ev.get("tested") or {}
        per_diagnosis.append(
            {
                "kind": d.failure_kind,
                "pattern": f"{ev.get('pattern', d.rule)} {ev.get('tool', '')} {ev.get('argument', '')}",
                "counts": f"{ev.get('failed_with')} of {ev.get('failed')} vs "
                f"{ev.get('ok_with')} of {ev.get('ok')}",
                "tested": tested.get("pattern", ""),
                "p": ev.get("p_value"),
                "runs": len(cids),
                "right": right,
            }
        )
    covered = sum(bool(explained.get(cid, set()) & k) for cid, k in kinds.items())
    diagnosed = {d.intent_id for d in out["found"]}
    return {
        "runs": len(runs),
        "failed_runs": len(kinds),
        "agreement": agree / len(runs),
        "coverage": covered / max(len(kinds), 1),
        "precision": right_pairs / pairs if pairs else float("nan"),
        "explained_runs": len(explained),
        "runs_under_several_kinds": sum(len(k) > 1 for k in explained.values()),
        "per_diagnosis": per_diagnosis,
        "diagnoses": len(out["found"]),
        "kinds": dict(Counter(d.failure_kind for d in out["found"])),
        "diagnosed_intents": len(diagnosed),
        "intents_with_proposal": sum(1 for i in diagnosed if out["proposals"].get(i)),
        "proposals": sum(out["proposals"].values()),
        "first_diagnosis_s": out["first_s"],
        "intents": len({t.intent_id for t in out["tags"]}),
    }


def report(res: dict[str, dict[str, Any]], data: Path) -> str:
    w, wo = res["with rewards"], res["without rewards"]
    rows = [
        ("outcome agreement with reward", "agreement", "{:.0%}", "100% with rewards"),
        ("coverage (failed runs explained, right kind)", "coverage", "{:.0%}", ">= 50%"),
        ("precision (explanations of the right kind)", "precision", "{:.0%}", ">= 70%"),
        ("diagnoses", "diagnoses", "{}", ""),
        ("runs explained", "explained_runs", "{}", ""),
        ("intents learned / diagnosed", None, "", ""),
        ("proposals (intents with >= 1 / diagnosed)", None, "", "1 per diagnosed intent"),
        ("import -> first diagnosis (s, cores)", "first_diagnosis_s", "{:.1f}", ""),
    ]
    lines = [
        f"Data: {w['runs']} runs ({w['failed_runs']} with reward 0) of `{data.name}`, no LLM.",
        "",
        "| measure | with rewards | without rewards | goal |",
        "|---|---|---|---|",
    ]
    for label, key, fmt, goal in rows:
        if label.startswith("intents learned"):
            cells = [f"{r['intents']} / {r['diagnosed_intents']}" for r in (w, wo)]
        elif label.startswith("proposals"):
            cells = [
                f"{r['proposals']} ({r['intents_with_proposal']} / {r['diagnosed_intents']})"
                for r in (w, wo)
            ]
        else:
            cells = [fmt.format(r[key]) for r in (w, wo)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {goal} |")
    lines += ["", f"Kinds diagnosed (with rewards): {w['kinds']}; without: {wo['kinds']}."]
    lines += [
        f"Runs explained under several kinds (with rewards): {w['runs_under_several_kinds']}.",
        "",
        "| diagnosis (with rewards) | pattern, tool, argument | failed vs successful "
        "| tested as | adjusted p | runs listed | of the right kind |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in sorted(w["per_diagnosis"], key=lambda d: (-d["runs"], d["kind"])):
        lines.append(
            f"| {d['kind']} | {d['pattern'].strip()} | {d['counts']} | {d['tested'] or '-'} "
            f"| {d['p']:.4f} | {d['runs']} | {d['right']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("CLOSELOOP_TAU_DATA", DEFAULT_DATA))
    )
    ap.add_argument("--home", type=Path, default=ROOT / ".closeloop-bench")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    f = a.data / RUNS_FILE
    if not f.is_file():
        text = f"Skipped: {f} not found (pass --data or set CLOSELOOP_TAU_DATA).\n"
        if a.out:
            a.out.write_text(text)
        print(text)
        return 0
    runs = json.loads(f.read_text())
    cfg = load_config(None, env={}, overrides={"home": str(a.home)})
    res = {}
    for label, rewards in (("with rewards", True), ("without rewards", False)):
        res[label] = measure(runs, run_loop(cfg, runs, rewards))
        print(label, res[label], file=sys.stderr)
    text = report(res, a.data)
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
