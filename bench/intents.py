"""Intent-clustering quality and speed on BANKING77 (77 labelled banking intents).

    python -m bench.intents [--data examples/data/banking77/train.csv] [--limit N] [--seed 0]

Streams the utterances once, shuffled with a fixed seed, through each embedder and the online
``IntentModel`` (never told k), and compares with an offline baseline on the same embeddings:
k-means with the true k (scikit-learn, bench only). Scores: NMI and ARI against the labels for
the tags given on arrival (mapped through later merges) and for the final model's assignment;
the number of intents (all active, and how many cover 95% of the points); id stability (the
share of points whose arrival tag, mapped through merges, is the final model's answer);
throughput and model memory. Writes ``bench/RESULTS_intents.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.static_embedder import StaticEmbedder
from processors.understand.embed import HashingEmbedder, MiniLMEmbedder
from processors.understand.intents import IntentModel

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "examples" / "data" / "banking77" / "train.csv"
RESULTS = Path(__file__).resolve().parent / "RESULTS_intents.md"
VARIANTS = {  # name -> IntentModel settings (the first is the default)
    "default (threshold 0.6, micro 0.85)": {},
    "threshold 0.65": {"threshold": 0.65},
    "threshold 0.55": {"threshold": 0.55},
    "micro 0.8": {"micro_threshold": 0.8},
}


def cover95(labels: np.ndarray) -> int:
    """How many clusters, largest first, it takes to cover 95% of the points."""
    sizes = np.sort(np.unique(labels, return_counts=True)[1])[::-1]
    return int(np.searchsorted(np.cumsum(sizes), 0.95 * len(labels)) + 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stream(X: np.ndarray, texts: list[str], settings: dict) -> dict:
    model = IntentModel(**settings)
    t = time.perf_counter()
    arrival = [model.learn_one(x, now_ns=i, text=s) for i, (x, s) in enumerate(zip(X, texts))]
    dt = time.perf_counter() - t
    mapped = np.array([model.resolve(a) for a in arrival])
    final = np.array([model.predict_one(x) or "-" for x in X])
    kinds = [c.change for c in model.changes]
    return {
        "arrival": mapped,
        "final": final,
        "pps": len(X) / dt,
        "k": len(model.intents()),
        "stability": float((mapped == final).mean()),
        "mem": model.nbytes(),
        "changes": {k: kinds.count(k) for k in ("created", "merged", "split")},
    }


def main(argv: list[str] | None = None) -> int:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ap = argparse.ArgumentParser(prog="python -m bench.intents", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N shuffled rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS_intents.md alone"
    )
    args = ap.parse_args(argv)

    with args.data.open(newline="") as f:
        rows = list(csv.DictReader(f))
    order = np.random.default_rng(args.seed).permutation(len(rows))
    if args.limit:
        order = order[: args.limit]
    texts = [rows[i]["text"] for i in order]
    y = np.array([rows[i]["category"] for i in order])
    k_true = len(set(y))
    print(
        f"{len(texts)} utterances, {k_true} labelled intents, stream order seed {args.seed}",
        flush=True,
    )

    embed_rows, cluster_rows = [], []
    minilm = MiniLMEmbedder()
    with tempfile.TemporaryDirectory() as models:
        t = time.perf_counter()
        static = StaticEmbedder.load_or_build(Path(models), minilm)
        build_s = time.perf_counter() - t
        embedders = {
            "minilm (numpy)": minilm,
            "static-256 (distilled)": static,
            "hashing": HashingEmbedder(),
        }
        vectors = {}
        for name, emb in embedders.items():
            t = time.perf_counter()
            vectors[name] = emb.embed(texts)
            sps = len(texts) / (time.perf_counter() - t)
            embed_rows.append((name, emb.dim, sps))
            print(f"embedded with {name}: {sps:,.0f} sentences/s", flush=True)

    for name, X in vectors.items():
        t = time.perf_counter()
        km = KMeans(k_true, n_init=3, random_state=args.seed).fit(X)
        base_s = time.perf_counter() - t
        lab = km.labels_
        cluster_rows.append(
            (
                name,
                f"k-means, true k={k_true} (offline)",
                nmi(y, lab),
                ari(y, lab),
                "",
                "",
                k_true,
                cover95(lab),
                "",
                f"{base_s:.1f} s fit",
                "",
                "",
            )
        )
        variants = (
            VARIANTS if name == "minilm (numpy)" else {"default (threshold 0.6, micro 0.85)": {}}
        )
        for vname, settings in variants.items():
            r = stream(X, texts, settings)
            cluster_rows.append(
                (
                    name,
                    f"IntentModel {vname}",
                    nmi(y, r["final"]),
                    ari(y, r["final"]),
                    nmi(y, r["arrival"]),
                    ari(y, r["arrival"]),
                    r["k"],
                    cover95(r["final"]),
                    f"{r['stability']:.3f}",
                    f"{r['pps']:,.0f} pts/s",
                    f"{r['mem'] / 1e6:.1f} MB",
                    "/".join(str(r["changes"][c]) for c in ("created", "merged", "split")),
                )
            )
            print(
                f"{name} / {vname}: NMI {cluster_rows[-1][2]:.4f} ARI {cluster_rows[-1][3]:.4f} k {r['k']}",
                flush=True,
            )

    head = (
        "| embedding | clusterer | NMI | ARI | NMI on arrival | ARI on arrival | clusters | clusters "
        "covering 95% | id stability | speed | model memory | created/merged/split |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in cluster_rows:
        cells = [f"{c:.4f}" if isinstance(c, float) else str(c) for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    emb_lines = ["| embedder | dim | sentences/s |", "|---|---:|---:|"]
    emb_lines += [f"| {n} | {d} | {s:,.0f} |" for n, d, s in embed_rows]
    cmd = (
        "python -m bench.intents"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    doc = "\n".join(
        [
            "# Understand: intent clustering on BANKING77",
            "",
            (
                f"Command: `{cmd}` — run {datetime.date.today().isoformat()} on {os.cpu_count()} cores "
                f"(nproc), CPU: {cpu_model()}."
            ),
            "",
            (
                f"Data: `{args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data}`, "
                f"{len(texts)} utterances in one pass, shuffled with seed {args.seed}; {k_true} true intents. "
                "NMI/ARI use the final model's assignment of every point; 'on arrival' uses the tag given when "
                "the point arrived, mapped through later merges. Id stability: share of points whose mapped "
                "arrival tag equals the final assignment. The online model is never told k."
            ),
            "",
            f"Static model build (distilled from the numpy MiniLM, cached in `<home>/models`): {build_s:.1f} s.",
            "",
            *emb_lines,
            "",
            *lines,
            "",
        ]
    )
    print()
    print(doc)
    if not args.no_write:
        RESULTS.write_text(doc)
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
