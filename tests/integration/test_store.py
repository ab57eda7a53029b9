"""The store: migrations apply once, the code's rows match the DDL, the SQL endpoint serves clients."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from processors.act import proposal_rows
from processors.credentials import ensure_sql_credentials
from processors.diagnose.core import diagnosis_rows
from processors.embedded.sqlserver import SQLServer
from processors.errors import StoreError
from processors.records import (
    Conversation,
    Diagnosis,
    Message,
    Outcome,
    Proposal,
    ReviewRecord,
    TagRecord,
)
from processors.review.core import outcome_rows, review_rows
from processors.store import Store, connect_http, migrations
from processors.understand import assemble
from processors.understand.agent import retagged_rows
from processors.understand.core import tag_row


def test_migrations_apply_once(store: Store) -> None:
    """The session store was migrated at start; migrating again applies nothing."""
    assert store.migrate() == []
    applied = [
        r["name"] for r in store.query("SELECT name FROM schema_migrations FINAL ORDER BY version")
    ]
    assert applied == [name for _, name, _ in migrations()]
    assert {
        "spans",
        "turns",
        "tool_calls",
        "conversations",
        "intents",
        "conversation_tags",
        "diagnoses",
        "proposals",
        "reviews",
        "outcomes",
    } <= set(store.table_counts())


def _rows(unique: str) -> dict[str, list[dict]]:
    now = time.time_ns()
    conv = Conversation(
        conversation_id=f"c-{unique}",
        version=2,
        start_ns=now,
        end_ns=now + 1,
        messages=[Message(role="user", content="hi")],
        trace_ids=["t1"],
    )
    tag = TagRecord(
        conversation_id=conv.conversation_id,
        conversation_version=2,
        intent_id=f"i-{unique}",
        intent_name="greeting",
        taxonomy_version=3,
        signals=["confusion"],
        outcome="abandoned",
        outcome_turn=1,
        failed=True,
        ts_ns=now,
        conversation=conv,
    )
    diag = Diagnosis(
        diagnosis_id=f"d-{unique}",
        intent_id=tag.intent_id,
        intent_name="greeting",
        rule="repeated_ask",
        summary="s",
        root_cause="r",
        component={"type": "prompt", "target": "system_prompt"},
        evidence={"turn": 3},
        trace_ids=["t1"],
        support=40,
        failures=20,
        updated_ns=now,
    )
    prop = Proposal(
        proposal_id=f"p-{unique}",
        diagnosis_id=diag.diagnosis_id,
        intent_id=tag.intent_id,
        backend="local",
        repo="/r",
        base="main",
        branch="closeloop/x",
        title="t",
        body="b",
        diff="d",
        files=["prompts/system.md"],
        created_ns=now,
        updated_ns=now,
    )
    rev = ReviewRecord(
        review_id=f"r-{unique}",
        proposal_id=prop.proposal_id,
        diagnosis_id=diag.diagnosis_id,
        intent_id=tag.intent_id,
        decision="approved",
        reviewer="Ada",
        ts_ns=now,
    )
    out = Outcome(
        proposal_id=prop.proposal_id,
        intent_id=tag.intent_id,
        before_version="a",
        after_version="b",
        before_n=40,
        before_failures=20,
        after_n=40,
        after_failures=2,
        rate_before=0.5,
        rate_after=0.05,
        diff_low=-0.6,
        diff_high=-0.3,
        p_value=1e-5,
        verdict="fixed",
        ts_ns=now,
    )
    return {
        "conversations": [
            dict(zip(assemble.CONVERSATION_COLUMNS, assemble.conversation_row(conv)))
        ],
        "conversation_tags": [tag_row(tag)],
        "diagnoses": diagnosis_rows([diag]),
        "proposals": proposal_rows([prop]),
        "reviews": review_rows([rev]),
        "outcomes": outcome_rows([out]),
    }


def test_every_stage_row_matches_its_table(store: Store, unique: str) -> None:
    """Each stage's rows carry exactly the insertable columns of its table, and insert."""
    for table, rows in _rows(unique).items():
        assert set(rows[0]) == set(store.column_types(table)), table
        assert store.insert_records(table, rows) == 1
    assert (
        store.scalar(
            "SELECT failed FROM conversation_tags FINAL WHERE conversation_id = {c:String}",
            {"c": f"c-{unique}"},
        )
        == 1
    )


