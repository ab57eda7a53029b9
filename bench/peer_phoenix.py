"""Side by side with Arize Phoenix: the same OTLP requests into both; offline vs online intents.

    python -m bench.peer_phoenix [--requests 100] [--spans 500] [--conversations 10000]
                                 [--phoenix .venv-phoenix/bin/phoenix]

Ingest: the same stamped OTLP/HTTP protobuf requests as ``bench.ingest`` (GenAI conversations,
~1.1 KB/span) go, unpaced from 4 connections, first to closeloop's embedded stack and then to
``phoenix serve`` (its default SQLite store, working dir in a temp dir, loopback ports). Per
system: spans/s accepted (answered 2xx) and the time from the first request until every span
is queryable (closeloop: ``spans`` via the SQL endpoint; Phoenix: ``count(*)`` of its
``spans`` table, read-only). Phoenix is installed in its own venv
(``python -m venv .venv-phoenix && .venv-phoenix/bin/pip install arize-phoenix`` in the
repository);
without it that part is skipped.

Intents: the tool a user would pick instead of an online model is a batch job (embed every
conversation, k-means with k given). Both paths get the same BANKING77 conversations and the
same MiniLM vectors (embedding time shown once: both pay it); then k-means (k = 77, told) vs
closeloop's ``Understand`` core in batches of 500 (never told k). NMI against the labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import ingest
from bench.understand import MemoEmbedder, conversation, utterances
from processors.config import load_config
from processors.embedded.broker import free_port
from processors.embedded.procs import stop_process
from processors.understand.core import Understand
from processors.understand.embed import make_embedder

PHOENIX = Path(__file__).resolve().parent.parent / ".venv-phoenix" / "bin" / "phoenix"
THREADS = 4
QUERYABLE_TIMEOUT_S = 600.0
STALL_S = 30.0  # no new span queryable for this long: the rest is not coming
LABELS = Path(__file__).resolve().parent.parent / "examples" / "data" / "banking77" / "train.csv"


@dataclass
class Peer:
    system: str
    spans: int
    accepted_rate: float
    queryable_s: float | None
    rejected: int
    stored: int  # spans queryable at the end of the wait
    stored_rate: float  # stored / seconds to the last growth


def send_all(
    url: str, n_requests: int, spans: int, level: int
) -> tuple[list[ingest.Sent], float, float]:
    bodies = [ingest.request_template(spans, seed) for seed in range(ingest.TEMPLATES)]
    prefixes = [ingest.request_prefix(0xBE7C4, level, k) for k in range(n_requests)]
    return ingest.fire(url, bodies, prefixes, rate=None, seconds=1e9, threads=THREADS, spans=spans)


def wait_count(count: Callable[[], int], target: int, t0: float) -> tuple[float | None, int, float]:
    """Wait until ``count()`` reaches ``target`` or stops growing for STALL_S.

    Returns (seconds from t0 to the target or None, the last count, seconds to the last growth).
    """
    last, grew = 0, time.perf_counter()
    while time.perf_counter() - t0 < QUERYABLE_TIMEOUT_S:
        n = count()
        now = time.perf_counter()
        if n > last:
            last, grew = n, now
        if n >= target:
            return now - t0, n, now - t0
        if now - grew > STALL_S:
            break
        time.sleep(0.25)
    return None, last, grew - t0


def measure(
    system: str, url: str, count: Callable[[], int], n_requests: int, spans: int, level: int
) -> Peer:
    sent, t0, t_last = send_all(url, n_requests, spans, level)
    ok = sum(1 for s in sent if 200 <= s.status < 300)
    queryable, stored, last_s = wait_count(count, ok * spans, t0)
    return Peer(
        system,
        ok * spans,
        ok * spans / max(t_last - t0, 1e-9),
        queryable,
        len(sent) - ok,
        stored,
        stored / max(last_s, 1e-9),
    )


def closeloop_peer(n_requests: int, spans: int) -> Peer:
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        stack = ingest.start_stack(Path(tmp) / "home")
        try:
            store = ingest.connect_http(stack.sql_url)
            return measure(
                "closeloop (embedded stack)",
                f"http://{stack.cfg.otlp.host}:{stack.cfg.otlp.http_port}",
                lambda: int(store.scalar("SELECT count() FROM spans") or 0),
                n_requests,
                spans,
                1,
            )
        finally:
            stack.stop()


def wait_http(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.25)
    return False


def phoenix_peer(phoenix: Path, n_requests: int, spans: int) -> Peer | None:
    if not phoenix.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="bench-phoenix-") as tmp:
        port, grpc = free_port(), free_port()
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": tmp,
            "PHOENIX_PORT": str(port),
            "PHOENIX_GRPC_PORT": str(grpc),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        with open(Path(tmp) / "phoenix.log", "wb") as log:
            proc = subprocess.Popen(
                [str(phoenix), "serve"],
                cwd=tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                if not wait_http(port, 120):
                    raise RuntimeError(f"phoenix did not come up; see {tmp}/phoenix.log")
                db = Path(tmp) / "phoenix.db"

                def count() -> int:
                    try:
                        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                            return int(c.execute("SELECT count(*) FROM spans").fetchone()[0])
                    except sqlite3.Error:
                        return 0

                return measure(
                    f"Arize Phoenix {phoenix_version(phoenix)} (SQLite)",
                    f"http://127.0.0.1:{port}",
                    count,
                    n_requests,
                    spans,
                    2,
                )
            finally:
                stop_process(proc, 30)


def phoenix_version(phoenix: Path) -> str:
    out = subprocess.run(
        [str(phoenix.parent / "python"), "-c", "import phoenix; print(phoenix.__version__)"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


# -- intents: offline batch vs online -----------------------------------------------------------
def intents_side_by_side(n: int, batch: int = 500) -> dict:
    import csv

    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    texts = utterances(n)
    with LABELS.open(newline="") as f:
        label_of = {r["text"]: r["category"] for r in csv.DictReader(f)}
    y = np.array([label_of[t] for t in texts])
    k = len(set(label_of.values()))
    with tempfile.TemporaryDirectory() as home:
        cfg = load_config(None, env={}, overrides={"home": home})
        emb = MemoEmbedder(make_embedder(cfg.understand, Path(home) / "models", cfg.llm))
        t = time.perf_counter()
        X = emb.embed(texts)
        embed_s = time.perf_counter() - t
        t = time.perf_counter()
        km = KMeans(k, n_init=3, random_state=0).fit(X)
        kmeans_s = time.perf_counter() - t
        core = Understand(cfg, emb)
        t = time.perf_counter()
        arrival = []
        for start in range(0, n, batch):
            out = core.process(
                [conversation(start + j, s) for j, s in enumerate(texts[start : start + batch])],
                time.time_ns(),
            )
            arrival += [tg.intent_id for tg in out.tags]
        online_s = time.perf_counter() - t
    final = np.array([core.model.predict_one(x) or "-" for x in X])
    mapped = np.array([core.model.resolve(a) for a in arrival])
    return {
        "n": n,
        "k": k,
        "embed_s": embed_s,
        "kmeans_s": kmeans_s,
        "online_s": online_s,
        "nmi_kmeans": nmi(y, km.labels_),
        "nmi_online": nmi(y, final),
        "nmi_arrival": nmi(y, mapped),
        "online_k": len(core.model.intents()),
        "embedder": cfg.understand.embedder,
    }


def markdown(
    peers: list[Peer], phoenix_missing: bool, intents: dict | None, command: str, spans: int
) -> str:
    lines = [
        "## Side by side: Arize Phoenix, and offline k-means",
        "",
        f"Command: `{command}`. The same OTLP/HTTP protobuf requests ({spans} spans each, ~1.1 KB/span, "
        f"{THREADS} connections, unpaced) into each system, one after the other on the same machine.",
        "",
    ]
    if peers:
        lines += [
            "| system | spans accepted | accepted spans/s | all queryable after (s) | spans queryable | "
            "queryable spans/s | rejected requests |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in peers:
            q = (
                f"{p.queryable_s:.1f}"
                if p.queryable_s is not None
                else f"never (stalled {STALL_S:.0f} s)"
            )
            lines.append(
                f"| {p.system} | {p.spans:,} | {p.accepted_rate:,.0f} | {q} | {p.stored:,} | "
                f"{p.stored_rate:,.0f} | {p.rejected} |"
            )
        if len(peers) == 2 and peers[1].stored_rate:
            a, b = peers
            lines += [
                "",
                f"Ratio closeloop / Phoenix: accepted {a.accepted_rate / b.accepted_rate:.2f}×, "
                f"queryable spans/s {a.stored_rate / b.stored_rate:.1f}× (above 1: closeloop is faster).",
            ]
            if b.stored < b.spans:
                lines += [
                    "",
                    f"Phoenix answered 200 to every request but only {b.stored:,} of {b.spans:,} spans "
                    f"became queryable; nothing more arrived in {STALL_S:.0f} s.",
                ]
    if phoenix_missing:
        lines += ["", f"Phoenix not installed at `{PHOENIX}`: skipped (see the module docstring)."]
    if intents:
        r = intents
        lines += [
            "",
            f"Intents on {r['n']:,} BANKING77 conversations ({r['k']} labelled intents), `{r['embedder']}` "
            f"vectors computed once in {r['embed_s']:.1f} s ({r['n'] / r['embed_s']:,.0f}/s; both paths "
            "need them):",
            "",
            "| path | clustering time (s) | NMI | intents |",
            "|---|---:|---:|---:|",
            f"| offline batch: k-means, k = {r['k']} given, n_init 3 | {r['kmeans_s']:.1f} | "
            f"{r['nmi_kmeans']:.4f} | {r['k']} |",
            f"| closeloop online (`Understand` core, k not given), final assignment | {r['online_s']:.1f} | "
            f"{r['nmi_online']:.4f} | {r['online_k']} |",
            f"| closeloop online, tag given on arrival (mapped through merges) | | {r['nmi_arrival']:.4f} | |",
            "",
            "The batch job must re-run over all conversations to take in new ones; the online "
            "path tags each conversation as it closes and keeps its intent ids.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--spans", type=int, default=500)
    p.add_argument("--conversations", type=int, default=10_000)
    p.add_argument("--phoenix", type=Path, default=PHOENIX)
    p.add_argument("--out", type=Path, help="also write the markdown section here")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    peers = [closeloop_peer(a.requests, a.spans)]
    print(peers[-1], flush=True)
    ph = phoenix_peer(a.phoenix, a.requests, a.spans)
    if ph:
        peers.append(ph)
        print(ph, flush=True)
    intents = intents_side_by_side(a.conversations) if a.conversations else None
    text = markdown(
        peers,
        ph is None,
        intents,
        f"python -m bench.peer_phoenix --requests {a.requests} --conversations {a.conversations}",
        a.spans,
    )
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        a.json.write_text(
            json.dumps({"peers": [dataclasses.asdict(x) for x in peers], **(intents or {})})
        )


if __name__ == "__main__":
    main()
