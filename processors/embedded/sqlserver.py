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

It listens on loopback only: it is a local window onto a local store, not a server.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

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
MAX_BODY = 512 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # the worker's log carries errors; per-request lines would drown it

    def do_GET(self) -> None:
        u = urlparse(self.path)
        if u.path in ("/ping", "/replicas_status"):
            self._send(200, b"Ok.\n", "text/plain; charset=UTF-8")
            return
        self._run(parse_qs(u.query, keep_blank_values=True), b"")

    def do_POST(self) -> None:
        u = urlparse(self.path)
        try:
            body = self._read_body()
        except ValueError as e:
            self._error(413, 0, str(e))
            return
        enc = (self.headers.get("Content-Encoding") or "").lower()
        try:
            if enc == "gzip":
                body = gzip.decompress(body)
            elif enc == "deflate":
                body = zlib.decompress(body)
            elif enc not in ("", "identity"):
                self._error(415, 0, f"unsupported Content-Encoding {enc!r}; send identity or gzip")
                return
        except (OSError, zlib.error) as e:
            self._error(400, 0, f"body does not decompress as {enc}: {e}")
            return
        self._run(parse_qs(u.query, keep_blank_values=True), body)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError(f"request body exceeds {MAX_BODY} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError(f"request body of {length} bytes exceeds {MAX_BODY}")
        return self.rfile.read(length) if length else b""

    def _run(self, qs: dict[str, list[str]], body: bytes) -> None:
        store = self.server.store
        query = (qs.get("query") or [""])[0]
        params = {k[len("param_") :]: v[0] for k, v in qs.items() if k.startswith("param_")}
        fmt = (qs.get("default_format") or ["TabSeparated"])[0]
        qid = (qs.get("query_id") or [uuid.uuid4().hex])[0]
        if not query and body[:6].upper() == b"INSERT":
            # clickhouse-connect sends "INSERT ... FORMAT F\n<data>" as one body
            head, _, rest = body.partition(b"\n")
            query, body = head.decode("utf-8", "replace"), rest
        try:
            if query and body and (m := _INSERT.match(query)):
                cols = [
                    c.strip().strip('`"') for c in (m.group("cols") or "").split(",") if c.strip()
                ]
                with store._lock:
                    store.client.raw_insert(
                        m.group("table").strip('`"'),
                        cols or None,
                        insert_block=body,
                        fmt=m.group("fmt"),
                    )
                self._send(200, b"", "text/plain; charset=UTF-8", qid)
                return
            sql = (
                (query + ("\n" + body.decode() if body else "")).strip() if query else body.decode()
            )
            if not sql.strip():
                self._error(400, 62, "Empty query")
                return
            out_fmt, ask_fmt = fmt, fmt
            if (m2 := _FORMAT.search(sql)) is not None:  # the query's own FORMAT clause wins
                out_fmt, ask_fmt = m2.group(0).split()[1].rstrip(";"), None
            if params:
                sql = bind_parameters(sql, params)
            with store._lock:
                data = store.client.raw_query(sql, fmt=ask_fmt)
            self._send(200, data, _content_type(out_fmt), qid, out_fmt)
        except (
            Exception
        ) as e:  # every ClickHouse error is reported to the client, the server stays up
            msg = str(e)
            code = int(m3.group(1)) if (m3 := _CODE.search(msg)) else 0
            self._error(500, code, msg)

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
        }
        reply(self, status, data, headers)


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
    def __init__(self, addr: tuple[str, int], store: Store) -> None:
        self.store = store
        super().__init__(addr, _Handler)


class SQLServer:
    """Serve ``store`` on ``host:port`` in a background thread."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), store)
        self.host, self.port = self._server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SQLServer:
        self._server.start("sql-http")
        return self

    def stop(self) -> None:
        self._server.stop()