def test_a_retag_re_versions_the_stored_row_keeping_the_rest(store: Store, unique: str) -> None:
    """A re-clustering's move changes the intent of the stored tag row and nothing else: a
    judge's signals and a stated outcome written meanwhile stay."""
    row = {
        **_rows(unique)["conversation_tags"][0],
        "signals": ["bug_report"],
        "source": "llm",
        "outcome": "escalated",
        "outcome_source": "stated",
    }
    store.insert_records("conversation_tags", [row])
    cid, version = row["conversation_id"], row["conversation_version"]
    move = {"conversation_version": version, "intent_name": "card has not arrived"}
    moves = [
        {**move, "conversation_id": cid, "intent_id": "intent-9", "taxonomy_version": 42},
        # another version of the conversation, or one never stored: nothing to re-version
        {**move, "conversation_id": cid + "-x", "intent_id": "intent-9", "taxonomy_version": 42},
    ]
    moved = retagged_rows(store, moves)
    assert len(moved) == 1
    store.insert_records("conversation_tags", moved)
    stored = store.query(
        "SELECT * EXCEPT ts FROM conversation_tags FINAL WHERE conversation_id = {c:String}",
        {"c": cid},
    )
    assert stored == [
        {
            **stored[0],
            **{
                k: v
                for k, v in row.items()
                if k not in ("intent_id", "intent_name", "taxonomy_version")
            },
            "intent_id": "intent-9",
            "intent_name": "card has not arrived",
            "taxonomy_version": 42,
        }
    ]
    assert retagged_rows(store, [{**moves[0], "conversation_version": version + 1}]) == []


def test_insert_records_of_mixed_shapes(store: Store, unique: str) -> None:
    """Keys the table lacks are left out; dicts and lists in String columns become JSON."""
    rows = [
        {"proposal_id": f"p1-{unique}", "reviewer": "Ada", "comment": {"why": ["ok"]}},
        {"comment": "plain", "proposal_id": f"p2-{unique}", "reviewer": ""},
        {"proposal_id": f"p3-{unique}", "reviewer": "Bo", "comment": [1, 2], "not_a_column": 5},
    ]
    for r in rows:
        r["review_id"] = r["proposal_id"].replace("p", "r", 1)
    assert store.insert_records("reviews", rows) == 3
    got = store.query(
        "SELECT proposal_id, reviewer, comment FROM reviews FINAL "
        "WHERE proposal_id LIKE {p:String} ORDER BY proposal_id",
        {"p": f"%-{unique}"},
    )
    assert [
        (r["reviewer"], json.loads(r["comment"]) if r["comment"][:1] in "{[" else r["comment"])
        for r in got
    ] == [("Ada", {"why": ["ok"]}), ("", "plain"), ("Bo", [1, 2])]


def test_sql_endpoint_serves_clickhouse_clients(store: Store, unique: str, tmp_path: Path) -> None:
    creds = ensure_sql_credentials(tmp_path)
    server = SQLServer(store, creds).start()
    try:
        client = connect_http(server.url, creds.writer)
        client.insert_records("reviews", _rows(unique)["reviews"])  # a Native insert over HTTP
        got = client.query(
            "SELECT reviewer FROM reviews FINAL WHERE review_id = {r:String}", {"r": f"r-{unique}"}
        )
        assert got == [{"reviewer": "Ada"}]
        q = urllib.parse.quote("SELECT 1 + 1 AS two FORMAT JSONEachRow")
        auth = urllib.parse.urlencode(vars(creds.reader))
        assert urllib.request.urlopen(f"{server.url}/?query={q}&{auth}").read() == b'{"two":2}\n'
        # parameters bound as ClickHouse binds them: arrays, quotes and backslashes survive
        tricky = "it's a \\ path\tand tab"
        got = client.query(
            "SELECT {s:String} AS s, length({a:Array(String)}) AS n, {u:UInt64} + 1 AS u",
            {"s": tricky, "a": ["x", "y'z", ""], "u": 41},
        )
        assert got == [{"s": tricky, "n": 3, "u": 42}]
        with pytest.raises(StoreError, match="Unknown"):
            client.query("SELECT no_such_column FROM reviews")
        assert urllib.request.urlopen(f"{server.url}/ping").read() == b"Ok.\n"  # still serving
    finally:
        server.stop()
