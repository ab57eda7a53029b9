"""The review page's templates with hostile data: every value escaped (autoescape), and no link
from data that is not http(s) (autoescape does not stop ``javascript:`` URLs)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from processors.web.drilldown import render_conversation, render_intent
from processors.web.pages import (
    render_diagnosis,
    render_intents,
    render_message,
    render_outcomes,
    render_proposal,
)
from processors.web.templating import env

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "<svg onload=alert(1)>",
    '"><a href="javascript:alert(1)">x</a>',
]
JS_URL = "javascript:alert(document.cookie)//{trace_id}"


class _Markup(HTMLParser):
    """The elements and attributes a browser would build from the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_inert(page: str) -> None:
    """No element, event handler or link of the hostile values survived as markup."""
    parser = _Markup()
    parser.feed(page)
    tags = parser.tags
    assert not [t for t, _ in tags if t in ("script", "img", "iframe", "object", "embed")]
    assert all(a.get("class") in ("spark", "chart") for t, a in tags if t == "svg")
    assert not [(t, a) for t, a in tags if any(k.startswith("on") for k in a)]
    links = [
        v or ""
        for t, a in tags
        for k, v in a.items()
        if t in ("a", "form", "button") and k in ("href", "action", "formaction")
    ]
    assert links and all(v.startswith(("/", "http://", "https://")) for v in links), links


def conversation(text: str) -> dict[str, Any]:
    return {
        "conversation_id": text,
        "tag": {
            "failed": 1,
            "outcome": text,
            "signals": [text],
            "intent_id": text,
            "intent_name": text,
            "outcome_source": text,
            "outcome_reason": text,
        },
        "feedback": [
            {
                "name": text,
                "score": 0.0,
                "label": text,
                "explanation": text,
                "source": text,
                "ts_ns": 1,
            }
        ],
        "explained_by": [
            {
                "diagnosis_id": text,
                "failure_kind": text,
                "turn": 1,
                "tool": text,
                "detail": text,
                "summary": text,
            }
        ],
        "messages": [
            {"role": "user", "content": text, "ts_ns": 1},
            {"role": text, "content": text, "tool_name": text, "tool_arguments": text},
            {"role": "tool", "content": f'{{"html": "{text[1:]}"}}', "error": text},
        ],
        "trace_ids": [text, "0af7651916cd43dd8448eb211c80319c"],
        "tool_calls": [
            {
                "name": text,
                "arguments": text,
                "result": text,
                "error_type": text,
                "error_message": text,
                "start_ns": 1,
                "duration_ms": 5,
            }
        ],
        "turns": [
            {
                "span_kind": "llm",
                "start_ns": 1,
                "response_model": text,
                "request_model": "",
                "input_tokens": 1,
                "output_tokens": 1,
                "duration_ms": 1,
                "status": text,
                "error_type": text,
                "error_message": "",
            }
        ],
        "model": text,
        "agent_name": text,
        "closed_reason": text,
    }


def outcome(text: str) -> dict[str, Any]:
    return {
        "intent_id": text,
        "intent_name": text,
        "verdict": text,
        "rate_before": 0.4,
        "rate_after": 0.1,
        "before_failures": 4,
        "before_n": 10,
        "after_failures": 1,
        "after_n": 10,
        "before_version": text,
        "after_version": text,
        "diff_low": -0.41,
        "diff_high": -0.19,
        "p_value": 2e-5,
    }


@pytest.mark.parametrize("text", HOSTILE)
def test_conversation_page_is_inert(text: str) -> None:
    page = render_conversation(conversation(text), JS_URL)
    assert_inert(page)
    assert 'class="ext"' not in page  # a javascript: web.trace_url gives no tracing-tool link
    assert 'href="/traces/0af7651916cd43dd8448eb211c80319c"' in page


