"""Layer 5's face: the review web page and its JSON API, served by the store owner.

Server-rendered HTML (stdlib :class:`~http.server.ThreadingHTTPServer`, no JavaScript at all:
the Content-Security-Policy forbids scripts, so even an escaping mistake cannot run one).

* Auth: one local token (``web.token``, else generated at start into ``<home>/run/web-token``,
  mode 0600). ``GET /login?token=...`` sets a signed HttpOnly, SameSite=Strict session cookie;
  scripts use ``Authorization: Bearer <token>``.
* Forms: every POST needs the session cookie, a CSRF field (HMAC of the session, compared in
  constant time) and a same-origin ``Origin`` (or ``Referer``). GET never changes state.
* ``POST /api/feedback`` (``Authorization: Bearer <token>``, JSON ``{"conversation_id", "score"
  | "label", "comment", "name"}``) records late feedback: the conversation's tags are
  re-versioned (:func:`processors.feedback.record_feedback`) and sent to ``publish_tags``.
* A decision (approve / reject) is the only other state change, and only a named human takes it:
  :func:`processors.review.loop.decide` with the backend from ``backend_factory`` — on the local
  backend approving merges the proposal branch — writes the
  :class:`~processors.records.ReviewRecord` and the proposal's new version.

The data comes from :mod:`processors.web.queries` (plain dicts shared by the pages and the
API), the HTML from :mod:`processors.web.pages`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from processors.act import ChangeBackend, open_backend
from processors.config import Config
from processors.embedded.httpd import HEALTH_PATH, Server, reply
from processors.errors import ActError, CloseloopError, InputError, ReviewError, StoreError
from processors.records import Proposal, ReviewRecord, TagRecord
from processors.review.loop import decide, ingest_webhook
from processors.store import Store
from processors.web.drilldown import render_conversation, render_intent
from processors.web.pages import (
    MAX_COMMENT_CHARS,
    MAX_REVIEWER_CHARS,
    render_diagnoses,
    render_diagnosis,
    render_intents,
    render_message,
    render_outcomes,
    render_overview,
    render_proposal,
    render_proposals,
)
from processors.web.queries import (
    conversation,
    conversation_of_trace,
    diagnoses,
    diagnosis,
    intent_detail,
    intents,
    outcomes,
    overview,
    proposal,
    proposals,
)

log = logging.getLogger("closeloop.web")

TOKEN_FILE = "web-token"
SESSION_MAX_AGE_S = 7 * 24 * 3600
MAX_FORM_BYTES = 64 * 1024
MAX_WEBHOOK_BYTES = 5 * 1024 * 1024  # GitHub caps deliveries at 25 MB; PR events are far smaller
WEBHOOK_PATH = "/webhooks/github"
FEEDBACK_PATH = "/api/feedback"
_ID = r"([A-Za-z0-9._:-]{1,200})"
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CSP,
}


# -- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "closeloop-web"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web: " + format, *args)

    @property
    def app(self) -> WebServer:
        return self.server.app

    # -- responses ------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None
    ) -> None:
        reply(self, status, body, {"Content-Type": ctype, **SECURITY_HEADERS, **(headers or {})})

    def _html(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, text.encode(), "text/html; charset=utf-8", headers)

    def _json(self, status: int, data: Any) -> None:
        self._send(
            status, json.dumps(data, ensure_ascii=False, default=str).encode(), "application/json"
        )

    def _redirect(self, location: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(303, b"", "text/plain", {"Location": location, **(headers or {})})

    # -- auth -----------------------------------------------------------------------------
    def _session(self) -> str | None:
        raw = self.headers.get("Cookie", "")
        for part in raw.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.app.cookie_name:
                return self.app.check_session(value)
        return None

    def _bearer(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and hmac.compare_digest(
            auth[7:].strip().encode(), self.app.token.encode()
        )

    def _same_origin(self) -> bool:
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin") or self.headers.get("Referer") or ""
        u = urlsplit(origin)
        return bool(host) and u.scheme == "http" and u.netloc == host

    def _unauthorized(self, api: bool) -> None:
        if api:
            self._send(
                401,
                json.dumps({"error": "unauthorized: send Authorization: Bearer <token>"}).encode(),
                "application/json",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        self._html(
            401,
            render_message(
                "Login needed",
                (
                    f"This page needs the closeloop web token. Open the login URL printed by `closeloop up`, "
                    f"or visit /login?token=<token> with the token from {self.app.token_hint}."
                ),
            ),
        )

    def _feedback(self) -> None:
        """Late feedback from a script or another service (a bearer token, no session)."""
        from processors.feedback import record_feedback
        from processors.redact import Redactor
        from processors.understand.feedback import feedback_evaluation

        if not self._bearer():
            return self._unauthorized(api=True)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            return self._json(413, {"error": f"the body must be at most {MAX_FORM_BYTES} bytes"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise InputError("the body must be a JSON object")
            cid = body.get("conversation_id")
            if not isinstance(cid, str) or not cid:
                raise InputError("conversation_id (a string) is missing")
            cfg = self.app.cfg
            ev = feedback_evaluation(
                score=body.get("score"),
                label=body.get("label"),
                comment=body.get("comment"),
                name=body.get("name"),
                redactor=Redactor(cfg.capture.redact, cfg.capture.extra_patterns),
                now_ns=time.time_ns(),
            )
            tag = record_feedback(self.app.store, cfg, cid, ev, self.app.publish_tags)
        except ValueError:
            return self._json(400, {"error": "the body is not JSON"})
        except InputError as e:
            return self._json(
                404 if "no tagged conversation" in e.reason else 400, {"error": e.reason}
            )
        except (StoreError, CloseloopError) as e:
            return self._json(503, {"error": f"not recorded, retry: {e}"})
        self._json(
            200,
            {
                "conversation_id": cid,
                "outcome": tag.outcome,
                "failed": tag.failed,
                "version": tag.conversation_version,
            },
        )

    # -- GET ------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path == "/login":
            return self._login(parse_qs(url.query).get("token", [""])[0])
        if path == HEALTH_PATH:  # a liveness probe: no credential, nothing of the store
            return self._json(200, {"status": "serving"})
        api = path.startswith("/api/")
        session = self._session()
        if session is None and not self._bearer():
            return self._unauthorized(api)
        try:
            if api:
                return self._api(path)
            return self._page(path, session or "")
        except StoreError as e:
            log.warning("web: %s failed: %s", path, e)
            if api:
                return self._json(500, {"error": str(e)})
            return self._html(500, render_message("The store failed", str(e)))

    def _login(self, token: str) -> None:
        if not token or not hmac.compare_digest(token.encode(), self.app.token.encode()):
            return self._html(
                401,
                render_message(
                    "Wrong token",
                    (f"That token is not this server's. Use the one from {self.app.token_hint}."),
                ),
            )
        cookie = (
            f"{self.app.cookie_name}={self.app.new_session()}; Path=/; HttpOnly; SameSite=Strict; "
            f"Max-Age={SESSION_MAX_AGE_S}"
        )
        self._redirect("/", {"Set-Cookie": cookie})

    def _page(self, path: str, session: str) -> None:
        app, store = self.app, self.app.store
        if path == "/":
            return self._html(200, render_overview(overview(store)))
        if path == "/intents":
            return self._html(
                200, render_intents(intents(store, app.cfg), app.cfg.understand.min_examples_shown)
            )
        if path == "/diagnoses":
            return self._html(200, render_diagnoses(diagnoses(store)))
        if path == "/proposals":
            return self._html(200, render_proposals(proposals(store)))
        if path == "/outcomes":
            return self._html(200, render_outcomes(outcomes(store)))
        m = re.fullmatch(r"/diagnoses/" + _ID, unquote(path))
        if m and (d := diagnosis(store, m.group(1))) is not None:
            return self._html(200, render_diagnosis(d, app.cfg.web.trace_url))
        m = re.fullmatch(r"/conversations/" + _ID, unquote(path))
        if m and (c := conversation(store, m.group(1))) is not None:
            return self._html(200, render_conversation(c, app.cfg.web.trace_url))
        m = re.fullmatch(r"/traces/" + _ID, unquote(path))
        if m and (cid := conversation_of_trace(store, m.group(1))) is not None:
            return self._redirect(f"/conversations/{quote(cid, safe='')}")
        if m:
            return self._html(
                404,
                render_message(
                    "Not captured",
                    f"No stored conversation holds trace {m.group(1)}: it was not captured here, "
                    "or its spans have not been processed yet.",
                ),
            )
        m = re.fullmatch(r"/intents/" + _ID, unquote(path))
        if m and (i := intent_detail(store, m.group(1))) is not None:
            return self._html(200, render_intent(i))
        m = re.fullmatch(r"/proposals/" + _ID, unquote(path))
        if m and (p := proposal(store, m.group(1))) is not None:
            return self._html(
                200, render_proposal(p, app.csrf_token(session), reviewer=app.reviewer)
            )
        self._html(404, render_message("Not found", f"Nothing at {path}."))

    def _api(self, path: str) -> None:
        store = self.app.store
        lists: dict[str, Callable[[], Any]] = {
            "/api/overview": lambda: overview(store),
            "/api/intents": lambda: intents(store, self.app.cfg),
            "/api/diagnoses": lambda: {"diagnoses": diagnoses(store)},
            "/api/proposals": lambda: {"proposals": proposals(store)},
            "/api/outcomes": lambda: {"outcomes": outcomes(store)},
        }
        if path in lists:
            return self._json(200, lists[path]())
        m = re.fullmatch(r"/api/(diagnoses|proposals|conversations|intents)/" + _ID, unquote(path))
        one = m and {
            "diagnoses": diagnosis,
            "proposals": proposal,
            "conversations": conversation,
            "intents": intent_detail,
        }[m.group(1)](store, m.group(2))
        if one:
            return self._json(200, one)
        self._json(404, {"error": f"nothing at {path}"})

    # -- POST -----------------------------------------------------------------------------
    def _github_webhook(self) -> None:
        """GitHub deliveries: authenticated by their HMAC signature, not by the session."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_WEBHOOK_BYTES:
            return self._json(413, {"error": f"body must be at most {MAX_WEBHOOK_BYTES} bytes"})
        body = self.rfile.read(length)
        try:
            records = ingest_webhook(
                self.app.store,
                dict(self.headers.items()),
                body,
                self.app.cfg.review.webhook_secret,
                time.time_ns(),
            )
        except ReviewError as e:
            return self._json(401, {"error": str(e)})
        except StoreError as e:
            return self._json(503, {"error": f"not recorded, redeliver: {e}"})
        self._json(200, {"recorded": [r.decision for r in records]})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == WEBHOOK_PATH:
            return self._github_webhook()
        if path == FEEDBACK_PATH:
            return self._feedback()
        session = self._session()
        if session is None:
            return self._unauthorized(api=False)
        if not self._same_origin():
            return self._html(
                403, render_message("Refused", "Cross-origin form posts are refused.")
            )
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_FORM_BYTES:
            return self._html(413, render_message("Refused", "The form is too large."))
        form = {
            k: v[0]
            for k, v in parse_qs(
                self.rfile.read(length).decode("utf-8", "replace"), keep_blank_values=True
            ).items()
        }
        if not hmac.compare_digest(
            form.get("csrf", "").encode(), self.app.csrf_token(session).encode()
        ):
            return self._html(
                403,
                render_message(
                    "Refused",
                    "The form's CSRF token is missing or stale; reload the page and try again.",
                ),
            )
        m = re.fullmatch(r"/proposals/" + _ID + r"/(approve|reject)", unquote(path))
        if not m:
            return self._html(404, render_message("Not found", f"Nothing to post to at {path}."))
        pid, decision = m.group(1), m.group(2)
        # the decision is the authenticated identity's (web.reviewer), never a name in the form
        status, error = self.app.decide(pid, decision, self.app.reviewer, form.get("comment", ""))
        if not error:
            return self._redirect(f"/proposals/{quote(pid)}#decision")
        p = proposal(self.app.store, pid)
        if p is None:
            return self._html(404, render_message("Not found", error))
        csrf = self.app.csrf_token(session)
        self._html(status, render_proposal(p, csrf, error, form, reviewer=self.app.reviewer))


