"""Every page of the dashboard lives with its Content-Security-Policy: visited in headless
Chromium with a finished job, a sweep and an evaluation table in place, no page has a
CSP violation (the `page` fixture fails on any), charts are drawn and server-rendered progress
bars have their width. And the policy is really on: an injected inline script does not run."""

from __future__ import annotations

import pytest
import requests

from tests.browser.test_dashboard_browser import COUNT_PIXELS, LOSS_BLUE
from tests.fleetproc import small_spec, tiny_fleet

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("csphome"), "csp")
    f.start_fleet("cspw1")
    yield f
    f.stop()


def test_every_page_works_under_the_content_security_policy(fleet, page):
    job = fleet.http.post(fleet.url + "/api/v1/jobs", json=small_spec(lora_name="csp-lora"),
                          timeout=10).json()["id"]
    sweep = fleet.http.post(fleet.url + "/api/v1/sweeps", timeout=10, json={
        "base": small_spec(lora_name="csp-sweep"), "parameters": {"lora_rank": [4]}}).json()["id"]
    assert fleet.wait_for_state(job, ("succeeded",), 120)["state"] == "succeeded"

    for path in ("/", "/jobs", "/jobs/new", f"/jobs/{job}", "/fleet", "/datasets", "/sweeps",
                 "/sweeps/new", f"/sweeps/{sweep}", "/evaluations", "/generate", "/users"):
        resp = page.goto(fleet.url + path)
        assert resp.status in (200, 403), (path, resp.status)  # /users: accounts mode only
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"], path
        page.wait_for_load_state("networkidle")

        if path == "/jobs":
            # The finished job's bar: width from data-pct (no style attribute), set by script.
            bar = page.locator(f"tr[data-job-id='{job}'] .bar")
            assert bar.get_attribute("style") is not None
            assert bar.evaluate("b => b.getBoundingClientRect().width") == pytest.approx(
                bar.evaluate("b => b.parentElement.getBoundingClientRect().width"), abs=1)
        if path == f"/jobs/{job}":
            page.wait_for_function(f"() => ({COUNT_PIXELS})(['[data-testid=loss-chart]', "
                                   f"{list(LOSS_BLUE)}]) > 20", timeout=15000)

    # The policy is on, and the fixture's listener hears it: an inline script is refused.
    ran = page.evaluate("""() => { const s = document.createElement("script");
        s.textContent = "window.injected = 1"; document.body.appendChild(s);
        return window.injected === 1; }""")
    page.wait_for_timeout(200)
    assert not ran
    assert any("script-src" in v for v in page.csp_violations), page.csp_violations
    page.csp_violations.clear()
    assert requests.get(fleet.url + "/jobs", timeout=5).headers["X-Frame-Options"] == "DENY"
