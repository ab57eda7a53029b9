"""Agents nobody here wrote, through the real stack (tansu, worker, chDB): `closeloop import`
round trip with a conversation over 1 MB and a burst, outcomes stated by evaluation events on
both signals, and late feedback that re-versions a closed conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from processors.capture.transcripts import parse_line, to_request
from processors.feedback import record_feedback
from processors.records import RESPONSE_REF, Evaluation, TagRecord
from processors.redact import Redactor
from processors.understand.feedback import feedback_evaluation
from processors.web.server import WebServer

from .pipeline import ROWS_TIMEOUT_S, Pipeline, running_pipeline
from .worker_proc import wait_for

REPO = Path(__file__).resolve().parents[2]
BURST = 60
BIG_TOOL_RESULT = 40_000  # characters per tool result; 40 calls: the history alone is > 1 MB
ANSWER_WAIT_S = 40


def line(cid: str, score: float | None, *, calls: int = 1, result: str = "ok") -> dict:
    msgs: list[dict] = [{"role": "user", "content": f"please archive project {cid}"}]
    for i in range(calls):
        call_id = f"call_{cid}_{i}"
        msgs += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "archive_project",
                            "arguments": json.dumps({"p": cid}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "name": "archive_project", "content": result},
        ]
    msgs.append({"role": "assistant", "content": "Archived."})
    out = {"id": cid, "system": "You archive projects.", "messages": msgs, "prompt_version": "v1"}
    if score is not None:
        out.update(score=score, evaluation_name="reward")
    return out


def _kv(k: str, v: object) -> KeyValue:
    a = AnyValue()
    if isinstance(v, float):
        a.double_value = v
    else:
        a.string_value = str(v)
    return KeyValue(key=k, value=a)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    env = {
        "CLOSELOOP_ASSEMBLE_IDLE_TIMEOUT_S": "3",
        "CLOSELOOP_UNDERSTAND_EMBEDDER": "hashing",
        # an evaluation waits this long for the answer it names (several idle closes)
        "CLOSELOOP_UNDERSTAND_ANSWER_WAIT_S": str(ANSWER_WAIT_S),
    }
    with running_pipeline(
        tmp_path_factory.mktemp("real-agents"), "capture,assemble,understand", env
    ) as p:
        yield p


@pytest.fixture(scope="module")
def imported(
    pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess:
    f = tmp_path_factory.mktemp("import") / "history.jsonl"
    lines = [json.dumps(line(f"b{i}", float(i % 2))) for i in range(BURST)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"id": "x", "messages": []}))
    big = line("big", 0.0, calls=40, result="r" * BIG_TOOL_RESULT)
    lines.append(json.dumps(big))
    f.write_text("\n".join(lines) + "\n")
    assert f.stat().st_size > 1_000_000
    return subprocess.run(
        [sys.executable, "-m", "processors.cli", "import", str(f), "--endpoint", pipe.http_url(""),
         "--home", str(pipe.cfg.home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CLOSELOOP_")},
            "PYTHONPATH": str(REPO),
        },
    )  # fmt: skip


def test_import_reports_bad_lines_by_number(imported: subprocess.CompletedProcess) -> None:
    assert imported.returncode == 1, imported.stderr
    assert f"imported {BURST + 1} conversation(s)" in imported.stdout
    assert "bad line(s): 4, 8" in imported.stdout
    assert "line 4: not JSON" in imported.stderr and "line 8: 'messages'" in imported.stderr


def test_import_round_trip_with_stated_outcomes(
    pipe: Pipeline, imported: subprocess.CompletedProcess
) -> None:
    rows = pipe.wait_rows(
        "SELECT conversation_id, outcome, failed, outcome_source, outcome_reason "
        "FROM conversation_tags FINAL",
        BURST + 1,
    )
    by = {r["conversation_id"]: r for r in rows}
    assert set(by) == {f"b{i}" for i in range(BURST)} | {"big"}
    for i in range(BURST):
        r = by[f"b{i}"]
        assert (r["failed"], r["outcome_source"]) == (int(i % 2 == 0), "stated"), r
        assert r["outcome"] == ("failed" if i % 2 == 0 else "resolved")
        assert "reward" in r["outcome_reason"]
    assert by["big"]["failed"] == 1
    # the conversation over 1 MB arrived whole: every call and its full result
    big = pipe.rows(
        "SELECT n_tool_calls, length(messages) AS size FROM conversations FINAL "
        "WHERE conversation_id = 'big'"
    )[0]
    assert big["n_tool_calls"] == 40 and big["size"] > 40 * BIG_TOOL_RESULT
    assert (
        pipe.rows("SELECT count() AS n FROM tool_calls FINAL WHERE conversation_id = 'big'")[0]["n"]
        == 40
    )
    assert (
        "call_b1_0"
        in pipe.rows("SELECT call_id FROM tool_calls FINAL WHERE conversation_id = 'b1'")[0][
            "call_id"
        ]
    )


def test_evaluation_log_record_sets_the_outcome(pipe: Pipeline) -> None:
    tr = parse_line(json.dumps(line("logged", None)), time.time_ns())
    req = to_request(tr)
    root = req.resource_spans[0].scope_spans[0].spans[0]
    logs = ExportLogsServiceRequest()
    lr = logs.resource_logs.add().scope_logs.add().log_records.add()
    lr.time_unix_nano = time.time_ns()
    lr.event_name = "gen_ai.evaluation.result"
    lr.trace_id, lr.span_id = root.trace_id, root.span_id
    lr.attributes.extend(
        [
            _kv("gen_ai.evaluation.name", "task_success"),
            _kv("gen_ai.evaluation.score.label", "fail"),
        ]
    )
    # the spans first (a log record that comes before any span of its trace needs
    # gen_ai.conversation.id: docs/agent-authors.md)
    for path, body in (("/v1/traces", req), ("/v1/logs", logs)):
        urllib.request.urlopen(
            urllib.request.Request(
                pipe.http_url(path),
                data=body.SerializeToString(),
                headers={"Content-Type": "application/x-protobuf"},
            ),
            timeout=10,
        ).read()
    (r,) = pipe.wait_rows(
        "SELECT outcome, failed, outcome_source FROM conversation_tags FINAL "
        "WHERE conversation_id = 'logged'",
        1,
    )
    assert (r["outcome"], r["failed"], r["outcome_source"]) == ("failed", 1, "stated")


def _tags_on_topic(pipe: Pipeline, cid: str, version: int = 2) -> list[TagRecord]:
    """``cid``'s tags on the tags topic, read until a stated one of ``version`` or above."""
    c = Consumer({"bootstrap.servers": pipe.broker.bootstrap, "group.id": f"t-{time.time_ns()}"})
    topic = pipe.cfg.topics.tags
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for m in c.consume(500, 1.0):
            if m.error() is None and m.key() == cid.encode():
                out.append(TagRecord.from_json(m.value()))
        if any(t.outcome_source == "stated" and t.conversation_version >= version for t in out):
            break
    c.close()
    return out


