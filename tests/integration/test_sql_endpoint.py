"""The store's SQL endpoint as an attacker tries it: real chDB behind the real endpoint.

Every refusal is checked on the wire, and beside it the valid use that must keep working
(clickhouse-connect as Grafana's and a user's client, ``closeloop sql``, the stages' writer).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import clickhouse_connect
import pytest

from processors.credentials import (
    SqlCredentials,
    ensure_sql_credentials,
    sql_credentials_path,
)
from processors.embedded.sqlserver import SqlLimits, SQLServer
from processors.errors import StoreError
from processors.store import Store, connect_http
from tests.browser import chromium_page, unavailable

REPO = Path(__file__).resolve().parents[2]
LIMITS = SqlLimits(
    max_body_bytes=4 * 1024 * 1024,
    max_query_bytes=64 * 1024,
    max_execution_s=2,
    max_memory_bytes=256 * 1024 * 1024,
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sql-home")


@pytest.fixture(scope="module")
def creds(home: Path) -> SqlCredentials:
    return ensure_sql_credentials(home / "run")


@pytest.fixture(scope="module")
def server(store: Store, creds: SqlCredentials, home: Path) -> Iterator[SQLServer]:
    s = SQLServer(store, creds, limits=LIMITS).start()
    # what the worker writes, so `closeloop sql --home` finds this endpoint
    (home / "run" / "sql.json").write_text(json.dumps({"url": s.url, "pid": os.getpid()}))
    yield s
    s.stop()


def request(
    server: SQLServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def query(
    server: SQLServer, sql: str, creds: Any, *, post: bool = True, **headers: str
) -> tuple[int, bytes]:
    auth = basic(creds.user, creds.password)
    if post:
        return request(server, "POST", "/", sql.encode(), {**auth, **headers})
    return request(server, "GET", "/?" + urlencode({"query": sql}), b"", {**auth, **headers})


# -- the credential --------------------------------------------------------------------------


def test_credentials_file_is_owner_only_and_stable(home: Path, creds: SqlCredentials) -> None:
    path = sql_credentials_path(home / "run")
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_sql_credentials(home / "run") == creds  # a restart keeps Grafana's password
    assert creds.reader.password != creds.writer.password


def test_no_or_wrong_credential_gets_401(server: SQLServer, creds: SqlCredentials) -> None:
    status, body = request(server, "GET", "/?" + urlencode({"query": "SELECT 1"}))
    assert status == 401 and b"authentication required" in body
    status, _ = request(server, "POST", "/", b"SELECT 1")
    assert status == 401
    status, _ = request(server, "POST", "/", b"SELECT 1", basic(creds.reader.user, "guess"))
    assert status == 401
    status, _ = request(server, "POST", "/", b"SELECT 1", basic(creds.writer.user, "x"))
    assert status == 401
    assert request(server, "GET", "/ping") == (200, b"Ok.\n")  # liveness needs no secret


def test_every_way_clickhouse_takes_a_user_works(server: SQLServer, creds: SqlCredentials) -> None:
    r = creds.reader
    assert query(server, "SELECT 40 + 2", r) == (200, b"42\n")
    headers = {"X-ClickHouse-User": r.user, "X-ClickHouse-Key": r.password}
    assert request(server, "POST", "/", b"SELECT 40 + 2", headers) == (200, b"42\n")
    url = "/?" + urlencode({"query": "SELECT 40 + 2", "user": r.user, "password": r.password})
    assert request(server, "GET", url) == (200, b"42\n")


def test_clickhouse_connect_reads_as_grafana_would(
    server: SQLServer, creds: SqlCredentials
) -> None:
    client = clickhouse_connect.get_client(
        host=server.host,
        port=server.port,
        username=creds.reader.user,
        password=creds.reader.password,
        autogenerate_session_id=False,
        compress=False,
    )
    got = client.query("SELECT name FROM system.tables WHERE name = {t:String}", {"t": "spans"})
    assert got.result_rows == [("spans",)]
    with pytest.raises(Exception, match="readonly|ACCESS_DENIED|497|164"):
        client.command("CREATE TABLE grafana_was_here (a UInt8) ENGINE = Memory")
    with pytest.raises(Exception, match="401|authentication"):
        clickhouse_connect.get_client(
            host=server.host, port=server.port, username="default", password=""
        ).query("SELECT 1")


def test_closeloop_sql_uses_the_reader(server: SQLServer, home: Path) -> None:
    run = [sys.executable, "-m", "processors.cli", "sql", "--home", str(home)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [*run, "SELECT 6 * 7 AS n", "--format", "TSVWithNames"],
        capture_output=True,
        env=env,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode().split() == ["n", "42"]
    bad = subprocess.run(
        [*run, "CREATE TABLE cli_was_here (a UInt8) ENGINE = Memory"],
        capture_output=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode != 0
    assert b"readonly" in bad.stderr.lower() or b"needs the writer" in bad.stderr


# -- web pages, DNS rebinding ----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},
        {"Host": "attacker.example:8723"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_requests_from_web_pages_are_refused(
    server: SQLServer, creds: SqlCredentials, headers: dict[str, str]
) -> None:
    """Even with the writer's credential: a browser never gets to the store."""
    status, body = query(server, "SELECT 1", creds.writer, **headers)
    assert status == 403, body
    assert query(server, "SELECT 1", creds.writer, **{"Sec-Fetch-Site": "none"}) == (200, b"1\n")
    host = {"Host": f"localhost:{server.port}"}
    assert query(server, "SELECT 1", creds.writer, **host) == (200, b"1\n")


