"""LLM steps under a slow or failing model: end-to-end throughput, lag, and the share of items
the LLM improved, next to the same run without an LLM.

    python -m bench.llm [--conversations 300] [--latencies 0.1,2,20] [--error-rate 0.3]
                        [--judge-rate 0.2] [--drain-s 120] [--out F] [--json F]

The conversations come from the support-agent example (scripted, ``seed`` fixed), exported
once to memory and sent as the same OTLP/HTTP requests to every run. Each run starts the
embedded stack (all stages, ``assemble.idle_timeout_s`` 2 s) in a temp home, with no LLM or
with tests/llm_server.py as the model: a fake that answers every step validly after
``latency`` seconds, or HTTP 500 for ``error-rate`` of the requests. Per run:

* ingest: spans/s from the first send until every stored span is queryable (the span count
  reached the value it has once every conversation is tagged; capture keeps the GenAI spans);
* tagging: conversations/s from the first send until every conversation is tagged, and the
  lag (last send → all tagged);
* restarts of the worker (the stack is supervised as ``closeloop up`` does);
* after tagging, up to ``--drain-s`` for the LLM's queues to empty: the share of sampled
  conversations whose tags the LLM judged, of intents it named, of diagnoses it reworded;
* lost: conversations sent but not tagged (must be 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.ingest import start_stack
from examples.support_agent import init_agent_repo, run_cycle
from processors.embedded.stack import EmbeddedStack
from processors.store import Store
from processors.understand.signals import judge_sampled
from tests.llm_server import FakeLLMServer

CONVERSATIONS_PER_REQUEST = 10
POLL_S = 0.5
TAG_TIMEOUT_S = 600.0


def requests(n: int, seed: int, tmp: Path) -> tuple[list[bytes], int, int]:
    """OTLP/HTTP bodies of ``n`` example conversations, their span and conversation counts."""
    repo = tmp / "agent"
    init_agent_repo(repo)
    memory = InMemorySpanExporter()
    run_cycle(repo, n=n, seed=seed, exporter=memory, mode="scripted")
    spans = list(memory.get_finished_spans())
    by_trace: dict[int, list[Any]] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    traces = list(by_trace.values())
    bodies = [
        encode_spans(
            [s for t in traces[i : i + CONVERSATIONS_PER_REQUEST] for s in t]
        ).SerializeToString()
        for i in range(0, len(traces), CONVERSATIONS_PER_REQUEST)
    ]
    return bodies, len(spans), n  # one conversation each, over one or more traces


def model(body: dict[str, Any]) -> str:
    """A model that answers every step validly (names, verdicts, rewordings; act's edit is
    left empty, so act keeps its templated fix)."""
    system, user = (m["content"] for m in body["messages"][:2])
    if "You name intents" in system:
        ks = [int(k) for k in re.findall(r"^Intent (\d+):$", user, re.M)]
        return json.dumps(
            {"intents": [{"intent": k, "name": f"llm intent {k}", "description": "d"} for k in ks]}
        )
    if "You review one conversation" in system:
        return json.dumps({"tags": ["confusion"], "outcome": "resolved"})
    if "You diagnose" in system:
        facts = json.loads(user.split("\n\n", 1)[0].removeprefix("Facts:\n"))
        return json.dumps(
            {
                "summary": "users fail here because the agent asks again",
                "root_cause": "the prompt does not carry the answer forward",
                "component": {"type": "prompt", "target": facts["allowed_targets"][0]},
                "confidence": 0.7,
                "evidence_ids": facts["trace_ids"][:1] or list(facts["stats"])[:1],
            }
        )
    return json.dumps({"edits": []})


@dataclass
class Run:
    label: str
    latency_s: float | None
    error_rate: float
    ingest_spans_per_s: float
    tag_conv_per_s: float
    lag_s: float
    worker_restarts: int
    lost: int
    judged_share: float | None
    named_share: float | None
    reworded_share: float | None
    drained: bool
    llm_calls: int
    llm_failures: int


def send(port: int, bodies: list[bytes]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for b in bodies:
        conn.request("POST", "/v1/traces", b, {"Content-Type": "application/x-protobuf"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"gateway answered {resp.status}")
    conn.close()


@dataclass
class Growth:
    """A polled count and when it first reached its current value."""

    value: int = -1
    since: float = 0.0

    def seen(self, value: int) -> None:
        if value != self.value:
            self.value, self.since = value, time.monotonic()


def count(store: Store, sql: str) -> int:
    return int(store.scalar(sql) or 0)


def wait_until(stack: EmbeddedStack, done: Any, timeout_s: float) -> float | None:
    """Poll ``done()`` (supervising the stack meanwhile); the time it became true, or None."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        stack.supervise_once()
        if done():
            return time.monotonic()
        time.sleep(POLL_S)
    return None


