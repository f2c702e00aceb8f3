"""Issue 11 in headless Chromium against a real fleet: the Jobs list's kind, result and duration
columns (points 7, 20), and a job page's summary with Resume (point 8)."""

from __future__ import annotations

import re

import pytest

from tests.fleetproc import FleetProcs, small_spec, tiny_fleet
from tests.tiny import write_tiny_raw_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("i11home"), "bi11")
    write_tiny_raw_text(f.settings.paths.datasets / "story.txt")
    f.start_fleet("bw1")
    yield f
    f.stop()


def submit(fleet: FleetProcs, kind: str, spec: dict) -> str:
    resp = fleet.http.post(f"{fleet.url}/api/v1/jobs", json={"kind": kind, "spec": spec},
                           timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def finished(fleet: FleetProcs, job: str) -> dict:
    rec = fleet.wait_for_state(job, ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "succeeded", rec.get("reason")
    return rec


def row(page, job: str):
    return page.locator(f"[data-testid='job-row'][data-job-id='{job}']")


def test_jobs_list_shows_kind_result_and_duration(fleet, page):
    train = finished(fleet, submit(fleet, "train", small_spec(lora_name="list-lora")))
    page.goto(fleet.url + "/jobs")
    page.locator("[data-testid='live-status'][data-state='live']").wait_for(timeout=15000)
    # Queued while the page is open: the row comes and fills in live.
    ev = submit(fleet, "evaluate", {"base_model": "tiny", "text_file": "story", "stride": 32,
                                    "max_length": 64})
    gen = submit(fleet, "generate", {"base_model": "tiny", "prompt": "Hi", "max_new_tokens": 4,
                                     "temperature": 0})
    ppl = finished(fleet, ev)["result"]["perplexity"]
    finished(fleet, gen)
    result = row(page, ev).locator("[data-col='result']")
    page.wait_for_function(f"() => document.querySelector(\"[data-job-id='{ev}'] "
                           "[data-col='result']\")?.textContent.startsWith('perplexity')",
                           timeout=30000)
    assert result.inner_text().strip() == f"perplexity {ppl:.4f}"
    page.wait_for_function(f"() => document.querySelector(\"[data-job-id='{gen}'] "
                           "[data-col='result'] a\")?.textContent === 'answered'", timeout=30000)
    link = row(page, gen).locator("[data-col='result'] a")
    assert link.get_attribute("href") == f"/jobs/{gen}#job-result"

    def cells(job):
        r = row(page, job)
        return (r.locator("[data-col='kind']").inner_text().strip(),
                r.locator("[data-col='progress'] .progress").is_visible(),
                r.locator("[data-col='duration']").inner_text().strip())

    for job, kind, bar in ((ev, "evaluate", False), (gen, "generate", False),
                           (train["id"], "train", True)):
        k, visible, duration = cells(job)
        assert (k, visible) == (kind, bar)
        assert re.fullmatch(r"\d+:\d\d", duration), duration
    assert row(page, train["id"]).locator("[data-col='result']").inner_text().strip() == \
        f"final loss {train['result']['final_loss']:.4f}"

    # The same on a fresh load (rendered by the server), and dates stay on one line.
    page.reload()
    assert row(page, ev).locator("[data-col='result']").inner_text().strip() == \
        f"perplexity {ppl:.4f}"
    assert not row(page, gen).locator("[data-col='progress'] .progress").is_visible()
    created = row(page, ev).locator("[data-col='created']")
    assert created.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
    page.set_viewport_size({"width": 700, "height": 800})
    box = created.bounding_box()
    line = created.evaluate("e => parseFloat(getComputedStyle(e).lineHeight) || 20")
    assert box["height"] < 2 * line + 16


def test_stop_then_resume_continues_from_the_checkpoint(fleet, page):
    job = submit(fleet, "train", small_spec(lora_name="resume-lora", epochs=300))
    page.goto(f"{fleet.url}/jobs/{job}")
    page.wait_for_function(
        "() => Number(document.querySelector(\"[data-testid='loss-chart']\")"
        ".dataset.points) >= 2", timeout=120000)
    resume = page.locator("[data-testid='resume-button']")
    assert resume.is_hidden()
    page.locator("[data-testid='stop-button']").click()
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='job-state']\").dataset.state"
        " === 'cancelled'", timeout=60000)
    steps = fleet.store.get(job)["result"]["steps"]
    assert (fleet.settings.paths.loras / "resume-lora" / f"checkpoint-{steps}").is_dir()

    # The summary: how long it ran, when it ended, its final loss; Resume from the step.
    resume.wait_for(state="visible", timeout=15000)
    assert resume.inner_text().strip() == f"Resume from step {steps}"
    summary = page.locator("[data-testid='job-summary']")
    assert re.fullmatch(r"\d+:\d\d", summary.locator(
        "[data-testid='summary-duration']").inner_text().strip())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", summary.locator(
        "[data-testid='summary-finished']").inner_text().strip())
    assert re.fullmatch(r"\d+\.\d{4}", summary.locator(
        "[data-testid='summary-final-loss']").inner_text().strip())
    assert summary.locator("[data-testid='summary-best-eval']").inner_text().strip() == "—"

    resume.click()
    page.wait_for_url(lambda u: re.search(r"/jobs/[0-9a-f]{12}$", u) and job not in u,
                      timeout=15000)
    new = page.url.rstrip("/").split("/")[-1]
    assert new != job
    rec = fleet.store.get(new)
    assert rec["spec"] == {**fleet.store.get(job)["spec"], "resume_from_checkpoint": "latest"}
    assert rec["owner"] == fleet.store.get(job)["owner"]
    # It continues: its first logged step is the one after the checkpoint's.
    first = fleet.wait_for(lambda: next(
        (e["step"] for _, e in fleet.store.events.history(new) if e.get("type") == "train"),
        None), 120, "the resumed job's first step")
    assert first == steps + 1
    page.locator("[data-testid='stop-button']").click()
    fleet.wait_for_state(new, ("cancelled",), timeout=60)


