"""The dashboard in a real headless Chromium (Debian's package), against real processes:
submit the New job form, watch points appear live on the loss chart, see the job succeed; stop a
running job and download what it saved."""

from __future__ import annotations

import re
import zipfile

import pytest

from tests.fleetproc import tiny_fleet
from tests.tiny import write_tiny_dataset

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("browserhome"), "br")
    write_tiny_dataset(f.settings.paths.datasets / "tiny-eval.json", n=4)  # quick to score
    f.start_fleet("bw1")
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


# Installed before the job page's own scripts: every time job.js changes the loss chart's
# point count, note it with what the page showed at that moment, so a test can tell points
# that arrived live (state "running") from points replayed after the job ended.
RECORD_CHART_UPDATES = """
document.addEventListener("DOMContentLoaded", () => {
  const chart = document.querySelector("[data-testid='loss-chart']");
  if (!chart) return;
  const text = (id) => document.querySelector(`[data-testid='${id}']`).textContent.trim();
  window.chartUpdates = [];
  new MutationObserver(() => window.chartUpdates.push({
    points: Number(chart.dataset.points), state: text("job-state"), step: text("stat-step"),
    epoch: text("stat-epoch"), tokens: text("stat-tokens"), eta: text("stat-eta"),
  })).observe(chart, { attributes: true, attributeFilter: ["data-points"] });
});
"""

# Pixels of a chart's canvas drawn in about this colour (what job.js gives each series).
COUNT_PIXELS = """([selector, rgb]) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas || !canvas.width || !canvas.height) return -1;
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 200 && Math.abs(d[i] - rgb[0]) < 40 && Math.abs(d[i + 1] - rgb[1]) < 40
        && Math.abs(d[i + 2] - rgb[2]) < 40) n++;
  }
  return n;
}"""
LOSS_BLUE, EVAL_PINK, LR_GREEN = (37, 99, 235), (252, 165, 165), (5, 150, 105)


def _data(page, testid: str, attr: str) -> int:
    return int(page.locator(f"[data-testid='{testid}']").get_attribute(f"data-{attr}"))


def test_submit_form_watch_chart_and_success(fleet, page):
    epochs, eval_steps = 6, 8
    page.add_init_script(RECORD_CHART_UPDATES)
    page.goto(fleet.url + "/jobs/new")
    _fill_form(page, lora_name="browser-lora", base_model="tiny", dataset="tiny.json",
               format="alpaca-format", lora_rank=4, lora_alpha=8, micro_batch_size=2,
               batch_size=4, epochs=epochs, learning_rate="1e-3", cutoff_len=64, overlap_len=32,
               warmup_steps=0,
               eval_dataset="tiny-eval.json", eval_steps=eval_steps)
    page.locator("[data-testid='submit-job']").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    job_id = page.url.rstrip("/").split("/")[-1]
    assert len(job_id) == 12

    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='job-state']\").textContent"
        ".trim() === 'succeeded'", timeout=180000)
    total = fleet.store.get(job_id)["total_steps"]
    assert total == epochs * 24 // 4  # 24 rows, 4 per optimizer step
    # The last events may still be waiting for the page's next redraw (30 ms).
    page.wait_for_function(
        f"() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        f".dataset.points) === {total}", timeout=10000)

    # Points arrived through Server-Sent Events while the job ran, not only afterwards, and the
    # stats moved with them.
    updates = page.evaluate("window.chartUpdates")
    live = [u for u in updates if u["state"] == "running" and 0 < u["points"] < total]
    assert len({u["points"] for u in live}) >= 2, f"no live points: {updates}"
    for u in live:
        assert re.fullmatch(rf"{u['points']} / {total}", u["step"]), u
        assert re.fullmatch(r"\d+\.\d\d", u["epoch"]) and 0 < float(u["epoch"]) <= epochs, u
        assert int(re.sub(r"\D", "", u["tokens"]) or 0) > 0, u  # digits, grouped by locale
        assert re.fullmatch(r"\d+:\d\d", u["eta"]), u  # m:ss to go
    assert [u["points"] for u in updates] == sorted(u["points"] for u in updates)

    # Both charts are uPlot canvases with their series drawn, one point per step; the eval loss
    # is a dot every eval_steps steps and one at the end.
    evals = len([s for s in range(1, total + 1) if s % eval_steps == 0 or s == total])
    assert _data(page, "loss-chart", "points") == total
    assert _data(page, "lr-chart", "points") == total
    assert _data(page, "loss-chart", "eval-points") == evals
    for chart, colour in (("#loss-chart", LOSS_BLUE), ("#loss-chart", EVAL_PINK),
                          ("#lr-chart", LR_GREEN)):
        assert page.locator(f"{chart} canvas").count() == 1
        assert page.evaluate(COUNT_PIXELS, [chart, list(colour)]) > 10, (chart, colour)
    assert page.locator("#loss-empty").is_hidden() and page.locator("#lr-empty").is_hidden()

    stat = lambda name: page.locator(f"[data-testid='stat-{name}']").inner_text().strip()  # noqa: E731
    assert stat("step") == f"{total} / {total}"
    assert stat("epoch") == f"{epochs:.2f}"
    assert int(re.sub(r"\D", "", stat("tokens")) or 0) > 0
    assert stat("eta") == "—"  # nothing left to wait for
    log = page.locator("[data-testid='log-tail']")
    assert int(log.get_attribute("data-lines")) > 0
    lines = log.locator(".line").all_inner_texts()
    assert any("state → running" in ln for ln in lines)
    # Each evaluation once, as the trainer logs it (issue 11, point 9).
    assert sum(f"Step {total}: eval loss" in ln for ln in lines) == 1
    assert not any("eval at step" in ln for ln in lines)
    assert any("Done! LoRA saved to loras/browser-lora/" in ln for ln in lines)
    page.screenshot(path=str(fleet.home / "job-page.png"), full_page=True)

    # A reload redraws the whole curve from the Redis Stream.
    page.reload()
    page.wait_for_function(
        f"() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        f".dataset.points || 0) === {total}", timeout=30000)
    assert _data(page, "lr-chart", "points") == total
    assert _data(page, "loss-chart", "eval-points") == evals
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


