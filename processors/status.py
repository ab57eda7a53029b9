"""``closeloop status``: processes, topic offsets and consumer lag, dead letters, rows per table."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from processors.config import Config
from processors.embedded.broker import committed_offsets, true_end_offsets
from processors.embedded.procs import read_run_file
from processors.embedded.stack import CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW_S
from processors.errors import CloseloopError
from processors.heartbeat import SILENT_AFTER_S, last_beat_ns, silent_s
from processors.store import open_store, running_endpoint


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
        st["processes"] = process_health(info, time.time_ns())
        add_heartbeats(cfg, st["processes"], time.monotonic_ns())
    st["store_waits"] = store_waits(cfg)
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
    store = store_status(cfg, running=info is not None)
    st["errors"] += store.pop("errors")
    st.update(store)
    return st


def process_health(info: dict[str, Any], now_ns: int) -> dict[str, dict[str, Any]]:
    """Per process of the stack file: pid, alive, restarts, last exit, and whether it is in a
    crash loop (``CRASH_LOOP_RESTARTS`` restarts within ``CRASH_LOOP_WINDOW_S``)."""
    out: dict[str, dict[str, Any]] = {
        "supervisor": {"pid": info.get("supervisor_pid"), "alive": True, "restarts": 0}
    }
    procs = dict(info.get("processes") or {})
    if not procs:  # a stack file written before restarts were recorded
        procs = {n: {"pid": p} for n, p in dict(info.get("children") or {}).items()}
        if info.get("broker_pid"):
            procs["broker"] = {"pid": info["broker_pid"]}
    for name, p in procs.items():
        recent = [t for t in p.get("restart_ns", []) if now_ns - t < CRASH_LOOP_WINDOW_S * 1e9]
        out[name] = {
            **p,
            "alive": _alive(p.get("pid")),
            "restarts": int(p.get("restarts", 0)),
            "crash_loop": len(recent) >= CRASH_LOOP_RESTARTS,
            "recent_restarts": len(recent),
        }
    return out


def add_heartbeats(cfg: Config, procs: dict[str, dict[str, Any]], now_ns: int) -> None:
    """``silent_s`` of each process that writes heartbeats (the workers): seconds since its
    last one (the supervisor kills it past ``worker.stall_timeout_s``)."""
    for p in procs.values():
        beat = last_beat_ns(cfg, int(p["pid"])) if isinstance(p.get("pid"), int) else None
        if beat is not None:
            p["silent_s"] = round(silent_s(now_ns, 0, beat), 1)


def store_status(cfg: Config, *, running: bool) -> dict[str, Any]:
    """Rows per table and dead letters (counted on their own: one failing table must not hide
    them), or why the store could not be read."""
    out: dict[str, Any] = {"tables": {}, "deadletters": None, "errors": []}
    if running and cfg.embedded_store and not running_endpoint(cfg):
        # never open the chDB files beside a stack: the owner restarting would find them locked
        out["errors"].append(
            "the store is not being served right now (its owner, the worker, is restarting); "
            "try again in a few seconds"
        )
        return out
    try:
        store = open_store(cfg)
    except CloseloopError as e:
        out["errors"].append(str(e))
        return out
    try:
        out["deadletters"] = int(store.scalar("SELECT count() FROM deadletter FINAL") or 0)
        if out["deadletters"]:
            out["deadletter_reasons"] = store.query(
                "SELECT stage, reason, count() AS n FROM deadletter FINAL GROUP BY stage, reason "
                "ORDER BY n DESC LIMIT 10"
            )
        out["tables"] = store.table_counts()
        out["checkpoint_resets"] = checkpoint_resets(store)
        out["llm"] = llm_steps(store) if out["tables"].get("llm_stats") else []
    except CloseloopError as e:
        out["errors"].append(str(e))
    finally:
        store.close()
    return out


def store_waits(cfg: Config) -> list[dict[str, Any]]:
    """The stages waiting on the store right now, and why (``run/waiting-<pid>.json`` of
    live worker processes)."""
    out = []
    for f in sorted(cfg.run_dir().glob("waiting-*.json")):
        info = read_run_file(cfg, f.name)
        if info is not None:
            out += [{**w, "pid": info["pid"]} for w in info.get("stages", [])]
    return out


def checkpoint_resets(store: Any) -> list[dict[str, Any]]:
    """The last reset of each checkpoint whose offsets belonged to another incarnation of its
    topic (a restarted memory broker): those records were read again, not skipped."""
    out = []
    for r in store.query("SELECT name, incarnation FROM checkpoints FINAL ORDER BY name"):
        resets = json.loads(r["incarnation"] or "{}").get("resets") or []
        if resets:
            out.append({"name": r["name"], **resets[-1]})
    return out


def _when(ns: int, now_ns: int) -> str:
    s = max(0, (now_ns - ns) // 1_000_000_000)
    return f"{s}s ago" if s < 120 else f"{s // 60} min ago"


def format_process(name: str, p: dict[str, Any], now_ns: int) -> list[str]:
    line = f"  {name:<11} pid {p['pid']!s:<8} {'up' if p['alive'] else 'DOWN'}"
    if p.get("restarts"):
        line += f"  restarts {p['restarts']}"
    if p.get("silent_s", 0) > SILENT_AFTER_S:
        line += f"  silent {p['silent_s']:.0f} s (no heartbeat)"
    out = [line]
    if p.get("crash_loop"):
        out.append(
            f"    CRASH LOOP: {p['recent_restarts']} restarts in the last "
            f"{CRASH_LOOP_WINDOW_S / 60:.0f} min"
        )
    if p.get("last_exit_ns"):
        code = p.get("last_exit_code")
        how = (
            "restarted"
            if code is None
            else f"killed by signal {-code}"
            if code < 0
            else f"exited with code {code}"
        )
        out.append(f"    last exit: {how}, {_when(p['last_exit_ns'], now_ns)}")
        if p.get("last_error"):
            out.append(f"    last error: {p['last_error']}")
    if p.get("rotations"):
        out.append(
            f"    rotations {p['rotations']}, the last {_when(p['last_rotation_ns'], now_ns)}: "
            f"{p['last_rotation']}"
        )
    if p.get("rotation_put_off_ns", 0) > p.get("last_rotation_ns", 0):
        out.append(
            f"    rotation {_when(p['rotation_put_off_ns'], now_ns)}: {p['rotation_put_off']}"
        )
    return out


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
    if not st["running"]:
        out.append(f"nothing runs on this home; start it with: closeloop up --home {st['home']}")
    if st["processes"]:
        out.append("processes:")
        now = time.time_ns()
        for n, p in st["processes"].items():
            out += format_process(n, p, now)
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
    for w in st.get("store_waits", []):
        out.append(
            f"stage {w['stage']} WAITING for the store since {_when(w['since_ns'], time.time_ns())} "
            f"(writing {w['table']}; its input offsets stay until written): {w['why']}"
        )
    for r in st.get("checkpoint_resets", []):
        out.append(
            f"checkpoint {r['name']} reset to the start of {', '.join(r['partitions'])} "
            f"{_when(r['at_ns'], time.time_ns())}: {r['why']}"
        )
    out.append(f"dead letters: {st['deadletters'] if st['deadletters'] is not None else 'unknown'}")
    for r in st.get("deadletter_reasons", []):
        out.append(f"  {r['stage']:<10} {r['n']:>6}  {r['reason']}")
    for e in st["errors"]:
        out.append(f"error: {e}")
    if st.get("hint"):
        out.append(st["hint"])
    return "\n".join(out)