@pytest.mark.parametrize("text", HOSTILE)
def test_diagnosis_evidence_and_proposal_are_inert(text: str) -> None:
    d = {
        "diagnosis_id": text,
        "summary": text,
        "status": text,
        "rule": text,
        "intent_name": text,
        "intent_id": text,
        "updated_ns": 0,
        "root_cause": text,
        "component": {"target": text, "nested": [{"quote": text * 3}, text]},
        "failure_rate": 0.5,
        "failures": 1,
        "support": 2,
        "baseline_rate": 0.1,
        "confidence": 0.9,
        "prompt_version": text,
        "agent_version": text,
        "window_from_ns": 0,
        "window_to_ns": 0,
        "trace_ids": [text],
        "evidence": {text: text, "conversation_ids": [text], "url": "javascript:alert(1)"},
        "proposals": [{"proposal_id": text, "title": text, "status": text}],
        "analyses": [
            {
                "conversation_id": text,
                "turn": 2,
                "trace_id": text,
                "failure_kind": text,
                "tool": text,
                "instruction": 1,
                "relation": relation,
                "quote": text,
            }
            for relation in ("broken", "lacking", text)
        ],
    }
    assert_inert(render_diagnosis(d, JS_URL))
    p = {
        "proposal_id": text,
        "title": text,
        "status": "open",
        "backend": text,
        "repo": text,
        "branch": text,
        "base": text,
        "commit": text,
        "version": 1,
        "pr_url": "javascript:alert(1)",
        "pr_number": 1,
        "diagnosis": d,
        "reviews": [
            {"decision": text, "reviewer": text, "ts_ns": 0, "merged_commit": "", "comment": text}
        ],
        "files": [text],
        "diff": f"+{text}\n-{text}",
        "outcome": outcome(text),
        "body": f"{text} 0af7651916cd43dd8448eb211c80319c",
    }
    page = render_proposal(p, csrf=text, error=text, form={"reviewer": text, "comment": text})
    assert_inert(page)
    assert "pull request #" not in page  # a javascript: PR URL is not linked
    assert f"/proposals/{text}" not in page  # ids are percent-encoded in paths


@pytest.mark.parametrize("text", HOSTILE)
def test_lists_and_charts_are_inert(text: str) -> None:
    intent = {
        "intent_id": text,
        "name": text,
        "status": text,
        "description": text,
        "examples_withheld": False,
        "examples": [text],
        "size": 3,
        "conversations": 3,
        "failure_rate": 0.3,
        "series": [[2, 1], [1, 0]],
        "signal_rates": {text: 0.5},
        "changes": [{"change": text, "taxonomy_version": 1}],
    }
    change = {"taxonomy_version": 1, "change": text, "name": text, "intent_id": text}
    buckets = {"count": 2, "width_ns": 3.6e12, "from_ns": 1}
    data = {"intents": [intent], "changes": [{**change, "other_id": text, "ts_ns": 1}]}
    assert_inert(render_intents({**data, "buckets": buckets}, 1))
    detail = {
        "name": text,
        "description": text,
        "tagged": 3,
        "series": [[2, 1], [1, 0]],
        "buckets": buckets,
        "version_changes": [(4e12, text)],
        "conversations": [
            {
                "conversation_id": text,
                "failed": 1,
                "outcome": text,
                "signals": [text],
                "prompt_version": text,
                "user_turns": 1,
                "tool_calls": 0,
                "ts_ns": 1,
            }
        ],
    }
    page = render_intent(detail)
    assert_inert(page.replace('<svg class="chart"', ""))  # the chart itself is ours
    group = {"proposal_id": text, "title": text, "intent_id": text}
    assert_inert(render_outcomes([{**group, "target": outcome(text), "controls": [outcome(text)]}]))
    assert_inert(render_message(text, text))


def test_no_template_turns_escaping_off() -> None:
    """Autoescape is on for every template (and .svg too); none opts out of it."""
    names = env.list_templates()
    assert {"base.html", "macros.html", "failure_rate.svg", "sparkline.svg"} <= set(names)
    assert env.autoescape is True
    for name in names:
        source = env.loader.get_source(env, name)[0] if env.loader else ""
        assert not re.search(r"\|\s*safe\b|autoescape\s+false", source), name
