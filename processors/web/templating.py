"""The review page's template environment: Jinja2 with autoescaping on for every template.

Every value from the store is untrusted (conversation text, evidence): autoescaping escapes it
wherever it lands; only :data:`Markup` built here or by a template is emitted as is. Autoescape
does not make a ``javascript:`` URL harmless, so a link from data goes through
:func:`http_url` (only ``http(s)://`` survives) and an id in a path through :func:`url_part`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

MAX_SHOWN_CHARS = 20_000  # one message or tool result; longer text is cut (the API has it whole)
_TRACE_ID = re.compile(r"[^A-Za-z0-9_-]")
_HEX_TRACE_ID = re.compile(r"\b[0-9a-f]{32}\b")


def when(ns: Any) -> str:
    ns = int(ns or 0)
    if not ns:
        return "—"
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M UTC")


def pct(x: Any) -> str:
    return f"{float(x or 0):.1%}"


def signed_pct(x: Any) -> str:
    return f"{float(x or 0):+.1%}"


def short(value: Any) -> bool:
    """Shown inline in a list of evidence (a number, a flag, a short one-line string)."""
    return isinstance(value, (int, float, bool)) or (
        isinstance(value, str) and len(value) < 40 and "\n" not in value
    )


def strings(value: Any) -> bool:
    """A list of strings (ids in evidence)."""
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


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


def url_part(value: Any) -> str:
    """An id as one path segment (``/`` and everything else reserved is percent-encoded)."""
    return quote(str(value), safe="")


def trace_id(value: Any) -> str:
    """A trace id reduced to the characters trace ids have (it goes into two URLs)."""
    return _TRACE_ID.sub("", str(value))[:64]


def http_url(url: Any) -> str:
    """``url`` if it is an http(s) URL, else ``""``: only those links from data become links.

    >>> [http_url(u) for u in ("https://x.example/1", "javascript:alert(1)", " http://a")]
    ['https://x.example/1', '', '']
    """
    url = str(url or "")
    return url if url.startswith(("http://", "https://")) else ""


def trace_tool_url(template: str, tid: str) -> str:
    """The trace in the tracing tool of ``web.trace_url`` (``{trace_id}`` placeholder), if set."""
    return http_url(template).replace("{trace_id}", quote(trace_id(tid)))


def link_trace_ids(text: Any) -> Markup:
    """Untrusted text, escaped, with every 32-hex trace id a link to its conversation page."""
    link = Markup('<a class="mono trace" href="/traces/{0}">{0}</a>')
    return Markup(_HEX_TRACE_ID.sub(lambda m: link.format(m[0]), str(escape(text))))


def shown(value: Any) -> str:
    """Untrusted text as shown in a pre block: JSON pretty-printed, cut at MAX_SHOWN_CHARS."""
    s = "" if value is None else str(value)
    try:
        parsed = json.loads(s) if s[:1] in "{[" else None
    except ValueError:
        parsed = None
    if parsed is not None:
        s = json.dumps(parsed, indent=2, ensure_ascii=False)
    cut = f"\n… ({len(s) - MAX_SHOWN_CHARS} more characters)" if len(s) > MAX_SHOWN_CHARS else ""
    return s[:MAX_SHOWN_CHARS] + cut


def badge_class(text: Any) -> str:
    return re.sub(r"[^a-z_]", "", str(text).lower())


def diff_class(line: str) -> str:
    if line.startswith(("+++", "---", "diff ", "index ")):
        return "meta"
    if line.startswith("+"):
        return "add"
    if line.startswith("-"):
        return "del"
    return "hunk" if line.startswith("@@") else ""


env = Environment(
    loader=PackageLoader("processors.web", "templates"),
    autoescape=True,  # every template, .html and .svg alike
    undefined=StrictUndefined,  # a misspelt field fails the page test instead of rendering ""
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=lambda v: "" if v is None else v,  # None prints as nothing, not "None"
)
env.filters.update(
    when=when,
    pct=pct,
    signed_pct=signed_pct,
    duration=duration_text,
    url_part=url_part,
    trace_id=trace_id,
    http_url=http_url,
    link_trace_ids=link_trace_ids,
    shown=shown,
    badge_class=badge_class,
    diff_class=diff_class,
)
env.tests.update(short=short, strings=strings)
env.globals.update(trace_tool_url=trace_tool_url)


def render(name: str, **context: Any) -> Markup:
    """Template ``name`` rendered with ``context`` (markup: safe to embed in another page)."""
    return Markup(env.get_template(name).render(**context))
