"""Bad input at every HTTP endpoint (property-based) and on the span topic: each gets a clear
error or goes to the dead-letter table and topic; every process keeps serving; ``closeloop
status`` shows the dead letters."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processors.capture.core import Capture, RawMessage
from processors.status import collect_status
from processors.web.server import WebServer
from tests.integration.pipeline import Pipeline, running_pipeline

from .harness import read_topic

TRIED: Counter[str] = Counter()  # bad inputs sent, per endpoint (reported by the last test)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
GATEWAY_ANSWERS = {200, 400, 404, 405, 411, 413, 415}
TOKEN = "fuzz-token-0123456789"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("badinput"), stages="capture") as p:
        yield p


@pytest.fixture(scope="module")
def web(pipe: Pipeline) -> Iterator[WebServer]:
    pipe.cfg.web.token = TOKEN
    server = WebServer(pipe.cfg, pipe.store, host="127.0.0.1", port=0).start()
    yield server
    server.stop()


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- the OTLP gateway ---------------------------------------------------------------------------


def any_value(depth: int) -> AnyValue:
    """A kvlist nested ``depth`` levels deep."""
    v = AnyValue(string_value="leaf")
    for i in range(depth):
        outer = AnyValue()
        outer.kvlist_value.values.append(KeyValue(key=f"k{i}", value=v))
        v = outer
    return v


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand (the library refuses to build too-deep messages)."""

    def varint(n: int) -> bytes:
        out = b""
        while n > 0x7F:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def too_deep(trace: int, depth: int) -> bytes:
    """A request whose one span has an attribute nested ``depth`` kvlists deep."""
    value = AnyValue(string_value="leaf").SerializeToString()
    for i in range(
        depth
    ):  # AnyValue.kvlist_value(6) -> KeyValueList.values(1) -> KeyValue{key(1), value(2)}
        value = _field(6, _field(1, _field(1, f"k{i}".encode()) + _field(2, value)))
    sp = span(trace, 1, "deep").SerializeToString() + _field(
        9, _field(1, b"deep") + _field(2, value)
    )
    return _field(1, _field(2, _field(2, sp)))  # request.resource_spans(1).scope_spans(2).spans(2)


def span(
    trace: int,
    sid: int,
    conv: str,
    *,
    start: int | None = None,
    end: int | None = None,
    attrs: dict[str, AnyValue] | None = None,
) -> Span:
    now = time.time_ns()
    s = Span(
        trace_id=trace.to_bytes(16, "big"),
        span_id=sid.to_bytes(8, "big"),
        name="chat",
        start_time_unix_nano=now if start is None else start,
        end_time_unix_nano=now + 10**6 if end is None else end,
    )
    s.attributes.append(KeyValue(key="gen_ai.conversation.id", value=AnyValue(string_value=conv)))
    for k, v in (attrs or {}).items():
        s.attributes.append(KeyValue(key=k, value=v))
    return s


def traces(*spans: Span) -> bytes:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.extend(spans)
    return req.SerializeToString()


def post_otlp(
    pipe: Pipeline, path: str, body: bytes, ctype: str = "application/x-protobuf", gz: bool = False
) -> int:
    headers = {"Content-Type": ctype}
    if gz:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    TRIED["gateway"] += 1
    code, _ = request(pipe.gateway.http_port, "POST", path, body, headers)
    return code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=30,
)
otlp_shaped = st.fixed_dictionaries(
    {
        "resourceSpans": st.lists(
            st.fixed_dictionaries(
                {
                    "scopeSpans": st.lists(
                        st.fixed_dictionaries(
                            {
                                "spans": st.lists(
                                    st.dictionaries(
                                        st.sampled_from(
                                            [
                                                "traceId",
                                                "spanId",
                                                "name",
                                                "startTimeUnixNano",
                                                "attributes",
                                                "kind",
                                                "status",
                                            ]
                                        ),
                                        json_values,
                                        max_size=6,
                                    ),
                                    max_size=3,
                                )
                            }
                        ),
                        max_size=2,
                    )
                }
            ),
            max_size=2,
        )
    }
)


@FUZZ
@given(
    path=st.sampled_from(["/v1/traces", "/v1/logs"]),
    body=st.binary(max_size=2048),
    ctype=st.sampled_from(["application/x-protobuf", "application/json", "text/plain"]),
    gz=st.booleans(),
)
def test_gateway_random_bytes(pipe: Pipeline, path: str, body: bytes, ctype: str, gz: bool) -> None:
    assert post_otlp(pipe, path, body, ctype, gz) in GATEWAY_ANSWERS


@FUZZ
@given(path=st.sampled_from(["/v1/traces", "/v1/logs"]), doc=json_values | otlp_shaped)
def test_gateway_random_json(pipe: Pipeline, path: str, doc: Any) -> None:
    body = json.dumps(doc).encode()
    assert post_otlp(pipe, path, body, "application/json") in GATEWAY_ANSWERS


