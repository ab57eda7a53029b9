"""Every SQL query of every Grafana dashboard in ops/grafana runs on the migrated schema.

Each query is expanded the way Grafana and the ClickHouse data source plugin
(grafana-clickhouse-datasource) expand it -- ``$__conditionalAll`` and dashboard variables in the
browser, then the backend macros ``$__timeFilter``, ``$__timeInterval``, ``$__fromTime``,
``$__toTime`` and ``$__interval_s`` (pkg/macros/macros.go of the plugin) -- and run on chDB over
demo rows for every table the dashboards read. A query must run, return the columns its panel
shows and, where the demo rows cover it, return rows.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from processors.store import Store

GRAFANA = Path(__file__).resolve().parents[2] / "ops" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "closeloop-clickhouse"}
ALL = "$__all"  # a multi-value variable's value when "All" is selected
INTERVAL_S = 60  # the panel's $__interval, as Grafana would compute it
HOUR_NS = 3600 * 10**9
SEC_NS = 10**9

# The columns each panel's query returns, in order: the panel's field overrides, legends and
# readers of this dashboard rely on them. Keyed "<dashboard file stem>/<panel title>/<refId>".
EXPECTED_COLUMNS: dict[str, list[str]] = {
    "pipeline-health/Spans stored/A": ["spans"],
    "pipeline-health/Conversations/A": ["conversations"],
    "pipeline-health/Dead letters/A": ["dead_letters"],
    "pipeline-health/Workers reporting/A": ["workers"],
    "pipeline-health/Spans per second/A": ["time", "spans_in_per_s"],
    "pipeline-health/Spans per second/B": ["time", "spans_started_per_s"],
    "pipeline-health/Ingest delay (span end to stored)/A": ["time", "p50", "p95", "max"],
    "pipeline-health/Records in per second, by stage/A": ["time", "stage", "records_in_per_s"],
    "pipeline-health/Records out per second, by stage/A": ["time", "stage", "records_out_per_s"],
    "pipeline-health/Dead letters per second, by stage/A": ["time", "stage", "deadletters_per_s"],
    "pipeline-health/CPU per stage (cores)/A": ["time", "stage", "cores"],
    "pipeline-health/ClickHouse write errors per second, by stage/A": [
        "time",
        "stage",
        "write_errors_per_s",
    ],
    "pipeline-health/Dead-letter reasons/A": [
        "stage",
        "reason",
        "dead_letters",
        "last_seen",
        "last_topic",
        "last_partition",
        "last_offset",
    ],
    "pipeline-health/Workers/A": [
        "worker",
        "stage",
        "last_report",
        "records_in",
        "records_out",
        "deadletters",
        "write_errors",
    ],
    "intents/Conversations per intent/A": ["time", "intent", "conversations"],
    "intents/Failure rate per intent/A": ["time", "intent", "failure_rate"],
    "intents/Signal rates/A": ["time", "signal", "rate"],
    "intents/Intent summary/A": [
        "intent",
        "conversations",
        "failure_rate",
        "abandoned_rate",
        "escalated_rate",
        "signal_rate",
        "top_signals",
    ],
    "intents/Taxonomy changes/A": ["time", "change", "changes"],
    "intents/Taxonomy change log/A": [
        "ts",
        "taxonomy_version",
        "change",
        "name",
        "intent_id",
        "other_id",
    ],
    "intents/Intents (current taxonomy)/A": [
        "name",
        "status",
        "size",
        "keywords",
        "description",
        "taxonomy_version",
        "updated_time",
        "intent_id",
    ],
    "diagnoses-proposals/Open diagnoses/A": ["open_diagnoses"],
    "diagnoses-proposals/Open proposals/A": ["open_proposals"],
    "diagnoses-proposals/Merged / rejected/A": ["merged", "rejected"],
    "diagnoses-proposals/Median time to first decision/A": ["median_hours"],
    "diagnoses-proposals/Proposals by status/A": ["status", "proposals"],
    "diagnoses-proposals/Review decisions/A": ["time", "decision", "decisions"],
    "diagnoses-proposals/Time to review/A": [
        "decision",
        "proposals",
        "p50_hours",
        "p90_hours",
        "max_hours",
    ],
    "diagnoses-proposals/Diagnoses waiting for a proposal/A": [
        "intent_name",
        "rule",
        "summary",
        "failure_rate",
        "baseline_rate",
        "support",
        "failures",
        "confidence",
        "prompt_version",
        "updated_time",
        "diagnosis_id",
    ],
    "diagnoses-proposals/Proposals/A": [
        "created",
        "title",
        "status",
        "pr_url",
        "intent",
        "last_decision",
        "reviewer",
        "proposal_id",
    ],
    "outcomes/Verdicts/A": ["verdict", "fixes"],
    "outcomes/Verdict per fix/A": [
        "measured",
        "fix",
        "intent",
        "before_version",
        "after_version",
        "before_n",
        "rate_before",
        "after_n",
        "rate_after",
        "change",
        "diff_low",
        "diff_high",
        "p_value",
        "verdict",
        "pr_url",
        "merged_by",
    ],
    "outcomes/Failure rate per prompt version (measured)/A": [
        "intent",
        "prompt_version",
        "conversations",
        "failed",
        "failure_rate",
    ],
    "outcomes/Failure rate by prompt version (live)/A": ["time", "prompt_version", "failure_rate"],
}


# -- Grafana + plugin expansion -------------------------------------------------------------------
def _call_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Arguments of a macro call whose ``(`` is at ``open_paren`` (nesting-aware, like the
    plugin's getMacroArgs), and the index just past its ``)``."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(sql)):
        c = sql[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i].strip())
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(sql[start:i].strip())
            start = i + 1
    raise AssertionError(f"unbalanced macro call in {sql!r}")


def _replace_calls(sql: str, name: str, expand: Any) -> str:
    marker = f"$__{name}("
    while (at := sql.rfind(marker)) != -1:
        args, end = _call_args(sql, at + len(marker) - 1)
        sql = sql[:at] + expand(args) + sql[end:]
    return sql


def _format(values: list[str], fmt: str | None) -> str:
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt is None:
        return ",".join(values)
    raise AssertionError(f"variable format {fmt!r} is not expanded by this test")


def expand(
    sql: str, *, from_s: int, to_s: int, interval_s: int, variables: dict[str, list[str] | str]
) -> str:
    """The SQL ClickHouse receives for a panel query."""

    def conditional_all(args: list[str]) -> str:
        cond, var = args
        value = variables[var.lstrip("$").strip("{}")]
        return "1=1" if value == ALL or value == [] else cond

    sql = _replace_calls(sql, "conditionalAll", conditional_all)

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name.startswith("__"):
            return m.group(0)  # a macro, expanded by the plugin below
        value = variables[name]
        assert value != ALL, f"${name} used outside $__conditionalAll would expand to All's values"
        return _format(list(value), m.group(2))

    sql = re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)", variable, sql)
    sql = _replace_calls(
        sql,
        "timeFilter",
        lambda a: f"{a[0]} >= toDateTime({from_s}) AND {a[0]} <= toDateTime({to_s})",
    )
    sql = _replace_calls(
        sql,
        "timeInterval",
        lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {max(interval_s, 1)} second)",
    )
    sql = re.sub(r"\$__fromTime\b", f"toDateTime({from_s})", sql)
    sql = re.sub(r"\$__toTime\b", f"toDateTime({to_s})", sql)
    sql = re.sub(r"\$__interval_s\b", str(max(interval_s, 1)), sql)
    assert "$" not in sql, f"unexpanded macro or variable left in {sql!r}"
    return sql


def test_expand_matches_the_plugin() -> None:
    sql = (
        "SELECT $__timeInterval(ts) AS time, count() / $__interval_s FROM t "
        "WHERE $__timeFilter(ts) AND "
        "$__conditionalAll(id IN (SELECT id FROM i WHERE name IN (${v:singlequote})), $v) "
        "AND ts < $__toTime"
    )
    got = expand(sql, from_s=100, to_s=200, interval_s=30, variables={"v": ["a", "b'c"]})
    assert got == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 30 second) AS time, count() / 30 "
        "FROM t WHERE ts >= toDateTime(100) AND ts <= toDateTime(200) "
        "AND id IN (SELECT id FROM i WHERE name IN ('a','b\\'c')) AND ts < toDateTime(200)"
    )
    assert "1=1" in expand(sql, from_s=1, to_s=2, interval_s=0, variables={"v": ALL})


# -- the dashboards -------------------------------------------------------------------------------
def _panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["panels"]:
        out += _panels(p) if p.get("type") == "row" and "panels" in p else [p]
    return out


def _targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for panel in _panels(doc):
            for t in panel.get("targets", []):
                out.append((path.stem, panel, t))
    return out


TARGETS = _targets()


def _key(stem: str, panel: dict[str, Any], target: dict[str, Any]) -> str:
    return f"{stem}/{panel['title']}/{target['refId']}"


def test_the_four_dashboards_exist_with_unique_uids() -> None:
    stems = {p.stem for p in DASHBOARDS}
    assert {"pipeline-health", "intents", "diagnoses-proposals", "outcomes"} <= stems
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_every_query_is_raw_sql_on_the_provisioned_datasource() -> None:
    assert TARGETS
    for stem, panel, t in TARGETS:
        where = _key(stem, panel, t)
        assert panel["datasource"] == DATASOURCE, where
        assert t["datasource"] == DATASOURCE, where
        assert t["editorType"] == "sql" and t["rawSql"].strip(), where
        # format 0 = time series, 1 = table (the plugin's / sqlds' FormatQueryOption)
        assert t["format"] == (0 if panel["type"] == "timeseries" else 1), where


def test_every_panel_query_has_its_expected_columns_listed() -> None:
    keys = {_key(*x) for x in TARGETS}
    assert keys == set(EXPECTED_COLUMNS), keys ^ set(EXPECTED_COLUMNS)
    titles = [(stem, p["title"]) for stem, p, t in TARGETS if t["refId"] == "A"]
    assert len(titles) == len(set(titles)), "panel titles must be unique within a dashboard"


def test_field_overrides_name_returned_columns() -> None:
    for stem, panel, t in TARGETS:
        for o in panel["fieldConfig"]["overrides"]:
            if o["matcher"]["id"] == "byName":
                assert o["matcher"]["options"] in EXPECTED_COLUMNS[_key(stem, panel, t)], (
                    stem,
                    panel["title"],
                )


# -- demo data ------------------------------------------------------------------------------------
class Demo:
    """Rows for every table the dashboards read, ids unique to this test run."""

    def __init__(self, u: str, now_ns: int) -> None:
        self.u = u
        # All rows sit in one $__interval bucket (the start of the previous hour), so a
        # bucketed panel's numbers can be checked exactly.
        self.base = (now_ns // HOUR_NS) * HOUR_NS - HOUR_NS
        self.billing = f"billing-{u}"
        self.login = f"login-{u}"
        self.stage = f"capture-{u}"
        self.fix_title = f"Ask for the API key once ({u})"
        self.reviewer = f"alice-{u}"

    def at(self, ms: int) -> int:
        return self.base + ms * 10**6

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        u = self.u
        ib, il = f"ib-{u}", f"il-{u}"
        spans = [
            {
                "trace_id": f"t{i}-{u}",
                "span_id": f"s{i}-{u}",
                "conversation_id": f"c{i % 5}-{u}",
                "name": "chat",
                "span_kind": "llm",
                "service_name": "demo-agent",
                "start_ns": self.at(i * 100),
                "end_ns": self.at(i * 100 + 800),
                "duration_ms": 800.0,
                "status_code": "OK",
                "attributes": {"gen_ai.operation.name": "chat"},
                "events": "[]",
                "ingested_ns": self.at(i * 100 + 2800),
            }
            for i in range(20)
        ]
        conversations = [
            {
                "conversation_id": f"c{i}-{u}",
                "version": 1,
                "start_ns": self.at(i * 10),
                "end_ns": self.at(i * 10 + 5000),
                "closed_reason": "idle",
                "prompt_version": "v1",
                "model": "m",
                "trace_ids": [f"t{i}-{u}"],
                "messages": "[]",
                "n_messages": 4,
            }
            for i in range(5)
        ]
        intents = [
            {
                "intent_id": ib,
                "name": self.billing,
                "description": "billing questions",
                "keywords": ["invoice"],
                "size": 10,
                "status": "active",
                "taxonomy_version": 2,
                "created_ns": self.at(0),
                "updated_ns": self.at(50),
            },
            {
                "intent_id": il,
                "name": self.login,
                "description": "cannot log in",
                "keywords": ["password"],
                "size": 5,
                "status": "active",
                "taxonomy_version": 2,
                "created_ns": self.at(0),
                "updated_ns": self.at(50),
            },
        ]
        changes = [
            {
                "taxonomy_version": 1,
                "intent_id": ib,
                "change": "created",
                "name": f"invoices-{u}",
                "ts_ns": self.at(1),
            },
            {
                "taxonomy_version": 1,
                "intent_id": il,
                "change": "created",
                "name": self.login,
                "ts_ns": self.at(2),
            },
            {
                "taxonomy_version": 2,
                "intent_id": ib,
                "change": "renamed",
                "name": self.billing,
                "ts_ns": self.at(3),
            },
        ]
        tags = []
        for i in range(10):  # billing: 4 of 10 failed, 3 carry "confusion"; renamed since tagging
            tags.append(
                {
                    "conversation_id": f"tb{i}-{u}",
                    "conversation_version": 1,
                    "intent_id": ib,
                    "intent_name": f"invoices-{u}",
                    "taxonomy_version": 1,
                    "signals": ["confusion"] if i < 3 else [],
                    "outcome": "abandoned" if i < 4 else "resolved",
                    "failed": int(i < 4),
                    "prompt_version": "v1" if i < 5 else "v2",
                    "ts_ns": self.at(100 + i),
                }
            )
        for i in range(5):  # login: 1 of 5 failed
            tags.append(
                {
                    "conversation_id": f"tl{i}-{u}",
                    "conversation_version": 1,
                    "intent_id": il,
                    "intent_name": self.login,
                    "taxonomy_version": 1,
                    "signals": ["setup_friction"],
                    "outcome": "escalated" if i == 0 else "resolved",
                    "failed": int(i == 0),
                    "prompt_version": "v1",
                    "ts_ns": self.at(200 + i),
                }
            )
        diagnoses = [
            {
                "diagnosis_id": f"d1-{u}",
                "intent_id": ib,
                "intent_name": self.billing,
                "rule": "failure_rate",
                "summary": "users abandon at turn 3",
                "root_cause": "asks for the API key again",
                "component": "{}",
                "confidence": 0.9,
                "evidence": "{}",
                "trace_ids": ["t1"],
                "support": 10,
                "failures": 4,
                "failure_rate": 0.4,
                "baseline_rate": 0.1,
                "prompt_version": "v1",
                "status": "proposed",
                "version": 2,
                "updated_ns": self.at(300),
            },
            {
                "diagnosis_id": f"d2-{u}",
                "intent_id": il,
                "intent_name": self.login,
                "rule": "latency",
                "summary": "slow login tool",
                "root_cause": "timeout",
                "component": "{}",
                "confidence": 0.6,
                "evidence": "{}",
                "trace_ids": ["t2"],
                "support": 5,
                "failures": 1,
                "failure_rate": 0.2,
                "baseline_rate": 0.1,
                "prompt_version": "v1",
                "status": "open",
                "version": 1,
                "updated_ns": self.at(301),
            },
        ]
        created = self.at(400)
        proposals = [
            {
                "proposal_id": f"p1-{u}",
                "diagnosis_id": f"d1-{u}",
                "intent_id": ib,
                "backend": "github",
                "repo": "acme/agent",
                "title": self.fix_title,
                "status": "merged",
                "version": 3,
                "pr_url": "https://github.example/acme/agent/pull/1",
                "created_ns": created,
                "updated_ns": created,
            },
            {
                "proposal_id": f"p2-{u}",
                "diagnosis_id": f"d2-{u}",
                "intent_id": il,
                "backend": "github",
                "repo": "acme/agent",
                "title": f"Raise the login timeout ({u})",
                "status": "rejected",
                "version": 2,
                "pr_url": "https://github.example/acme/agent/pull/2",
                "created_ns": created,
                "updated_ns": created,
            },
        ]
        # Decided 2 s (approved), 3 s (merged), 1 s (rejected) after creation: same bucket.
        reviews = [
            {
                "review_id": f"r1-{u}",
                "proposal_id": f"p1-{u}",
                "diagnosis_id": f"d1-{u}",
                "intent_id": ib,
                "decision": "approved",
                "reviewer": self.reviewer,
                "merged_commit": "",
                "ts_ns": created + 2 * SEC_NS,
            },
            {
                "review_id": f"r2-{u}",
                "proposal_id": f"p1-{u}",
                "diagnosis_id": f"d1-{u}",
                "intent_id": ib,
                "decision": "merged",
                "reviewer": self.reviewer,
                "merged_commit": "abc",
                "ts_ns": created + 3 * SEC_NS,
            },
            {
                "review_id": f"r3-{u}",
                "proposal_id": f"p2-{u}",
                "diagnosis_id": f"d2-{u}",
                "intent_id": il,
                "decision": "rejected",
                "reviewer": f"bob-{u}",
                "merged_commit": "",
                "ts_ns": created + SEC_NS,
            },
        ]
        outcomes = [
            {
                "proposal_id": f"p1-{u}",
                "intent_id": ib,
                "before_version": "v1",
                "after_version": "v2",
                "before_n": 200,
                "before_failures": 80,
                "after_n": 100,
                "after_failures": 10,
                "rate_before": 0.4,
                "rate_after": 0.1,
                "diff_low": -0.39,
                "diff_high": -0.21,
                "p_value": 1e-6,
                "verdict": "fixed",
                "ts_ns": self.at(500),
            }
        ]
        # Cumulative counters of one worker: 10 -> 110 -> 260, restart, 50: 100 + 150 + 50 = 300 in.
        stats = [
            {
                "ts_ns": self.at(1000 + k * 5000),
                "worker": f"w-{u}",
                "stage": self.stage,
                "records_in": v,
                "records_out": v // 2,
                "deadletters": 1 if k else 0,
                "write_errors": k,
            }
            for k, v in enumerate([10, 110, 260, 50])
        ]
        dead = [
            {
                "stage": self.stage,
                "reason": reason,
                "detail": "",
                "topic": "otlp_spans",
                "partition": 0,
                "offset": off,
                "key": "",
                "original_b64": "",
                "ts_ns": self.at(600 + off),
            }
            for off, reason in enumerate(["not protobuf", "not protobuf", "truncated"])
        ]
        return {
            "spans": spans,
            "conversations": conversations,
            "intents": intents,
            "intent_changes": changes,
            "conversation_tags": tags,
            "diagnoses": diagnoses,
            "proposals": proposals,
            "reviews": reviews,
            "outcomes": outcomes,
            "stage_stats": stats,
            "deadletter": dead,
        }


@pytest.fixture(scope="module")
def demo(store: Store) -> Demo:
    d = Demo(uuid.uuid4().hex[:10], time.time_ns())
    for table, rows in d.rows().items():
        store.insert_records(table, rows)
    return d


def query(
    store: Store, demo: Demo, target: dict[str, Any], intent: list[str] | str
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Run a panel's query over the demo window: column names, their types, rows."""
    sql = expand(
        target["rawSql"],
        from_s=demo.base // SEC_NS - 3600,
        to_s=time.time_ns() // SEC_NS + 60,
        interval_s=INTERVAL_S,
        variables={"intent": intent},
    )
    res = store.client.query(sql)
    names = list(res.column_names)
    rows = [dict(zip(names, r, strict=True)) for r in res.result_rows]
    return names, [t.name for t in res.column_types], rows


