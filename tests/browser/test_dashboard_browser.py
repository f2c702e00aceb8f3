"""The dashboard in a real headless Chromium (Debian's package), against real processes:
submit the New job form, watch points appear on the loss chart, see the job succeed."""

from __future__ import annotations

import re
import time

import pytest

from tests.fleetproc import FleetProcs
from tests.tiny import make_tiny_model, write_tiny_dataset

pytestmark = pytest.mark.browser


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

    # Try it: a prompt answered by the base model and by base + this LoRA, on this page.
    try_it = page.locator("[data-testid='try-it']")
    assert try_it.is_visible()
    _fill_form(page, prompt="Name a colour.", max_new_tokens=6, temperature=0)
    page.locator("[data-testid='try-submit']").click()
    result = page.locator("[data-testid='try-result']")
    result.locator("[data-testid='answer-lora']").wait_for(timeout=120000)
    assert "6 tokens" in result.locator("[data-testid='answer-base']").inner_text()
    assert "Base + browser-lora" in result.locator("[data-testid='answer-lora']").inner_text()
    assert page.url.endswith(job_id)  # the answers came here, with a link to their own job
    gen_id = result.locator("[data-testid='try-job-link']").get_attribute("href").split("/")[-1]
    gen = fleet.store.get(gen_id)
    assert gen["kind"] == "generate" and gen["state"] == "succeeded"
    assert gen["spec"]["lora"] == "browser-lora" and gen["spec"]["base_model"] == "tiny"

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


def test_try_it_and_evaluations_pages(fleet, page):
    (fleet.settings.paths.datasets / "story.txt").write_text("The sea is wide and deep. " * 40)
    page.goto(fleet.url + "/generate")
    _fill_form(page, base_model="tiny", prompt="The sea is", max_new_tokens=8, temperature=0)
    page.locator("[data-testid='submit-generate']").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    page.locator("[data-testid='answer-base']").wait_for(timeout=120000)
    assert "8 tokens" in page.locator("[data-testid='answer-base']").inner_text()
    assert page.locator("[data-testid='prompt-text']").inner_text() == "The sea is"

    page.goto(fleet.url + "/evaluations")
    _fill_form(page, base_model="tiny", text_file="story.txt", stride=32, max_length=64,
               comment="from the browser")
    page.locator("[data-testid='submit-eval']").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    page.wait_for_function(
        "() => /^[0-9.]+$/.test((document.querySelector(\"[data-testid='perplexity']\") || {})"
        ".textContent || '')", timeout=120000)
    ppl = float(page.locator("[data-testid='perplexity']").inner_text())
    page.goto(fleet.url + "/evaluations")
    row = page.locator("[data-testid='evaluation-row']").first
    assert float(row.locator("[data-testid='evaluation-ppl']").inner_text()) == round(ppl, 4)
    comment = row.locator("[data-testid='evaluation-comment']")
    assert comment.input_value() == "from the browser"
    comment.fill("edited")
    comment.press("Tab")  # change event: saved at once
    row.locator(".saved").wait_for(state="visible")
    page.reload()
    assert page.locator("[data-testid='evaluation-comment']").first.input_value() == "edited"