class _HTTPServer(Server):
    def __init__(self, addr: tuple[str, int], app: WebServer) -> None:
        self.app = app
        super().__init__(addr, _Handler)


class WebServer:
    """The review page on ``host:port`` (``web.host``/``web.port``; port 0 picks a free one).

    ``backend_factory`` gives the change backend a decision goes through (default: the
    configured one, :func:`processors.act.open_backend`); ``on_decision`` is called with each
    recorded review and the proposal's new version (e.g. to publish them on ``closeloop.reviews``).
    """

    def __init__(
        self,
        cfg: Config,
        store: Store,
        backend_factory: Callable[[], ChangeBackend] | None = None,
        host: str | None = None,
        port: int | None = None,
        *,
        on_decision: Callable[[ReviewRecord, Proposal], None] | None = None,
        publish_tags: Callable[[TagRecord], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.backend_factory = backend_factory or (lambda: open_backend(cfg))
        self.on_decision = on_decision
        self.publish_tags = publish_tags
        self.token = cfg.web.token
        self.reviewer = cfg.web.resolved_reviewer()  # whoever holds the token decides as this
        self._key = secrets.token_bytes(32)  # signs sessions; a restart logs everyone out
        self._decide_lock = (
            threading.Lock()
        )  # one decision at a time: status read and write stay consistent
        self._server = _HTTPServer(
            (cfg.web.host if host is None else host, cfg.web.port if port is None else port), self
        )
        self.host, self.port = self._server.server_address[:2]
        self.cookie_name = f"closeloop_session_{self.port}"  # cookies ignore ports: one per server

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def login_url(self) -> str:
        return f"{self.url}/login?token={quote(self.token)}"

    @property
    def token_path(self) -> Path:
        return self.cfg.run_dir() / TOKEN_FILE

    @property
    def token_hint(self) -> str:
        return (
            str(self.token_path)
            if not self.cfg.web.token
            else "web.token (closeloop.yaml or CLOSELOOP_WEB_TOKEN)"
        )

    def start(self) -> WebServer:
        if not self.token:
            self.token = secrets.token_urlsafe(24)
            write_token(self.token_path, self.token)
        self._server.start("web-http")
        log.info("review page on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.stop()

    # -- sessions -----------------------------------------------------------------------------
    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def new_session(self, now_s: int | None = None) -> str:
        sid = f"{int(time.time() if now_s is None else now_s)}.{secrets.token_urlsafe(18)}"
        return f"{sid}.{self._sign('session', sid)}"

    def check_session(self, cookie: str, now_s: float | None = None) -> str | None:
        """The session id of a valid, unexpired cookie value, else ``None``."""
        sid, _, sig = cookie.rpartition(".")
        if not sid or not hmac.compare_digest(sig.encode(), self._sign("session", sid).encode()):
            return None
        issued = int(sid.split(".", 1)[0])
        return (
            sid if (time.time() if now_s is None else now_s) - issued < SESSION_MAX_AGE_S else None
        )

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf", session)

    # -- decisions ------------------------------------------------------------------------------
    def decide(
        self, proposal_id: str, decision: str, reviewer: str, comment: str
    ) -> tuple[int, str]:
        """``(status, error)``: a decision taken (``error`` empty) or why not (nothing written)."""
        if len(reviewer) > MAX_REVIEWER_CHARS or len(comment) > MAX_COMMENT_CHARS:
            return (
                400,
                f"name or comment too long (max {MAX_REVIEWER_CHARS} / {MAX_COMMENT_CHARS} characters)",
            )
        with self._decide_lock:
            try:
                backend = self.backend_factory()
            except CloseloopError as e:
                return 503, f"the change backend is not available: {e}"
            try:
                record, updated = decide(
                    self.store,
                    backend,
                    proposal_id,
                    decision,
                    reviewer,
                    comment,
                    time.time_ns(),
                    cfg=self.cfg,
                )
            except (ReviewError, ActError) as e:
                return 400, str(e)
            except StoreError as e:
                return 500, f"the decision could not be recorded: {e}"
        log.info("web: %s %s by %s", proposal_id, record.decision, record.reviewer)
        if self.on_decision is not None:
            try:
                self.on_decision(record, updated)
            except (
                Exception
            ):  # the decision is recorded in the store; a missed notification is only logged
                log.exception("web: on_decision failed for %s", proposal_id)
        return 200, ""


def write_token(path: Path, token: str) -> None:
    """Write the token readable by its owner only (0600), replacing any earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