# -- the reader cannot write, reach files, URLs, servers or processes -------------------------

SECRET_LINE = "closeloop-canary-file-line"

REFUSED_READS = [
    "SELECT * FROM file('{f}', 'LineAsString')",
    "select * from file('{f}', 'LineAsString')",
    "SELECT * FROM `file`('{f}', 'LineAsString')",
    "SELECT * FROM file /* hidden */ ('{f}', 'LineAsString')",
    "SELECT *\n\tFROM\n  file\n(\n'{f}'\n, 'LineAsString')",
    "SELECT file('{f}')",
    "SELECT FILE('{f}')",
    "SELECT `file`('{f}')",
    "SELECT fIlE/**/('{f}') -- trailing",
    "SELECT 1; SELECT file('{f}')",
    "SELECT 1 -- x\n; SELECT file('{f}')",
    "SELECT * FROM (SELECT * FROM file('{f}', 'LineAsString') SETTINGS readonly = 0)",
    "SELECT 1 SETTINGS readonly = 0",
    "WITH (SELECT file('{f}')) AS x SELECT x",
    "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
    "SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv')",
    "SELECT * FROM hdfs('hdfs://127.0.0.1:9/x', 'TSV', 'a String')",
    "SELECT * FROM remote('127.0.0.1:9', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1:9', system.one)",
    "SELECT * FROM cluster('default', system.one)",
    "SELECT * FROM mysql('127.0.0.1:9', 'd', 't', 'u', 'p')",
    "SELECT * FROM postgresql('127.0.0.1:9', 'd', 't', 'u', 'p')",
    "SELECT * FROM executable('cat {f}', 'LineAsString', 'a String')",
    "SELECT * FROM input('a String')",
    "SELECT * FROM python(x)",
    "SELECT * FROM dictionary('d')",
    "SELECT * FROM iceberg('http://127.0.0.1:9/bucket/x')",
    "SELECT * FROM azureBlobStorage('a', 'b', 'c')",
    "DESCRIBE TABLE file('{f}', 'LineAsString')",
    "EXPLAIN SELECT * FROM file('{f}', 'LineAsString')",
    "CREATE TABLE reader_was_here (a UInt8) ENGINE = Memory",
    "CREATE TABLE reader_was_here ENGINE = File(LineAsString, '{f}')",
    "CREATE DICTIONARY d (a String) PRIMARY KEY a SOURCE(FILE(path '{f}' format 'TSV')) "
    "LAYOUT(FLAT()) LIFETIME(0)",
    "INSERT INTO reviews (review_id) VALUES ('x')",
    "INSERT INTO FUNCTION file('{f}.out', 'TSV') SELECT 1",
    "DROP TABLE reviews",
    "ALTER TABLE reviews DELETE WHERE 1",
    "TRUNCATE TABLE reviews",
    "KILL QUERY WHERE 1",
    "USE system",
    "SET readonly = 0",
    "SYSTEM DROP MARK CACHE",
]