def find(title: str, ref: str = "A") -> dict[str, Any]:
    (target,) = [t for _, p, t in TARGETS if p["title"] == title and t["refId"] == ref]
    return target


@pytest.mark.parametrize("intent_choice", ["all", "one"])
@pytest.mark.parametrize(("stem", "panel", "target"), TARGETS, ids=[_key(*x) for x in TARGETS])
def test_query_runs_and_returns_the_panels_columns(
    store: Store,
    demo: Demo,
    stem: str,
    panel: dict[str, Any],
    target: dict[str, Any],
    intent_choice: str,
) -> None:
    intent = ALL if intent_choice == "all" else [demo.billing]
    names, types, rows = query(store, demo, target, intent)
    assert names == EXPECTED_COLUMNS[_key(stem, panel, target)]
    assert rows, "the demo rows cover every panel: an empty result means a broken query"
    if panel["type"] == "timeseries":
        # Grafana's time series format: a time column, at most one label column, numbers.
        assert types[0].startswith("DateTime"), types
        labels = [t for t in types[1:] if "String" in t]
        assert len(labels) <= 1 and len(labels) < len(types) - 1, types
    if panel["type"] == "stat":
        assert len(rows) == 1


def _rows(
    store: Store, demo: Demo, title: str, intent: list[str] | str = ALL
) -> list[dict[str, Any]]:
    return query(store, demo, find(title), intent)[2]


