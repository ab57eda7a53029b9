"""The pages behind the review page's links: one conversation, one intent.

A conversation is shown as stored (capture redacted it before storage): its transcript with
the tool calls' arguments and results, errors, model calls with latency and tokens, and its
outcome as the understand layer tagged it. Every value goes through :func:`h`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from processors.web.charts import duration_text, failure_rate_chart
from processors.web.pages import badge, conv_link, h, page, pct, trace_link, when

MAX_SHOWN_CHARS = 20_000  # one message or tool result; longer text is cut (the API has it whole)


def _text(value: Any) -> str:
    """Untrusted text in a pre block; JSON pretty-printed when it is JSON."""
    s = "" if value is None else str(value)
    try:
        parsed = json.loads(s) if s[:1] in "{[" else None
    except ValueError:
        parsed = None
    if parsed is not None:
        s = json.dumps(parsed, indent=2, ensure_ascii=False)
    cut = f"\n… ({len(s) - MAX_SHOWN_CHARS} more characters)" if len(s) > MAX_SHOWN_CHARS else ""
    return f'<pre class="quote">{h(s[:MAX_SHOWN_CHARS] + cut)}</pre>'


def _message(m: Mapping[str, Any]) -> str:
    role = str(m.get("role") or "?")
    head = f'<span class="role">{h(role)}</span> <span class="muted">{when(m.get("ts_ns"))}</span>'
    body = _text(m["content"]) if m.get("content") else ""
    if role == "assistant" and m.get("tool_name"):
        head += f" · calls <code>{h(m['tool_name'])}</code>"
        body += _text(m.get("tool_arguments") or "")
    elif role == "tool":
        head += f" · result of <code>{h(m.get('tool_name') or m.get('tool_call_id') or '')}</code>"
    if m.get("error"):
        body += f'<div class="box error">{h(m["error"])}</div>'
    return f'<div class="msg m-{h(role)}">{head}{body}</div>'


def _summary(c: Mapping[str, Any], trace_url: str) -> str:
    tag = c["tag"]
    if tag:
        verdict = badge("failed" if tag["failed"] else "succeeded")
        outcome = (
            f"{verdict} {badge(tag['outcome'])} "
            + " ".join(f"<code>{h(s)}</code>" for s in tag["signals"])
            + f' · intent <a href="/intents/{h(tag["intent_id"])}">{h(tag["intent_name"])}</a>'
        )
    else:
        outcome = '<span class="muted">not tagged yet</span>'
    start, end = int(c.get("start_ns") or 0), int(c.get("end_ns") or 0)
    rows = [
        ("outcome", outcome),
        ("prompt version", f"<code>{h(c.get('prompt_version') or '—')}</code>"),
        (
            "agent",
            f"{h(c.get('agent_name') or '—')} <code>{h(c.get('agent_version') or '')}</code>",
        ),
        ("model", f"<code>{h(c.get('model') or '—')}</code>"),
        ("when", f"{when(start)} · {duration_text(max(end - start, 0))} long"),
        ("model latency", f"{float(c.get('latency_ms') or 0) / 1000:.1f} s"),
        (
            "tokens",
            f"{int(c.get('input_tokens') or 0)} in · {int(c.get('output_tokens') or 0)} out",
        ),
        (
            "calls",
            f"{int(c.get('llm_calls') or 0)} model · {int(c.get('n_tool_calls') or 0)} tool · "
            f"{int(c.get('errors') or 0)} errors",
        ),
        ("closed", h(c.get("closed_reason") or "—")),
        ("traces", " ".join(trace_link(t, trace_url) for t in c["trace_ids"]) or "—"),
    ]
    return (
        '<div class="box"><dl>'
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
        + "</dl></div>"
    )


def _tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    if not calls:
        return '<p class="muted">No tool calls.</p>'
    rows = "".join(
        f"<tr><td><code>{h(t['name'])}</code><div class=muted>{when(t['start_ns'])}</div></td>"
        f"<td>{_text(t['arguments'])}</td><td>{_text(t['result'])}"
        + (
            f'<div class="box error">{h(t["error_type"])} {h(t["error_message"])}</div>'
            if t["error_type"] or t["error_message"]
            else ""
        )
        + f"</td><td class=num>{float(t['duration_ms']):.0f} ms</td></tr>"
        for t in calls
    )
    return (
        '<table class="tools"><thead><tr><th>tool</th><th>arguments</th><th>result</th>'
        f'<th class="num">latency</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _model_calls(turns: Sequence[Mapping[str, Any]]) -> str:
    llm = [t for t in turns if t["span_kind"] == "llm"]
    if not llm:
        return '<p class="muted">No model calls captured.</p>'
    rows = "".join(
        f"<tr><td>{when(t['start_ns'])}</td><td><code>{h(t['response_model'] or t['request_model'])}</code></td>"
        f"<td class=num>{int(t['input_tokens'])}</td><td class=num>{int(t['output_tokens'])}</td>"
        f"<td class=num>{float(t['duration_ms']):.0f} ms</td><td>{badge(t['status'] or 'ok')}"
        f"{' ' + h(t['error_type']) + ' ' + h(t['error_message']) if t['error_type'] or t['error_message'] else ''}</td></tr>"
        for t in llm
    )
    return (
        "<table><thead><tr><th>when</th><th>model</th><th class=num>tokens in</th>"
        "<th class=num>tokens out</th><th class=num>latency</th><th>status</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def render_conversation(c: Mapping[str, Any], trace_url: str) -> str:
    messages = c["messages"] if isinstance(c["messages"], list) else []
    transcript = (
        "".join(_message(m) for m in messages if isinstance(m, Mapping))
        or '<p class="muted">No transcript yet: the conversation is not assembled yet, or its '
        "instrumentation records no message content.</p>"
    )
    body = (
        f"<h1>Conversation <code>{h(c['conversation_id'])}</code></h1>"
        + _summary(c, trace_url)
        + f'<h2>Transcript</h2><div class="transcript">{transcript}</div>'
        + f"<h2>Tool calls</h2>{_tool_calls(c['tool_calls'])}"
        + f"<h2>Model calls</h2>{_model_calls(c['turns'])}"
    )
    return page(f"Conversation {c['conversation_id']}", body, "/intents")


def render_intent(d: Mapping[str, Any]) -> str:
    b = d["buckets"]
    rows = "".join(
        f"<tr><td>{conv_link(c['conversation_id'])}</td>"
        f"<td>{badge('failed' if c['failed'] else 'succeeded')} {badge(c['outcome'])}</td>"
        f"<td>{' '.join(f'<code>{h(s)}</code>' for s in c['signals'])}</td>"
        f"<td><code>{h(c['prompt_version'] or '—')}</code></td>"
        f"<td class=num>{int(c['user_turns'] or 0)}</td><td class=num>{int(c['tool_calls'] or 0)}</td>"
        f"<td>{when(c['ts_ns'])}</td></tr>"
        for c in d["conversations"]
    )
    failed = sum(f for _, f in d["series"])
    body = (
        f"<h1>{h(d['name'])}</h1><p class=muted>{h(d['description'])}</p>"
        f"<p>{d['tagged']} conversations tagged, {failed} failed ({pct(failed / d['tagged'] if d['tagged'] else 0)})</p>"
        + failure_rate_chart(d["series"], b["from_ns"], b["width_ns"], d["version_changes"])
        + "<h2>Conversations</h2>"
        + (
            "<table><thead><tr><th>conversation</th><th>outcome</th><th>signals</th>"
            "<th>prompt version</th><th class=num>user turns</th><th class=num>tool calls</th>"
            f"<th>when</th></tr></thead><tbody>{rows}</tbody></table>"
            if rows
            else '<p class="muted">No conversations tagged with this intent yet.</p>'
        )
    )
    return page(d["name"], body, "/intents")
