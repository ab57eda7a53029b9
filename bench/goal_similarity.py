"""Goal similarity: how the contrast's reference sets behave on real user requests.

    python -m bench.goal_similarity [--trials 40]

The contrastive analysis (:mod:`processors.diagnose.reference`) compares each conversation
with its nearest successful conversations by goal: the TF-IDF cosine of the user's first
messages, at least ``contrast_reference_similarity``. An intent learned online often mixes
related requests, so this simulates one: 3 BANKING77 categories sharing a word (``card``,
``transfer``, ``top``, ...), their ``test.csv`` utterances (40 each). For each threshold it
reports the share of utterances with at least one neighbour that alike (reference sets
exist) and the share of those neighbours in the utterance's own category (they share its
goal).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

from processors.diagnose.reference import references, tfidf

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "banking77" / "test.csv"
WORDS = ("card", "transfer", "top", "cash", "exchange", "pin")
THRESHOLDS = (0.2, 0.3, 0.4, 0.5)


def measure(trials: int, seed: int = 1) -> list[tuple[float, float, float]]:
    with DATA.open() as f:
        rows = list(csv.reader(f))[1:]
    by: dict[str, list[str]] = defaultdict(list)
    for text, category in rows:
        by[category].append(text)
    cats = sorted(by)
    out = []
    for threshold in THRESHOLDS:
        rng = random.Random(seed)
        with_refs = same = total = 0
        for _ in range(trials):
            pool = [c for c in cats if rng.choice(WORDS) in c] or cats
            texts = {
                f"{c}|{i}": t
                for c in rng.sample(pool, min(3, len(pool)))
                for i, t in enumerate(by[c])
            }
            for cid, ref in references(tfidf(texts), list(texts), 3, threshold).items():
                total += 1
                if ref:
                    with_refs += 1
                    same += sum(r.split("|")[0] == cid.split("|")[0] for r in ref) / len(ref)
        out.append((threshold, with_refs / total, same / max(with_refs, 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    a = ap.parse_args(argv)
    print("| cosine at least | utterances with a reference | references of the same category |")
    print("|---|---|---|")
    for threshold, have, same in measure(a.trials):
        print(f"| {threshold} | {have:.0%} | {same:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
