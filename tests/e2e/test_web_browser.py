"""A reviewer in a real browser: log in with the printed URL, open the proposal, approve it as
the page's identity (web.reviewer; the configured local git backend merges it), see the
decision, then the verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.config import Config
from processors.store import Store
from processors.web.server import WebServer
from tests.browser import chromium_page, unavailable
from tests.integration.test_web import T0, explained_row, git, seed

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "browser available")


def test_reviewer_approves_in_the_browser(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> None:
    config.web.reviewer = "Ada Lovelace"  # the identity behind the token: no name to type
    s = seed(store, config, tmp_path, unique)
    base_before = git(s.repo, "rev-parse", "main")
    server = WebServer(
        config, store, host="127.0.0.1", port=0
    ).start()  # default backend: act.repo, local
    try:
        with chromium_page() as page:
            page.goto(server.login_url)
            assert page.url == server.url + "/"  # the token left the address bar
            link = f'a[href="/proposals/{s.proposal.proposal_id}"]'  # the shared store holds other tests' too
            page.get_by_role("link", name="Proposals", exact=True).click()
            assert page.locator(link).inner_text() == s.proposal.title
            page.click(link)
            assert page.locator("pre.diff .add").count() >= 1  # the diff, coloured
            assert page.locator("#reviewer").inner_text() == "Ada Lovelace"
            page.fill("#comment", "carry the key forward")
            page.get_by_role("button", name="Approve").click()
            page.wait_for_url(f"**/proposals/{s.proposal.proposal_id}#decision")
            decision = page.locator(".decision").inner_text()
            assert "Approved by Ada Lovelace" in decision and "merged as" in decision
            assert page.locator("form.decide").count() == 0
            assert page.locator(".badge", has_text="merged").count() >= 1

            page.get_by_role("link", name="Outcomes").click()
            row = page.locator("tr", has=page.locator(link))
            assert row.locator(".badge").inner_text() == "fixed"
            assert "[-41.0%, -19.0%]" in row.inner_text()
    finally:
        server.stop()
    (review,) = store.query(
        "SELECT reviewer, decision, merged_commit FROM reviews FINAL "
        "WHERE proposal_id = {p:String}",
        {"p": s.proposal.proposal_id},
    )
    merge = git(s.repo, "rev-parse", "main")
    assert review == {"reviewer": "Ada Lovelace", "decision": "approved", "merged_commit": merge}
    assert merge != base_before and git(s.repo, "rev-parse", f"{merge}^2") == s.proposal.commit


def test_reader_goes_from_a_diagnosis_to_the_failed_conversation(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> None:
    """Diagnoses → the diagnosis → its trace: the conversation, in two clicks from the diagnosis
    list; then the intent's chart and the folded control rows of the outcomes."""
    s = seed(store, config, tmp_path, unique)
    server = WebServer(config, store, host="127.0.0.1", port=0).start()
    try:
        with chromium_page() as page:
            page.goto(server.login_url)
            page.get_by_role("link", name="Diagnoses", exact=True).click()
            page.click(f'a[href="/diagnoses/{s.diagnosis.diagnosis_id}"]')  # click 1
            page.locator(f'a.trace[href="/traces/{s.trace_id}"]').first.click()  # click 2
            page.wait_for_url(f"**/conversations/{s.conversation_id}")
            transcript = page.locator(".transcript")
            assert transcript.locator(".msg").count() == 4
            assert "My API key does not work" in transcript.locator(".m-user").inner_text()
            assert "timeout after 30 s" in transcript.locator(".m-tool").inner_text()
            assert page.locator("table.tools").inner_text().count("check_key") == 1
            assert page.locator(".badge", has_text="failed").count() >= 1
            assert page.evaluate("document.querySelectorAll('script').length") == 0

            page.click(f'a[href="/intents/{s.intent_id}"]')
            chart = page.locator("svg.chart")
            assert chart.is_visible() and chart.bounding_box()["width"] > 300
            assert chart.locator("g.version text").text_content() == "p-2"

            page.get_by_role("link", name="Outcomes").click()
            controls = page.locator(
                "tr.controls", has=page.locator(f'a[href="/intents/{s.small_intent_id}"]')
            )
            assert not controls.locator("table").is_visible()  # folded
            controls.locator("summary").click()
            assert controls.locator("table").is_visible()
            assert "no effect" in controls.locator("table").inner_text()
    finally:
        server.stop()


