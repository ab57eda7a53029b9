"""Understand core throughput and memory: BANKING77 conversations tagged, embedding included.

    python -m bench.understand [--embedded 10000] [--sizes 10000,100000,1000000] [--batch 500]

Each conversation is one BANKING77 utterance as the user's message plus a canned assistant
answer. First ``--embedded`` conversations go through ``Understand.process`` with the default
embedder (``make_embedder``: MiniLM, ONNX int8) in batches of ``--batch``, as the worker calls
it: conversations/s tagged, embedding included. Then the same core keeps going to each of
``--sizes`` conversations with the vectors of the first pass reused (the 10k utterances cycle
with fresh conversation ids), which measures the rest of the path and shows whether memory
(process RSS, the intent model's ``nbytes()``) stays flat as conversations accumulate.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from processors.config import load_config
from processors.records import Conversation, Message
from processors.understand.core import Understand
from processors.understand.embed import Embedder, make_embedder

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "banking77" / "train.csv"
ANSWER = "Thanks for reaching out. Let me look into that for you."
T0 = 1_731_000_000_000_000_000


def utterances(limit: int = 0, seed: int = 0) -> list[str]:
    with DATA.open(newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in (order[:limit] if limit else order)]


def conversation(i: int, text: str) -> Conversation:
    ts = T0 + i * 1_000_000_000
    return Conversation(
        conversation_id=f"bench-{i}",
        start_ns=ts,
        end_ns=ts + 5_000_000_000,
        closed_reason="idle",
        prompt_version="p-1",
        model="gpt-4o-mini",
        agent_name="support",
        agent_version="1.0",
        messages=[Message("user", text, ts_ns=ts), Message("assistant", ANSWER, ts_ns=ts + 1)],
        llm_calls=1,
        input_tokens=120,
        output_tokens=30,
        latency_ms=800.0,
    )


def rss_mb() -> float:
    """Current resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoEmbedder:
    """The default embedder, remembering each text's vector so the later passes reuse it.

    On the first pass every text is new, so it costs what the embedder costs.
    """

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if new:
            self.memo.update(zip(new, self.inner.embed(new)))
        return np.stack([self.memo[t] for t in texts])


def run(embedded: int, sizes: list[int], batch: int, log: Callable[[str], None] = print) -> dict:
    texts = utterances(embedded)
    with tempfile.TemporaryDirectory(prefix="bench-understand-") as home:
        cfg = load_config(None, env={}, overrides={"home": home})
        t = time.perf_counter()
        embedder = make_embedder(cfg.understand, Path(home) / "models", cfg.llm)
        load_s = time.perf_counter() - t
        core = Understand(cfg, MemoEmbedder(embedder))
        rss0 = rss_mb()
        t, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(texts), batch):
            core.process(
                [conversation(start + j, s) for j, s in enumerate(texts[start : start + batch])],
                T0 + start * 1_000_000_000,
            )
        embedded_rate = len(texts) / (time.perf_counter() - t)
        # CPU time of every thread of this process: on a shared machine the wall rate moves
        # with the other jobs, the CPU per conversation much less
        cpu_us = (time.process_time() - cpu) / len(texts) * 1e6
        log(
            f"{len(texts):,} conversations with {cfg.understand.embedder} embedding: "
            f"{embedded_rate:,.0f}/s, {cpu_us:,.0f} µs CPU each"
        )
        points = [(len(texts), rss_mb(), core.model.nbytes(), len(core.model.intents()), None)]
        done = len(texts)
        cycle = itertools.cycle(texts)
        for size in sorted(s for s in sizes if s > done):
            t, cpu = time.perf_counter(), time.process_time()
            n0 = done
            while done < size:
                n = min(batch, size - done)
                core.process(
                    [conversation(done + j, next(cycle)) for j in range(n)],
                    T0 + done * 1_000_000_000,
                )
                done += n
            rate = (done - n0) / (time.perf_counter() - t)
            rest_us = (time.process_time() - cpu) / (done - n0) * 1e6
            points.append((done, rss_mb(), core.model.nbytes(), len(core.model.intents()), rate))
            log(
                f"{done:,} conversations: RSS {points[-1][1]:,.0f} MB, model {points[-1][2] / 1e6:.1f} MB, "
                f"{points[-1][3]} intents, {rate:,.0f}/s without embedding, {rest_us:,.0f} µs CPU each"
            )
    return {
        "embedder": cfg.understand.embedder,
        "load_s": load_s,
        "embedded": len(texts),
        "embedded_rate": embedded_rate,
        "embedded_cpu_us": cpu_us,
        "rss_start": rss0,
        "points": points,
        "batch": batch,
    }


def markdown(res: dict, command: str) -> str:
    lines = [
        "## Understand core: conversations tagged per second, memory",
        "",
        f"Command: `{command}`. BANKING77 utterances as one-message conversations, batches of "
        f"{res['batch']} through `Understand.process` (embed, intent model, tagger, namer; no LLM). "
        f"Embedder `{res['embedder']}` (the default), loaded in {res['load_s']:.1f} s.",
        "",
        f"**{res['embedded_rate']:,.0f} conversations/s tagged, embedding included** "
        f"({res['embedded']:,} conversations; {res['embedded_cpu_us']:,.0f} µs of CPU per "
        "conversation, all threads).",
        "",
        "Longer runs reuse those vectors (the utterances cycle with fresh conversation ids), so the "
        "rate below is everything but the embedding:",
        "",
        "| conversations | rate without embedding (/s) | RSS MB | intent model MB | intents |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, rss, nbytes, k, rate in res["points"]:
        r = f"{rate:,.0f}" if rate else "(first pass, embedded)"
        lines.append(f"| {n:,} | {r} | {rss:,.0f} | {nbytes / 1e6:.1f} | {k} |")
    lines += [
        "",
        f"RSS after loading the embedder, before the first conversation: {res['rss_start']:,.0f} MB.",
    ]
    last_n, _, _, _, last_rate = res["points"][-1]
    if last_n < 1_000_000 and last_rate:
        lines += [
            "",
            f"1M conversations not run: at {last_rate:,.0f}/s (without embedding) it takes "
            f"~{1e6 / last_rate / 60:.0f} min; `--sizes 100000,1000000` runs it.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedded", type=int, default=10_000)
    p.add_argument("--sizes", default="100000")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", type=Path, help="also write the markdown section here")
    p.add_argument("--json", type=Path, help="write the goal figures here")
    a = p.parse_args()
    res = run(a.embedded, [int(s) for s in a.sizes.split(",") if s], a.batch)
    text = markdown(
        res, "python -m bench.understand " + f"--embedded {a.embedded} --sizes {a.sizes}"
    )
    print(text)
    if a.out:
        a.out.write_text(text)
    if a.json:
        rates = [pt[4] for pt in res["points"] if pt[4]]
        a.json.write_text(
            json.dumps(
                {
                    "embedded_rate": res["embedded_rate"],
                    "embedder": res["embedder"],
                    "rate_without_embedding": rates[-1] if rates else 0.0,
                }
            )
        )


if __name__ == "__main__":
    main()