def run_one(
    label: str,
    latency: float | None,
    error_rate: float,
    bodies: list[bytes],
    n_conv: int,
    judge_rate: float,
    drain_s: float,
    tmp: Path,
) -> Run:
    settings: dict[str, Any] = {"assemble": {"idle_timeout_s": 2.0}}
    srv = None
    if latency is not None:
        srv = FakeLLMServer(model, latency_s=latency, error_rate=error_rate).__enter__()
        step = {"concurrency": 8, "calls_per_min": 600, "tokens_per_hour": 0}
        settings["llm"] = {
            "base_url": srv.base_url,
            "timeout_s": max(15.0, 2 * latency),
            "judge_rate": judge_rate,
            **{s: dict(step) for s in ("naming", "judge", "diagnose", "act")},
        }
    stack = start_stack(tmp / label.replace(" ", "-") / "home", settings=settings)
    try:
        store = stack.sql_store()
        t0 = time.monotonic()
        send(stack.cfg.otlp.http_port, bodies)
        sent = time.monotonic()
        spans = Growth()

        def all_tagged() -> bool:
            spans.seen(count(store, "SELECT count() FROM spans"))
            return count(store, "SELECT count() FROM conversation_tags FINAL") >= n_conv

        t_tags = wait_until(stack, all_tagged, TAG_TIMEOUT_S)
        stored_spans = spans.value
        tagged = count(store, "SELECT count() FROM conversation_tags FINAL")
        drained = True
        if srv is not None:
            drained = (
                wait_until(
                    stack,
                    lambda: (
                        count(store, "SELECT sum(queued) FROM llm_stats FINAL") == 0
                        and count(store, "SELECT count() FROM llm_stats FINAL") > 0
                    ),
                    drain_s,
                )
                is not None
            )
            time.sleep(6)  # one more stats tick: rows applied after the queue emptied
        shares = improved(store, judge_rate) if srv is not None else (None, None, None)
        calls = (
            store.query("SELECT sum(calls) AS c, sum(failures) AS f FROM llm_stats FINAL")[0]
            if srv is not None
            else {"c": 0, "f": 0}
        )
        restarts = stack.children["worker"].restarts
        store.close()
    finally:
        stack.stop()
        if srv is not None:
            srv.__exit__(None, None, None)
    end_tags = t_tags or time.monotonic()
    return Run(
        label=label,
        latency_s=latency,
        error_rate=error_rate,
        ingest_spans_per_s=stored_spans / (spans.since - t0),
        tag_conv_per_s=n_conv / (end_tags - t0),
        lag_s=end_tags - sent,
        worker_restarts=restarts,
        lost=n_conv - tagged,
        judged_share=shares[0],
        named_share=shares[1],
        reworded_share=shares[2],
        drained=drained,
        llm_calls=int(calls["c"] or 0),
        llm_failures=int(calls["f"] or 0),
    )


def improved(store: Store, judge_rate: float) -> tuple[float | None, float | None, float | None]:
    """Shares the LLM improved: judged of the sampled conversations, named of the intents,
    reworded of the diagnoses (None: nothing to improve)."""
    tags = store.query("SELECT conversation_id, source FROM conversation_tags FINAL")
    sampled = [t for t in tags if judge_sampled(t["conversation_id"], judge_rate)]
    intents = store.query("SELECT source FROM intents FINAL WHERE status = 'active'")
    diags = store.query("SELECT source FROM diagnoses FINAL")

    def share(rows: list[dict[str, Any]]) -> float | None:
        return sum(r["source"] == "llm" for r in rows) / len(rows) if rows else None

    return share(sampled), share(intents), share(diags)


def markdown(runs: list[Run], n_conv: int, n_spans: int, command: str) -> str:
    """The table; ``n_spans``: spans exported (capture stores the GenAI ones)."""
    base = runs[0]
    out = [
        "## LLM steps beside the stream",
        "",
        f"`{command}`: {n_conv} example conversations ({n_spans} spans exported), all stages, "
        "the model tests/llm_server.py; ratios against the run without an LLM (first row); "
        "the last row repeats that run: the spread between the two is the machine's noise.",
        "",
        "| run | ingest spans/s | ratio | tagging conv/s | ratio | lag s | restarts | lost "
        "| judged | named | reworded | LLM calls (failed) | queues drained |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.0%}"

    for r in runs:
        out.append(
            f"| {r.label} | {r.ingest_spans_per_s:,.0f} | "
            f"{r.ingest_spans_per_s / base.ingest_spans_per_s:.2f} | {r.tag_conv_per_s:.1f} | "
            f"{r.tag_conv_per_s / base.tag_conv_per_s:.2f} | {r.lag_s:.1f} | "
            f"{r.worker_restarts} | {r.lost} | {pct(r.judged_share)} | {pct(r.named_share)} | "
            f"{pct(r.reworded_share)} | {r.llm_calls} ({r.llm_failures}) | "
            f"{'yes' if r.drained else 'no'} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=300)
    ap.add_argument("--latencies", default="0.1,2,20")
    ap.add_argument("--error-rate", type=float, default=0.3)
    ap.add_argument("--judge-rate", type=float, default=0.2)
    ap.add_argument("--drain-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--json")
    a = ap.parse_args()
    latencies = [float(x) for x in a.latencies.split(",") if x]
    plan: list[tuple[str, float | None, float]] = [("no LLM", None, 0.0)]
    plan += [(f"{lat:g} s", lat, 0.0) for lat in latencies]
    if a.error_rate:
        lat = min(latencies, default=0.1)
        plan.append((f"{lat:g} s, {a.error_rate:.0%} errors", lat, a.error_rate))
    plan.append(("no LLM, again", None, 0.0))  # how far the machine alone moves the figures
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        bodies, n_spans, n_conv = requests(a.conversations, a.seed, Path(tmp))
        runs = []
        for label, lat, err in plan:
            r = run_one(
                label,
                lat,
                err,
                bodies,
                n_conv,
                a.judge_rate,
                a.drain_s,
                Path(tmp),
            )
            print(json.dumps(asdict(r)), file=sys.stderr, flush=True)
            runs.append(r)
    shown = [x for x in sys.argv[1:] if x not in (a.out, a.json, "--out", "--json")]
    command = "python -m bench.llm " + " ".join(shown)
    text = markdown(runs, n_conv, n_spans, command.strip())
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in runs]))


if __name__ == "__main__":
    main()