def test_late_feedback_reversions_a_closed_conversation(
    pipe: Pipeline, imported: subprocess.CompletedProcess
) -> None:
    pipe.wait_rows("SELECT 1 FROM conversation_tags FINAL WHERE conversation_id = 'b1'", 1)
    before = pipe.rows(
        "SELECT conversation_version AS v, failed FROM conversation_tags FINAL "
        "WHERE conversation_id = 'b1'"
    )[0]
    assert before["failed"] == 0  # reward 1
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})

    def publish(tag: TagRecord) -> None:
        producer.produce(
            pipe.cfg.topics.tags, key=tag.conversation_id.encode(), value=tag.to_json()
        )
        assert producer.flush(10) == 0

    ev = feedback_evaluation(
        label="thumbs_down", comment="wrong project, mail me at a@b.co",
        redactor=Redactor(pipe.cfg.capture.redact), now_ns=time.time_ns(),
    )  # fmt: skip
    new = record_feedback(pipe.store, pipe.cfg, "b1", ev, publish)
    assert (new.failed, new.outcome, new.conversation_version) == (True, "failed", before["v"] + 1)
    after = pipe.rows(
        "SELECT conversation_version AS v, failed, outcome_reason FROM conversation_tags FINAL "
        "WHERE conversation_id = 'b1'"
    )[0]
    assert (after["v"], after["failed"]) == (before["v"] + 1, 1)
    assert "a@b.co" not in after["outcome_reason"]
    assert pipe.rows("SELECT label FROM feedback FINAL WHERE conversation_id = 'b1'") == [
        {"label": "thumbs_down"}
    ]
    assert any(
        t.failed and t.conversation_version == before["v"] + 1 for t in _tags_on_topic(pipe, "b1")
    )


