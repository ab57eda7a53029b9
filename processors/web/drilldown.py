"""The pages behind the review page's links: one conversation, one intent.

A conversation is shown as stored (capture redacted it before storage): its transcript with
the tool calls' arguments and results, errors, model calls with latency and tokens, and its
outcome as the understand layer tagged it (templates ``conversation.html`` and ``intent.html``,
autoescaped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from processors.web.charts import failure_rate_chart
from processors.web.templating import render


def render_conversation(c: Mapping[str, Any], trace_url: str) -> str:
    messages = c["messages"] if isinstance(c["messages"], list) else []
    return render(
        "conversation.html", c=c, messages=messages, trace_url=trace_url, active="/intents"
    )


def render_intent(d: Mapping[str, Any]) -> str:
    b = d["buckets"]
    chart = failure_rate_chart(d["series"], b["from_ns"], b["width_ns"], d["version_changes"])
    return render("intent.html", d=d, chart=chart, active="/intents")
