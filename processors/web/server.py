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
  :func:`processors.review.core.decide` with the backend from ``backend_factory`` — on the local
  backend approving merges the proposal branch — writes the
  :class:`~processors.records.ReviewRecord` and the proposal's new version.

Data functions (:func:`overview`, :func:`intents`, ...) return plain dicts shared by the pages
and the API, so both always show the same thing.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from processors.act.core import ChangeBackend, open_backend
from processors.config import Config
from processors.errors import ActError, CloseloopError, InputError, ReviewError, StoreError
from processors.records import Proposal, ReviewRecord, TagRecord
from processors.review.core import decide, ingest_webhook
from processors.store import Store

log = logging.getLogger("closeloop.web")

TOKEN_FILE = "web-token"
SESSION_MAX_AGE_S = 7 * 24 * 3600
MAX_FORM_BYTES = 64 * 1024
MAX_WEBHOOK_BYTES = 5 * 1024 * 1024  # GitHub caps deliveries at 25 MB; PR events are far smaller
WEBHOOK_PATH = "/webhooks/github"
FEEDBACK_PATH = "/api/feedback"
MAX_REVIEWER_CHARS = 200
MAX_COMMENT_CHARS = 4000
SPARK_BUCKETS = 24
LIST_LIMIT = 500
_ID = r"([A-Za-z0-9._:-]{1,200})"
_TRACE_ID = re.compile(r"[^A-Za-z0-9_-]")
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# -- data: plain dicts for the pages and the API ----------------------------------------------


def _json_field(text: Any) -> Any:
    """A JSON column back as data; text that is not JSON stays text."""
    if not isinstance(text, str) or not text:
        return text or {}
    try:
        return json.loads(text)
    except ValueError:
        return text


def overview(store: Store) -> dict[str, Any]:
    """Headline counts, verdicts of targeted intents, and the proposals waiting for a human."""
    counts = {
        "conversations": store.scalar("SELECT count() FROM conversations FINAL"),
        "intents": store.scalar("SELECT count() FROM intents FINAL WHERE status = 'active'"),
        "open_diagnoses": store.scalar("SELECT count() FROM diagnoses FINAL WHERE status = 'open'"),
        "open_proposals": store.scalar("SELECT count() FROM proposals FINAL WHERE status = 'open'"),
    }
    verdicts = {
        r["verdict"]: int(r["n"])
        for r in store.query(
            "SELECT verdict, count() AS n FROM outcomes FINAL WHERE (proposal_id, intent_id) IN "
            "(SELECT proposal_id, intent_id FROM proposals FINAL) GROUP BY verdict"
        )
    }
    waiting = store.query(
        "SELECT proposal_id, title, intent_id, created_ns FROM proposals FINAL WHERE status = 'open' "
        "ORDER BY created_ns DESC LIMIT 20"
    )
    return {
        "counts": {k: int(v or 0) for k, v in counts.items()},
        "verdicts": verdicts,
        "waiting": waiting,
    }


