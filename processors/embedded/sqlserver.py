"""A ClickHouse-compatible HTTP endpoint over the embedded (chDB) store.

chDB lets one process own a store; the process that owns it serves it here so that
``closeloop sql``, ``clickhouse-connect``'s HTTP client and Grafana's ClickHouse data
source read (and other processes write) the live data. The subset of the ClickHouse
HTTP interface implemented:

- ``GET /ping`` → ``Ok.``
- ``GET|POST /?query=SQL`` (or the SQL as the POST body), output in the query's
  ``FORMAT`` clause or ``default_format`` (default ``TabSeparated``);
  ``param_<name>`` URL parameters bind ``{name:Type}`` placeholders.
- ``POST /?query=INSERT INTO t (cols) FORMAT F`` with the data as the body (what
  clickhouse-connect sends for inserts).
- errors as HTTP 500 with ``Code: N. DB::Exception: ...`` and ``X-ClickHouse-Exception-Code``.

Who may do what (:mod:`processors.credentials`):

- every request but ``/ping`` names a user: HTTP Basic auth, ``X-ClickHouse-User`` /
  ``X-ClickHouse-Key`` headers or ``user``/``password`` URL parameters, as ClickHouse takes
  them; else 401;
- a request whose ``Host`` is not this endpoint's address (DNS rebinding), or that a browser
  sent on a web page's behalf (``Origin``, or ``Sec-Fetch-Site`` other than ``none``), gets 403:
  no web page may use the store, whatever it knows;
- only the writer, on POST, runs with the owner's rights. Everyone else runs on a second chDB
  connection with ``readonly=1`` and limits on time and memory set before any query (a query
  cannot lift them); the statement first goes through ClickHouse's own parser
  (``formatQuerySingleLine``, ``EXPLAIN AST``), which refuses several statements, and what
  ``readonly`` does not cover in chDB is refused from that tree: functions reaching files, URLs,
  other servers or processes, and ``INTO OUTFILE``. The canonical statement is what runs.
- bodies are bounded before and after decompression (413).

It listens on loopback only: it is a local window onto a local store, not a server.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

import chdb

from processors.credentials import SqlCredentials
from processors.embedded.httpd import Server, reply
from processors.store import Store

_INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<table>[\w.`\"]+)\s*(?:\((?P<cols>[^)]*)\))?\s*"
    r"(?:SETTINGS\s+[^F]*?)?FORMAT\s+(?P<fmt>\w+)\s*$",
    re.I | re.S,
)
_FORMAT = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.I)
_CODE = re.compile(r"Code:\s*(\d+)")
_PLACEHOLDER = re.compile(r"\{(\w+):([^{}]+)\}")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f"}  # else \x is x
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"})
_AST_FUNCTION = re.compile(r"^\s*Function (\S+)", re.M)
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.I)
ACCESS_DENIED = 497
# Statements a reader may run (the root node of ClickHouse's AST).
READER_STATEMENTS = (
    "SelectWithUnionQuery",
    "SelectIntersectExceptQuery",
    "Show",
    "DescribeQuery",
    "ExistsTableQuery",
    "Explain",
)
# Table functions that only compute (everything else in system.table_functions reaches files,
# URLs, other servers, processes or this process' Python objects and is refused).
READER_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateseries",
        "generaterandom",
        "values",
        "null",
        "view",
        "merge",
        "format",
    }
)
# Scalar functions that readonly lets through in chDB and that read outside the store.
READER_DENIED_FUNCTIONS = frozenset({"file"})


@dataclass(frozen=True)
class SqlLimits:
    max_body_bytes: int = 256 * 1024 * 1024
    max_query_bytes: int = 1024 * 1024
    max_execution_s: int = 60
    max_memory_bytes: int = 4 * 1024 * 1024 * 1024


class Refused(Exception):
    """A request this endpoint will not run: HTTP status, ClickHouse code, message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class ReaderSession:
    """A second chDB connection to the owner's store, read-only with limits set before any
    query runs (``readonly=1`` also forbids changing them afterwards)."""

    def __init__(self, path: str, limits: SqlLimits, lock: threading.RLock) -> None:
        self._conn = chdb.connect(path)
        self._lock = lock
        for setting in (
            f"SET max_execution_time = {int(limits.max_execution_s)}",
            f"SET max_memory_usage = {int(limits.max_memory_bytes)}",
            "SET readonly = 1",
        ):
            self._conn.query(setting)
        names = self._query("SELECT name FROM system.table_functions", "TabSeparated")
        self._denied = (
            frozenset(n.lower() for n in names.decode().split()) - READER_TABLE_FUNCTIONS
        ) | READER_DENIED_FUNCTIONS

    def _query(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> bytes:
        with self._lock:
            res = (
                self._conn.query(sql, fmt, params=params) if params else self._conn.query(sql, fmt)
            )
        return res.bytes()

    def canonical(self, sql: str) -> str:
        """The statement as ClickHouse's parser reads it (comments gone, one statement only),
        or Refused naming what the reader may not do."""
        try:
            text = self._query(
                "SELECT formatQuerySingleLine({q:String})",
                "TabSeparatedRaw",
                {"q": sql.translate(_TSV_ESCAPES)},
            ).decode()
        except Exception as e:  # the parser's own syntax error, reported as ClickHouse does
            raise Refused(400, _code(str(e)) or 62, _strip_scope(str(e))) from None
        canonical = text.rstrip("\n")
        ast = self._query("EXPLAIN AST " + canonical, "TabSeparatedRaw").decode()
        root = ast.split(None, 1)[0] if ast.strip() else ""
        if not root.startswith(READER_STATEMENTS):
            raise Refused(403, ACCESS_DENIED, f"{root or 'this statement'} needs the writer")
        called = {f.lower() for f in _AST_FUNCTION.findall(ast)}
        if denied := sorted(called & self._denied):
            raise Refused(403, ACCESS_DENIED, f"function(s) {', '.join(denied)} are not allowed")
        if _INTO_OUTFILE.search(canonical):
            raise Refused(403, ACCESS_DENIED, "INTO OUTFILE is not allowed")
        return canonical

    def query(self, sql: str, fmt: str | None) -> bytes:
        return self._query(sql, fmt or "TabSeparated")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _code(message: str) -> int:
    return int(m.group(1)) if (m := _CODE.search(message)) else 0


def _strip_scope(message: str) -> str:
    """A parser error about our wrapper names the user's statement, not the wrapper."""
    return message.split(": In scope SELECT formatQuerySingleLine", 1)[0]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # the worker's log carries errors; per-request lines would drown it

    def do_GET(self) -> None:
        self._serve(post=False)

    def do_POST(self) -> None:
        self._serve(post=True)

    def _serve(self, *, post: bool) -> None:
        u = urlparse(self.path)
        qs = parse_qs(u.query, keep_blank_values=True)
        body: bytes | None = None if post else b""
        try:
            self._check_origin()
            if u.path in ("/ping", "/replicas_status"):
                self._send(200, b"Ok.\n", "text/plain; charset=UTF-8")
                return
            writer = self._authenticate(qs)
            # a reader only ever sends a query: its body is capped at the query size, so a
            # compressed bomb stops after a megabyte, not after the writer's limit
            cap = (
                self.server.limits.max_body_bytes if writer else self.server.limits.max_query_bytes
            )
            body = self._read_body(cap) if post else b""
            self._run(qs, body, writer=writer and post)
        except Refused as e:
            if body is None:  # refused before its body was read: the connection cannot go on
                self.close_connection = True
            self._error(e.status, e.code, str(e))

    def _check_origin(self) -> None:
        """Only local programs may talk to the store: not a web page (any ``Origin``, or a
        browser's ``Sec-Fetch-Site``), not a name that resolves here (``Host``)."""
        host = self.headers.get("Host") or ""
        if _hostname(host) not in self.server.hosts:
            raise Refused(403, ACCESS_DENIED, f"Host {host!r} is not this endpoint's address")
        if self.headers.get("Origin") is not None:
            raise Refused(403, ACCESS_DENIED, "requests from web pages (Origin) are refused")
        if (self.headers.get("Sec-Fetch-Site") or "none") != "none":
            raise Refused(
                403, ACCESS_DENIED, "requests from web pages (Sec-Fetch-Site) are refused"
            )

    def _authenticate(self, qs: dict[str, list[str]]) -> bool:
        """True for the writer, False for the reader; 401 for anyone else."""
        user = self.headers.get("X-ClickHouse-User")
        password = self.headers.get("X-ClickHouse-Key") or ""
        auth = self.headers.get("Authorization") or ""
        if user is None and auth[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user = None
        if user is None and "user" in qs:
            user, password = qs["user"][0], (qs.get("password") or [""])[0]
        creds = self.server.credentials
        if user is not None and creds.writer.matches(user, password):
            return True
        if user is not None and creds.reader.matches(user, password):
            return False
        raise Refused(
            401,
            516,
            "authentication required: user and password from <home>/run/sql-credentials.json "
            "(HTTP Basic auth or X-ClickHouse-User/X-ClickHouse-Key)",
        )

    def _read_body(self, cap: int) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = _int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    body = b"".join(chunks)
                    break
                total += size
                if total > cap:
                    self.close_connection = True
                    raise Refused(413, 0, f"request body exceeds {cap} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        else:
            length = _int(self.headers.get("Content-Length") or "0", 10)
            if length > cap:
                self.close_connection = True
                raise Refused(413, 0, f"request body of {length} bytes exceeds {cap}")
            body = self.rfile.read(length) if length else b""
        return _decode(body, (self.headers.get("Content-Encoding") or "").lower(), cap)

    def _run(self, qs: dict[str, list[str]], body: bytes, *, writer: bool) -> None:
        query = (qs.get("query") or [""])[0]
        params = {k[len("param_") :]: v[0] for k, v in qs.items() if k.startswith("param_")}
        fmt = (qs.get("default_format") or ["TabSeparated"])[0]
        qid = (qs.get("query_id") or [uuid.uuid4().hex])[0]
        if not query and body[:6].upper() == b"INSERT":
            # clickhouse-connect sends "INSERT ... FORMAT F\n<data>" as one body
            head, _, rest = body.partition(b"\n")
            query, body = head.decode("utf-8", "replace"), rest
        try:
            if writer and query and body and (m := _INSERT.match(query)):
                self._insert(m, body)
                self._send(200, b"", "text/plain; charset=UTF-8", qid)
                return
            sql = (
                (query + ("\n" + body.decode() if body else "")).strip() if query else body.decode()
            )
            if not sql.strip():
                raise Refused(400, 62, "Empty query")
            if params:
                sql = bind_parameters(sql, params)
            if not writer:
                if len(sql.encode()) > self.server.limits.max_query_bytes:
                    raise Refused(
                        413, 0, f"query exceeds {self.server.limits.max_query_bytes} bytes"
                    )
                sql = self.server.reader.canonical(sql)
            out_fmt, ask_fmt = fmt, fmt
            if (m2 := _FORMAT.search(sql)) is not None:  # the query's own FORMAT clause wins
                out_fmt, ask_fmt = m2.group(0).split()[1].rstrip(";"), None
            data = self._query(sql, ask_fmt, writer=writer)
            self._send(200, data, _content_type(out_fmt), qid, out_fmt)
        except Refused:
            raise
        except (
            Exception
        ) as e:  # every ClickHouse error is reported to the client, the server stays up
            self._error(500, _code(str(e)), str(e))

    def _insert(self, m: re.Match[str], body: bytes) -> None:
        store = self.server.store
        cols = [c.strip().strip('`"') for c in (m.group("cols") or "").split(",") if c.strip()]
        with store._lock:
            store.client.raw_insert(
                m.group("table").strip('`"'), cols or None, insert_block=body, fmt=m.group("fmt")
            )

    def _query(self, sql: str, fmt: str | None, *, writer: bool) -> bytes:
        if not writer:
            return self.server.reader.query(sql, fmt)
        store = self.server.store
        with store._lock:
            return store.client.raw_query(sql, fmt=fmt)

    def _send(self, status: int, data: bytes, ctype: str, qid: str = "", fmt: str = "") -> None:
        headers = {
            "Content-Type": ctype,
            "X-ClickHouse-Server-Display-Name": "closeloop-chdb",
            "X-ClickHouse-Timezone": "UTC",
            **({"X-ClickHouse-Query-Id": qid} if qid else {}),
            **({"X-ClickHouse-Format": fmt} if fmt else {}),
            "X-ClickHouse-Summary": json.dumps({"read_rows": "0", "written_rows": "0"}),
        }
        reply(self, status, data, headers)

    def _error(self, status: int, code: int, msg: str) -> None:
        text = msg if msg.startswith("Code:") else f"Code: {code}. DB::Exception: {msg}"
        data = (text.rstrip() + "\n").encode()
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(code),
            **({"WWW-Authenticate": 'Basic realm="closeloop"'} if status == 401 else {}),
            **({"Connection": "close"} if self.close_connection else {}),
        }
        reply(self, status, data, headers)


def _hostname(host: str) -> str:
    """``Host`` without its port: ``127.0.0.1:8723`` → ``127.0.0.1``, ``[::1]:80`` → ``::1``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _int(text: str | bytes, base: int) -> int:
    try:
        return int(text, base)
    except ValueError:
        raise Refused(400, 0, f"malformed length {text[:20]!r}") from None


def _decode(body: bytes, encoding: str, cap: int) -> bytes:
    """The body decompressed, never beyond ``cap`` bytes (a small bomb is refused with 413
    before it grows): gzip and deflate as ClickHouse takes them."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise Refused(415, 0, f"unsupported Content-Encoding {encoding!r}; send identity or gzip")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as e:
        raise Refused(400, 0, f"body does not decompress as {encoding}: {e}") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise Refused(413, 0, f"request body decompresses beyond {cap} bytes")
    if not inflater.eof:
        raise Refused(400, 0, f"body is a truncated {encoding} stream")
    return out


def bind_parameters(sql: str, params: dict[str, str]) -> str:
    """Bind ``{name:Type}`` placeholders server-side, as ClickHouse's HTTP interface does:
    the ``param_name`` value is the text form of the value (TSV-escaped), parsed as ``Type``."""

    def literal(m: re.Match[str]) -> str:
        name, typ = m.group(1), m.group(2).strip()
        if name not in params:
            return m.group(0)  # ClickHouse reports the missing parameter itself
        text = params[name]
        if re.fullmatch(r"(?:Nullable\(|LowCardinality\()?(?:String|FixedString\(\d+\))\)?", typ):
            # a bare string arrives TSV-escaped; compound values keep their quoted text form
            text = re.sub(
                r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), text, flags=re.DOTALL
            )
        if typ == "Identifier":
            return "`" + text.replace("\\", "\\\\").replace("`", "\\`") + "`"
        quoted = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return f"CAST({quoted} AS {typ})"

    return _PLACEHOLDER.sub(literal, sql)


def _content_type(fmt: str) -> str:
    f = fmt.lower()
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    if f in ("native", "rowbinary", "rowbinarywithnamesandtypes", "arrow", "parquet"):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


class _Server(Server):
    def __init__(
        self,
        addr: tuple[str, int],
        store: Store,
        credentials: SqlCredentials,
        limits: SqlLimits,
    ) -> None:
        self.store = store
        self.credentials = credentials
        self.limits = limits
        self.reader = ReaderSession(store.dsn[len("chdb://") :], limits, store._lock)
        super().__init__(addr, _Handler)
        # the names this endpoint answers to (any port: a local proxy may sit in front)
        host = self.server_address[0]
        loopback = host in ("127.0.0.1", "::1")
        self.hosts = frozenset({host, "localhost"} if loopback else {host})


class SQLServer:
    """Serve ``store`` (a chDB store) on ``host:port`` in a background thread."""

    def __init__(
        self,
        store: Store,
        credentials: SqlCredentials,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: SqlLimits | None = None,
    ) -> None:
        self._server = _Server((host, port), store, credentials, limits or SqlLimits())
        self.host, self.port = self._server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SQLServer:
        self._server.start("sql-http")
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.reader.close()