def test_late_feedback_outlives_a_later_version_of_its_conversation(
    pipe: Pipeline, imported: subprocess.CompletedProcess
) -> None:
    from processors.feedback import load_tagged

    pipe.wait_rows("SELECT 1 FROM conversation_tags FINAL WHERE conversation_id = 'b5'", 1)
    ev = feedback_evaluation(label="thumbs_down", redactor=Redactor([]), now_ns=time.time_ns())
    fed = record_feedback(pipe.store, pipe.cfg, "b5", ev)  # b5's reward was 1: resolved before
    assert fed.failed
    # b5 assembled again (more spans arrived), with the reward its spans stated: a version
    # above the feedback's, tagged from the conversation alone it would be resolved
    conv = load_tagged(pipe.store, conversation_id="b5")[-1].conversation
    assert conv is not None
    conv.version = fed.conversation_version + 1
    conv.evaluations = [Evaluation(name="reward", score=1.0, source="event", ts_ns=1)]
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
    producer.produce(pipe.cfg.topics.conversations, key=b"b5", value=conv.to_json())
    assert producer.flush(10) == 0
    (r,) = pipe.wait_rows(
        "SELECT failed, outcome, outcome_reason FROM conversation_tags FINAL "
        f"WHERE conversation_id = 'b5' AND conversation_version = {fed.conversation_version + 1}",
        1,
    )
    assert (r["failed"], r["outcome"]) == (1, "failed")
    assert "thumbs_down" in r["outcome_reason"]
    tags = _tags_on_topic(pipe, "b5", fed.conversation_version + 1)
    later = [t for t in tags if t.conversation_version == fed.conversation_version + 1]
    assert later and all(t.failed for t in later)


def test_feedback_endpoint_needs_the_token(
    pipe: Pipeline, imported: subprocess.CompletedProcess
) -> None:
    pipe.wait_rows("SELECT 1 FROM conversation_tags FINAL WHERE conversation_id = 'b3'", 1)
    pipe.cfg.web.token = "test-token-123"
    server = WebServer(pipe.cfg, pipe.store, port=0).start()
    try:

        def post(body: dict, token: str | None) -> tuple[int, dict]:
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            req = urllib.request.Request(
                server.url + "/api/feedback", data=json.dumps(body).encode(), headers=headers
            )
            try:
                with urllib.request.urlopen(req, timeout=20) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert post({"conversation_id": "b3", "score": 0}, None)[0] == 401
        assert post({"conversation_id": "b3", "score": 0}, "wrong")[0] == 401
        assert post({"conversation_id": "b3"}, "test-token-123")[0] == 400
        assert post({"conversation_id": "nope", "score": 0}, "test-token-123")[0] == 404
        status, body = post({"conversation_id": "b3", "score": 0.0}, "test-token-123")
        assert status == 200 and body["failed"] is True and body["outcome"] == "failed"
        assert pipe.rows(
            "SELECT failed FROM conversation_tags FINAL WHERE conversation_id = 'b3'"
        ) == [{"failed": 1}]
    finally:
        server.stop()


