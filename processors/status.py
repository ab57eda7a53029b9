"""``closeloop status``: processes, topic offsets and consumer lag, dead letters, rows per table."""

from __future__ import annotations

import os
from typing import Any

from processors.config import Config
from processors.embedded.broker import committed_offsets, true_end_offsets
from processors.errors import CloseloopError
from processors.store import open_store


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def consumer_offsets(
    cfg: Config, bootstrap: str, tps: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The committed offset of each partition, from the consumer group that reads it: the
    capture processes' own group for the OTLP topics when they run, the worker's otherwise."""
    from processors.stages import ALL_STAGES, CAPTURE_ONLY, app_id

    otlp = {cfg.topics.otlp_spans, cfg.topics.otlp_logs}
    capture_group = app_id(CAPTURE_ONLY) if cfg.capture.processes else app_id(ALL_STAGES)
    out = committed_offsets(bootstrap, app_id(ALL_STAGES), [tp for tp in tps if tp[0] not in otlp])
    out.update(committed_offsets(bootstrap, capture_group, [tp for tp in tps if tp[0] in otlp]))
    return out


def collect_status(cfg: Config, info: dict[str, Any] | None) -> dict[str, Any]:
    st: dict[str, Any] = {
        "home": str(cfg.home_path),
        "running": info is not None,
        "processes": {},
        "topics": {},
        "tables": {},
        "deadletters": None,
        "errors": [],
    }
    bootstrap = cfg.kafka.bootstrap
    if info is None and not bootstrap:
        st["hint"] = "nothing is running here: start the embedded stack with `closeloop up`"
    if info:
        bootstrap = str(info.get("bootstrap") or bootstrap)
        st["endpoints"] = {
            k: info.get(k) for k in ("otlp_grpc", "otlp_http", "sql", "web", "clickhouse")
        }
        st["processes"]["supervisor"] = {"pid": info.get("supervisor_pid"), "alive": True}
        if info.get("broker_pid"):
            st["processes"]["broker"] = {
                "pid": info["broker_pid"],
                "alive": _alive(info["broker_pid"]),
            }
        for name, pid in dict(info.get("children") or {}).items():
            st["processes"][name] = {"pid": pid, "alive": _alive(pid)}
    if bootstrap:
        try:
            topics = cfg.topics.all()
            ends = true_end_offsets(bootstrap, topics)
            commits = consumer_offsets(cfg, bootstrap, list(ends))
            for (t, p), end in sorted(ends.items()):
                row = st["topics"].setdefault(t, {"messages": 0, "lag": 0, "partitions": 0})
                row["messages"] += end
                row["partitions"] += 1
                c = commits.get((t, p), -1)
                row["lag"] += end - c if c >= 0 else end
        except Exception as e:  # status reports what it cannot reach instead of failing
            st["errors"].append(f"Kafka at {bootstrap}: {e}")
    try:
        store = open_store(cfg)
        try:
            st["tables"] = store.table_counts()
            st["llm"] = llm_steps(store) if st["tables"].get("llm_stats") else []
            st["deadletters"] = st["tables"].get("deadletter")
            if st["deadletters"]:
                st["deadletter_reasons"] = store.query(
                    "SELECT stage, reason, count() AS n FROM deadletter FINAL GROUP BY stage, reason "
                    "ORDER BY n DESC LIMIT 10"
                )
        finally:
            store.close()
    except CloseloopError as e:
        st["errors"].append(str(e))
    return st


def llm_steps(store: Any) -> list[dict[str, Any]]:
    """Per LLM step, the newest counters of each worker process summed (queue and breaker:
    of the newest process)."""
    return store.query(
        "SELECT step, sum(calls) AS calls, sum(failures) AS failures, sum(cached) AS cached, "
        "sum(skipped) AS skipped, sum(tokens) AS tokens, "
        "argMax(median_latency_s, ts_ns) AS median_latency_s, argMax(queued, ts_ns) AS queued, "
        "argMax(breaker, ts_ns) AS breaker FROM llm_stats FINAL GROUP BY step ORDER BY step"
    )


def format_status(st: dict[str, Any]) -> str:
    out = [f"closeloop home: {st['home']}  —  {'running' if st['running'] else 'not running'}"]
    if st.get("endpoints"):
        out.append("endpoints:")
        out += [f"  {k:<11} {v}" for k, v in st["endpoints"].items()]
    if st["processes"]:
        out.append("processes:")
        out += [
            f"  {n:<11} pid {p['pid']:<8} {'up' if p['alive'] else 'DOWN'}"
            for n, p in st["processes"].items()
        ]
    if st["topics"]:
        out.append("topics (messages / consumer lag of the group that reads them):")
        out += [
            f"  {t:<28} {r['messages']:>9} msgs  lag {r['lag']:>7}  ({r['partitions']} partitions)"
            for t, r in st["topics"].items()
        ]
    if st["tables"]:
        out.append("tables (rows, FINAL):")
        out += [f"  {t:<20} {n:>10}" for t, n in st["tables"].items()]
    if st.get("llm"):
        out.append(
            "llm steps (calls / failures / cached / skipped, median latency, queue, tokens):"
        )
        out += [
            f"  {r['step']:<9} {r['calls']:>6} calls {r['failures']:>5} failed {r['cached']:>5} "
            f"cached {r['skipped']:>5} skipped  {r['median_latency_s']:>6.2f}s  queue "
            f"{r['queued']:>4}  {r['tokens']:>8} tokens  breaker {r['breaker']}"
            for r in st["llm"]
        ]
    out.append(f"dead letters: {st['deadletters'] if st['deadletters'] is not None else 'unknown'}")
    for r in st.get("deadletter_reasons", []):
        out.append(f"  {r['stage']:<10} {r['n']:>6}  {r['reason']}")
    for e in st["errors"]:
        out.append(f"error: {e}")
    if st.get("hint"):
        out.append(st["hint"])
    return "\n".join(out)
