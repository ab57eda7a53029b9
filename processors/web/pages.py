"""The review page's HTML: server-rendered, no JavaScript (the Content-Security-Policy of
:mod:`processors.web.server` forbids scripts, so even an escaping mistake cannot run one).

Every value from the store goes through :func:`h` (conversation text and evidence are
untrusted); only http(s) links from data become links.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

MAX_REVIEWER_CHARS = 200
MAX_COMMENT_CHARS = 4000
_TRACE_ID = re.compile(r"[^A-Za-z0-9_-]")


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


def duration_text(ns: float) -> str:
    """A duration a person reads: ``40 s``, ``12 min``, ``2.5 h``, ``3 d``.

    >>> [duration_text(x) for x in (0, 4e10, 7.2e11, 9e12, 2.6e14)]
    ['<1 s', '40 s', '12 min', '2.5 h', '3 d']
    """
    s = ns / 1e9
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 129600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def trace_link(trace_id: str, template: str) -> str:
    """A trace id as a link to its conversation on this page, plus a link (↗) to the trace in
    the tracing tool of ``web.trace_url`` (``{trace_id}`` placeholder) when one is set."""
    tid = _TRACE_ID.sub("", str(trace_id))[:64]
    out = f'<a class="mono trace" href="/traces/{quote(tid)}">{h(tid)}</a>'
    if template and template.startswith(("http://", "https://")):
        ext = h(template.replace("{trace_id}", quote(tid)))
        out += f' <a class="ext" href="{ext}" title="open in the tracing tool">↗</a>'
    return out


def conv_link(conversation_id: str) -> str:
    """A conversation id as a link to its page."""
    return (
        f'<a class="mono conv" href="/conversations/{quote(str(conversation_id), safe="")}">'
        f"{h(conversation_id)}</a>"
    )


_HEX_TRACE_ID = re.compile(r"\b[0-9a-f]{32}\b")


def link_trace_ids(escaped: str) -> str:
    """Link every 32-hex trace id in already escaped text to its conversation page."""
    return _HEX_TRACE_ID.sub(
        lambda m: f'<a class="mono trace" href="/traces/{m[0]}">{m[0]}</a>', escaped
    )


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
    if "conversation" in key and isinstance(ids, list) and all(isinstance(c, str) for c in ids):
        return " ".join(conv_link(c) for c in ids) or "—"
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
svg.chart{background:#fff;border:1px solid #e2e8f0;border-radius:6px;max-width:100%;height:auto}
.msg{background:#fff;border:1px solid #e2e8f0;border-left:4px solid #94a3b8;border-radius:4px;
padding:.4rem .7rem;margin:.4rem 0}.msg .role{font-weight:600;text-transform:capitalize}
.m-user{border-left-color:#2563eb}.m-assistant{border-left-color:#16a34a}.m-tool{border-left-color:#d97706;
margin-left:1.5rem}.m-system{border-left-color:#64748b}.b-failed,.b-abandoned,.b-errored{background:#fee2e2;
color:#991b1b}.b-succeeded{background:#dcfce7;color:#166534}a.ext{text-decoration:none}
table.tools td{max-width:28rem}tr.controls>td{background:#f8fafc}
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
            f'<tr><td><b><a href="/intents/{quote(i["intent_id"], safe="")}">{h(i["name"])}</a></b> '
            f"{badge(i['status']) if i['status'] != 'active' else ''}"
            f"<div class=muted>{h(i['description'])}</div>{ex}</td>"
            f"<td class=num>{int(i['size'])}</td><td class=num>{i['conversations']}</td>"
            f"<td class=num>{pct(i['failure_rate'])}</td><td>{sparkline(i['series'])}</td>"
            f'<td class="chips">{chips}</td><td class=muted>{hist}</td></tr>'
        )
    b = data["buckets"]
    note = (
        (
            f"Sparklines: {b['count']} buckets of {duration_text(b['width_ns'])} from "
            f"{when(b['from_ns'])}; grey = volume, red = failure rate (0–100%). An intent's name "
            "opens its failure rate over time and its conversations."
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
        f"request)</summary><pre>{link_trace_ids(h(p['body']))}</pre></details>"
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


def _ilink(intent_id: str, text: str) -> str:
    return f'<a href="/intents/{quote(intent_id, safe="")}">{h(text or intent_id)}</a>'


def _control_rows(controls: Sequence[Mapping[str, Any]]) -> str:
    """The control intents of one change, folded: most are "not enough data" and would bury the
    target rows; the summary says how many moved."""
    measured = [c for c in controls if c["verdict"] != "not_enough_data"]
    moved = [c for c in measured if c["verdict"] in ("fixed", "regressed")]
    rows = "".join(
        f"<tr><td>{_ilink(c['intent_id'], c['intent_name'])}</td>{_outcome_cells(c)}</tr>"
        for c in sorted(controls, key=lambda c: (c["verdict"] == "not_enough_data", c["intent_id"]))
    )
    return (
        f'<tr class="controls"><td></td><td colspan="6"><details><summary>{len(controls)} control '
        f"intent{'s' if len(controls) != 1 else ''}: {len(measured)} with enough data, "
        f"{len(moved)} moved</summary><table><thead><tr><th>intent</th><th>verdict</th>"
        "<th>before</th><th>after</th><th>difference (95% CI)</th><th class=num>p-value</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></details></td></tr>"
    )


def render_outcomes(groups: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for g in groups:
        t = g["target"]
        target = _outcome_cells(t) if t else '<td colspan="5" class="muted">no measurement yet</td>'
        rows.append(
            f"<tr><td>{_plink(g['proposal_id'], g['title'])}</td>"
            f"<td><b>{_ilink(g['intent_id'], (t['intent_name'] if t else '') or g['intent_id'])}</b> "
            "<span class=muted>target</span>"
            f"</td>{target}</tr>"
        )
        if g["controls"]:
            rows.append(_control_rows(g["controls"]))
    return page(
        "Outcomes",
        "<h1>Outcomes</h1><p class=muted>Failure rate of the targeted intent before and after "
        "the merged change; the other intents are controls (folded under each change).</p>"
        + _table(
            ["proposal", "intent", "verdict", "before", "after", "difference (95% CI)", "#p-value"],
            rows,
            "No verdicts yet: a change is measured after it is merged.",
        ),
        "/outcomes",
    )


def render_message(title: str, message: str, extra: str = "") -> str:
    return page(title, f"<h1>{h(title)}</h1><p>{h(message)}</p>{extra}")