def test_stage_rates_count_counter_increases_across_a_worker_restart(
    store: Store, demo: Demo
) -> None:
    rows = [
        r for r in _rows(store, demo, "Records in per second, by stage") if r["stage"] == demo.stage
    ]
    # 10 -> 110 -> 260 -> (restart) 50: 100 + 150 + 50 records in one 60 s bucket
    assert [r["records_in_per_s"] for r in rows] == [pytest.approx(300 / INTERVAL_S)]
    errors = [
        r
        for r in _rows(store, demo, "ClickHouse write errors per second, by stage")
        if r["stage"] == demo.stage
    ]
    assert [r["write_errors_per_s"] * INTERVAL_S for r in errors] == [pytest.approx(3)]
    workers = [r for r in _rows(store, demo, "Workers") if r["stage"] == demo.stage]
    assert [(r["worker"], r["records_in"], r["write_errors"]) for r in workers] == [
        (f"w-{demo.u}", 50, 3)
    ]


def test_dead_letter_reasons(store: Store, demo: Demo) -> None:
    rows = {
        r["reason"]: r["dead_letters"]
        for r in _rows(store, demo, "Dead-letter reasons")
        if r["stage"] == demo.stage
    }
    assert rows == {"not protobuf": 2, "truncated": 1}


def test_intent_panels_use_the_current_name_and_honour_the_intent_variable(
    store: Store, demo: Demo
) -> None:
    (row,) = _rows(store, demo, "Intent summary", [demo.billing])
    assert row["intent"] == demo.billing  # tagged as invoices-*, renamed since
    assert (
        row["conversations"],
        row["failure_rate"],
        row["abandoned_rate"],
        row["signal_rate"],
        row["top_signals"],
    ) == (10, pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.3), "confusion")
    everything = {r["intent"] for r in _rows(store, demo, "Intent summary")}
    assert {demo.billing, demo.login} <= everything
    per_intent = {r["intent"] for r in _rows(store, demo, "Conversations per intent", [demo.login])}
    assert per_intent == {demo.login}
    signals = {r["signal"]: r["rate"] for r in _rows(store, demo, "Signal rates", [demo.billing])}
    assert signals == {"confusion": pytest.approx(0.3)}
    live = {
        r["prompt_version"]: r["failure_rate"]
        for r in _rows(store, demo, "Failure rate by prompt version (live)", [demo.billing])
    }
    assert live == {"v1": pytest.approx(0.8), "v2": pytest.approx(0.0)}


