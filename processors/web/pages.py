"""The review page's HTML: server-rendered from the Jinja2 templates in ``templates/``
(autoescaped, see :mod:`processors.web.templating`), no JavaScript (the Content-Security-Policy
of :mod:`processors.web.server` forbids scripts, so even an escaping mistake cannot run one).

Each ``render_*`` takes the plain dicts of :mod:`processors.web.queries` and returns the page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from processors.web.charts import sparkline
from processors.web.templating import render

MAX_REVIEWER_CHARS = 200
MAX_COMMENT_CHARS = 4000


def render_overview(data: Mapping[str, Any]) -> str:
    return render("overview.html", data=data, active="/")


def render_intents(data: Mapping[str, Any], min_examples: int) -> str:
    return render(
        "intents.html",
        data=data,
        min_examples=min_examples,
        sparkline=sparkline,
        active="/intents",
    )


def render_diagnoses(rows: Sequence[Mapping[str, Any]]) -> str:
    return render("diagnoses.html", rows=rows, active="/diagnoses")


def render_diagnosis(d: Mapping[str, Any], trace_url: str) -> str:
    return render("diagnosis.html", d=d, trace_url=trace_url, active="/diagnoses")


def render_proposals(rows: Sequence[Mapping[str, Any]]) -> str:
    return render("proposals.html", rows=rows, active="/proposals")


def render_proposal(
    p: Mapping[str, Any], csrf: str, error: str = "", form: Mapping[str, str] | None = None
) -> str:
    return render(
        "proposal.html",
        p=p,
        csrf=csrf,
        error=error,
        form=form or {},
        max_reviewer_chars=MAX_REVIEWER_CHARS,
        max_comment_chars=MAX_COMMENT_CHARS,
        active="/proposals",
    )


def render_outcomes(groups: Sequence[Mapping[str, Any]]) -> str:
    return render("outcomes.html", groups=groups, active="/outcomes")


def render_message(title: str, message: str) -> str:
    return render("message.html", title=title, message=message)