def test_stop_a_running_job_keeps_the_incomplete_lora(fleet, page, tmp_path):
    page.goto(fleet.url + "/jobs/new")
    # 300 epochs (1800 steps) would take minutes: the job is surely still running when stopped.
    _fill_form(page, lora_name="stopped-lora", base_model="tiny", dataset="tiny.json",
               format="alpaca-format", lora_rank=4, lora_alpha=8, micro_batch_size=2,
               batch_size=4, epochs=300, learning_rate="1e-3", cutoff_len=64, overlap_len=32,
               warmup_steps=0)
    page.locator("[data-testid='submit-job']").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    job_id = page.url.rstrip("/").split("/")[-1]
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='job-state']\").textContent.trim()"
        " === 'running' && Number(document.querySelector(\"[data-testid='loss-chart']\")"
        ".dataset.points) >= 2", timeout=120000)
    stop = page.locator("[data-testid='stop-button']")
    assert stop.inner_text().strip() == "Stop"
    assert page.locator("[data-testid='download-lora']").is_hidden()
    stop.click()

    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='job-state']\").textContent"
        ".trim() === 'cancelled'", timeout=60000)
    rec = fleet.store.get(job_id)
    assert rec["state"] == "cancelled"
    steps, total = rec["result"]["steps"], rec["result"]["total_steps"]
    assert 2 <= steps < total == 1800
    reason = page.locator("[data-testid='job-reason']")
    assert reason.is_visible()
    assert reason.inner_text().strip() == "stopped by the user; the incomplete LoRA was saved"
    assert stop.is_hidden()
    assert page.locator("[data-testid='stop-requested']").is_hidden()
    # The chart holds the steps that were trained and no more.
    page.wait_for_function(
        f"() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        f".dataset.points) === {steps}", timeout=10000)
    log = page.locator("[data-testid='log-tail']")
    log.locator(".line", has_text="Incomplete LoRA saved to loras/stopped-lora/").wait_for()
    # The request is logged once (the worker's watchdog may add its own "stop requested;
    # the trainer has 60 s" line when its heartbeat comes before the trainer's answer).
    assert log.locator(".line", has_text="stop requested: the trainer stops after the current "
                                         "step").count() == 1

    # The saved adapter is offered for download (and to try), and the zip holds it.
    download = page.locator("[data-testid='download-lora']")
    download.wait_for(state="visible", timeout=10000)
    assert page.locator("[data-testid='try-it']").is_visible()
    with page.expect_download() as info:
        download.click()
    path = tmp_path / "stopped-lora.zip"
    info.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        names = {n.split("/")[-1] for n in zf.namelist()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json"} <= names


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
    page.locator("[data-testid='answer-base']").wait_for(timeout=120000)  # on this page
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
