"""Intent-clustering quality and speed on several labelled intent data sets, with one default.

    python -m bench.intents [--data-dir DIR] [--sets banking77,hwu64,snips] [--limit 10000]
                            [--seed 0] [--no-write]

The data sets are read from ``--data-dir`` (or ``CLOSELOOP_BENCH_DATA``; default
``../shared/data`` beside the repository), one folder each, as published:

* ``banking77/train.csv`` — BANKING77 (PolyAI, CC-BY-4.0): 77 banking intents;
* ``hwu64/trainset/*.csv`` — HWU64 (Liu et al. 2019, CC-BY-4.0): 64 intents over 21 home-assistant
  scenarios;
* ``snips/train_*_full.json`` — SNIPS 2017-06 custom intent engines (sonos/nlu-benchmark, CC0): 7
  broad intents (music, weather, restaurants, books, films).

Each set is shuffled with a fixed seed, cut to ``--limit`` utterances, embedded with the
default embedder (``minilm``: all-MiniLM-L6-v2 on ONNX int8) and streamed once through the online
``IntentModel`` with its defaults (never told k), in batches of 500 as the understand core does.
Baseline: offline k-means told the true k on the same vectors (scikit-learn, bench only).
Scores: NMI and ARI of the final model's assignment and of the tags given on arrival (in their
latest version, as re-clusterings re-version them, then through later merges), the number of clusters of each, the speed with embedding, and the share
of intents whose deterministic name shares a content word with the intent's majority label.
Writes ``bench/RESULTS_intents.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from processors.understand.embed import OnnxMiniLMEmbedder
from processors.understand.intents import IntentModel
from processors.understand.naming import STOP_WORDS, KeyphraseIndex, _stem, name_intent, words

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "RESULTS_intents.md"
BATCH = 500  # conversations per understand batch
NMI_SLACK, ARI_SLACK, ARRIVAL_SLACK, MAX_CLUSTER_RATIO = 0.01, 0.03, 0.03, 2.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def banking77(d: Path) -> list[tuple[str, str]]:
    with (d / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def hwu64(d: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted((d / "hwu64" / "trainset").glob("*.csv")):
        with p.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter=";"):
                text = (r.get("answer_from_user") or r.get("answer_from_anno") or "").strip()
                if text:
                    out.append((text, f"{r['scenario']}_{r['intent']}"))
    return out


def snips(d: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted((d / "snips").glob("train_*_full.json")):
        doc = json.loads(p.read_bytes().decode("utf-8", errors="replace"))
        for label, rows in doc.items():
            out += [("".join(c["text"] for c in r["data"]).strip(), label) for r in rows]
    return out


LOADERS: dict[str, Callable[[Path], list[tuple[str, str]]]] = {
    "banking77": banking77,
    "hwu64": hwu64,
    "snips": snips,
}


def label_words(label: str) -> set[str]:
    """Content-word stems of a label: "card_arrival", "AddToPlaylist", "alarm_query"."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label)
    return {_stem(w) for w in words(spaced.replace("_", " ")) if w not in STOP_WORDS}


@dataclass
class SetResult:
    name: str
    n: int
    k_true: int
    km: tuple[float, float, float]  # NMI, ARI, fit seconds
    final: tuple[float, float, int]  # NMI, ARI, clusters
    arrival: tuple[float, float, int]
    arrival_late: float  # NMI on arrival over the second half of the stream (warmed up)
    embed_s: float
    cluster_s: float
    embed_cpu: float  # CPU seconds, every thread of the process
    cluster_cpu: float
    names_hit: int
    names_total: int
    sample_names: list[tuple[str, str]]  # (majority label, name)


def name_share(
    model: IntentModel, final: np.ndarray, texts: list[str], y: np.ndarray
) -> tuple[int, int, list[tuple[str, str]]]:
    """How many intents' names share a content word with their majority label, of how many."""
    index = KeyphraseIndex()
    for f, t in zip(final, texts):
        index.add(f, t)
    stats = index.stats()
    hit, total, shown = 0, 0, []
    for s in sorted(model.intents(), key=lambda s: -s.size):
        labels = Counter(y[final == s.intent_id])
        if not labels:
            continue
        major = labels.most_common(1)[0][0]
        named = name_intent(
            [t for _, t in s.examples],
            stats,
            class_counts=index.counts(s.intent_id),
            n_docs=index.docs(s.intent_id),
        )
        total += 1
        hit += bool(label_words(major) & {_stem(w) for w in words(named.name)})
        shown.append((major, named.name))
    return hit, total, shown


