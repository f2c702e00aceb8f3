"""The dashboard in a real headless Chromium (Debian's package), against real processes:
submit the New job form, watch points appear on the loss chart, see the job succeed."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from tests.fleetproc import FleetProcs
from tests.tiny import make_tiny_model, write_tiny_dataset

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LORAFLEET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("browserhome")
    f = FleetProcs(home, redis_server, prefix=f"br{time.monotonic_ns()}")
    make_tiny_model(f.settings.paths.models / "tiny")
    write_tiny_dataset(f.settings.paths.datasets / "tiny.json")
    f.start_dispatcher()
    f.start_worker("bw1")
    f.start_dashboard()
    f.wait_for_workers(1)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
                    "(scripts/setup.sh --test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # The dashboard must work offline: fail on any request that leaves this machine.
    external: list[str] = []
    pg.on("request", lambda r: external.append(r.url)
          if not r.url.startswith(("http://127.0.0.1", "data:", "about:")) else None)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not external, f"requests outside the app: {external}"


def _fill_form(page, **values):
    for name, value in values.items():
        el = page.locator(f"[name='{name}']")
        tag = el.evaluate("e => e.tagName.toLowerCase()")
        if tag == "select":
            el.select_option(str(value))
        else:
            el.fill(str(value))


def test_submit_form_watch_chart_and_success(fleet, page):
    page.goto(fleet.url + "/jobs/new")
    _fill_form(page, lora_name="browser-lora", base_model="tiny", dataset="tiny.json",
               format="alpaca-format", lora_rank=4, lora_alpha=8, micro_batch_size=2,
               batch_size=4, epochs=6, learning_rate="1e-3", cutoff_len=64, warmup_steps=0)
    page.locator("[data-testid='submit-job']").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    job_id = page.url.rstrip("/").split("/")[-1]
    assert len(job_id) == 12

    chart = page.locator("[data-testid='loss-chart']")
    # Points arrive through Server-Sent Events while the job runs.
    page.wait_for_function(
        "() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        ".dataset.points || 0) >= 2", timeout=180000)
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='job-state']\").textContent"
        ".trim() === 'succeeded'", timeout=180000)
    total = fleet.store.get(job_id)["total_steps"]
    assert int(chart.get_attribute("data-points")) == total
    page.screenshot(path=str(fleet.home / "job-page.png"), full_page=True)

    # A reload redraws the whole curve from the Redis Stream.
    page.reload()
    page.wait_for_function(
        f"() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        f".dataset.points || 0) === {total}", timeout=30000)
    assert page.locator("[data-testid='download-lora']").is_visible()

    # The job is in the Jobs list with its state.
    page.goto(fleet.url + "/jobs")
    row = page.locator(f"[data-testid='job-row'][data-job-id='{job_id}']")
    assert "succeeded" in row.inner_text()

    page.goto(fleet.url + "/fleet")
    assert "bw1" in page.locator("body").inner_text()


def test_form_shows_field_errors_and_queues_nothing(fleet, page):
    before = len(fleet.store.list())
    page.goto(fleet.url + "/jobs/new")
    _fill_form(page, lora_name="../../etc/passwd", base_model="tiny", dataset="tiny.json",
               format="alpaca-format", lora_rank=0, learning_rate="abc")
    page.locator("[data-testid='submit-job']").click()
    for field in ("lora_name", "lora_rank", "learning_rate"):
        err = page.locator(f"[data-testid='error-{field}']")
        err.wait_for(state="visible", timeout=10000)
        assert err.inner_text().strip()
    assert page.url.endswith("/jobs/new")
    assert len(fleet.store.list()) == before
