"""Intent-clustering goals over many stream orders, the default against other settings.

    python -m bench.intent_orders [--data-dir DIR] [--sets banking77,hwu64,snips] [--orders 12]
                                  [--limit 10000] [--against cut_tolerance=0.25,recluster_sample=6000]

One order of a stream can pass or miss a goal by luck: the re-clustering's cut depends on where
the stream stands when it runs. This bench embeds each data set once (as ``bench.intents`` reads
it), then for each of ``--orders`` shuffles (seeds 0, 1, …) takes the first ``--limit``
utterances and streams them through the default ``IntentModel`` and through one with the
``--against`` settings, in the same run, on the same vectors. Each order is scored as
``bench.intents`` scores one: final NMI and ARI against offline k-means told the true k (the
margin to the goal: NMI ≥ k-means − 0.01, ARI ≥ k-means − 0.03), clusters against 2 × the true
number, the tag on arrival within 0.03 of final. Per set: goals met, the mean margins, the
cluster counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.intents import (
    ARI_SLACK,
    ARRIVAL_SLACK,
    DEFAULT_DATA,
    LOADERS,
    MAX_CLUSTER_RATIO,
    NMI_SLACK,
    cpu_model,
    learn_stream,
)
from processors.understand.embed import OnnxMiniLMEmbedder


@dataclass
class OrderScore:
    nmi_margin: float  # final NMI − (k-means NMI − NMI_SLACK)
    ari_margin: float
    clusters: int
    arrival_ok: bool
    cluster_ok: bool

    @property
    def goals_met(self) -> int:
        return (self.nmi_margin >= 0) + (self.ari_margin >= 0) + self.cluster_ok + self.arrival_ok


def parse_settings(text: str) -> dict[str, Any]:
    """``key=value,key=value`` into IntentModel keyword arguments (numbers as numbers)."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value) if "." in value else int(value)
    return out


def score_order(
    X: np.ndarray,
    texts: list[str],
    y: np.ndarray,
    km: tuple[float, float],
    settings: dict[str, Any],
) -> OrderScore:
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    model, arrival_ids = learn_stream(X, texts, settings)
    final = np.array([model.predict_one(x) or "-" for x in X])
    arrival = np.array([model.resolve(a) for a in arrival_ids])
    f_nmi, k = nmi(y, final), len(set(final))
    return OrderScore(
        f_nmi - (km[0] - NMI_SLACK),
        ari(y, final) - (km[1] - ARI_SLACK),
        k,
        nmi(y, arrival) >= f_nmi - ARRIVAL_SLACK,
        k <= MAX_CLUSTER_RATIO * len(set(y)),
    )


def run_set(
    rows: list[tuple[str, str]], X_all: np.ndarray, orders: int, limit: int, against: dict[str, Any]
) -> list[tuple[OrderScore, OrderScore]]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    out = []
    for seed in range(orders):
        order = np.random.default_rng(seed).permutation(len(rows))[: limit or None]
        X = X_all[order]
        texts = [rows[i][0] for i in order]
        y = np.array([rows[i][1] for i in order])
        labels = KMeans(len(set(y)), n_init=3, random_state=0).fit(X).labels_
        km = (nmi(y, labels), ari(y, labels))
        out.append((score_order(X, texts, y, km, {}), score_order(X, texts, y, km, against)))
        print(f"  order {seed}: default {out[-1][0]}; against {out[-1][1]}", flush=True)
    return out


def summary(name: str, label: str, scores: list[OrderScore]) -> str:
    met = sum(s.goals_met for s in scores)
    passed = sum(s.goals_met == 4 for s in scores)
    ks = [s.clusters for s in scores]
    return (
        f"| {name} | {label} | {passed}/{len(scores)} | {met}/{4 * len(scores)} | "
        f"{np.mean([s.nmi_margin for s in scores]):+.4f} "
        f"({min(s.nmi_margin for s in scores):+.3f}) | "
        f"{np.mean([s.ari_margin for s in scores]):+.4f} "
        f"({min(s.ari_margin for s in scores):+.3f}) | {min(ks)}–{max(ks)} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.intent_orders", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CLOSELOOP_BENCH_DATA", DEFAULT_DATA)),
    )
    ap.add_argument("--sets", default=",".join(LOADERS))
    ap.add_argument("--orders", type=int, default=12)
    ap.add_argument("--limit", type=int, default=10_000, help="utterances per order (0: all)")
    ap.add_argument(
        "--against",
        default="cut_tolerance=0.25,recluster_sample=6000",
        help="IntentModel settings to compare with the default (key=value,...)",
    )
    args = ap.parse_args(argv)
    against = parse_settings(args.against)
    lines = [
        f"CPU: {cpu_model()}; {args.orders} orders of {args.limit:,} utterances per set; "
        f"against: {args.against}",
        "",
        "| data set | settings | orders meeting every goal | goals met | NMI margin: mean "
        "(worst) | ARI margin: mean (worst) | clusters |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as models:
        embedder = OnnxMiniLMEmbedder(Path(models))
        for name in args.sets.split(","):
            if name not in LOADERS:
                ap.error(f"unknown data set {name!r}; known: {', '.join(LOADERS)}")
            rows = LOADERS[name](args.data_dir)
            print(f"{name}: embedding {len(rows):,} utterances", flush=True)
            X_all = embedder.embed([t for t, _ in rows])
            pairs = run_set(rows, X_all, args.orders, args.limit, against)
            lines.append(summary(name, "default", [d for d, _ in pairs]))
            lines.append(summary(name, args.against, [a for _, a in pairs]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
