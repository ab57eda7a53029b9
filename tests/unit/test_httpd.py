"""The one HTTP server and reply helper (processors/embedded/httpd.py), on a loopback port."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from processors.embedded.httpd import Server, reply


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/not-modified":
            return reply(self, 304, b"", {"ETag": '"x"'})
        reply(self, 200, b"hello", {"Content-Type": "text/plain", "X-Extra": "1"})

    do_HEAD = do_GET


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), _Handler)
    thread = srv.start("test-http")
    assert thread.daemon and srv.daemon_threads
    yield srv
    srv.stop()
    thread.join(5)
    assert not thread.is_alive()


def ask(srv: Server, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_reply_sends_status_headers_length_and_body(server: Server) -> None:
    status, headers, body = ask(server, "GET", "/")
    assert (status, body) == (200, b"hello")
    assert headers["Content-Length"] == "5" and headers["X-Extra"] == "1"


def test_head_gets_the_length_but_no_body(server: Server) -> None:
    # read the raw answer (http.client never reads a body after HEAD, so it could not tell)
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as sock:
        sock.sendall(b"HEAD / HTTP/1.0\r\nHost: x\r\n\r\n")
        raw = b"".join(iter(lambda: sock.recv(4096), b""))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Content-Length: 5" in head
    assert body == b""


def test_not_modified_has_no_content_length(server: Server) -> None:
    status, headers, body = ask(server, "GET", "/not-modified")
    assert (status, body) == (304, b"") and "Content-Length" not in headers
    assert headers["ETag"] == '"x"'
