"""MiniLM embedders side by side: speed, fidelity to sentence-transformers, intent quality.

    python -m bench.embedders [--repeats 3] [--out bench/RESULTS_embedders.md]

For each way of running all-MiniLM-L6-v2 (numpy reference, ONNX fp32, ONNX int8, int8 with a
shorter max length): sentences/s embedding BANKING77 ``test.csv`` in one call (best and median
of ``--repeats``, wall clock, all cores), cosine to the sentence-transformers vectors in
``tests/data/minilm_reference.npz`` (min / mean), NMI / ARI / intents of the online
``IntentModel`` streaming ``train.csv`` (as ``bench.intents`` does), the first-use build time
and the size of the cached graph. The graphs are built in a temporary models dir.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.intents import DEFAULT_DATA, banking77, cpu_model, learn_stream
from processors.understand.embed import Embedder, MiniLMEmbedder, OnnxMiniLMEmbedder

ROOT = Path(__file__).resolve().parent.parent
SPEED_DATA = ROOT / "examples" / "data" / "banking77" / "test.csv"
REFERENCE = ROOT / "tests" / "data" / "minilm_reference.npz"


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def speed(emb: Embedder, texts: list[str], repeats: int) -> list[float]:
    emb.embed(texts[:64])  # warm-up: first-run allocations
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        emb.embed(texts)
        out.append(len(texts) / (time.perf_counter() - t))
    return out


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ap = argparse.ArgumentParser(
        prog="python -m bench.embedders", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    speed_texts, _ = read_texts(SPEED_DATA)
    data = Path(os.environ.get("CLOSELOOP_BENCH_DATA", DEFAULT_DATA))
    train_texts, train_labels = (list(c) for c in zip(*banking77(data), strict=True))
    order = np.random.default_rng(0).permutation(len(train_texts))  # bench.intents' stream order
    train_texts = [train_texts[i] for i in order]
    y = np.array([train_labels[i] for i in order])
    ref = np.load(REFERENCE)
    ref_texts, ref_vectors = [str(t) for t in ref["texts"]], ref["vectors"]

    rows = []
    with tempfile.TemporaryDirectory() as models:
        variants: dict[str, tuple] = {
            "minilm-numpy (reference)": (lambda: MiniLMEmbedder(), 1),
            "minilm-fp32 (ONNX)": (
                lambda: OnnxMiniLMEmbedder(Path(models), precision="fp32"),
                args.repeats,
            ),
            "minilm (ONNX int8, default)": (
                lambda: OnnxMiniLMEmbedder(Path(models), precision="int8"),
                args.repeats,
            ),
            "minilm int8, max 64 tokens": (
                lambda: OnnxMiniLMEmbedder(Path(models), max_tokens=64),
                args.repeats,
            ),
            "minilm int8, max 32 tokens": (
                lambda: OnnxMiniLMEmbedder(Path(models), max_tokens=32),
                args.repeats,
            ),
        }
        for name, (make, repeats) in variants.items():
            emb = make()
            built = getattr(emb, "built_s", None)
            path = getattr(emb, "path", None)
            size = f"{path.stat().st_size / 1e6:.0f} MB" if path else "- (no cache)"
            sps = speed(emb, speed_texts, repeats)
            cos = (emb.embed(ref_texts) * ref_vectors).sum(axis=1)
            X = emb.embed(train_texts)
            model, _ = learn_stream(X, train_texts)
            final = np.array([model.predict_one(x) or "-" for x in X])
            rows.append(
                (
                    name,
                    max(sps),
                    statistics.median(sps),
                    cos.min(),
                    cos.mean(),
                    nmi(y, final),
                    ari(y, final),
                    len(set(final)),
                    "-" if built is None else f"{built:.1f} s",
                    size,
                )
            )
            print(
                f"{name}: {max(sps):,.0f}/s cos {cos.min():.4f}/{cos.mean():.4f} NMI {rows[-1][5]:.4f} "
                f"ARI {rows[-1][6]:.4f} k {rows[-1][7]}",
                flush=True,
            )

    lines = [
        f"Embedders on {os.cpu_count()} cores, CPU: {cpu_model()}; `python -m bench.embedders "
        f"--repeats {args.repeats}`. Speed: {len(speed_texts)} BANKING77 test utterances in one call "
        "(best / median). Cosine: vs sentence-transformers on the 64 reference texts. NMI/ARI/intents: "
        f"IntentModel (defaults) streaming {len(train_texts)} train utterances, seed 0.",
        "",
        "| embedder | sentences/s best | median | cosine min | cosine mean | NMI | ARI | intents "
        "| first-use build | cache on disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, best, med, cmin, cmean, n, a, k, built, size in rows:
        lines.append(
            f"| {name} | {best:,.0f} | {med:,.0f} | {cmin:.4f} | {cmean:.4f} | {n:.4f} | {a:.4f} | {k} "
            f"| {built} | {size} |"
        )
    doc = "\n".join(lines) + "\n"
    print()
    print(doc)
    if args.out:
        args.out.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
