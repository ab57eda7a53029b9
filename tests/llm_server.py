"""A tiny OpenAI-compatible HTTP server for tests (loopback only, one thread).

Each test decides what the "model" answers and inspects what it was sent::

    def responder(body: dict) -> str | tuple[int, dict]:
        return '{"tags": []}'                   # the assistant message content
        # or (500, {"error": {"message": "boom"}}) for a raw HTTP status and JSON body

    with FakeLLMServer(responder) as srv:
        cfg = LLMConfig(base_url=srv.base_url, max_retries=0)
        ...
        srv.requests    # [Received(path="/v1/chat/completions", body={...}), ...]

A slow or failing model: ``latency_s`` (every chat answer waits this long, or until the
server stops) and ``error_rate`` (that share of chat requests, drawn with ``seed``, answer
HTTP 500)::

    with FakeLLMServer(responder, latency_s=20.0, error_rate=0.3) as srv: ...

Endpoints: ``POST /v1/chat/completions`` (answered by ``responder``) and
``POST /v1/embeddings`` (answered by ``embedder(texts) -> list[vector]``; by default
a deterministic 8-dimension vector per text, a hash of the text).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Responder = Callable[[dict[str, Any]], "str | tuple[int, dict[str, Any]]"]
Embedder = Callable[[list[str]], list[list[float]]]


@dataclass
class Received:
    path: str
    body: dict[str, Any]

    def text(self) -> str:
        """All message contents of a chat request, joined (for asserting what was sent)."""
        return "\n".join(str(m.get("content", "")) for m in self.body.get("messages", []))


def hash_embedder(texts: list[str]) -> list[list[float]]:
    """Deterministic stand-in vectors: equal texts get equal vectors."""
    return [[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in texts]


def chat_completion(content: str, model: str = "fake") -> dict[str, Any]:
    """The JSON body of a chat completion whose only choice says ``content``."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class FakeLLMServer:
    """Serve ``responder`` / ``embedder`` on ``127.0.0.1:<free port>`` while in the ``with`` block."""

    def __init__(
        self,
        responder: Responder,
        embedder: Embedder = hash_embedder,
        *,
        latency_s: float = 0.0,
        error_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.responder = responder
        self.embedder = embedder
        self.latency_s = latency_s
        self.error_rate = error_rate
        self.requests: list[Received] = []
        self.answered = 0  # chat requests answered 200 (after their latency)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # a short poll interval: shutdown() waits for it, and tests start many servers
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def chat_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()  # sleeping answers end now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(Received(path, body))
            fail = self._rng.random() < self.error_rate
        if path.endswith("/chat/completions"):
            if self.latency_s and self._stopping.wait(self.latency_s):
                return 503, {"error": {"message": "server stopping"}}
            if fail:
                return 500, {"error": {"message": "injected failure"}}
            out = self.responder(body)
            if isinstance(out, tuple):
                return out
            with self._lock:
                self.answered += 1
            return 200, chat_completion(out, body.get("model", "fake"))
        if path.endswith("/embeddings"):
            inp = body.get("input", [])
            texts = [inp] if isinstance(inp, str) else list(inp)
            data = [
                {"object": "embedding", "index": i, "embedding": v}
                for i, v in enumerate(self.embedder(texts))
            ]
            return 200, {
                "object": "list",
                "data": data,
                "model": body.get("model", "fake"),
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        return 404, {"error": {"message": f"no route {path}"}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    status, out = 400, {"error": {"message": "body is not JSON"}}
                else:
                    status, out = server._answer(self.path, body)
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # the client may have given up waiting (its timeout): nothing to answer then
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass  # keep test output clean

        return Handler
