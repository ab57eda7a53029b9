"""What the ``responses`` materialized view costs span inserts, side by side in one run.

Run: ``python -m bench.responses_view [--spans 40000] [--rounds 5]``. Prints a table; no
assertions on speed.

``schemas/010_responses.sql`` has the store fill ``responses`` (where each answer is, by its
``gen_ai.response.id``) from every insert into ``spans`` through the materialized view
``responses_from_spans``, so the view's work is part of every span insert. This inserts the
same capture rows (``bench/capture_core.py``'s realistic GenAI spans with message content, one
chat span in four carrying a response id) into ``spans`` of one chDB store, column by column as
capture does, with the view attached and detached (``DETACH``/``ATTACH``: the schema's own view,
unchanged), alternating which goes first each round. Merges are stopped while it measures, so an
insert's time is the insert's own (the view runs inside it). Per insert: rows/s of wall time and
CPU µs per row of this process (chDB runs in it); the table gives each round and the medians,
and the ratio of each with-view figure to the baseline without it in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.capture_core import make_messages
from processors.capture.core import Capture
from processors.config import CaptureConfig
from processors.redact import Redactor
from processors.store import Store, connect

VIEW = "responses_from_spans"
MODES = ("without view", "with view")


def span_columns(n: int) -> tuple[list[dict], int]:
    """Capture's ``spans`` rows for ``n`` spans, and how many carry a response id."""
    cfg = CaptureConfig()
    batch = Capture(cfg, Redactor(cfg.redact)).process(make_messages(n, content=True), 0)
    assert len(batch.span_rows) == n and not batch.deadletters
    answered = sum(1 for r in batch.span_rows if r["attributes"].get("gen_ai.response.id"))
    return batch.span_rows, answered


def set_view(store: Store, attached: bool) -> None:
    """Attach or detach the schema's view (each refuses to repeat itself)."""
    now = store.scalar(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {v:String}",
        {"v": VIEW},
    )
    if bool(now) != attached:
        store.command(f"{'ATTACH' if attached else 'DETACH'} TABLE {VIEW}")


def insert_once(store: Store, cols: dict, with_view: bool) -> tuple[float, float, int]:
    """Wall and CPU seconds of one insert of ``cols`` into ``spans``, and the rows the view
    added to ``responses`` (0 without it)."""
    set_view(store, with_view)
    before = store.scalar("SELECT count() FROM responses")
    w0, c0 = time.perf_counter(), time.process_time()
    store.insert_columns("spans", cols)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, store.scalar("SELECT count() FROM responses") - before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    n = args.spans
    rows, answered = span_columns(n)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        store = connect(f"chdb://{Path(tmp) / 'store'}")
        store.migrate()
        cols = store.columns_of("spans", rows)
        store.insert_columns("spans", cols)  # warm-up: the table's first part, caches
        for table in ("spans", "responses"):
            store.command(f"SYSTEM STOP MERGES {table}")
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                wall, cpu, added = insert_once(store, cols, mode == "with view")
                assert added == (answered if mode == "with view" else 0), (mode, added)
                results[mode].append((n / wall, cpu / n * 1e6))
        set_view(store, True)
        store.close()
    print(
        f"{n:,} spans per insert ({answered:,} with a gen_ai.response.id), {args.rounds} rounds, "
        "merges stopped\n"
    )
    print(f"{'round':<8} {'mode':<14} {'rows/s':>10} {'CPU µs/row':>11} {'rows/s vs without':>18}")
    for r in range(args.rounds):
        base = results["without view"][r][0]
        for mode in MODES:
            rate, cpu = results[mode][r]
            print(f"{r + 1:<8} {mode:<14} {rate:>10,.0f} {cpu:>11.2f} {rate / base:>18.2f}")
    med = {m: [statistics.median(x[i] for x in results[m]) for i in (0, 1)] for m in MODES}
    print()
    for mode in MODES:
        print(f"{'median':<8} {mode:<14} {med[mode][0]:>10,.0f} {med[mode][1]:>11.2f}")
    ratios = [
        w[0] / wo[0] for w, wo in zip(results["with view"], results["without view"], strict=True)
    ]
    print(
        f"\nwith the view / without, rows/s per round: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}); CPU per row "
        f"{med['with view'][1] / med['without view'][1]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
