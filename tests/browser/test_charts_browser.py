"""Charts, the Sweep page's liveness and the Evaluations table in headless Chromium against real
processes (issue 11, points 1 and 11-14): a sweep that ends with no job event after its end
still shows "finished"; step axes tick on whole steps and a single learning rate gets a sane
axis; the loss chart smooths (TensorBoard's debiased EMA), zooms and switches to a log scale;
sweep curves and the scatter start on the sweep's own metric; an evaluation with LoRAs shows its
change from the base model, or offers to measure the base."""

from __future__ import annotations

import pytest

from dispatcher.jobs.evaltable import EvalTable
from tests.fleetproc import small_spec, tiny_fleet
from tests.tiny import write_tiny_dataset

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("chartshome"), "bc")
    write_tiny_dataset(f.settings.paths.datasets / "tiny-eval.json", n=4)
    (f.settings.paths.datasets / "story.txt").write_text("The sea is wide and deep. " * 40)
    f.start_fleet("cw1")
    yield f
    f.stop()


def _submit(fleet, spec, kind="train"):
    res = fleet.http.post(fleet.url + "/api/v1/jobs", json={"kind": kind, "spec": spec}, timeout=10)
    assert res.status_code == 201, res.text
    return res.json()["id"]


def _state(page):
    return page.locator("[data-testid='sweep-page']").get_attribute("data-state")


def _ticks(page, testid, axis):
    return page.locator(f"[data-testid='{testid}']").get_attribute(f"data-{axis}-ticks").split()


def test_sweep_page_shows_the_sweeps_own_end(fleet, page):
    """Point 1: the trials end while the page is open, then the dispatcher marks the sweep
    finished; no job event follows that, yet the page shows it."""
    fleet.kill("dispatcher")  # the trials stay queued, and nothing marks the sweep finished
    try:
        body = {"base": small_spec(lora_name="bc-end"), "parameters": {"lora_rank": [4, 8]},
                "evaluate": {"text_file": "story.txt", "stride": 32, "max_length": 64}}
        res = fleet.http.post(fleet.url + "/api/v1/sweeps", json=body, timeout=10)
        assert res.status_code == 201, res.text
        sid = res.json()["id"]
        page.goto(f"{fleet.url}/sweeps/{sid}")
        page.wait_for_function("() => document.querySelector(\"[data-testid='live-status']\")"
                               ".dataset.state === 'live'", timeout=15000)
        for t in res.json()["trials"]:
            assert fleet.http.post(f"{fleet.url}/api/v1/jobs/{t['job']}/cancel",
                                   timeout=10).status_code == 200
        # Every trial ended; the sweep waits for the dispatcher to close it.
        page.wait_for_function("() => document.querySelector(\"[data-testid='sweep-page']\")"
                               ".dataset.state === 'evaluating'", timeout=15000)
        assert page.locator("[data-testid='cancel-sweep']").is_visible()
    finally:
        fleet.start_dispatcher()
    fleet.wait_for(lambda: fleet.http.get(f"{fleet.url}/api/v1/sweeps/{sid}", timeout=5)
                   .json().get("finished"), 30, "the sweep to finish")
    page.wait_for_function("() => document.querySelector(\"[data-testid='sweep-page']\")"
                           ".dataset.state === 'finished'", timeout=10000)
    assert page.locator("[data-testid='sweep-state']").inner_text() == "finished"
    assert not page.locator("[data-testid='cancel-sweep']").is_visible()


def _ema(values, w):
    """TensorBoard's debiased exponential moving average (the last value)."""
    last, out = 0.0, None
    for n, v in enumerate(values, 1):
        last = last * w + (1 - w) * v
        out = last / (1 - w ** n)
    return out