def intents(store: Store, cfg: Config, buckets: int = SPARK_BUCKETS) -> dict[str, Any]:
    """Intents with size, failure and signal rates, a volume/failure series and their changes.

    Raw examples are withheld from intents smaller than ``understand.min_examples_shown``
    (small clusters can single out a person).
    """
    rows = store.query(
        "SELECT intent_id, name, description, keywords, examples, size, status, parent_id, taxonomy_version, "
        "created_ns, updated_ns FROM intents FINAL ORDER BY size DESC, intent_id LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )
    stats = {
        r["intent_id"]: r
        for r in store.query(
            "SELECT intent_id, count() AS n, sum(failed) AS failures FROM conversation_tags FINAL GROUP BY intent_id"
        )
    }
    signals: dict[str, dict[str, int]] = {}
    for r in store.query(
        "SELECT intent_id, s AS signal, count() AS n FROM conversation_tags FINAL "
        "ARRAY JOIN signals AS s GROUP BY intent_id, signal ORDER BY signal"
    ):
        signals.setdefault(r["intent_id"], {})[r["signal"]] = int(r["n"])
    span = store.query(
        "SELECT min(ts_ns) AS lo, max(ts_ns) AS hi, count() AS n FROM conversation_tags FINAL"
    )[0]
    lo, hi = int(span["lo"] or 0), int(span["hi"] or 0)
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    series: dict[str, list[list[int]]] = {}
    if int(span["n"] or 0):
        for r in store.query(
            "SELECT intent_id, toUInt32(intDiv(ts_ns - {lo:UInt64}, {w:UInt64})) AS b, count() AS n, "
            "sum(failed) AS f FROM conversation_tags FINAL WHERE ts_ns >= {lo:UInt64} GROUP BY intent_id, b",
            {"lo": lo, "w": width},
        ):
            s = series.setdefault(r["intent_id"], [[0, 0] for _ in range(buckets)])
            s[min(int(r["b"]), buckets - 1)] = [int(r["n"]), int(r["f"])]
    changes = store.query(
        "SELECT taxonomy_version, intent_id, change, name, other_id, ts_ns FROM intent_changes FINAL "
        "ORDER BY taxonomy_version DESC, ts_ns DESC, intent_id LIMIT 200"
    )
    by_intent: dict[str, list[dict[str, Any]]] = {}
    for c in changes:
        by_intent.setdefault(c["intent_id"], []).append(c)
    out = []
    for r in rows:
        st = stats.get(r["intent_id"], {})
        n, fails = int(st.get("n", 0)), int(st.get("failures", 0))
        shown = int(r["size"]) >= cfg.understand.min_examples_shown
        out.append(
            {
                **r,
                "examples": list(r["examples"]) if shown else [],
                "examples_withheld": not shown,
                "conversations": n,
                "failures": fails,
                "failure_rate": fails / n if n else 0.0,
                "signal_rates": {k: v / n for k, v in signals.get(r["intent_id"], {}).items()}
                if n
                else {},
                "series": series.get(r["intent_id"], [[0, 0] for _ in range(buckets)]),
                "changes": by_intent.get(r["intent_id"], []),
            }
        )
    return {
        "intents": out,
        "changes": changes,
        "buckets": {"from_ns": lo, "width_ns": width, "count": buckets},
    }


_DIAG_LIST = (
    "diagnosis_id, intent_id, intent_name, rule, summary, confidence, support, failures, failure_rate, "
    "baseline_rate, status, version, updated_ns"
)


def diagnoses(store: Store) -> list[dict[str, Any]]:
    return store.query(
        f"SELECT {_DIAG_LIST} FROM diagnoses FINAL ORDER BY status = 'open' DESC, updated_ns DESC "
        "LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )


def diagnosis(store: Store, diagnosis_id: str) -> dict[str, Any] | None:
    """One diagnosis with component and evidence as data, and the proposals made from it."""
    rows = store.query(
        "SELECT * FROM diagnoses FINAL WHERE diagnosis_id = {d:String}", {"d": diagnosis_id}
    )
    if not rows:
        return None
    d = rows[0]
    d["component"], d["evidence"] = _json_field(d["component"]), _json_field(d["evidence"])
    d["proposals"] = store.query(
        "SELECT proposal_id, title, status FROM proposals FINAL "
        "WHERE diagnosis_id = {d:String} ORDER BY created_ns",
        {"d": diagnosis_id},
    )
    return d


def proposals(store: Store) -> list[dict[str, Any]]:
    """Proposals, the ones awaiting a decision first, with the last decision and who took it."""
    rows = store.query(
        "SELECT proposal_id, diagnosis_id, intent_id, backend, repo, branch, title, files, pr_number, pr_url, "
        "status, version, created_ns, updated_ns FROM proposals FINAL "
        "ORDER BY status = 'open' DESC, updated_ns DESC LIMIT {n:UInt32}",
        {"n": LIST_LIMIT},
    )
    last = {
        r["proposal_id"]: r
        for r in store.query(
            "SELECT proposal_id, argMax(decision, ts_ns) AS decision, argMax(reviewer, ts_ns) AS reviewer, "
            "max(ts_ns) AS decided_ns FROM reviews FINAL GROUP BY proposal_id"
        )
    }
    return [{**r, "last_decision": last.get(r["proposal_id"])} for r in rows]


def proposal(store: Store, proposal_id: str) -> dict[str, Any] | None:
    """One proposal with its reviews (oldest first), its diagnosis summary and its outcome."""
    rows = store.query(
        "SELECT * FROM proposals FINAL WHERE proposal_id = {p:String}", {"p": proposal_id}
    )
    if not rows:
        return None
    p = rows[0]
    p["reviews"] = store.query(
        "SELECT * FROM reviews FINAL WHERE proposal_id = {p:String} ORDER BY ts_ns",
        {"p": proposal_id},
    )
    diag = store.query(
        "SELECT diagnosis_id, intent_name, summary, root_cause, status FROM diagnoses FINAL "
        "WHERE diagnosis_id = {d:String}",
        {"d": p["diagnosis_id"]},
    )
    p["diagnosis"] = diag[0] if diag else None
    p["outcome"] = next(
        iter(
            store.query(
                "SELECT * FROM outcomes FINAL WHERE proposal_id = {p:String} AND intent_id = {i:String}",
                {"p": proposal_id, "i": p["intent_id"]},
            )
        ),
        None,
    )
    return p


def outcomes(store: Store) -> list[dict[str, Any]]:
    """Per proposal: the target intent's outcome and the control intents' outcomes."""
    props = {
        r["proposal_id"]: r
        for r in store.query("SELECT proposal_id, intent_id, title, status FROM proposals FINAL")
    }
    names = {
        r["intent_id"]: r["name"] for r in store.query("SELECT intent_id, name FROM intents FINAL")
    }
    groups: dict[str, dict[str, Any]] = {}
    for o in store.query(
        "SELECT * FROM outcomes FINAL ORDER BY ts_ns DESC, proposal_id, intent_id"
    ):
        p = props.get(o["proposal_id"], {})
        g = groups.setdefault(
            o["proposal_id"],
            {
                "proposal_id": o["proposal_id"],
                "title": p.get("title", ""),
                "intent_id": p.get("intent_id", ""),
                "target": None,
                "controls": [],
            },
        )
        o = {**o, "intent_name": names.get(o["intent_id"], "")}
        if o["intent_id"] == g["intent_id"]:
            g["target"] = o
        else:
            g["controls"].append(o)
    return list(groups.values())


# -- HTML ---------------------------------------------------------------------------------------


def h(value: Any) -> str:
    """HTML-escape anything (conversation text and evidence are untrusted)."""
    return html.escape("" if value is None else str(value), quote=True)


def when(ns: Any) -> str:
    ns = int(ns or 0)
    if not ns:
        return "—"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M UTC")


def pct(x: Any) -> str:
    return f"{float(x or 0):.1%}"


def badge(text: str) -> str:
    return f'<span class="badge b-{h(re.sub(r"[^a-z_]", "", text.lower()))}">{h(text.replace("_", " "))}</span>'


def trace_link(trace_id: str, template: str) -> str:
    """A trace id as a link through ``web.trace_url`` (``{trace_id}`` placeholder), else as code."""
    tid = _TRACE_ID.sub("", str(trace_id))[:64]
    if template and template.startswith(("http://", "https://")):
        return (
            f'<a class="mono" href="{h(template.replace("{trace_id}", quote(tid)))}">{h(tid)}</a>'
        )
    return f"<code>{h(tid)}</code>"


def safe_href(url: str) -> str:
    """Only http(s) links from data (a PR URL) become links."""
    return h(url) if str(url).startswith(("http://", "https://")) else ""


def sparkline(series: Sequence[Sequence[int]], width: int = 144, height: int = 30) -> str:
    """Inline SVG: conversation volume per bucket (grey bars, scaled to the busiest bucket) and
    failure rate (red line, 0–100%, drawn only through buckets that have conversations).

    >>> 'polyline' in sparkline([[2, 1], [4, 0], [0, 0]])
    True
    """
    n = len(series)
    if not n or not any(v for v, _ in series):
        return '<span class="muted">no data</span>'
    top = max(v for v, _ in series)
    slot = width / n
    bars = "".join(
        f'<rect x="{round(i * slot, 1)}" y="{round(height - v / top * height, 1)}" '
        f'width="{round(max(slot - 1, 1), 1)}" height="{round(v / top * height, 1)}"/>'
        for i, (v, _) in enumerate(series)
        if v
    )
    fail = " ".join(
        f"{round((i + 0.5) * slot, 1)},{round((height - 1) - f / v * (height - 2), 1)}"
        for i, (v, f) in enumerate(series)
        if v
    )
    total, fails = sum(v for v, _ in series), sum(f for _, f in series)
    title = f"{total} conversations, {fails} failed; busiest bucket {top}"
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f'<title>{h(title)}</title><g fill="#cbd5e1">{bars}</g>'
        f'<polyline points="{fail}" fill="none" stroke="#dc2626" stroke-width="1.5"/></svg>'
    )


def render_value(value: Any, trace_url: str, key: str = "") -> str:
    """Evidence (any JSON) as readable HTML: dicts as definition lists, trace ids as links."""
    ids = [value] if isinstance(value, str) else value
    if "trace_id" in key and isinstance(ids, list) and all(isinstance(t, str) for t in ids):
        return " ".join(trace_link(t, trace_url) for t in ids) or "—"
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">—</span>'
        items = "".join(
            f"<dt>{h(str(k).replace('_', ' '))}</dt><dd>{render_value(v, trace_url, str(k))}</dd>"
            for k, v in value.items()
        )
        return f"<dl>{items}</dl>"
    if isinstance(value, list):
        if not value:
            return '<span class="muted">none</span>'
        if all(
            isinstance(v, (int, float, bool))
            or (isinstance(v, str) and len(v) < 40 and "\n" not in v)
            for v in value
        ):
            return ", ".join(f"<code>{h(v)}</code>" for v in value)
        return (
            "<ol>" + "".join(f"<li>{render_value(v, trace_url, key)}</li>" for v in value) + "</ol>"
        )
    if isinstance(value, float):
        return h(f"{value:.4g}")
    if isinstance(value, str) and (len(value) > 80 or "\n" in value):
        return f'<pre class="quote">{h(value)}</pre>'
    return h(value)


def render_diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = (
            "meta"
            if line.startswith(("+++", "---", "diff ", "index "))
            else "add"
            if line.startswith("+")
            else "del"
            if line.startswith("-")
            else "hunk"
            if line.startswith("@@")
            else ""
        )
        lines.append(f'<span class="{cls}">{h(line)}</span>' if cls else h(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


_CSS = """
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#0f172a;
background:#f8fafc}header{background:#0f172a;color:#e2e8f0;padding:.6rem 1.2rem;display:flex;gap:1.2rem;
align-items:center}header a{color:#cbd5e1;text-decoration:none}header a.on{color:#fff;font-weight:600}
header .brand{font-weight:700;color:#fff;margin-right:1rem}main{max-width:1200px;margin:0 auto;padding:1rem 1.2rem}
h1{font-size:1.35rem;margin:.4rem 0 1rem}h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e2e8f0}
th,td{text-align:left;padding:.35rem .55rem;border-bottom:1px solid #e2e8f0;vertical-align:top}
th{background:#f1f5f9;font-weight:600;font-size:.85rem}td.num,th.num{text-align:right;white-space:nowrap}
a{color:#1d4ed8}.muted{color:#64748b}.mono,code{font-family:ui-monospace,Menlo,monospace;font-size:.85em}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{color:inherit;text-decoration:none;background:#fff;
border:1px solid #e2e8f0;border-radius:6px;padding:.7rem 1rem;min-width:150px}.card b{display:block;font-size:1.6rem}
.badge{display:inline-block;padding:.05rem .45rem;border-radius:9px;font-size:.78rem;font-weight:600;
background:#e2e8f0;color:#334155;white-space:nowrap}.b-fixed,.b-merged,.b-resolved{background:#dcfce7;color:#166534}
.b-regressed,.b-rejected{background:#fee2e2;color:#991b1b}.b-not_enough_data{background:#fef3c7;color:#92400e}
.b-open,.b-proposed{background:#dbeafe;color:#1e40af}.b-approved{background:#ccfbf1;color:#115e59}
pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #e2e8f0;padding:.6rem;
border-radius:4px;margin:.3rem 0}pre.diff{font:12.5px/1.4 ui-monospace,Menlo,monospace;background:#0b1120;
color:#e2e8f0}.diff .add{color:#86efac;background:#052e16;display:inline-block;width:100%}
.diff .del{color:#fca5a5;background:#450a0a;display:inline-block;width:100%}.diff .hunk{color:#93c5fd}
.diff .meta{color:#94a3b8}pre.quote{background:#f8fafc;font-size:.9em}dl{margin:0;display:grid;
grid-template-columns:max-content 1fr;gap:.2rem .8rem}dt{font-weight:600;color:#475569}dd{margin:0}
.box{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:.8rem 1rem;margin:.6rem 0}
.flash{border-left:4px solid #16a34a}.error{border-left:4px solid #dc2626;color:#991b1b}
form.decide{display:grid;grid-template-columns:max-content 1fr;gap:.5rem .8rem;align-items:center}
form.decide input,form.decide textarea{font:inherit;padding:.3rem .45rem;border:1px solid #94a3b8;border-radius:4px}
button{font:inherit;padding:.35rem .9rem;border-radius:4px;border:1px solid #0f172a;cursor:pointer}
button.approve{background:#15803d;color:#fff;border-color:#15803d}button.reject{background:#fff;color:#b91c1c;
border-color:#b91c1c}.chips span{display:inline-block;margin:0 .3rem .2rem 0;font-size:.8rem;color:#334155}
svg.spark{vertical-align:middle}details summary{cursor:pointer;color:#1d4ed8}
"""

_NAV = (
    ("/", "Overview"),
    ("/intents", "Intents"),
    ("/diagnoses", "Diagnoses"),
    ("/proposals", "Proposals"),
    ("/outcomes", "Outcomes"),
)


def page(title: str, body: str, active: str = "") -> str:
    nav = "".join(
        f'<a href="{href}"{" class=on" if href == active else ""}>{label}</a>'
        for href, label in _NAV
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{h(title)} · closeloop</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>'
        f'<body><header><span class="brand">closeloop</span>{nav}</header><main>{body}</main></body></html>'
    )


def _table(head: Iterable[str], rows: Iterable[str], empty: str) -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="muted">{h(empty)}</p>'
    ths = "".join(
        f'<th class="num">{h(c[1:])}</th>' if c.startswith("#") else f"<th>{h(c)}</th>"
        for c in head
    )
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _plink(pid: str, text: str) -> str:
    return f'<a href="/proposals/{quote(pid)}">{h(text or pid)}</a>'


def _dlink(did: str, text: str) -> str:
    return f'<a href="/diagnoses/{quote(did)}">{h(text or did)}</a>'


def render_overview(data: Mapping[str, Any]) -> str:
    c = data["counts"]
    cards = [
        ("conversations", "/intents", "conversations"),
        ("intents", "/intents", "active intents"),
        ("open_diagnoses", "/diagnoses", "open diagnoses"),
        ("open_proposals", "/proposals", "proposals awaiting review"),
    ]
    body = '<h1>Overview</h1><div class="cards">' + "".join(
        f'<a class="card" href="{href}"><b>{c[k]}</b>{h(label)}</a>' for k, href, label in cards
    )
    verdicts = (
        " ".join(f"{badge(v)} {n}" for v, n in sorted(data["verdicts"].items())) or "none yet"
    )
    body += (
        f'<div class="card"><b>{sum(data["verdicts"].values())}</b>verdicts: {verdicts}</div></div>'
    )
    rows = (
        f"<tr><td>{_plink(p['proposal_id'], p['title'])}</td><td><code>{h(p['intent_id'])}</code></td>"
        f"<td>{when(p['created_ns'])}</td></tr>"
        for p in data["waiting"]
    )
    return page(
        "Overview",
        body
        + "<h2>Awaiting your review</h2>"
        + _table(["proposal", "intent", "proposed"], rows, "Nothing to review."),
        "/",
    )


def render_intents(data: Mapping[str, Any], min_examples: int) -> str:
    rows = []
    for i in data["intents"]:
        chips = "".join(
            f"<span>{h(k.replace('_', ' '))} {pct(v)}</span>" for k, v in i["signal_rates"].items()
        )
        if i["examples_withheld"]:
            ex = f'<span class="muted">examples hidden below {min_examples} conversations</span>'
        elif i["examples"]:
            ex = (
                "<details><summary>examples</summary>"
                + "".join(f'<pre class="quote">{h(x)}</pre>' for x in i["examples"][:5])
                + "</details>"
            )
        else:
            ex = ""
        hist = ", ".join(
            f"{h(c['change'])} v{int(c['taxonomy_version'])}" for c in i["changes"][:4]
        )
        rows.append(
            f"<tr><td><b>{h(i['name'])}</b> {badge(i['status']) if i['status'] != 'active' else ''}"
            f"<div class=muted>{h(i['description'])}</div>{ex}</td>"
            f"<td class=num>{int(i['size'])}</td><td class=num>{i['conversations']}</td>"
            f"<td class=num>{pct(i['failure_rate'])}</td><td>{sparkline(i['series'])}</td>"
            f'<td class="chips">{chips}</td><td class=muted>{hist}</td></tr>'
        )
    b = data["buckets"]
    note = (
        (
            f"Sparklines: {b['count']} buckets of {b['width_ns'] / 3.6e12:.2f} h from {when(b['from_ns'])}; "
            "grey = volume, red = failure rate (0–100%)."
        )
        if b["from_ns"]
        else ""
    )
    changes = (
        f"<tr><td class=num>{int(c['taxonomy_version'])}</td><td>{badge(c['change'])}</td>"
        f"<td>{h(c['name'])} <code>{h(c['intent_id'])}</code></td><td><code>{h(c['other_id'])}</code></td>"
        f"<td>{when(c['ts_ns'])}</td></tr>"
        for c in data["changes"]
    )
    return page(
        "Intents",
        "<h1>Intents</h1>"
        + f'<p class="muted">{h(note)}</p>'
        + _table(
            [
                "intent",
                "#size",
                "#conversations",
                "#failure rate",
                "volume / failures",
                "signals",
                "taxonomy",
            ],
            rows,
            "No intents learned yet.",
        )
        + "<h2>Taxonomy changes</h2>"
        + _table(
            ["#version", "change", "intent", "other", "when"], changes, "No taxonomy changes yet."
        ),
        "/intents",
    )


def render_diagnoses(rows_: Sequence[Mapping[str, Any]]) -> str:
    rows = (
        f"<tr><td>{_dlink(d['diagnosis_id'], d['summary'])}</td><td>{h(d['intent_name'])}</td>"
        f"<td><code>{h(d['rule'])}</code></td><td class=num>{pct(d['failure_rate'])} "
        f"<span class=muted>vs {pct(d['baseline_rate'])}</span></td><td class=num>{int(d['support'])}</td>"
        f"<td>{badge(d['status'])}</td><td>{when(d['updated_ns'])}</td></tr>"
        for d in rows_
    )
    return page(
        "Diagnoses",
        "<h1>Diagnoses</h1>"
        + _table(
            ["summary", "intent", "rule", "#failure rate", "#support", "status", "updated"],
            rows,
            "No diagnoses yet.",
        ),
        "/diagnoses",
    )


def render_diagnosis(d: Mapping[str, Any], trace_url: str) -> str:
    comp = d["component"] if isinstance(d["component"], dict) else {"detail": d["component"]}
    props = "".join(
        f"<li>{_plink(p['proposal_id'], p['title'])} {badge(p['status'])}</li>"
        for p in d["proposals"]
    )
    body = (
        f"<h1>{h(d['summary'])}</h1><p>{badge(d['status'])} <code>{h(d['rule'])}</code> · intent "
        f"<b>{h(d['intent_name'])}</b> <code>{h(d['intent_id'])}</code> · updated {when(d['updated_ns'])}</p>"
        f'<div class="box"><dl><dt>root cause</dt><dd>{h(d["root_cause"])}</dd>'
        f"<dt>component</dt><dd>{render_value(comp, trace_url)}</dd>"
        f"<dt>failure rate</dt><dd>{pct(d['failure_rate'])} ({int(d['failures'])} of {int(d['support'])}) "
        f"vs baseline {pct(d['baseline_rate'])}</dd><dt>confidence</dt><dd>{float(d['confidence']):.2f}</dd>"
        f"<dt>versions</dt><dd>prompt <code>{h(d['prompt_version'] or '—')}</code> agent "
        f"<code>{h(d['agent_version'] or '—')}</code></dd><dt>window</dt><dd>{when(d['window_from_ns'])} → "
        f"{when(d['window_to_ns'])}</dd><dt>traces</dt>"
        f"<dd>{render_value(list(d['trace_ids']), trace_url, 'trace_ids')}</dd></dl></div>"
        f"<h2>Evidence</h2><div class=box>{render_value(d['evidence'], trace_url)}</div>"
        f"<h2>Proposals</h2>" + (f"<ul>{props}</ul>" if props else '<p class="muted">None yet.</p>')
    )
    return page(d["summary"], body, "/diagnoses")


def render_proposals(rows_: Sequence[Mapping[str, Any]]) -> str:
    def decided(p: Mapping[str, Any]) -> str:
        last = p["last_decision"]
        return f"{h(last['decision'])} by {h(last['reviewer'])}" if last else ""

    rows = (
        f"<tr><td>{_plink(p['proposal_id'], p['title'])}</td><td>{badge(p['status'])}</td>"
        f"<td><code>{h(p['intent_id'])}</code></td><td>{h(p['backend'])} <code>{h(p['branch'])}</code></td>"
        f"<td>{decided(p)}</td><td>{when(p['updated_ns'])}</td></tr>"
        for p in rows_
    )
    return page(
        "Proposals",
        "<h1>Proposals</h1>"
        + _table(
            ["proposal", "status", "intent", "where", "decision", "updated"],
            rows,
            "No proposals yet.",
        ),
        "/proposals",
    )


def _review_line(r: Mapping[str, Any]) -> str:
    merged = (
        f" — merged as <code>{h(str(r['merged_commit'])[:12])}</code>" if r["merged_commit"] else ""
    )
    comment = f'<pre class="quote">{h(r["comment"])}</pre>' if r["comment"] else ""
    return (
        f'<div class="box flash decision">{badge(r["decision"])} <b>{h(r["decision"].capitalize())} by '
        f'<span class="reviewer">{h(r["reviewer"])}</span></b> · {when(r["ts_ns"])}{merged}{comment}</div>'
    )


def render_proposal(
    p: Mapping[str, Any], csrf: str, error: str = "", form: Mapping[str, str] | None = None
) -> str:
    form = form or {}
    pid = quote(p["proposal_id"])
    parts = [
        (
            f"<h1>{h(p['title'])}</h1><p>{badge(p['status'])} {h(p['backend'])} · <code>{h(p['repo'])}</code> "
            f"<code>{h(p['branch'])}</code> → <code>{h(p['base'])}</code> · commit "
            f"<code>{h(str(p['commit'])[:12])}</code> · version {int(p['version'])}"
        )
    ]
    if p["pr_url"] and safe_href(p["pr_url"]):
        parts.append(
            f' · <a href="{safe_href(p["pr_url"])}">pull request #{int(p["pr_number"])}</a>'
        )
    parts.append("</p>")
    d = p["diagnosis"]
    if d:
        parts.append(
            f"<p>From diagnosis {_dlink(d['diagnosis_id'], d['summary'])} ({h(d['intent_name'])}): "
            f"{h(d['root_cause'])}</p>"
        )
    parts.append('<div id="decision">' + "".join(_review_line(r) for r in p["reviews"]) + "</div>")
    parts.append(
        f"<h2>Diff</h2><p>{', '.join(f'<code>{h(f)}</code>' for f in p['files']) or '—'}</p>"
        f"{render_diff(p['diff'])}"
    )
    if error:
        parts.append(f'<div class="box error" role="alert">{h(error)}</div>')
    if p["status"] == "open":
        verb = (
            "Approving merges the branch into the base branch of the local repository."
            if p["backend"] == "local"
            else "Approving records your approval on the pull request; "
            "merging stays yours on GitHub."
        )
        parts.append(
            f'<h2>Decision</h2><div class="box"><p class="muted">{h(verb)} Rejecting closes it.</p>'
            f'<form class="decide" method="post" action="/proposals/{pid}/approve">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">'
            f'<label for="reviewer">Your name</label><input id="reviewer" name="reviewer" required '
            f'maxlength="{MAX_REVIEWER_CHARS}" value="{h(form.get("reviewer", ""))}" autocomplete="name">'
            f'<label for="comment">Comment</label><textarea id="comment" name="comment" rows="2" '
            f'maxlength="{MAX_COMMENT_CHARS}">{h(form.get("comment", ""))}</textarea><span></span><span>'
            f'<button class="approve" type="submit">Approve</button> '
            f'<button class="reject" type="submit" formaction="/proposals/{pid}/reject">Reject</button>'
            f"</span></form></div>"
        )
    o = p["outcome"]
    if o:
        parts.append(f"<h2>Outcome</h2><div class=box>{_outcome_cells(o, inline=True)}</div>")
    parts.append(
        f"<h2>Description</h2><details><summary>the proposal's full text (markdown, as on the pull "
        f"request)</summary><pre>{h(p['body'])}</pre></details>"
    )
    return page(p["title"], "".join(parts), "/proposals")


def _outcome_cells(o: Mapping[str, Any], inline: bool = False) -> str:
    diff = float(o["rate_after"]) - float(o["rate_before"])
    cells = [
        badge(o["verdict"]),
        (
            f"{pct(o['rate_before'])} <span class=muted>({int(o['before_failures'])}/{int(o['before_n'])}, "
            f"<code>{h(o['before_version'] or '—')}</code>)</span>"
        ),
        (
            f"{pct(o['rate_after'])} <span class=muted>({int(o['after_failures'])}/{int(o['after_n'])}, "
            f"<code>{h(o['after_version'] or '—')}</code>)</span>"
        ),
        f"{diff:+.1%} <span class=muted>[{float(o['diff_low']):+.1%}, {float(o['diff_high']):+.1%}]</span>",
        f"{float(o['p_value']):.3g}",
    ]
    if inline:
        labels = ["verdict", "before", "after", "difference (95% CI)", "p-value"]
        return (
            "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in zip(labels, cells)) + "</dl>"
        )
    return "".join(f"<td{' class=num' if i == 4 else ''}>{c}</td>" for i, c in enumerate(cells))


def render_outcomes(groups: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for g in groups:
        t = g["target"]
        target = _outcome_cells(t) if t else '<td colspan="5" class="muted">no measurement yet</td>'
        rows.append(
            f"<tr><td>{_plink(g['proposal_id'], g['title'])}</td>"
            f"<td><b>{h(t['intent_name'] if t else '') or h(g['intent_id'])}</b> "
            "<span class=muted>target</span>"
            f"</td>{target}</tr>"
        )
        rows.extend(
            f"<tr class=muted><td></td><td>{h(c['intent_name'] or c['intent_id'])} control</td>"
            f"{_outcome_cells(c)}</tr>"
            for c in g["controls"]
        )
    return page(
        "Outcomes",
        "<h1>Outcomes</h1><p class=muted>Failure rate of the targeted intent before and after "
        "the merged change; the other intents are controls.</p>"
        + _table(
            ["proposal", "intent", "verdict", "before", "after", "difference (95% CI)", "#p-value"],
            rows,
            "No verdicts yet: a change is measured after it is merged.",
        ),
        "/outcomes",
    )


def render_message(title: str, message: str, extra: str = "") -> str:
    return page(title, f"<h1>{h(title)}</h1><p>{h(message)}</p>{extra}")


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
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

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
        m = re.fullmatch(r"/proposals/" + _ID, unquote(path))
        if m and (p := proposal(store, m.group(1))) is not None:
            return self._html(200, render_proposal(p, app.csrf_token(session)))
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
        m = re.fullmatch(r"/api/(diagnoses|proposals)/" + _ID, unquote(path))
        one = m and (diagnosis if m.group(1) == "diagnoses" else proposal)(store, m.group(2))
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
        status, error = self.app.decide(
            pid, decision, form.get("reviewer", ""), form.get("comment", "")
        )
        if not error:
            return self._redirect(f"/proposals/{quote(pid)}#decision")
        p = proposal(self.app.store, pid)
        if p is None:
            return self._html(404, render_message("Not found", error))
        self._html(status, render_proposal(p, self.app.csrf_token(session), error, form))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

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
        self._key = secrets.token_bytes(32)  # signs sessions; a restart logs everyone out
        self._decide_lock = (
            threading.Lock()
        )  # one decision at a time: status read and write stay consistent
        self._server = _HTTPServer(
            (cfg.web.host if host is None else host, cfg.web.port if port is None else port), self
        )
        self.host, self.port = self._server.server_address[:2]
        self.cookie_name = f"closeloop_session_{self.port}"  # cookies ignore ports: one per server
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="web-http", daemon=True
        )

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
        self._thread.start()
        log.info("review page on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

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