@pytest.mark.parametrize("sql", REFUSED_READS)
@pytest.mark.parametrize("post", [True, False], ids=["post", "get"])
def test_reader_refusals(
    server: SQLServer, creds: SqlCredentials, tmp_path: Path, sql: str, post: bool
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET_LINE + "\n")
    status, body = query(server, sql.format(f=secret), creds.reader, post=post)
    assert status != 200, body
    assert SECRET_LINE.encode() not in body
    assert not (tmp_path / "secret.txt.out").exists()


def test_writer_on_get_is_a_reader(server: SQLServer, creds: SqlCredentials) -> None:
    """An <img src> could only ever send a GET: writes need POST (and the writer)."""
    status, _ = query(
        server, "CREATE TABLE get_was_here (a UInt8) ENGINE = Memory", creds.writer, post=False
    )
    assert status != 200
    assert query(server, "EXISTS TABLE get_was_here", creds.writer) == (200, b"0\n")


def test_into_outfile_writes_nothing(
    server: SQLServer, creds: SqlCredentials, tmp_path: Path
) -> None:
    out = tmp_path / "dump.tsv"
    for sql in (
        f"SELECT * FROM reviews INTO OUTFILE '{out}'",
        f"select 1 into   outfile '{out}' FORMAT CSV",
        f"SELECT 1 /* x */ INTO/**/OUTFILE '{out}'",
    ):
        status, _ = query(server, sql, creds.reader)
        assert status == 403
    assert not out.exists()


def test_reader_still_reads_what_the_page_and_dashboards_need(
    server: SQLServer, creds: SqlCredentials
) -> None:
    ok = [
        ("SELECT count() > 0 FROM system.tables WHERE name = 'spans'", b"1\n"),
        ("SELECT sum(number) FROM numbers(10)", b"45\n"),
        ("SELECT count() FROM spans FINAL WHERE trace_id = 'no-such-trace'", b"0\n"),
        ("SELECT 'file(' AS s, 'url' AS u FORMAT TSV", b"file(\turl\n"),
        ("WITH 2 AS a SELECT a * number FROM numbers(3) ORDER BY 1 FORMAT CSV", b"0\n2\n4\n"),
        ("SELECT x FROM (SELECT 1 AS x UNION ALL SELECT 2) ORDER BY x", b"1\n2\n"),
        ("EXISTS TABLE spans", b"1\n"),
    ]
    for sql, want in ok:
        assert query(server, sql, creds.reader) == (200, want), sql
    status, body = query(server, "SHOW TABLES", creds.reader)
    assert status == 200 and b"conversations" in body


def test_writer_writes_on_post(server: SQLServer, creds: SqlCredentials, unique: str) -> None:
    writer = connect_http(server.url, creds.writer)
    rows = [[f"r-sec-{unique}", f"p-{unique}", "approve", "Ada", ""]]
    cols = ["review_id", "proposal_id", "decision", "reviewer", "comment"]
    assert writer.insert("reviews", rows, cols) == 1
    reader = connect_http(server.url, creds.reader)
    got = reader.query(
        "SELECT reviewer FROM reviews FINAL WHERE review_id = {r:String}", {"r": rows[0][0]}
    )
    assert got == [{"reviewer": "Ada"}]
    with pytest.raises(StoreError):
        reader.insert("reviews", rows, cols)


# -- limits -----------------------------------------------------------------------------------