def test_loss_chart_smooths_zooms_and_log_scale(fleet, page):
    """Points 11 and 12 on a finished job's page."""
    job = _submit(fleet, small_spec(lora_name="bc-chart", epochs=3, eval_dataset="tiny-eval.json",
                                    eval_steps=4))
    fleet.wait_for_state(job, ("succeeded",))
    events = fleet.http.get(f"{fleet.url}/api/v1/jobs/{job}/events?format=json", timeout=10).json()
    events = events["events"] if isinstance(events, dict) else events
    losses = [e["loss"] for e in events if e.get("type") == "train" and e.get("loss") is not None]
    assert len(losses) >= 10

    page.goto(f"{fleet.url}/jobs/{job}")
    chart = page.locator("[data-testid='loss-chart']")
    page.wait_for_function(f"() => document.querySelector(\"[data-testid='loss-chart']\")"
                           f".dataset.points === '{len(losses)}'", timeout=15000)
    assert int(chart.get_attribute("data-eval-points")) >= 2
    # Whole steps only on the step axes.
    for testid in ("loss-chart", "lr-chart"):
        ticks = _ticks(page, testid, "x")
        assert ticks and all(t.isdigit() for t in ticks), (testid, ticks)

    # Smoothing: TensorBoard's debiased EMA of the training loss; 0 = the raw curve.
    assert page.locator("[data-testid='loss-smoothing-value']").inner_text() == "0.60"
    assert float(chart.get_attribute("data-smoothed-last")) == pytest.approx(_ema(losses, 0.6))
    page.locator("[data-testid='loss-smoothing']").fill("0.9")
    assert page.locator("[data-testid='loss-smoothing-value']").inner_text() == "0.90"
    assert float(chart.get_attribute("data-smoothed-last")) == pytest.approx(_ema(losses, 0.9))
    page.locator("[data-testid='loss-smoothing']").fill("0")
    assert float(chart.get_attribute("data-smoothed-last")) == pytest.approx(losses[-1])

    # Drag to zoom on x; a double-click shows every step again.
    box = chart.locator(".u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=5)
    page.mouse.up()
    assert chart.get_attribute("data-zoomed") == "1"
    lo, hi = float(chart.get_attribute("data-x-min")), float(chart.get_attribute("data-x-max"))
    assert 1 < lo < hi < len(losses)
    chart.locator(".u-over").dblclick(position={"x": box["width"] / 2, "y": box["height"] / 2})
    assert chart.get_attribute("data-zoomed") == "0"

    # Log scale for the loss, and back.
    page.locator("[data-testid='loss-log']").check()
    assert chart.get_attribute("data-scale") == "log"
    assert chart.get_attribute("data-points") == str(len(losses))
    assert page.locator("[data-testid='loss-chart'] canvas").count() == 1
    page.locator("[data-testid='loss-log']").uncheck()
    assert chart.get_attribute("data-scale") == "linear"


def test_one_point_learning_rate_axis_is_sane(fleet, page):
    """Point 11: a job of one optimizer step: the learning-rate axis spans that rate, not 0-100."""
    job = _submit(fleet, small_spec(lora_name="bc-one", batch_size=24, micro_batch_size=4,
                                    lr_scheduler_type="constant", learning_rate="1e-3"))
    fleet.wait_for_state(job, ("succeeded",))
    page.goto(f"{fleet.url}/jobs/{job}")
    page.wait_for_function("() => document.querySelector(\"[data-testid='lr-chart']\")"
                           ".dataset.points === '1'", timeout=15000)
    ticks = [float(t) for t in _ticks(page, "lr-chart", "y")]
    assert ticks and min(ticks) >= 4e-4 and max(ticks) <= 1.6e-3, ticks
    assert all(t.isdigit() for t in _ticks(page, "lr-chart", "x"))


def test_sweep_curves_and_scatter_use_the_sweeps_metric(fleet, page):
    """Point 13: trials with an evaluation set: curves and scatter start on the eval loss."""
    body = {"base": small_spec(lora_name="bc-metric", epochs=2, eval_dataset="tiny-eval.json",
                               eval_steps=3),
            "parameters": {"learning_rate": ["1e-3", "2e-3"]}}
    res = fleet.http.post(fleet.url + "/api/v1/sweeps", json=body, timeout=10)
    assert res.status_code == 201, res.text
    page.goto(f"{fleet.url}/sweeps/{res.json()['id']}")
    page.wait_for_function("() => document.querySelector(\"[data-testid='sweep-page']\")"
                           ".dataset.state === 'finished'", timeout=180000)
    chart = page.locator("[data-testid='sweep-chart']")
    page.wait_for_function("() => document.querySelector(\"[data-testid='sweep-chart']\")"
                           ".dataset.series === '2'", timeout=10000)
    assert chart.get_attribute("data-metric") == "eval_loss"
    assert page.locator("[data-testid='curve-metric']").input_value() == "eval_loss"
    assert all(t.isdigit() for t in _ticks(page, "sweep-chart", "x"))
    page.locator("[data-testid='curve-metric']").select_option("loss")
    assert chart.get_attribute("data-metric") == "loss"
    assert chart.get_attribute("data-series") == "2"

    assert page.locator("[data-testid='scatter-metric']").input_value() == "best_eval_loss"
    assert page.locator("[data-testid='scatter-x-title']").text_content() == "learning_rate"
    assert page.locator("[data-testid='scatter-y-title']").text_content() == "best eval loss"
    assert page.locator("[data-testid='scatter-point']").count() == 2
    assert page.locator("[data-testid='scatter-y-tick']").count() >= 2
    assert page.locator("[data-testid='scatter-x-tick']").all_text_contents() == ["0.001", "0.002"]
    # Every label lies inside the picture: nothing clipped.
    outside = page.evaluate("""() => {
      const svg = document.querySelector("[data-testid='scatter'] svg");
      const [, , w, h] = svg.getAttribute("viewBox").split(" ").map(Number);
      return [...svg.querySelectorAll("text")].map((t) => {
        const b = t.getBBox();
        const m = t.getCTM(), s = svg.getCTM();  // the title is rotated: map its corners
        const pts = [[b.x, b.y], [b.x + b.width, b.y + b.height]].map(([x, y]) => {
          const p = new DOMPoint(x, y).matrixTransform(s.inverse().multiply(m));
          return [p.x, p.y];
        });
        return pts.some(([x, y]) => x < -0.5 || y < -0.5 || x > w + 0.5 || y > h + 0.5)
          ? t.textContent : null;
      }).filter(Boolean);
    }""")
    assert outside == []


def test_evaluations_compare_with_the_base_model(fleet, page):
    """Point 14: the link column has a header; a LoRA's row shows its change from the base
    model on the same text and settings, or a button that measures the base."""
    table = EvalTable(fleet.settings.paths.evals / "evaluations.csv")
    # A LoRA's measurement as a worker records it (the LoRA itself need not exist here).
    table.add(base_model="tiny", loras=["some-lora"], text_file="story.txt", perplexity=50.0,
              stride=32, max_length=64, tokens=100)
    page.goto(fleet.url + "/evaluations")
    headers = page.locator("[data-testid='evaluations-table'] thead th").all_text_contents()
    assert headers[-1] == "job" and "against the base model" in headers
    row = page.locator("[data-testid='evaluation-row']").first
    assert row.locator("td").count() == len(headers)
    row.locator("[data-testid='measure-base']").click()
    link = row.locator("[data-testid='vs-base-job']")
    link.wait_for(timeout=10000)
    base_job = link.get_attribute("href").rstrip("/").split("/")[-1]
    spec = fleet.store.get(base_job)["spec"]
    assert (spec["base_model"], spec["loras"], spec["text_file"], spec["stride"],
            spec["max_length"]) == ("tiny", [], "story.txt", 32, 64)
    page.reload()  # while it is queued or running, the row links to it
    assert page.locator("[data-testid='evaluation-row']").first.locator(
        "[data-testid='vs-base-job'], [data-testid='vs-base-delta']").count() == 1
    fleet.wait_for_state(base_job, ("succeeded",), timeout=120)
    base_ppl = fleet.store.get(base_job)["result"]["perplexity"]
    page.reload()
    lora_row = page.locator("[data-testid='evaluation-row']").filter(has_text="some-lora")
    delta = lora_row.locator("[data-testid='vs-base-delta']").inner_text()
    assert delta.startswith(f"{50.0 - base_ppl:+.4f}")
    base_row = page.locator("[data-testid='evaluation-row']").filter(has_text="the base model")
    assert base_row.count() == 1