def test_diagnose_reads_conversations_back_with_their_per_call_data(
    pipe: Pipeline, imported: subprocess.CompletedProcess
) -> None:
    from processors.feedback import load_tagged

    pipe.wait_rows("SELECT 1 FROM conversation_tags FINAL WHERE conversation_id = 'big'", 1)
    (tag,) = load_tagged(pipe.store, conversation_id="big")
    conv = tag.conversation
    assert conv is not None and conv.llm_calls == 41  # one model call per assistant message
    assert len(conv.tool_calls) == 40
    assert all(c.duration_ms > 0 and c.name == "archive_project" for c in conv.tool_calls)
    # the latency rule's per-call figure is the span time per call, not the conversation's total
    assert conv.latency_ms / conv.llm_calls < 1000


def test_an_evaluation_after_its_conversation_left_assemble_is_late_feedback(
    pipe: Pipeline,
) -> None:
    from processors.understand.core import tag_row

    # a conversation tagged long ago (no longer in assemble's state): rows as the stages wrote them
    ghost = TagRecord("ghost", 7, "i-old", "old intent", 1, outcome="resolved", ts_ns=5)
    pipe.store.insert_records("conversation_tags", [tag_row(ghost)])
    pipe.store.insert_records(
        "conversations",
        [{"conversation_id": "ghost", "version": 7, "messages": json.dumps(
            [{"role": "user", "content": "archive it"}, {"role": "assistant", "content": "Done."}]
        ), "trace_ids": ["ab" * 16]}],
    )  # fmt: skip
    logs = ExportLogsServiceRequest()
    sl = logs.resource_logs.add().scope_logs.add()
    for cid in ("ghost", "never-seen"):
        lr = sl.log_records.add()
        lr.time_unix_nano = time.time_ns()
        lr.event_name = "gen_ai.evaluation.result"
        lr.attributes.extend(
            [
                _kv("gen_ai.conversation.id", cid),
                _kv("gen_ai.evaluation.name", "nightly_grader"),
                _kv("gen_ai.evaluation.score.value", 0.0),
            ]
        )
    urllib.request.urlopen(
        urllib.request.Request(
            pipe.http_url("/v1/logs"),
            data=logs.SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        ),
        timeout=10,
    ).read()
    (r,) = pipe.wait_rows(
        "SELECT conversation_version AS v, failed, outcome_source, intent_id "
        "FROM conversation_tags FINAL WHERE conversation_id = 'ghost' AND conversation_version > 7",
        1,
    )
    assert (r["v"], r["failed"], r["outcome_source"], r["intent_id"]) == (8, 1, "stated", "i-old")
    dead = pipe.wait_rows("SELECT reason, key FROM deadletter FINAL WHERE stage = 'understand'", 1)
    assert {(d["reason"], d["key"]) for d in dead} == {
        ("evaluation for a conversation never tagged", "never-seen")
    }
    # neither became a conversation of its own for the intent model
    assert pipe.rows(
        "SELECT count() AS n FROM conversation_tags FINAL WHERE conversation_id = 'never-seen'"
    ) == [{"n": 0}]


def _send(pipe: Pipeline, path: str, body: object) -> None:
    urllib.request.urlopen(
        urllib.request.Request(
            pipe.http_url(path),
            data=body.SerializeToString(),  # type: ignore[attr-defined]
            headers={"Content-Type": "application/x-protobuf"},
        ),
        timeout=10,
    ).read()


def _grade(response_id: str, name: str, score: float) -> ExportLogsServiceRequest:
    """A grader's evaluation log record naming only the answer it judges."""
    logs = ExportLogsServiceRequest()
    lr = logs.resource_logs.add().scope_logs.add().log_records.add()
    lr.time_unix_nano = time.time_ns()
    lr.event_name = "gen_ai.evaluation.result"
    lr.attributes.extend(
        [
            _kv("gen_ai.response.id", response_id),
            _kv("gen_ai.evaluation.name", name),
            _kv("gen_ai.evaluation.score.value", score),
        ]
    )
    return logs


