"""The layer commands: ``tag``, ``intents``, ``diagnoses``, ``diagnose``, ``proposals``, ``review``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from processors.config import Config, load_config
from processors.errors import CloseloopError, InputError
from processors.records import Conversation, Message, TagRecord, ToolCall
from processors.store import Store, open_store

TAG_BATCH = 256


def _cfg(a: argparse.Namespace) -> Config:
    return load_config(getattr(a, "config", None), overrides={"home": getattr(a, "home", None)})


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))[:60]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, ""))[:60].ljust(widths[c]) for c in cols))
    return "\n".join(lines)


# -- tag ---------------------------------------------------------------------------------------
def conversation_from_json(d: dict[str, Any]) -> Conversation:
    """An exported conversation line: ``{"conversation_id", "turns": [{"role", "content"}, ...]}``."""
    if not isinstance(d, dict) or not isinstance(d.get("conversation_id"), str):
        raise InputError("a line needs a string conversation_id")
    turns = d.get("turns")
    if not isinstance(turns, list):
        raise InputError("a line needs a list of turns")
    msgs, calls = [], []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ("user", "assistant", "tool", "system"):
            raise InputError(f"turn {i} needs a role of user, assistant, tool or system")
        content = t.get("content") or ""
        if not isinstance(content, str):
            raise InputError(f"turn {i}: content must be a string")
        ts = int(t.get("ts_ns") or t.get("timestamp_ns") or i)
        msgs.append(
            Message(
                role=t["role"],
                content=content,
                ts_ns=ts,
                tool_name=str(t.get("tool_name", "")),
                tool_arguments=str(t.get("arguments", "")),
                error=str(t.get("error", "")),
            )
        )
        for tc in t.get("tool_calls") or []:
            calls.append(
                ToolCall(
                    name=str(tc.get("name", "")),
                    arguments=json.dumps(tc.get("arguments", "")),
                    result=str(tc.get("result", "")),
                    error_message=str(tc.get("error", "")),
                )
            )
    return Conversation(
        conversation_id=d["conversation_id"],
        messages=msgs,
        tool_calls=calls,
        prompt_version=str(d.get("prompt_version", "")),
        closed_reason=str(d.get("closed_reason", "end")),
        errors=sum(1 for m in msgs if m.error),
    )


def run_tag(
    cfg: Config, lines: list[str], now_ns: int
) -> tuple[list[dict[str, Any]], list[str], Any]:
    """The understand cores over exported conversations, in arrival order, one pass."""
    from processors.llm import make_llm
    from processors.understand.core import Understand
    from processors.understand.embed import make_embedder

    core = Understand(
        cfg, make_embedder(cfg.understand, cfg.home_path / "models", cfg.llm), make_llm(cfg.llm)
    )
    convs: list[Conversation] = []
    errors: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            convs.append(conversation_from_json(json.loads(line)))
        except (ValueError, InputError) as e:
            errors.append(f"line {n}: {e}")
    tags: list[TagRecord] = []
    for i in range(0, len(convs), TAG_BATCH):
        tags += core.process(convs[i : i + TAG_BATCH], now_ns).tags
    names = {i: core._name_of(i) for i in {t.intent_id for t in tags}}
    out = [
        {
            "conversation_id": t.conversation_id,
            "intent_id": core.model.resolve(t.intent_id),
            "intent_name": names.get(t.intent_id, t.intent_name),
            "signals": t.signals,
            "outcome": t.outcome,
            "outcome_turn": t.outcome_turn,
        }
        for t in tags
    ]
    for o in out:  # final names: intents named later in the pass name earlier lines too
        o["intent_name"] = core._name_of(o["intent_id"])
    return out, errors, core


def cmd_tag(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    src = sys.stdin if a.input == "-" else open(a.input, encoding="utf-8")
    with src:
        lines = src.readlines()
    out, errors, core = run_tag(cfg, lines, time.time_ns())
    dst = sys.stdout if a.output == "-" else open(a.output, "w", encoding="utf-8")
    with dst:
        for o in out:
            dst.write(json.dumps(o, ensure_ascii=False) + "\n")
    for e in errors:
        print(f"closeloop tag: skipped {e}", file=sys.stderr)
    print(
        f"closeloop tag: {len(out)} conversations tagged into {len(core.model.intents())} intents"
        f"{f', {len(errors)} lines skipped' if errors else ''}",
        file=sys.stderr,
    )
    return 1 if errors and not out else 0


# -- inspection --------------------------------------------------------------------------------
def _store(a: argparse.Namespace) -> Store:
    return open_store(_cfg(a))


def cmd_intents(a: argparse.Namespace) -> int:
    store = _store(a)
    rows = store.query("""
        SELECT i.intent_id AS id, i.name AS name, i.size AS size, i.status AS status,
               round(t.fail_rate, 3) AS failure_rate, t.n AS tagged, t.top_signals AS signals
        FROM (SELECT * FROM intents FINAL) AS i
        LEFT JOIN (SELECT intent_id, count() AS n, avg(failed) AS fail_rate,
                          arrayStringConcat(arraySlice(topK(3)(arrayJoin(if(empty(signals), [''], signals))), 1, 3), ',')
                          AS top_signals
                   FROM conversation_tags FINAL GROUP BY intent_id) AS t ON t.intent_id = i.intent_id
        WHERE i.status = 'active' ORDER BY i.size DESC""")
    print(_table(rows, ["id", "name", "size", "tagged", "failure_rate", "signals"]))
    return 0


def cmd_diagnoses(a: argparse.Namespace) -> int:
    store = _store(a)
    rows = store.query(
        "SELECT diagnosis_id AS id, intent_name AS intent, rule, support, failures, "
        "round(failure_rate, 3) AS rate, status, summary, trace_ids FROM diagnoses FINAL "
        "ORDER BY updated_ns DESC"
    )
    if getattr(a, "json", False):
        print(json.dumps(rows, default=str, indent=2))
        return 0
    for r in rows:
        print(
            f"{r['id']}  [{r['status']}] {r['rule']}  intent={r['intent']}  "
            f"{r['failures']}/{r['support']} failing ({r['rate']:.0%})"
        )
        print(f"    {r['summary']}")
        print(f"    traces: {', '.join(r['trace_ids'][:5])}")
    if not rows:
        print("(no diagnoses)")
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    """Force a diagnosis for one intent now: replay its tagged conversations through a fresh
    diagnoser (the worker's running one keeps its own state) and write what it finds."""
    from processors.diagnose.core import Diagnoser, diagnosis_rows

    cfg = _cfg(a)
    store = open_store(cfg)
    rows = store.query("""
        SELECT t.* EXCEPT ts, c.messages AS messages_json, c.trace_ids AS trace_ids,
               c.closed_reason AS closed_reason, c.latency_ms AS latency_ms, c.errors AS errors
        FROM (SELECT * FROM conversation_tags FINAL) AS t
        INNER JOIN (SELECT * FROM conversations FINAL) AS c ON c.conversation_id = t.conversation_id
        ORDER BY t.ts_ns""")
    if not any(r["intent_id"] == a.intent for r in rows):
        raise CloseloopError(
            f"no tagged conversations for intent {a.intent!r}; `closeloop intents` lists them"
        )
    core = Diagnoser(cfg.diagnose)
    now = time.time_ns()
    for r in rows:
        msgs = [Message.from_dict(m) for m in json.loads(r.pop("messages_json") or "[]")]
        conv = Conversation(
            conversation_id=r["conversation_id"],
            version=r["conversation_version"],
            messages=msgs,
            trace_ids=r.pop("trace_ids"),
            closed_reason=r.pop("closed_reason"),
            latency_ms=r.pop("latency_ms"),
            errors=r.pop("errors"),
            prompt_version=r["prompt_version"],
            agent_version=r["agent_version"],
            model=r["model"],
            tool_calls=[
                ToolCall(
                    name=m.tool_name,
                    call_id=m.tool_call_id,
                    arguments=m.tool_arguments,
                    result="" if m.error else m.content,
                    error_message=m.error,
                    trace_id=m.trace_id,
                    span_id=m.span_id,
                )
                for m in msgs
                if m.role == "tool"
            ],
        )
        r["failed"] = bool(r["failed"])
        core.observe(TagRecord.from_dict({**r, "conversation": conv.to_dict()}), now)
    found = core.diagnose_now(a.intent, now)
    if found:
        store.insert_records("diagnoses", diagnosis_rows(found))
    for d in found:
        print(f"{d.diagnosis_id}  {d.rule}: {d.summary}")
    if not found:
        print(
            f"no diagnosis for {a.intent}: its failure rate does not stand out "
            f"(min_support={cfg.diagnose.min_support}, min_failures={cfg.diagnose.min_failures})"
        )
    return 0


def cmd_proposals(a: argparse.Namespace) -> int:
    store = _store(a)
    rows = store.query(
        "SELECT proposal_id AS id, status, backend, branch, pr_url, title, version "
        "FROM proposals FINAL ORDER BY created_ns DESC"
    )
    print(_table(rows, ["id", "status", "branch", "title", "version"]))
    return 0


def cmd_review(a: argparse.Namespace) -> int:
    from processors.act import open_backend
    from processors.review.core import decide, load_diagnosis, load_proposal

    cfg = _cfg(a)
    store = open_store(cfg)
    if a.action == "list":
        rows = store.query(
            "SELECT proposal_id AS id, status, title FROM proposals FINAL "
            "WHERE status IN ('open', 'approved') ORDER BY created_ns"
        )
        print(_table(rows, ["id", "status", "title"]))
        return 0
    if not a.proposal:
        raise CloseloopError(
            f"`closeloop review {a.action}` needs a proposal id; `closeloop review list` shows them"
        )
    prop = load_proposal(store, a.proposal)
    if prop is None:
        raise CloseloopError(f"no proposal {a.proposal!r}")
    if a.action == "show":
        diag = load_diagnosis(store, prop.diagnosis_id)
        print(
            f"{prop.title}\n{'=' * len(prop.title)}\nstatus: {prop.status}   branch: {prop.branch}   "
            f"{prop.pr_url}\n\n{prop.body}\n\n{prop.diff}"
        )
        if diag:
            print(f"\nevidence traces: {', '.join(diag.trace_ids)}")
        return 0
    if not a.reviewer:
        raise CloseloopError("a decision needs the reviewer's name: --as NAME")
    if cfg.act.repo == "":
        raise CloseloopError("act.repo is not configured: nothing to merge into")
    record, updated = decide(
        store,
        open_backend(cfg),
        prop.proposal_id,
        a.action,
        a.reviewer,
        a.comment or "",
        time.time_ns(),
        cfg=cfg,
    )
    print(
        f"{a.action}d {prop.proposal_id} as {record.reviewer}"
        + (f"; merged {record.merged_commit[:12]} into {prop.base}" if record.merged_commit else "")
        + f"; proposal is now {updated.status}"
    )
    return 0


def register(sub: argparse._SubParsersAction, common: Any) -> None:
    """Add the layer commands to the ``closeloop`` parser."""
    p = sub.add_parser("tag", help="run the understand cores over exported conversations (JSONL)")
    common(p)
    p.add_argument("--input", required=True, help="conversations.jsonl (- for stdin)")
    p.add_argument("--output", required=True, help="tags.jsonl (- for stdout)")
    p.set_defaults(fn=cmd_tag)

    p = sub.add_parser("intents", help="the learned intent taxonomy with sizes and failure rates")
    common(p)
    p.set_defaults(fn=cmd_intents)

    p = sub.add_parser("diagnoses", help="open diagnoses with their evidence")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_diagnoses)

    p = sub.add_parser("diagnose", help="force a diagnosis of one intent now")
    common(p)
    p.add_argument("--intent", required=True)
    p.set_defaults(fn=cmd_diagnose)

    p = sub.add_parser("proposals", help="proposed changes (branches / pull requests)")
    common(p)
    p.set_defaults(fn=cmd_proposals)

    p = sub.add_parser("review", help="list, show, approve or reject proposals (a human decision)")
    common(p)
    p.add_argument("action", choices=["list", "show", "approve", "reject"])
    p.add_argument("proposal", nargs="?")
    p.add_argument("--as", dest="reviewer", help="your name: recorded with the decision")
    p.add_argument("--comment", default="")
    p.set_defaults(fn=cmd_review)

    p = sub.add_parser("web", help="serve the review page (closeloop up starts it)")
    common(p)
    p.add_argument("--port", type=int, help="default: web.port")
    p.set_defaults(fn=cmd_web)


def cmd_web(a: argparse.Namespace) -> int:
    """Serve the review page until SIGTERM/SIGINT (``closeloop up`` runs it as a child)."""
    import signal
    import threading

    from processors.embedded.procs import write_run_file
    from processors.web.server import WebServer

    cfg = _cfg(a)
    store = open_store(cfg)
    server = WebServer(cfg, store, port=a.port).start()
    run = cfg.run_dir()
    run.mkdir(parents=True, exist_ok=True)
    # the login url holds the token: the file is for its owner only
    write_run_file(run, "web.json", {"url": server.url, "login_url": server.login_url}).chmod(0o600)
    print(
        f"closeloop web: serving the review page at {server.url} (login: {server.token_path})",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    store.close()
    (run / "web.json").unlink(missing_ok=True)
    return 0