def test_every_page_renders_under_the_csp(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> None:
    """Each view from the templates, in the browser under the page's Content-Security-Policy:
    the shared layout's stylesheet applies (nothing refused), no script, untrusted text inert."""
    s = seed(store, config, tmp_path, unique)
    server = WebServer(config, store, host="127.0.0.1", port=0).start()
    paths = ["/", "/intents", "/diagnoses", "/proposals", "/outcomes"] + [
        f"/diagnoses/{s.diagnosis.diagnosis_id}",
        f"/proposals/{s.proposal.proposal_id}",
        f"/conversations/{s.conversation_id}",
        f"/intents/{s.intent_id}",
    ]
    try:
        with chromium_page() as page:
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: errors.append(f"a dialog opened: {d.message}"))
            page.goto(server.login_url)
            for path in paths:
                assert page.goto(server.url + path).status == 200, path
                header = page.locator("header").evaluate("e => getComputedStyle(e).display")
                assert header == "flex", path  # the inline stylesheet was applied
                assert page.locator("header a").count() == 5, path  # the shared nav
                assert page.evaluate("document.querySelectorAll('script').length") == 0, path
            assert errors == []  # no CSP refusal, no alert() from planted text
    finally:
        server.stop()


def test_a_diagnosis_shows_the_llms_failure_analyses_of_its_conversations(
    store: Store, config: Config, tmp_path: Path, unique: str
) -> None:
    """Only when there are any, only for the conversations it explains, the quote as inert text."""
    s = seed(store, config, tmp_path, unique)
    quote = "Please paste your key again <img src=x onerror=alert(1)><script>alert('q')</script>"
    analysis = {
        "intent_id": s.intent_id,
        "failure_kind": "tool_error",
        "turn": 2,
        "trace_id": s.trace_id,
        "span_id": "s2",
        "tool": "check_key",
        "instruction": 1,
        "relation": "broken",
        "quote": quote,
        "ts_ns": T0,
    }
    server = WebServer(config, store, host="127.0.0.1", port=0).start()
    path = f"/diagnoses/{s.diagnosis.diagnosis_id}"
    try:
        with chromium_page() as page:
            dialogs: list[str] = []
            page.on("dialog", lambda d: dialogs.append(d.message))
            page.goto(server.login_url)
            page.goto(server.url + path)
            assert page.get_by_role("heading", name="Failure analyses").count() == 0
            store.insert_records("diagnosis_conversations", [explained_row(s, "")])
            store.insert_records(
                "failure_analyses",
                [
                    {**analysis, "conversation_id": s.conversation_id},
                    # of the same intent, explained by no diagnosis: not this one's
                    {**analysis, "conversation_id": f"c-{unique}-other", "quote": "elsewhere"},
                ],
            )
            page.goto(server.url + path)
            assert page.get_by_role("heading", name="Failure analyses").is_visible()
            rows = page.locator("table.analyses tbody tr")
            assert rows.count() == 1
            cells = [rows.locator("td").nth(i).inner_text() for i in range(6)]
            assert cells[0] == s.conversation_id
            assert cells[1].startswith("turn 2") and s.trace_id in cells[1]
            assert cells[2:5] == ["tool error", "check_key", "broke no. 1"]
            assert cells[5] == quote  # shown as the text it is
            assert rows.locator("img, script").count() == 0
            assert page.evaluate("document.querySelectorAll('script').length") == 0
            rows.locator("a.conv").click()
            page.wait_for_url(f"**/conversations/{s.conversation_id}")
            assert dialogs == []
    finally:
        server.stop()