def learn_stream(
    X: np.ndarray, texts: list[str], settings: dict[str, Any] | None = None
) -> tuple[IntentModel, list[str]]:
    """An ``IntentModel`` (the default, or with ``settings``) fed ``X`` in understand batches,
    and the tags given on arrival, re-versioned at each re-clustering as the understand core
    does."""
    model = IntentModel(**(settings or {}))
    arrival_ids: list[str] = []
    for i in range(0, len(X), BATCH):
        reclusterings = model.reclusterings
        arrival_ids += model.learn_many(X[i : i + BATCH], now_ns=i, texts=texts[i : i + BATCH])
        if model.reclusterings != reclusterings:
            arrival_ids = model.current_tags(range(len(arrival_ids)), arrival_ids)
    return model, arrival_ids


def run_set(
    name: str, texts: list[str], y: np.ndarray, embedder: OnnxMiniLMEmbedder, seed: int
) -> SetResult:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    k_true = len(set(y))
    t, cpu = time.perf_counter(), time.process_time()
    X = embedder.embed(texts)
    embed_s, embed_cpu = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    km = KMeans(k_true, n_init=3, random_state=seed).fit(X).labels_
    km_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    model, arrival_ids = learn_stream(X, texts)
    cluster_s, cluster_cpu = time.perf_counter() - t, time.process_time() - cpu
    arrival = np.array([model.resolve(a) for a in arrival_ids])
    final = np.array([model.predict_one(x) or "-" for x in X])
    hit, total, shown = name_share(model, final, texts, y)
    return SetResult(
        name,
        len(texts),
        k_true,
        (nmi(y, km), ari(y, km), km_s),
        (nmi(y, final), ari(y, final), len(set(final))),
        (nmi(y, arrival), ari(y, arrival), len(set(arrival))),
        nmi(y[len(y) // 2 :], arrival[len(y) // 2 :]),
        embed_s,
        cluster_s,
        embed_cpu,
        cluster_cpu,
        hit,
        total,
        shown,
    )


def verdicts(r: SetResult) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for one set."""
    km_nmi, km_ari, _ = r.km
    f_nmi, f_ari, f_k = r.final
    a_nmi = r.arrival[0]
    return [
        (
            f"NMI ≥ k-means − {NMI_SLACK}",
            f"{f_nmi:.3f} vs {km_nmi:.3f}",
            f_nmi >= km_nmi - NMI_SLACK,
        ),
        (
            f"ARI ≥ k-means − {ARI_SLACK}",
            f"{f_ari:.3f} vs {km_ari:.3f}",
            f_ari >= km_ari - ARI_SLACK,
        ),
        (
            f"clusters ≤ {MAX_CLUSTER_RATIO:g} × true",
            f"{f_k} vs {r.k_true}",
            f_k <= MAX_CLUSTER_RATIO * r.k_true,
        ),
        (
            f"NMI on arrival within {ARRIVAL_SLACK} of final",
            f"{a_nmi:.3f} vs {f_nmi:.3f}",
            a_nmi >= f_nmi - ARRIVAL_SLACK,
        ),
    ]


def report(results: list[SetResult], cmd: str, limit: int, seed: int) -> str:
    head = (
        "| embedding · data set | clusterer | NMI | ARI | NMI on arrival | ARI on arrival | "
        "NMI on arrival, 2nd half | clusters | clusters on arrival | true k | speed with "
        "embedding | names sharing a word with the majority label |"
    )
    rows = [head, "|" + "---|" * 12]
    goal_rows = ["| data set | goal | measured | met |", "|---|---|---|---|"]
    name_rows = ["| data set | majority label | name (no LLM) |", "|---|---|---|"]
    for r in results:
        rows.append(
            f"| minilm · {r.name} | k-means, true k={r.k_true} (offline) | {r.km[0]:.4f} | "
            f"{r.km[1]:.4f} |  |  |  | {r.k_true} |  | {r.k_true} | {r.km[2]:.1f} s fit |  |"
        )
        rate = r.n / (r.embed_s + r.cluster_s)
        rows.append(
            f"| minilm · {r.name} | IntentModel default | {r.final[0]:.4f} | {r.final[1]:.4f} | "
            f"{r.arrival[0]:.4f} | {r.arrival[1]:.4f} | {r.arrival_late:.4f} | {r.final[2]} | "
            f"{r.arrival[2]} | "
            f"{r.k_true} | {rate:,.0f}/s ({r.n / r.embed_s:,.0f}/s embedding, "
            f"{r.n / r.cluster_s:,.0f}/s clustering; CPU per utterance "
            f"{r.embed_cpu / r.n * 1e6:,.0f} µs embedding, {r.cluster_cpu / r.n * 1e6:,.0f} µs "
            f"clustering) | {r.names_hit}/{r.names_total} = "
            f"{r.names_hit / max(r.names_total, 1):.2f} |"
        )
        goal_rows += [
            f"| {r.name} | {g} | {m} | {'met' if ok else 'NOT met'} |" for g, m, ok in verdicts(r)
        ]
        name_rows += [f"| {r.name} | {lab} | {nm} |" for lab, nm in r.sample_names[:8]]
    return "\n".join(
        [
            "# Understand: intent clustering on several data sets, one default",
            "",
            (
                f"Command: `{cmd}` — run {datetime.date.today().isoformat()} on {os.cpu_count()} "
                f"cores (nproc), CPU: {cpu_model()}."
            ),
            "",
            (
                f"Each set shuffled with seed {seed}, the first {limit:,} utterances, one pass in "
                f"batches of {BATCH}. NMI/ARI: the final model's assignment of every utterance; "
                "'on arrival': the tag given when it arrived, in its latest version (the understand core "
                "re-versions the tags a re-clustering moved to another intent, for the last "
                f"{IntentModel().remember:,} conversations) and mapped through later merges ('2nd half': "
                "the utterances after the first half, once the model has warmed up). The online "
                "model is never told k; k-means is, on the same vectors. Speed: utterances per "
                "second, embedding (ONNX int8 MiniLM on both cores) plus clustering."
            ),
            "",
            *rows,
            "",
            *goal_rows,
            "",
            "Names of the largest intents (phrases from their central examples, no LLM):",
            "",
            *name_rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.intents", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CLOSELOOP_BENCH_DATA", DEFAULT_DATA)),
        help="folder holding banking77/, hwu64/, snips/ (env CLOSELOOP_BENCH_DATA)",
    )
    ap.add_argument("--sets", default=",".join(LOADERS), help="comma-separated data sets")
    ap.add_argument("--limit", type=int, default=10_000, help="utterances per set (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as models:
        embedder = OnnxMiniLMEmbedder(Path(models))
        for name in args.sets.split(","):
            if name not in LOADERS:
                ap.error(f"unknown data set {name!r}; known: {', '.join(LOADERS)}")
            try:
                rows = LOADERS[name](args.data_dir)
            except OSError as e:
                print(f"{name}: not found under {args.data_dir} ({e}); skipped", file=sys.stderr)
                continue
            order = np.random.default_rng(args.seed).permutation(len(rows))
            if args.limit:
                order = order[: args.limit]
            texts = [rows[i][0] for i in order]
            y = np.array([rows[i][1] for i in order])
            r = run_set(name, texts, y, embedder, args.seed)
            results.append(r)
            print(
                f"{name}: NMI {r.final[0]:.4f} (k-means {r.km[0]:.4f}) ARI {r.final[1]:.4f} "
                f"(k-means {r.km[1]:.4f}) clusters {r.final[2]} (true {r.k_true}); arrival NMI "
                f"{r.arrival[0]:.4f}; names {r.names_hit}/{r.names_total}",
                flush=True,
            )
    if not results:
        print(f"no data set found under {args.data_dir}", file=sys.stderr)
        return 2
    cmd = "python -m bench.intents" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    doc = report(results, cmd.rstrip(), args.limit, args.seed)
    print()
    print(doc)
    if not args.no_write:
        RESULTS.write_text(doc)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