def test_gateway_hostile_but_valid_otlp_is_stored_or_refused_clearly(pipe: Pipeline) -> None:
    conv = f"hostile-{time.time_ns()}"
    huge = AnyValue(string_value="x" * 300_000)
    ok = [
        traces(span(0xA1, 1, conv, attrs={"gen_ai.input.messages": huge})),  # huge attribute
        traces(span(0xA2, 1, conv, attrs={"deep": any_value(20)})),  # deep nesting
        traces(span(0xA3, 1, conv, start=1, end=2)),  # 1970
        traces(span(0xA4, 1, conv, start=(1 << 63) - 10, end=(1 << 63) - 1)),  # year 2262
        traces(span(0xA5, 1, conv, start=2 * 10**18, end=10**18)),  # ends before it starts
        traces(span(0xA6, 1, conv), span(0xA6, 1, conv)),  # duplicate span id
        traces(span(0xA6, 1, conv)),  # ... in two requests
        traces(*[span(0xB000 + t, 1, conv) for t in range(30)]),  # one conversation, 30 traces
    ]
    for body in ok:
        assert post_otlp(pipe, "/v1/traces", body) == 200
    bad_utf8 = traces(span(0xA7, 1, conv, attrs={"k": AnyValue(string_value="AAAA")})).replace(
        b"AAAA", b"\xff\xfe\xfd\xfc"
    )
    assert post_otlp(pipe, "/v1/traces", bad_utf8) == 400
    assert post_otlp(pipe, "/v1/traces", too_deep(0xA8, 2000)) == 400  # past any parser's depth
    rows = pipe.wait_rows(
        "SELECT trace_id, span_id, start_ns, length(attributes['gen_ai.input.messages']) AS n "
        "FROM spans FINAL WHERE conversation_id = {c:String}",
        36,
        {"c": conv},
    )
    assert len(rows) == 36, len(
        rows
    )  # 6 spans (one sent three times) + 30 traces of one conversation
    assert (
        max(r["n"] for r in rows) <= pipe.cfg.capture.max_attribute_bytes + 64
    )  # truncated, not dropped
    assert pipe.worker.proc is not None and pipe.worker.proc.poll() is None


# -- the span topic: what no gateway would send, straight from a broken collector -----------------


def test_garbage_on_the_topic_is_dead_lettered_and_status_counts_it(pipe: Pipeline) -> None:
    rng = __import__("random").Random(5)
    garbage = [
        b"\x07" + rng.randbytes(rng.randint(0, 200)) for _ in range(20)
    ]  # wire type 7: never protobuf
    garbage += [b"{not json", json.dumps({"resourceSpans": "nope"}).encode(), b"\xff" * 64]
    core = Capture(pipe.cfg.capture)
    expected = len(
        core.process(
            [RawMessage(pipe.cfg.topics.otlp_spans, 0, i, None, g) for i, g in enumerate(garbage)],
            time.time_ns(),
        ).deadletters
    )
    assert expected >= 20
    producer = Producer({"bootstrap.servers": pipe.broker.bootstrap})
    for g in garbage:
        producer.produce(pipe.cfg.topics.otlp_spans, value=g)
    producer.flush()
    TRIED["topic"] += len(garbage)
    count = "SELECT count() FROM deadletter FINAL"
    before = pipe.store.scalar(count) or 0
    pipe.wait_rows(f"{count} HAVING count() >= {before + expected}", 1)
    cfg = pipe.cfg
    cfg.kafka.bootstrap = pipe.broker.bootstrap
    n1 = pipe.store.scalar(count)
    status = collect_status(cfg, None)
    n2 = pipe.store.scalar(count)
    assert before + expected <= n1 <= status["deadletters"] <= n2
    assert status["deadletter_reasons"] and not status["errors"]
    # the same dead letters are on the dead-letter topic, for whoever wants to replay them
    letters = [json.loads(v) for v in read_topic(pipe.broker.bootstrap, cfg.topics.deadletter)]
    assert len(letters) >= expected
    originals = {
        base64.b64decode(d["original_b64"])
        for d in letters
        if d["stage"] == "capture" and d["reason"]
    }
    assert {g for g in garbage if g.startswith(b"\x07")} <= originals  # each kept whole, to replay


# -- the SQL endpoint ------------------------------------------------------------------------------

SQL_BASE = [
    "SELECT count() FROM spans",
    "SELECT * FROM deadletter LIMIT 3 FORMAT JSONEachRow",
    "SELECT {x:UInt32} + 1",
    "SELECT name FROM system.tables",
]


