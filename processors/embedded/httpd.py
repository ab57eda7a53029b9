"""The one way closeloop serves HTTP: a threaded stdlib server and a reply helper.

Used by the OTLP gateway, the review page, the embedded SQL server and the embedded S3 server,
so each of them only says what its answers hold.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# GET answers 200 while the process serves, no credential, nothing of the store (the gateway and
# the review page; the embedded supervisor restarts one that stops answering it)
HEALTH_PATH = "/healthz"


class Server(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` that does not keep the process alive (daemon request
    threads) and queues a burst of new connections instead of resetting them (the default
    backlog of 5 is too short when a client opens a pool of connections at once)."""

    daemon_threads = True
    request_queue_size = 128

    def start(self, name: str) -> threading.Thread:
        """Serve in a daemon thread called ``name``."""
        thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving and release the port."""
        self.shutdown()
        self.server_close()


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    length: int | None = None,
) -> None:
    """Send one whole response: status, ``headers``, ``Content-Length`` (``length`` when the
    body is not ``body``, e.g. the size of an object a HEAD describes; none on a 304) and the
    body, which a HEAD request does not get."""
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    if status != 304:
        handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    if body and handler.command != "HEAD":
        handler.wfile.write(body)