def test_gzip_bomb_gets_413_and_the_server_lives(server: SQLServer, creds: SqlCredentials) -> None:
    bomb = gzip.compress(b"SELECT 1 -- " + b" " * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    headers = {**basic(creds.writer.user, creds.writer.password), "Content-Encoding": "gzip"}
    status, body = request(server, "POST", "/", bomb, headers)
    assert status == 413, body
    small = gzip.compress(b"SELECT 7")
    assert request(server, "POST", "/", small, headers) == (200, b"7\n")
    status, _ = request(server, "POST", "/", b"SELECT 1", {**headers, "Content-Encoding": "br"})
    assert status == 415
    # a reader's body is a query: capped at the query size while it decompresses
    reader = {**basic(creds.reader.user, creds.reader.password), "Content-Encoding": "gzip"}
    small_bomb = gzip.compress(b"SELECT 1 -- " + b" " * (2 * LIMITS.max_query_bytes))
    status, body = request(server, "POST", "/", small_bomb, reader)
    assert status == 413 and b"decompresses beyond" in body
    assert request(server, "POST", "/", small, reader) == (200, b"7\n")


def test_body_and_query_size_limits(server: SQLServer, creds: SqlCredentials) -> None:
    auth = basic(creds.writer.user, creds.writer.password)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.putrequest("POST", "/")
    for k, v in {**auth, "Content-Length": str(LIMITS.max_body_bytes + 1)}.items():
        conn.putheader(k, v)
    conn.endheaders()  # the body is never sent: the length alone is refused
    assert conn.getresponse().status == 413
    conn.close()
    long_query = "SELECT 1 -- " + "x" * LIMITS.max_query_bytes
    assert query(server, long_query, creds.reader)[0] == 413


def test_time_and_memory_limits_stop_reader_queries(
    server: SQLServer, creds: SqlCredentials
) -> None:
    status, body = query(server, "SELECT count() FROM numbers(1000000000000)", creds.reader)
    assert status == 500 and b"TIMEOUT_EXCEEDED" in body
    status, body = query(
        server, "SELECT groupArray(randomString(1000)) FROM numbers(10000000)", creds.reader
    )
    assert status == 500 and (b"MEMORY_LIMIT_EXCEEDED" in body or b"TIMEOUT_EXCEEDED" in body)
    assert query(server, "SELECT 1", creds.reader) == (200, b"1\n")


# -- a web page in a real browser ---------------------------------------------------------------


class _AttackPage(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "browser available")
def test_a_web_page_cannot_use_the_store_even_knowing_the_password(
    server: SQLServer, creds: SqlCredentials
) -> None:
    """The <img>/no-cors attack from another origin, with the writer's credential in the URL:
    the endpoint refuses it (Origin / Sec-Fetch-Site), so no table appears."""
    w = creds.writer

    def url(table: str) -> str:
        sql = f"CREATE TABLE {table} (a UInt8) ENGINE = Memory"
        return f"{server.url}/?" + urlencode({"query": sql, "user": w.user, "password": w.password})

    _AttackPage.html = f"""<!doctype html><html><body>
<img src="{url("img_was_here")}">
<script>
window.done = Promise.allSettled([
  fetch("{url("nocors_was_here")}", {{mode: "no-cors"}}),
  fetch("{url("post_was_here")}", {{mode: "no-cors", method: "POST", body: "SELECT 1"}}),
  fetch("{url("cors_was_here")}").then(r => r.status),
]).then(() => "done");
</script></body></html>""".encode()
    page_server = ThreadingHTTPServer(("127.0.0.1", 0), _AttackPage)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    try:
        with chromium_page() as page:
            page.goto(f"http://127.0.0.1:{page_server.server_address[1]}/")
            assert page.evaluate("window.done") == "done"
            page.wait_for_load_state("load")
    finally:
        page_server.shutdown()
        page_server.server_close()
    for table in ("img_was_here", "nocors_was_here", "post_was_here", "cors_was_here"):
        assert query(server, f"EXISTS TABLE {table}", w) == (200, b"0\n"), table
    # the same POST from a local program (no Origin) is what the writer's credential is for:
    # the browser was refused for being a browser, not for the query
    local = url("local_was_here")
    assert request(server, "POST", local[len(server.url) :], b"")[0] == 200
    assert query(server, "EXISTS TABLE local_was_here", w) == (200, b"1\n")
    assert query(server, "DROP TABLE local_was_here", w)[0] == 200