@FUZZ
@given(
    base=st.sampled_from(SQL_BASE),
    at=st.integers(0, 60),
    junk=st.text(
        alphabet=st.sampled_from(list("'\"`()[]{};,\\%$#*/-+=<>:|\x00\u00e9\u202e "))
        | st.characters(),
        max_size=12,
    ),
    param=st.text(max_size=10),
    fmt=st.sampled_from(["", "JSON", "Nonsense", "TabSeparated"]),
)
@example(
    base=SQL_BASE[0], at=0, junk="\ud800", param="\udfff", fmt=""
)  # lone surrogates: not UTF-8
def test_sql_endpoint_malformed_queries(
    pipe: Pipeline, base: str, at: int, junk: str, param: str, fmt: str
) -> None:
    sql = base[:at] + junk + base[at:]
    port = int(pipe.worker.url.rsplit(":", 1)[1])
    # a lone surrogate (st.characters() draws them) goes out as the invalid UTF-8 it encodes to
    path = (
        f"/?query={quote(sql, errors='surrogatepass')}&param_x={quote(param, errors='surrogatepass')}"
        + (f"&default_format={fmt}" if fmt else "")
    )
    TRIED["sql"] += 1
    code, body = request(port, "GET", path)
    assert code == 200 or (code in (400, 413, 415, 500) and body.startswith(b"Code:")), (
        code,
        body[:200],
    )
    code, body = request(
        port,
        "POST",
        "/",
        sql.encode("utf-8", "surrogatepass"),
        {"Content-Encoding": "gzip"} if at % 7 == 0 else {},
    )
    assert code == 200 or body.startswith(b"Code:"), (code, body[:200])


def test_sql_endpoint_survives_broken_http_and_still_answers(pipe: Pipeline) -> None:
    port = int(pipe.worker.url.rsplit(":", 1)[1])
    for raw in (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /?query=SELECT%201 HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
        b"GARBAGE\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
        TRIED["sql"] += 1
    assert request(port, "GET", "/ping") == (200, b"Ok.\n")
    assert request(port, "GET", "/?query=SELECT%2041")[1].strip() == b"41"


# -- the review page ---------------------------------------------------------------------------------

path_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@FUZZ
@given(
    segments=st.lists(
        st.sampled_from(
            [
                "",
                "api",
                "intents",
                "diagnoses",
                "proposals",
                "outcomes",
                "login",
                "webhooks",
                "github",
                "..",
                "%2e%2e",
                "approve",
            ]
        )
        | path_text,
        max_size=4,
    ),
    query=path_text,
    auth=st.booleans(),
)
def test_review_page_random_paths(
    web: WebServer, segments: list[str], query: str, auth: bool
) -> None:
    path = (
        "/"
        + "/".join(quote(s, safe="%") for s in segments)
        + ("?" + quote(query, safe="=&") if query else "")
    )
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    TRIED["web"] += 1
    code, body = request(web.port, "GET", path, headers=headers)
    assert code < 500 and b"Traceback" not in body, (path, code, body[:300])
    if not auth:
        assert code in (401, 404, 405, 501), (path, code)  # nothing is shown without the token
        assert code != 200


@FUZZ
@given(
    path=st.sampled_from(["/proposals/p1/approve", "/proposals/p1/reject", "/", "/webhooks/github"])
    | path_text,
    form=st.dictionaries(
        st.sampled_from(["csrf", "reviewer", "comment", "x"]) | st.text(max_size=8),
        st.text(max_size=40),
        max_size=4,
    ),
    origin=st.sampled_from(["same", "other", "none"]),
)
def test_review_page_random_forms_change_nothing(
    web: WebServer, pipe: Pipeline, path: str, form: dict[str, str], origin: str
) -> None:
    cookie = f"{web.cookie_name}={web.new_session()}"
    host = f"127.0.0.1:{web.port}"
    headers = {"Cookie": cookie, "Host": host, "Content-Type": "application/x-www-form-urlencoded"}
    if origin != "none":
        headers["Origin"] = f"http://{host}" if origin == "same" else "http://evil.example"
    body = "&".join(f"{quote(k)}={quote(v)}" for k, v in form.items()).encode()
    # quoted either way: http.client cannot send a non-ASCII request line (it failed on "/\x80")
    target = quote(path if path.startswith("/") else "/" + path)
    TRIED["web"] += 1
    code, resp = request(web.port, "POST", target, body, headers)
    assert code in (401, 403, 404, 413) and b"Traceback" not in resp, (target, code, resp[:300])
    assert (pipe.store.scalar("SELECT count() FROM reviews") or 0) == 0


def test_every_process_still_serves_after_the_fuzzing(
    pipe: Pipeline, web: WebServer, record_property
) -> None:
    conv = f"after-fuzz-{time.time_ns()}"
    assert post_otlp(pipe, "/v1/traces", traces(span(0xC0FFEE, 1, conv))) == 200
    assert pipe.wait_rows(
        "SELECT span_id FROM spans FINAL WHERE conversation_id = {c:String}", 1, {"c": conv}
    )
    assert (
        request(web.port, "GET", "/api/overview", headers={"Authorization": f"Bearer {TOKEN}"})[0]
        == 200
    )
    assert pipe.worker.proc is not None and pipe.worker.proc.poll() is None
    assert "Traceback" not in pipe.worker_log()
    for k, v in TRIED.items():
        record_property(f"bad_inputs_{k}", v)
    record_property("bad_inputs_total", sum(TRIED.values()))
    print(f"bad inputs tried: {dict(TRIED)} total {sum(TRIED.values())}")