def _answer(cid: str, response_id: str) -> object:
    """A conversation's spans, its chat span carrying ``response_id``."""
    req = to_request(parse_line(json.dumps(line(cid, None)), time.time_ns()))
    chat = next(
        sp
        for sp in req.resource_spans[0].scope_spans[0].spans
        if any(kv.key == "gen_ai.operation.name" and kv.value.string_value == "chat"
               for kv in sp.attributes)
    )  # fmt: skip
    chat.attributes.append(_kv("gen_ai.response.id", response_id))
    return req


def test_an_evaluation_finds_an_answer_another_capture_process_saw(pipe: Pipeline) -> None:
    # the answer, captured by this worker's capture ...
    _send(pipe, "/v1/traces", _answer("answered", "chatcmpl-elsewhere"))
    pipe.wait_rows("SELECT 1 FROM conversation_tags FINAL WHERE conversation_id = 'answered'", 1)
    # ... and its grade, taken by a capture process that never saw it (a new worker process:
    # capture remembers answers in memory only), with nothing but the response id
    pipe.stop_worker()
    pipe.start_worker()
    for response_id in ("chatcmpl-elsewhere", "chatcmpl-never-seen"):
        _send(pipe, "/v1/logs", _grade(response_id, "grader", 0.0))
    (r,) = pipe.wait_rows(
        "SELECT failed, outcome_source, outcome_reason FROM conversation_tags FINAL "
        "WHERE conversation_id = 'answered' AND outcome_source = 'stated'",
        1,
    )
    assert r["failed"] == 1 and "grader" in r["outcome_reason"]
    # the stand-in named after the answer is no conversation of its own
    assert pipe.rows(
        "SELECT count() AS n FROM conversations FINAL WHERE startsWith(conversation_id, 'gen_ai')"
    ) == [{"n": 0}]
    dead = pipe.wait_rows(
        "SELECT reason, detail FROM deadletter FINAL "
        "WHERE reason = 'evaluation for an unknown answer'",
        1,
    )
    assert [d["detail"] for d in dead] == [
        "no captured span has gen_ai.response.id 'chatcmpl-never-seen' within "
        f"{ANSWER_WAIT_S} s of the evaluation"
    ]


def test_an_evaluation_waits_for_an_answer_stored_after_its_stand_in_closed(
    pipe: Pipeline,
) -> None:
    stand_in = RESPONSE_REF + "chatcmpl-later"
    _send(pipe, "/v1/logs", _grade("chatcmpl-later", "late_grader", 0.0))

    # its stand-in closed with no answer stored: the evaluation went back to wait for it
    # (understand sent the stand-in's record to closeloop.turns again)
    def requeued() -> bool:
        return sum(t["conversation_id"] == stand_in for t in pipe.turn_records()) >= 2

    assert wait_for(requeued, ROWS_TIMEOUT_S), pipe.worker_log()[-3000:]
    assert pipe.rows(
        "SELECT count() AS n FROM responses FINAL WHERE response_id = 'chatcmpl-later'"
    ) == [{"n": 0}]
    _send(pipe, "/v1/traces", _answer("answered-later", "chatcmpl-later"))
    (r,) = pipe.wait_rows(
        "SELECT failed, outcome_source, outcome_reason FROM conversation_tags FINAL "
        "WHERE conversation_id = 'answered-later' AND outcome_source = 'stated'",
        1,
    )
    assert r["failed"] == 1 and "late_grader" in r["outcome_reason"]
    assert pipe.rows(
        "SELECT count() AS n FROM deadletter FINAL WHERE detail LIKE '%chatcmpl-later%'"
    ) == [{"n": 0}]
    assert pipe.rows(
        "SELECT count() AS n FROM conversations FINAL WHERE conversation_id = {c:String}",
        {"c": stand_in},
    ) == [{"n": 0}]