def test_intent_variable_lists_active_intents(store: Store, demo: Demo) -> None:
    variables = [
        v for path in DASHBOARDS for v in json.loads(path.read_text())["templating"]["list"]
    ]
    assert variables and all(
        v["name"] == "intent" and v["datasource"] == DATASOURCE for v in variables
    )
    for v in variables:
        res = store.client.query(v["query"]["rawSql"])
        names = [r[0] for r in res.result_rows]
        assert demo.billing in names and demo.login in names


def test_verdict_per_fix_joins_proposal_intent_and_merger(store: Store, demo: Demo) -> None:
    (row,) = [r for r in _rows(store, demo, "Verdict per fix") if r["fix"] == demo.fix_title]
    assert (row["intent"], row["verdict"], row["merged_by"]) == (
        demo.billing,
        "fixed",
        demo.reviewer,
    )
    assert row["change"] == pytest.approx(-0.3)
    measured = {
        (r["prompt_version"], r["conversations"], r["failed"])
        for r in _rows(store, demo, "Failure rate per prompt version (measured)")
        if r["intent"] == demo.billing
    }
    assert measured == {("v1", 200, 80), ("v2", 100, 10)}


def test_proposals_table_shows_the_latest_decision(store: Store, demo: Demo) -> None:
    rows = {
        r["proposal_id"]: (r["intent"], r["last_decision"], r["reviewer"])
        for r in _rows(store, demo, "Proposals")
        if r["proposal_id"].endswith(demo.u)
    }
    assert rows == {
        f"p1-{demo.u}": (demo.billing, "merged", demo.reviewer),
        f"p2-{demo.u}": (demo.login, "rejected", f"bob-{demo.u}"),
    }
