"""The Sweeps pages in headless Chromium against real processes: define a sweep in the form,
preview its trials (a duplicate skipped), queue it, watch the Sweep page fill in (table, best
trial, overlaid loss curves, scatter), sort the table, cancel a running sweep, and follow a
pack (two trials trained together) on the Sweep, Job and Fleet pages."""

from __future__ import annotations

import re

import pytest

from tests.fleetproc import small_spec, tiny_fleet

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("sweephome"), "bs")
    f.start_fleet("sw1")
    yield f
    f.stop()


BASE = {"lora_name": "br-sweep", "base_model": "tiny", "dataset": "tiny.json",
        "format": "alpaca-format", "lora_rank": 4, "lora_alpha": 8, "micro_batch_size": 2,
        "batch_size": 4, "epochs": 2, "learning_rate": "1e-3", "cutoff_len": 64, "overlap_len": 32,
        "warmup_steps": 0}


def _fill_base(page, **values):
    for name, value in values.items():
        el = page.locator(f"#base-fields [name='{name}']")
        if el.evaluate("e => e.tagName.toLowerCase()") == "select":
            el.select_option(str(value))
        else:
            el.fill(str(value))


def test_define_preview_queue_and_watch_a_sweep(fleet, page):
    page.goto(fleet.url + "/sweeps")
    page.locator("[data-testid='new-sweep']").click()
    page.wait_for_url(re.compile(r"/sweeps/new$"))
    _fill_base(page, **BASE)
    row = page.locator("[data-testid='vary-row']").first
    row.locator("[data-testid='vary-param']").select_option("lora_rank")
    row.locator("[data-testid='vary-values']").fill("4, 8, 4")
    page.locator("#add-vary").click()
    row2 = page.locator("[data-testid='vary-row']").nth(1)
    row2.locator("[data-testid='vary-param']").select_option("learning_rate")
    row2.locator("[data-testid='vary-kind']").select_option("range")
    row2.locator("[data-testid='vary-min']").fill("1e-3")
    row2.locator("[data-testid='vary-max']").fill("2e-3")
    row2.locator("[data-testid='vary-step']").fill("1e-3")
    page.locator("[name='s-max_concurrent']").fill("1")

    page.locator("[data-testid='sweep-preview']").click()
    count = page.locator("[data-testid='preview-count']")
    count.wait_for(timeout=10000)
    assert count.inner_text() == "4"
    assert page.locator("[data-testid='preview-trial']").all_inner_texts() == [
        "br-sweep-r4-lr1e-3", "br-sweep-r4-lr2e-3", "br-sweep-r8-lr1e-3", "br-sweep-r8-lr2e-3"]
    assert "2 duplicates skipped" in page.locator("[data-testid='preview-skipped']").inner_text()
    assert fleet.store.list() == []  # the preview queued nothing

    page.locator("[data-testid='submit-sweep']").click()
    page.wait_for_url(re.compile(r"/sweeps/s[0-9a-f]{11}$"), timeout=15000)
    sid = page.url.rstrip("/").split("/")[-1]
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='sweep-page']\").dataset.state === 'finished'",
        timeout=240000)
    rows = page.locator("[data-testid='trial-row']")
    assert rows.count() == 4
    assert page.locator("[data-testid='trial-state']").all_inner_texts() == ["succeeded"] * 4
    assert page.locator("[data-testid='best-mark']").count() == 1
    # Each varied value sits under its own column.
    first = rows.first.locator("td")
    assert [first.nth(1).inner_text(), first.nth(2).inner_text()] == ["4", "1e-3"]
    best = fleet.store.get(page.locator("tr[data-best='1']").get_attribute("data-job-id"))
    assert best["sweep"] == sid
    assert page.locator("[data-testid='sweep-chart']").get_attribute("data-series") == "4"
    assert page.locator("[data-testid='sweep-chart'] canvas").count() == 1
    assert page.locator("[data-testid='scatter-point']").count() == 4
    summary = page.locator("[data-testid='sweep-summary']").inner_text()
    assert summary.startswith("4 trials: 4 succeeded, 0 failed, 0 stopped early")

    # Sorting by final loss orders the rows by that column, and again reverses it.
    header = page.locator("th[data-sort='final_loss']")
    header.click()
    col = 3 + 1  # trial, lora_rank, learning_rate, state, final loss (0-based index 4)
    losses = [float(t) for t in rows.locator(f"td:nth-child({col + 1})").all_inner_texts()]
    assert losses == sorted(losses)
    header.click()
    losses = [float(t) for t in rows.locator(f"td:nth-child({col + 1})").all_inner_texts()]
    assert losses == sorted(losses, reverse=True)
    # The row of the best trial holds the lowest final loss (no evaluation set).
    assert page.locator("tr[data-best='1'] td:nth-child(5)").inner_text() == f"{min(losses):.4f}"
    # Hovering a row highlights it (and its curve).
    rows.first.hover()
    assert "hover" in rows.first.get_attribute("class")
    csv = fleet.http.get(fleet.url + page.locator("[data-testid='export-csv']").get_attribute("href"),
                       timeout=10)
    assert csv.status_code == 200 and len(csv.text.strip().splitlines()) == 5
    page.screenshot(path=str(fleet.home / "sweep-page.png"), full_page=True)

    page.goto(fleet.url + "/sweeps")
    assert "finished" in page.locator(f"[data-sweep-id='{sid}']").inner_text()