def test_a_finished_job_shows_best_and_final_eval_loss(fleet, page):
    from tests.tiny import write_tiny_dataset

    write_tiny_dataset(fleet.settings.paths.datasets / "ev.json", n=4)
    job = finished(fleet, submit(fleet, "train", small_spec(
        lora_name="eval-lora", epochs=4, eval_dataset="ev.json", eval_steps=2)))["id"]
    evals = [e["eval_loss"] for _, e in fleet.store.events.history(job) if e["type"] == "eval"]
    assert len(evals) >= 2
    page.goto(f"{fleet.url}/jobs/{job}")
    s = page.locator("[data-testid='job-summary']")
    assert s.locator("[data-testid='summary-final-eval']").inner_text() == f"{evals[-1]:.4f}"
    assert s.locator("[data-testid='summary-best-eval']").inner_text() == f"{min(evals):.4f}"
    assert page.locator("[data-testid='resume-button']").is_hidden()

    # Point 9: the log has a line per step (a short run), each evaluation once, and the long
    # result line wraps inside the box.
    total = fleet.store.get(job)["total_steps"]
    steps = [e for _, e in fleet.store.events.history(job) if e["type"] == "eval"]
    log = page.locator("[data-testid='log-tail']")
    page.wait_for_function("() => [...document.querySelectorAll(\"[data-testid='log-tail'] "
                           ".line\")].some(l => l.textContent.includes('result: '))",
                           timeout=15000)
    lines = log.locator(".line").all_inner_texts()
    for n in range(1, total + 1):
        assert sum(f"Step {n}/{total}: loss " in ln for ln in lines) == 1, n
    assert re.search(r"Step 1/\d+: loss \d+\.\d{4}, learning rate [\d.e+-]+, \d+ tokens/s",
                     "\n".join(lines))
    for e in steps:
        assert sum(f"Step {e['step']}: eval loss" in ln for ln in lines) == 1
    assert not any("eval at step" in ln for ln in lines)
    assert log.evaluate("e => e.scrollWidth <= e.clientWidth")


def test_parameters_are_grouped_and_changes_marked(fleet, page):
    """Point 10: groups in order, every spec key once, the non-default values marked."""
    job = submit(fleet, "train", small_spec(lora_name="params-lora", epochs=1))
    finished(fleet, job)
    page.goto(f"{fleet.url}/jobs/{job}")
    table = page.locator("[data-testid='params-table']")
    groups = table.locator("[data-testid='param-group']")
    assert [groups.nth(i).get_attribute("data-group") for i in range(groups.count())] == [
        "Model and data", "LoRA", "Optimisation", "Raw text", "Checkpoints", "Speed", "Other"]
    raw = table.locator("[data-group='Raw text'] tr[data-param]")
    assert [raw.nth(i).get_attribute("data-param") for i in range(raw.count())] == [
        "raw_text_file", "overlap_len", "newline_favor_len", "hard_cut_string", "min_chars"]
    spec = fleet.store.get(job)["spec"]
    names = table.locator("tr[data-param]")
    assert sorted(names.nth(i).get_attribute("data-param") for i in range(names.count())) == \
        sorted(spec)
    changed = table.locator("tr[data-changed='yes']")
    # small_spec's choices that differ from the webui's defaults, and nothing else.
    assert sorted(changed.nth(i).get_attribute("data-param") for i in range(changed.count())) == [
        "batch_size", "cutoff_len", "epochs", "learning_rate", "lora_alpha", "lora_rank",
        "micro_batch_size", "overlap_len", "warmup_steps"]
    rank = table.locator("tr[data-param='lora_rank']")
    assert rank.get_attribute("title") == "default: 32"
    assert rank.locator("th").evaluate("e => getComputedStyle(e, '::before').content") == '"● "'
    plain = table.locator("tr[data-param='optimizer'] th")
    assert plain.evaluate("e => getComputedStyle(e, '::before').content") == "none"


def test_fleet_page_shows_a_cpu_workers_load(fleet, page):
    """Point 19: a CPU worker's load column has its CPU use and load average, not nothing."""
    page.goto(f"{fleet.url}/fleet")
    load = page.locator("[data-testid='worker-row'][data-worker='bw1'] [data-col='load']")
    pattern = r"\d+ % CPU · load \d+(\.\d+)?"
    assert re.fullmatch(pattern, load.inner_text().strip()), load.inner_text()
    # The same once fleet.js has redrawn the table from the API.
    page.wait_for_timeout(5500)
    assert re.fullmatch(pattern, load.inner_text().strip()), load.inner_text()
