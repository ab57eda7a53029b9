"""End-to-end ingest: OTLP/HTTP spans into the embedded stack until they are queryable.

    python -m bench.ingest [--rates 1000,2000,5000,10000,20000,40000] [--seconds 10] [--threads 4]
                           [--spans 500] [--no-profile] [--capture-processes 0,2]
                           [--storage memory,s3]

For each broker storage (``kafka.storage``: memory, the default, or s3: on disk) and each
``capture.processes`` setting (0: capture inside the worker; N: N capture processes
beside it), starts ``EmbeddedStack`` (broker, worker, gateway, web) in a temp home and sends realistic
GenAI conversations (8 spans each, one trace: llm, llm, tool, http spans with semconv
attributes and message content, ~1.1 KB/span) as OTLP/HTTP protobuf requests of ``--spans``
spans from ``--threads`` keep-alive connections, at each offered rate, then unpaced ("max"),
then at half the best stored rate; the ramp stops at the first level whose backlog is not
queryable within max(30 s, 3 × the level's length). Per level: spans/s acknowledged by the gateway, spans/s
stored (all of the level's spans queryable in ``spans`` through the SQL endpoint), and the
export→queryable latency of each request: every request's trace ids carry its sequence
number, and a poller counts the stored spans per request every ``POLL_S``; a request is
queryable at the first poll that sees all its spans (latency = that poll's end − send start,
so the resolution is about ``POLL_S``). CPU per process comes from ``/proc/<pid>/stat``.
Last, py-spy samples the worker while it takes unpaced load: the top frames say where the
time goes.

Conversations are kept open during the run (``assemble.idle_timeout_s`` = 1 h), so the
understand stage (measured by ``bench.understand``) does not run: this is the capture path,
gateway → broker → worker capture → ClickHouse, plus the assembler's per-turn state.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bench.capture_core import KINDS, _attrs, _kv, export_request
from processors.config import load_config
from processors.embedded.broker import free_port
from processors.embedded.stack import EmbeddedStack
from processors.runtime import STATS_INTERVAL_S
from processors.store import Store

ROOT = Path(__file__).resolve().parent.parent  # frames under it are named relative to it
SPANS_PER_CONVERSATION = 8
PLACEHOLDER = bytes.fromhex(
    "5a17c0de9e3b61f4"
)  # first 8 trace-id bytes of a template, replaced per request
SPAN_PLACEHOLDER = bytes.fromhex(
    "c3a95e7d21"
)  # first 5 span-id bytes, replaced by the level and sequence
TEMPLATES = 4
POLL_S = 0.25
DRAIN_MIN_S = 30.0  # a level's backlog must be queryable within max(this, 3 x its length)
BACKLOG_TIMEOUT_S = 240.0  # before the half-load level, the ramp's backlog must be stored
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the traffic ------------------------------------------------------------------------------
def request_template(spans: int, seed: int, per_trace: int = SPANS_PER_CONVERSATION) -> bytes:
    """One OTLP request of ``spans`` GenAI spans in conversations (traces) of ``per_trace``
    spans; trace ids start with PLACEHOLDER (:func:`stamp` makes them unique)."""
    rng = random.Random(seed)
    built: list[Span] = []
    t0 = time.time_ns() - 60_000_000_000
    for i in range(spans):
        conv = i // per_trace
        kind = KINDS[i % len(KINDS)]
        attrs = _attrs(kind, i, rng, content=True)
        if "gen_ai.conversation.id" in attrs:
            attrs["gen_ai.conversation.id"] = f"{PLACEHOLDER.hex()}-{conv}"
        start = t0 + i * 50_000_000
        built.append(
            Span(
                trace_id=PLACEHOLDER + conv.to_bytes(8, "big"),
                span_id=SPAN_PLACEHOLDER + (i + 1).to_bytes(3, "big"),  # never all zero
                name=f"{kind} span",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start,
                end_time_unix_nano=start + 40_000_000,
                attributes=[_kv(k, v) for k, v in attrs.items()],
            )
        )
    return export_request(built)


def request(seed: int, spans: int, per_trace: int = SPANS_PER_CONVERSATION) -> bytes:
    """One request of ``spans`` spans whose ids are its own (``seed`` tells requests apart)."""
    return stamp(request_template(spans, seed, per_trace), request_prefix(0, 0, seed))


def request_prefix(nonce: int, level: int, seq: int) -> bytes:
    """8 bytes that start every trace id of one request: run nonce, level, sequence number."""
    return nonce.to_bytes(3, "big") + level.to_bytes(1, "big") + seq.to_bytes(4, "big")


def stamp(template: bytes, prefix: bytes) -> bytes:
    """The template with its trace, span and conversation ids made unique to one request.

    Span ids too: some stores (Phoenix) keep one row per span id across traces.
    """
    return (
        template.replace(PLACEHOLDER, prefix)
        .replace(SPAN_PLACEHOLDER, prefix[3:])
        .replace(PLACEHOLDER.hex().encode(), prefix.hex().encode())
    )


@dataclass
class Sent:
    seq: int
    t_send: float
    t_ack: float
    status: int


def fire(
    url: str,
    bodies: list[bytes],
    prefixes: list[bytes],
    *,
    rate: float | None,
    seconds: float,
    threads: int,
    spans: int,
) -> tuple[list[Sent], float, float]:
    """POST stamped requests, paced at ``rate`` spans/s (None: as fast as answered) for ``seconds``.

    Returns the requests sent, the start time and the time of the last answer.
    """
    host, port = url.split("//")[1].split(":")
    seqs = itertools.count()
    out: list[Sent] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    gap = spans / rate if rate else 0.0

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        while True:
            with lock:
                k = next(seqs)
            slot = t0 + k * gap
            if (
                slot - t0 >= seconds
                or k >= len(prefixes)
                or (not rate and time.perf_counter() - t0 >= seconds)
            ):
                break
            delay = slot - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            body = stamp(bodies[k % len(bodies)], prefixes[k])
            ts = time.perf_counter()
            try:
                conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                status = 0
            with lock:
                out.append(Sent(k, ts, time.perf_counter(), status))
        conn.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sorted(out, key=lambda s: s.seq), t0, max((s.t_ack for s in out), default=t0)


# -- watching the store -----------------------------------------------------------------------
class Poller:
    """Counts stored spans per request prefix every POLL_S; records when each request completes."""

    def __init__(self, store: Store, prefixes: list[bytes], spans: int) -> None:
        self.store = store
        self.hexes = [p.hex() for p in prefixes]
        self.spans = spans
        self.done: dict[int, float] = {}
        self.expected = 0  # requests acknowledged so far (set by the caller)
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _lowest_open(self) -> int:
        k = 0
        while k in self.done:
            k += 1
        return k

    def _run(self) -> None:
        while not self._stop.is_set():
            lo = self._lowest_open()
            if lo < len(self.hexes):
                sql = (
                    "SELECT substring(trace_id, 1, 16) AS r, count() AS c FROM spans "
                    f"WHERE trace_id >= '{self.hexes[lo]}' AND trace_id < '{self.hexes[-1]}g' GROUP BY r"
                )
                rows = self.store.query(sql)
                now = time.perf_counter()
                self.queries += 1
                index = {h: i for i, h in enumerate(self.hexes[lo:], lo)}
                for row in rows:
                    k = index.get(row["r"])
                    if k is not None and k not in self.done and int(row["c"]) >= self.spans:
                        self.done[k] = now
            self._stop.wait(POLL_S)

    def wait_for(self, seqs: list[int], timeout_s: float) -> bool:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if all(k in self.done for k in seqs):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@dataclass
class Level:
    name: str
    offered: float | None
    requests: int = 0
    rejected: int = 0
    acked_rate: float = 0.0
    stored_rate: float = 0.0
    p50_s: float = float("nan")
    p99_s: float = float("nan")
    drained: bool = True
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cores used


def run_level(
    stack: EmbeddedStack,
    store: Store,
    name: str,
    level_no: int,
    nonce: int,
    rate: float | None,
    seconds: float,
    threads: int,
    spans: int,
    bodies: list[bytes],
) -> Level:
    n_max = int((rate or 200_000) * seconds / spans) + threads + 1
    prefixes = [request_prefix(nonce, level_no, k) for k in range(n_max)]
    pids = process_ids(stack)
    cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
    poller = Poller(store, prefixes, spans).start()
    w0 = time.perf_counter()
    sent, t0, t_last = fire(
        f"http://{stack.cfg.otlp.host}:{stack.cfg.otlp.http_port}",
        bodies,
        prefixes,
        rate=rate,
        seconds=seconds,
        threads=threads,
        spans=spans,
    )
    ok = [s for s in sent if s.status == 200]
    drained = poller.wait_for([s.seq for s in ok], max(DRAIN_MIN_S, 3 * seconds))
    poller.stop()
    wall = time.perf_counter() - w0
    cpu = {n: (cpu_seconds(p) - cpu0[n]) / wall for n, p in pids.items()}
    lv = Level(
        name, rate, requests=len(sent), rejected=len(sent) - len(ok), drained=drained, cpu=cpu
    )
    lv.acked_rate = len(ok) * spans / max(t_last - t0, 1e-9)
    stored = [poller.done[s.seq] for s in ok if s.seq in poller.done]
    if stored:
        lv.stored_rate = len(stored) * spans / (max(stored) - t0)
    lat = [poller.done[s.seq] - s.t_send for s in ok if s.seq in poller.done]
    lv.p50_s, lv.p99_s = percentile(lat, 0.5), percentile(lat, 0.99)
    return lv


def wait_stored(store: Store, n: int, timeout_s: float) -> bool:
    """Wait until the spans table holds ``n`` rows (a saturated level's backlog drains first)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if int(store.scalar("SELECT count() FROM spans") or 0) >= n:
            return True
        time.sleep(1.0)
    return False


def stage_cpu_seconds(store: Store) -> dict[str, float]:
    """CPU seconds each stage used so far (``stage_stats.cpu_s``, summed over processes), after
    the next write of the counters."""
    time.sleep(STATS_INTERVAL_S + 1)
    rows = store.query(
        "SELECT stage, sum(c) AS cpu FROM (SELECT stage, worker, max(cpu_s) AS c FROM stage_stats "
        "GROUP BY stage, worker) GROUP BY stage ORDER BY cpu DESC"
    )
    return {r["stage"]: float(r["cpu"]) for r in rows if r["cpu"] > 0}


def process_ids(stack: EmbeddedStack) -> dict[str, int]:
    pids = {n: c.proc.pid for n, c in stack.children.items() if c.proc is not None and n != "web"}
    if stack.broker is not None and stack.broker.pid is not None:
        pids["broker"] = stack.broker.pid
    pids["client"] = os.getpid()
    return pids


# -- where the time goes ----------------------------------------------------------------------
def profile_worker(
    stack: EmbeddedStack,
    seconds: float,
    threads: int,
    spans: int,
    bodies: list[bytes],
    nonce: int,
    level_no: int,
    out: Path,
) -> list[tuple[str, float, float]]:
    """py-spy the worker under unpaced load; top frames as (frame, self %, total %)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return []
    pid = stack.children["capture-1" if "capture-1" in stack.children else "worker"].proc.pid
    prof = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "50",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prefixes = [request_prefix(nonce, level_no, k) for k in range(int(200_000 * seconds / spans))]
    fire(
        f"http://{stack.cfg.otlp.host}:{stack.cfg.otlp.http_port}",
        bodies,
        prefixes,
        rate=None,
        seconds=seconds,
        threads=threads,
        spans=spans,
    )
    prof.wait(seconds + 30)
    return top_frames(out.read_text() if out.exists() else "")


def top_frames(raw: str, n: int = 12) -> list[tuple[str, float, float]]:
    """From py-spy's raw (collapsed) stacks: the ``n`` frames with the most self time, then
    closeloop's own functions by inclusive time; as (frame, self %, total %)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the process / thread
        for f in set(frames):
            incl[f] += c
        if frames:
            self_c[frames[-1]] += c
    if not total:
        return []
    ours = [f for f, _ in incl.most_common() if "processors/" in f and "worker.py" not in f][:n]
    ranked = [f for f, _ in self_c.most_common(n)] + [
        f for f in ours if f not in dict(self_c.most_common(n))
    ]
    return [(f, 100 * self_c[f] / total, 100 * incl[f] / total) for f in ranked]


def _frame(f: str) -> str:
    """'insert_records (processors/store.py:123)' → 'insert_records (processors/store.py)'."""
    name, _, where = f.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# -- the run ----------------------------------------------------------------------------------
def start_stack(
    home: Path, capture_processes: int = 0, settings: dict | None = None
) -> EmbeddedStack:
    """The embedded stack on free ports; conversations stay open (see the module docstring)
    unless ``settings`` (config sections, as in closeloop.yaml) say otherwise."""
    home.mkdir(parents=True)
    config_file = home / "closeloop.yaml"  # the children read the file, not our overrides
    config_file.write_text(
        yaml.safe_dump(
            {
                "assemble": {"idle_timeout_s": 3600.0},
                "capture": {"processes": capture_processes},
                **(settings or {}),
            }
        )
    )
    cfg = load_config(
        config_file,
        env={},
        overrides={
            "home": str(home),
            "otlp.grpc_port": free_port(),
            "otlp.http_port": free_port(),
            "web.port": free_port(),
            "clickhouse.sql_port": free_port(),
        },
    )
    return EmbeddedStack(cfg, config_file=str(config_file)).start()


def run(
    rates: list[int],
    seconds: float,
    threads: int,
    spans: int,
    profile: bool = True,
    log: Callable[[str], None] = print,
    capture_processes: int = 0,
    storage: str = "memory",
) -> dict:
    bodies = [request_template(spans, seed) for seed in range(TEMPLATES)]
    span_bytes = len(bodies[0]) / spans
    nonce = random.Random().getrandbits(24)
    levels: list[Level] = []
    frames: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        stack = start_stack(Path(tmp) / "home", capture_processes, {"kafka": {"storage": storage}})
        try:
            store = stack.sql_store()
            # warm-up: connections, topic metadata, the first inserts
            warm = run_level(stack, store, "warm-up", 0, nonce, 2000, 2, 2, spans, bodies)
            plan: list[tuple[str, float | None]] = [(f"{r:,}/s", float(r)) for r in rates] + [
                ("max", None)
            ]
            for no, (name, rate) in enumerate(plan, 1):
                lv = run_level(stack, store, name, no, nonce, rate, seconds, threads, spans, bodies)
                levels.append(lv)
                log(format_level(lv))
                if not lv.drained:
                    log("  backlog not drained; stopping the ramp")
                    break
            best = max((lv.stored_rate for lv in levels), default=0.0)
            acked = (
                sum((lv.requests - lv.rejected) * spans for lv in levels) + warm.requests * spans
            )
            if best and wait_stored(store, acked, BACKLOG_TIMEOUT_S):
                half = run_level(
                    stack,
                    store,
                    "half of max",
                    len(plan) + 1,
                    nonce,
                    best / 2,
                    seconds,
                    threads,
                    spans,
                    bodies,
                )
                levels.append(half)
                log(format_level(half))
            stored_total = int(store.scalar("SELECT count() FROM spans") or 0)
            stage_cpu = stage_cpu_seconds(store)
            if profile:
                frames = profile_worker(
                    stack,
                    min(seconds, 10),
                    threads,
                    spans,
                    bodies,
                    nonce,
                    len(plan) + 2,
                    Path(tmp) / "worker.pyspy",
                )
            store.close()
        finally:
            stack.stop()
    return {
        "levels": levels,
        "span_bytes": span_bytes,
        "stored_total": stored_total,
        "frames": frames,
        "stage_cpu": stage_cpu,
        "spans": spans,
        "threads": threads,
        "seconds": seconds,
        "capture_processes": capture_processes,
        "storage": storage,
    }


def format_level(lv: Level) -> str:
    cpu = " ".join(f"{n}={c:.2f}" for n, c in lv.cpu.items())
    return (
        f"{lv.name:>12} acked {lv.acked_rate:>8,.0f}/s stored {lv.stored_rate:>8,.0f}/s "
        f"p50 {lv.p50_s:5.2f}s p99 {lv.p99_s:5.2f}s rejected {lv.rejected} cores: {cpu}"
    )


def setting(res: dict) -> str:
    n = res["capture_processes"]
    where = (
        f"capture in {n} process{'es' if n > 1 else ''} of its own beside the worker"
        if n
        else "capture inside the worker (the default)"
    )
    return where if res["storage"] == "memory" else f"{where}, broker storage {res['storage']}"


def markdown(res: dict, command: str) -> str:
    procs = list(res["levels"][0].cpu) if res["levels"] else []
    lines = [
        f"### {setting(res)} (`capture.processes: {res['capture_processes']}`)",
        "",
        f"Command: `{command}`. Requests of {res['spans']} spans (~{res['span_bytes']:,.0f} bytes/span "
        f"on the wire), {res['threads']} client threads, {res['seconds']:.0f} s per level; "
        "conversations of 8 spans (llm, llm, tool, http) with message content. Latency: send → "
        f"all of the request's spans counted by `SELECT ... FROM spans` (polled every {POLL_S} s). "
        "CPU in cores (1.00 = one core busy) over the level including its drain; `client` is this "
        "benchmark (sender and poller) on the same 2 cores.",
        "",
        "| level | offered spans/s | acknowledged spans/s | stored spans/s | p50 s | p99 s | rejected | "
        + " | ".join(f"cpu {p}" for p in procs)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(procs),
    ]
    for lv in res["levels"]:
        offered = f"{lv.offered:,.0f}" if lv.offered else "unpaced"
        drained = "" if lv.drained else " (not drained)"
        lines.append(
            f"| {lv.name} | {offered} | {lv.acked_rate:,.0f} | {lv.stored_rate:,.0f}{drained} | "
            f"{lv.p50_s:.2f} | {lv.p99_s:.2f} | {lv.rejected} | "
            + " | ".join(f"{lv.cpu.get(p, 0):.2f}" for p in procs)
            + " |"
        )
    lines += ["", f"Spans stored at the end: {res['stored_total']:,}."]
    if res["stage_cpu"]:
        lines += [
            "",
            "CPU per stage over the whole run (the stage's own work and its inserts, measured in the "
            "worker processes; `stage_stats.cpu_s`):",
            "",
            "| stage | CPU s | µs per span stored |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {st} | {c:,.1f} | {1e6 * c / max(res['stored_total'], 1):,.0f} |"
            for st, c in res["stage_cpu"].items()
        ]
    if res["frames"]:
        who = "capture-1" if res["capture_processes"] else "the worker"
        lines += [
            "",
            f"Where {who}'s time goes (py-spy, unpaced load, active threads; share of samples):",
            "",
            "| frame | self % | total % |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{f}` | {s:.1f} | {t:.1f} |" for f, s, t in res["frames"]]
    return "\n".join(lines) + "\n"


def comparison(results: list[dict]) -> str:
    """The settings side by side: best stored rate and its ratio to the first (the baseline)."""
    base = max(
        (lv.stored_rate for lv in results[0]["levels"] if lv.name != "half of max"), default=0.0
    )
    lines = [
        "| setting | best stored spans/s | ratio to the first | cores used at that level |",
        "|---|---:|---:|---|",
    ]
    for res in results:
        levels = [lv for lv in res["levels"] if lv.name != "half of max"]
        best = max(levels, key=lambda lv: lv.stored_rate) if levels else Level("none", None)
        cores = ", ".join(f"{n} {c:.2f}" for n, c in best.cpu.items())
        lines.append(
            f"| {setting(res)} | {best.stored_rate:,.0f} | {best.stored_rate / base if base else 0:.2f} | "
            f"{cores} |"
        )
    return "\n".join(lines) + "\n"


def figures(res: dict) -> dict:
    """The numbers the goals table needs."""
    levels = [lv for lv in res["levels"] if lv.name != "half of max"]
    best = max(levels, key=lambda lv: lv.stored_rate) if levels else Level("none", None)
    half = next((lv for lv in res["levels"] if lv.name == "half of max"), None)
    own = [f for f, _, _ in res["frames"] if "processors/" in f]
    return {
        "best_stored": best.stored_rate,
        "best_acked": max((lv.acked_rate for lv in levels), default=0.0),
        "cores_at_best": {n: round(c, 2) for n, c in best.cpu.items()},
        "capture_us_per_span": 1e6
        * res["stage_cpu"].get("capture", 0.0)
        / max(res["stored_total"], 1),
        "worker_cores_at_best": best.cpu.get("worker", 0.0),
        "gateway_cores_at_best": best.cpu.get("gateway", 0.0),
        "broker_cores_at_best": best.cpu.get("broker", 0.0),
        "half_p50": half.p50_s if half else None,
        "half_p99": half.p99_s if half else None,
        "half_rate": half.offered if half else None,
        "half_worker_cores": half.cpu.get("worker") if half else None,
        "top_frame": f"`{own[0]}`" if own else "not profiled",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1000,2000,5000,10000,20000,40000")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--spans", type=int, default=500)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--capture-processes",
        default="0,2",
        help="capture.processes settings to run side by side (the first is the baseline)",
    )
    p.add_argument(
        "--storage",
        default="memory",
        help="kafka.storage settings to run side by side (memory, s3), each with every capture setting",
    )
    p.add_argument("--out", type=Path, help="also write the markdown section here")
    p.add_argument("--json", type=Path, help="write the goal figures (of the best setting) here")
    a = p.parse_args()
    command = (
        f"python -m bench.ingest --rates {a.rates} --seconds {a.seconds:g} "
        f"--capture-processes {a.capture_processes}"
        + (f" --storage {a.storage}" if a.storage != "memory" else "")
    )
    results = []
    for storage in (x for x in a.storage.split(",") if x):
        for n in (int(x) for x in a.capture_processes.split(",") if x):
            print(f"-- kafka.storage: {storage}, capture.processes: {n}")
            results.append(
                run(
                    [int(r) for r in a.rates.split(",") if r],
                    a.seconds,
                    a.threads,
                    a.spans,
                    not a.no_profile,
                    capture_processes=n,
                    storage=storage,
                )
            )
    text = "\n".join(
        [
            "## Ingest: OTLP/HTTP → gateway → broker → capture → ClickHouse",
            "",
            f"Command: `{command}`.",
            "",
            comparison(results),
            *(markdown(r, command) for r in results),
        ]
    )
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        best = max(results, key=lambda r: figures(r)["best_stored"])
        a.json.write_text(
            json.dumps(
                {
                    **figures(best),
                    "capture_processes": best["capture_processes"],
                    "baseline_stored": figures(results[0])["best_stored"],
                }
            )
        )


if __name__ == "__main__":
    main()