def test_bad_values_are_shown_and_nothing_is_queued(fleet, page):
    before = len(fleet.store.list())
    page.goto(fleet.url + "/sweeps/new")
    _fill_base(page, **{**BASE, "epochs": 0})
    page.locator("[data-testid='vary-row'] [data-testid='vary-values']").fill("0, 8")
    # pack_size shows only with packs on; the API's refusal lands next to it.
    pack_size = page.locator(".field[data-setting='pack_size']")
    page.locator("[name='s-pack']").select_option("off")
    assert not pack_size.is_visible()
    page.locator("[name='s-pack']").select_option("auto")
    page.locator("[name='s-pack_size']").fill("9")
    page.locator("[data-testid='submit-sweep']").click()
    err = page.locator("[data-testid='vary-row'] .vary-error")
    err.wait_for(state="visible", timeout=10000)
    assert "value 0" in err.inner_text()
    assert page.locator("[data-testid='error-epochs']").is_visible()
    assert page.locator("[data-testid='error-pack_size']").inner_text() == (
        "must be a whole number from 0 to 8, got 9")
    assert page.url.endswith("/sweeps/new")
    assert len(fleet.store.list()) == before


def test_cancel_a_running_sweep(fleet, page):
    body = {"base": small_spec(lora_name="br-cancel", epochs=200),
            "parameters": {"lora_rank": [4, 8]}, "max_concurrent": 1}
    sid = fleet.http.post(fleet.url + "/api/v1/sweeps", json=body, timeout=10).json()["id"]
    page.goto(f"{fleet.url}/sweeps/{sid}")
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[data-testid='trial-state']\")]"
        ".some((e) => e.textContent === 'running')", timeout=60000)
    page.locator("[data-testid='cancel-sweep']").click()
    page.wait_for_function(
        "() => document.querySelector(\"[data-testid='sweep-page']\").dataset.state === 'cancelled'",
        timeout=60000)
    assert page.locator("[data-testid='trial-state']").all_inner_texts() == ["cancelled"] * 2
    assert not page.locator("[data-testid='cancel-sweep']").is_visible()


def test_a_pack_on_the_sweep_job_and_fleet_pages(fleet, page):
    """Two trials that can share the tiny base, both allowed at once: the dispatcher hands them
    to the worker as one pack, which trains them together; the Sweep page lists the pack and
    fills the pack column, a trial's page names the other, the Fleet page shows the pack."""
    body = {"base": small_spec(lora_name="br-pack", epochs=200),
            "parameters": {"lora_rank": [4, 8]}, "max_concurrent": 2}
    sid = fleet.http.post(fleet.url + "/api/v1/sweeps", json=body, timeout=10).json()["id"]
    try:
        page.goto(f"{fleet.url}/sweeps/{sid}")
        assert "pack: auto (size: as the card fits)" in page.locator(
            "[data-testid='sweep-pack-setting']").inner_text()
        pack = page.locator("[data-testid='sweep-pack']")
        pack.wait_for(timeout=60000)  # drawn live when the dispatcher forms it
        assert pack.inner_text().startswith("pack 1: 2 trials on sw1 — br-pack-r4, br-pack-r8")
        page.wait_for_function(
            "() => [...document.querySelectorAll(\"[data-testid='trial-state']\")]"
            ".every((e) => e.textContent === 'running')", timeout=60000)
        assert page.locator("[data-testid='trial-pack']").all_inner_texts() == ["1", "1"]
        assert "(training)" in pack.inner_text()
        first = page.locator("[data-testid='trial-row']").first.get_attribute("data-job-id")
        mate = page.locator("[data-testid='trial-row']").nth(1).get_attribute("data-job-id")

        page.goto(f"{fleet.url}/jobs/{first}")
        together = page.locator("[data-testid='job-pack']")
        assert together.inner_text().strip() == "· pack 1: trained together with br-pack-r8"
        assert together.locator("a").get_attribute("href") == f"/jobs/{mate}"

        page.goto(f"{fleet.url}/fleet")
        card = page.locator("[data-worker='sw1'] [data-testid='worker-pack']")
        card.wait_for(timeout=30000)
        assert card.inner_text() == f"pack 1 of sweep {sid}: 2 trials (br-pack-r4, br-pack-r8)"
        # Drawn again by fleet.js (Refresh): the same words.
        card.evaluate("e => { e.dataset.fromServer = 'yes'; }")
        page.locator("#refresh-workers").click()
        page.wait_for_function(
            "() => { const e = document.querySelector(\"[data-worker='sw1'] "
            "[data-testid='worker-pack']\"); return e && !e.dataset.fromServer; }",
            timeout=10000)
        assert card.inner_text() == f"pack 1 of sweep {sid}: 2 trials (br-pack-r4, br-pack-r8)"
    finally:
        fleet.http.post(f"{fleet.url}/api/v1/sweeps/{sid}/cancel", timeout=10)
    for t in fleet.http.get(f"{fleet.url}/api/v1/sweeps/{sid}", timeout=10).json()["rows"]:
        fleet.wait_for_state(t["id"], ("cancelled",), timeout=60)
