"""The layer commands: ``tag``, ``intents``, ``diagnoses``, ``diagnose``, ``proposals``, ``review``,
``import``, ``feedback``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from processors.config import Config, config_for
from processors.errors import CloseloopError, InputError
from processors.feedback import load_tagged, record_feedback
from processors.records import Conversation, Message, TagRecord, ToolCall
from processors.store import Store, open_store

TAG_BATCH = 256


def _cfg(a: argparse.Namespace) -> Config:
    return config_for(getattr(a, "config", None), getattr(a, "home", None))


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

    llm = make_llm(cfg.llm)
    core = Understand(
        cfg,
        make_embedder(cfg.understand, cfg.home_path / "models", cfg.llm),
        llm_enabled=llm is not None,
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
    retagged: dict[str, str] = {}  # conversation id -> the intent a re-clustering moved it to
    for i in range(0, len(convs), TAG_BATCH):
        batch = core.process(convs[i : i + TAG_BATCH], now_ns)
        tags += core.improve(batch, llm, now_ns).tags if llm is not None else batch.tags
        retagged.update((r["conversation_id"], r["intent_id"]) for r in batch.retags)
    names = {i: core._name_of(i) for i in {t.intent_id for t in tags}}
    out = [
        {
            "conversation_id": t.conversation_id,
            "intent_id": core.model.resolve(retagged.get(t.conversation_id, t.intent_id)),
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
        "SELECT diagnosis_id AS id, intent_name AS intent, rule, failure_kind, support, failures, "
        "round(failure_rate, 3) AS rate, status, summary, trace_ids FROM diagnoses FINAL "
        "ORDER BY updated_ns DESC"
    )
    if getattr(a, "json", False):
        print(json.dumps(rows, default=str, indent=2))
        return 0
    for r in rows:
        print(
            f"{r['id']}  [{r['status']}] {r['failure_kind']} ({r['rule']})  intent={r['intent']}  "
            f"{r['failures']}/{r['support']} failing ({r['rate']:.0%})"
        )
        print(f"    {r['summary']}")
        print(f"    traces: {', '.join(r['trace_ids'][:5])}")
    if not rows:
        print("(no diagnoses)")
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    """Force a diagnosis for one intent now: replay its tagged conversations through a fresh
    diagnoser (the worker's running one keeps its own state) and write what it finds. With an
    LLM configured, a sample of the intent's failed conversations is analysed too, as the
    stream does (``diagnose.llm_analysis_sample``), and the answers join or make diagnoses."""
    from processors.diagnose.contrast import conversation_rows
    from processors.diagnose.core import Diagnoser, diagnosis_rows
    from processors.llm import make_llm

    cfg = _cfg(a)
    store = open_store(cfg)
    tags = load_tagged(store)
    if not any(t.intent_id == a.intent for t in tags):
        raise CloseloopError(
            f"no tagged conversations for intent {a.intent!r}; `closeloop intents` lists them"
        )
    llm = make_llm(cfg.llm)
    core = Diagnoser(cfg.diagnose, llm_enabled=llm is not None)
    now = time.time_ns()
    for t in tags:
        core.observe(t, now)
    core.take_explanation_rows()  # of the replay's diagnoses, which are not written
    found = core.diagnose_now(a.intent, now)
    if llm is not None:
        analysed, rows = core.analyse_now(a.intent, llm, now)
        store.insert_records("failure_analyses", rows)
        # an analysis that joined a diagnosis found above makes its next version
        found = list({d.diagnosis_id: d for d in [*found, *analysed]}.values())
        print(
            f"LLM failure analysis: {len(rows)} failed conversation(s) of {a.intent} analysed, "
            f"{len(core.llm_rejections)} answer(s) refused"
        )
    if found:
        store.insert_records("diagnoses", diagnosis_rows(found))
        store.insert_records(
            "diagnosis_conversations", conversation_rows(found) + core.take_explanation_rows()
        )
    for d in found:
        print(f"{d.diagnosis_id}  {d.failure_kind} ({d.rule}): {d.summary}")
    if not found:
        print(
            f"no diagnosis for {a.intent}: its failure rate does not stand out "
            f"(min_support={cfg.diagnose.min_support}, min_failures={cfg.diagnose.min_failures}) "
            "and no pattern sets its failed conversations apart from its successful ones "
            f"(contrast_min_failures={cfg.diagnose.contrast_min_failures}, "
            f"contrast_min_successes={cfg.diagnose.contrast_min_successes})"
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
    from processors.review.loop import decide, load_diagnosis, load_proposal

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


# -- import ----------------------------------------------------------------------------------
IMPORT_RETRIES = 8  # a busy gateway answers 503/429: back off and resend, up to this many times


def _otlp_endpoint(cfg: Config, given: str | None) -> str:
    from processors.embedded.stack import read_stack_file

    if given:
        return given.rstrip("/")
    info = read_stack_file(cfg) or {}
    return str(info.get("otlp_http") or f"http://{cfg.otlp.host}:{cfg.otlp.http_port}")


def post_otlp(url: str, body: bytes, timeout_s: float = 30.0) -> None:
    """POST one OTLP/HTTP protobuf request; retried with backoff while the gateway is busy."""
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
    )
    for attempt in range(IMPORT_RETRIES + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                r.read()
            return
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503, 504) or attempt == IMPORT_RETRIES:
                detail = e.read()[:300].decode("utf-8", "replace")
                raise CloseloopError(f"{url} answered {e.code}: {detail}") from None
        except OSError as e:
            if attempt == IMPORT_RETRIES:
                raise CloseloopError(
                    f"cannot reach the OTLP endpoint {url}: {e} (is `closeloop up` running?)"
                ) from None
        time.sleep(min(0.2 * 2**attempt, 5.0))


def cmd_import(a: argparse.Namespace) -> int:
    """Send transcripts (OpenAI chat messages, JSONL) through the gateway as GenAI OTLP spans."""
    from tqdm import tqdm

    from processors.capture.transcripts import read_lines, to_request

    cfg = _cfg(a)
    url = _otlp_endpoint(cfg, a.endpoint) + "/v1/traces"
    path = Path(a.file)
    if not path.is_file():
        raise CloseloopError(f"{path} does not exist")
    total = sum(1 for line in path.open(encoding="utf-8", errors="replace") if line.strip())
    sent, bad = 0, []
    now = time.time_ns()
    with path.open(encoding="utf-8", errors="replace") as f:
        bar = tqdm(total=total, unit="conv", desc="import", disable=a.quiet, file=sys.stderr)
        for n, got in read_lines(f, now):
            bar.update(1)
            if isinstance(got, str):
                bad.append((n, got))
                bar.write(f"line {n}: {got}", file=sys.stderr)
                continue
            post_otlp(url, to_request(got).SerializeToString())
            sent += 1
        bar.close()
    print(
        f"imported {sent} conversation(s) from {path} into {url}"
        + (f"; {len(bad)} bad line(s): {', '.join(str(n) for n, _ in bad[:20])}" if bad else "")
    )
    return 1 if bad else 0


# -- feedback --------------------------------------------------------------------------------
def tags_publisher(cfg: Config) -> Any:
    """A function sending a TagRecord to ``closeloop.tags`` when a broker is known (a running
    stack, or ``kafka.bootstrap``), so diagnose and verification take it in; else None."""
    from processors.embedded.stack import read_stack_file

    info = read_stack_file(cfg) or {}
    bootstrap = str(info.get("bootstrap") or cfg.kafka.bootstrap)
    if not bootstrap:
        return None
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})

    def publish(tag: TagRecord) -> None:
        producer.produce(cfg.topics.tags, key=tag.conversation_id.encode(), value=tag.to_json())
        if producer.flush(10) > 0:
            raise CloseloopError(f"the broker at {bootstrap} did not acknowledge the new tags")

    return publish


def lazy_tags_publisher(cfg: Config) -> Any:
    """:func:`tags_publisher`, made at the first use (the web page starts before the stack
    file names the broker) and kept; nothing is published while no broker is known."""
    made: list[Any] = []

    def publish(tag: TagRecord) -> None:
        if not made or made[0] is None:
            made[:] = [tags_publisher(cfg)]
        if made[0] is not None:
            made[0](tag)

    return publish


def cmd_feedback(a: argparse.Namespace) -> int:
    from processors.redact import Redactor
    from processors.understand.feedback import feedback_evaluation

    cfg = _cfg(a)
    ev = feedback_evaluation(
        score=a.score,
        label=a.label,
        comment=a.comment,
        name=a.name,
        redactor=Redactor(cfg.capture.redact, cfg.capture.extra_patterns),
        now_ns=time.time_ns(),
    )
    store = open_store(cfg)
    try:
        tag = record_feedback(store, cfg, a.conversation_id, ev, tags_publisher(cfg))
    finally:
        store.close()
    print(
        f"{a.conversation_id}: outcome {tag.outcome} ({'failed' if tag.failed else 'not failed'}), "
        f"tags version {tag.conversation_version}"
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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_diagnoses)

    p = sub.add_parser("diagnose", help="force a diagnosis of one intent now")
    common(p)
    p.add_argument("--intent", required=True, help="intent id (`closeloop intents` lists them)")
    p.set_defaults(fn=cmd_diagnose)

    p = sub.add_parser("proposals", help="proposed changes (branches / pull requests)")
    common(p)
    p.set_defaults(fn=cmd_proposals)

    p = sub.add_parser("review", help="list, show, approve or reject proposals (a human decision)")
    common(p)
    p.add_argument("action", choices=["list", "show", "approve", "reject"], help="what to do")
    p.add_argument("proposal", nargs="?", help="proposal id (show, approve, reject)")
    p.add_argument("--as", dest="reviewer", help="your name: recorded with the decision")
    p.add_argument("--comment", default="", help="a note recorded with the decision")
    p.set_defaults(fn=cmd_review)

    p = sub.add_parser(
        "import", help="send OpenAI chat-message transcripts (JSONL) through the stack as OTLP"
    )
    common(p)
    p.add_argument("file", help="one conversation per line (see docs/agent-authors.md)")
    p.add_argument("--endpoint", help="OTLP/HTTP base URL (default: the running stack's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("feedback", help="record late feedback or a reward for a conversation")
    common(p)
    p.add_argument("conversation_id", help="the conversation the feedback is about")
    g = p.add_argument_group("what was stated (one at least)")
    g.add_argument(
        "--score", type=float, help="e.g. 0 or 1 (failure below understand.outcome_fail_below)"
    )
    g.add_argument("--label", help="e.g. pass, fail, thumbs_down (understand.outcome_*_labels)")
    p.add_argument("--comment", help="why (redacted before storage)")
    p.add_argument("--name", help="the evaluation's name (default: feedback)")
    p.set_defaults(fn=cmd_feedback)

    p = sub.add_parser("web", help="serve the review page (closeloop up starts it)")
    common(p)
    p.add_argument("--port", type=int, help="port to serve on (default: web.port)")
    p.set_defaults(fn=cmd_web)


def cmd_web(a: argparse.Namespace) -> int:
    """Serve the review page until SIGTERM/SIGINT (``closeloop up`` runs it as a child)."""
    import signal
    import threading

    from processors.embedded.procs import write_run_file
    from processors.heartbeat import dump_stacks_on_signal
    from processors.web.server import WebServer

    dump_stacks_on_signal()
    cfg = _cfg(a)
    store = open_store(cfg)
    server = WebServer(cfg, store, port=a.port, publish_tags=lazy_tags_publisher(cfg)).start()
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
