"""Drive the system's headless Chromium (Debian's ``chromium`` package) with Playwright.

Playwright's own browser download is never used (``playwright install`` needs the network):
the browser is ``/usr/bin/chromium`` through ``executable_path``, with a throw-away profile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Playwright adds --headless itself (headless=True) and --user-data-dir (persistent context).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unavailable() -> str:
    """Why the browser tests cannot run here ('' when they can)."""
    try:
        import playwright.sync_api  # noqa: F401 - only probing that it is installed
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no `playwright install`)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)"
    return ""


@contextmanager
def chromium_page(timeout_ms: int = 15_000) -> Iterator[Any]:
    """A Playwright ``Page`` in a fresh headless Chromium profile, closed (and deleted) afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="closeloop-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=ARGS
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout_ms)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
