"""Headless Chromium (Debian's package) driven by Playwright, for every browser test."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("LORAFLEET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# No first-run work and no background connections: the machine may have no network at all.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => console.error(
  `Content Security Policy violation: ${e.violatedDirective} ${e.blockedURI} ${e.sample}`));
"""


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
                    "(scripts/setup.sh --test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh page that fails the test on a JavaScript error or on any request that leaves the
    machine (the dashboard must work offline: no CDN). Where the test uses a single-user
    `fleet`, the page is logged in as its user is: by opening the printed URL (?token=...)."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # Anything the Content-Security-Policy refused (Chromium logs each as a console error;
    # the event catches what it does not log) fails the test: every page must live with it.
    pg.csp_violations = []
    pg.on("console", lambda m: pg.csp_violations.append(m.text)
          if "Content Security Policy" in m.text else None)
    pg.add_init_script(REPORT_CSP_VIOLATIONS)
    external: list[str] = []
    pg.on("request", lambda r: external.append(r.url)
          if not r.url.startswith(("http://127.0.0.1", "data:", "about:")) else None)
    if "fleet" in request.fixturenames:
        from dispatcher.access.accounts import Accounts

        fleet = request.getfixturevalue("fleet")
        if not Accounts(fleet.home).has_users():
            fleet.open_printed_url(pg)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not pg.csp_violations, f"Content-Security-Policy violations: {pg.csp_violations}"
    assert not external, f"requests outside the app: {external}"
