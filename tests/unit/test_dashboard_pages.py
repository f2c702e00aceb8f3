"""The dashboard's HTML pages render from real Redis data and load only local assets."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from html.parser import HTMLParser

import pytest

from dashboard.app import create_app
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.specs import TrainSpec
from dispatcher.jobs.states import JobState
from tests.appclient import client_for
from tests.datafolder import small_data_folder


class Elements(HTMLParser):
    """Every start tag with its attributes, to query a page without a browser."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str | None]]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.tags if (tag is None or t == tag)
                and all(a.get(k) == v for k, v in want.items())]


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix, files={
        "datasets/d.json": "[]", "datasets/book.txt": "once upon a time"})


@pytest.fixture
def client(settings):
    return client_for(create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True}))


def spec(**over):
    s = {"lora_name": "pages-lora", "base_model": "tiny", "dataset": "d.json",
         "format": "alpaca-format", "lora_rank": 8, "target_modules": ["q", "k", "v"]}
    s.update(over)
    return s


def test_new_job_form_has_every_spec_field(client):
    resp = client.get("/jobs/new")
    assert resp.status_code == 200
    page = Elements(resp.get_data(as_text=True))
    for f in fields(TrainSpec):
        assert page.find(data_field=f.name), f"no form field for {f.name}"
        assert page.find(data_testid=f"error-{f.name}"), f"no error slot for {f.name}"
    # Numbers, text, checkboxes and selects with the data folder's choices.
    assert page.find("input", name="lora_rank", type="number", value="32")
    assert page.find("input", name="learning_rate", type="text", value="3e-4")
    assert page.find("input", name="add_eos_token", type="checkbox")
    boxes = [a["value"] for a in page.find("input", name="target_modules", type="checkbox")]
    assert boxes == ["q", "k", "v", "o", "gate", "up", "down", "all"]
    checked = [a["value"] for a in page.find("input", name="target_modules")
               if "checked" in a]
    assert checked == ["q", "v"]
    options = [a["value"] for a in page.find("option")]
    for name in ("tiny", "d.json", "alpaca-format", "book.txt", "cosine", "adamw_torch", "4bit",
                 "urgent"):
        assert name in options, name
    assert page.find("form", data_testid="new-job-form")
    assert page.find("button", data_testid="submit-job")
    # Help text from the spec's field docs.
    assert "LoRA rank (dimension)" in resp.get_data(as_text=True)


def test_new_job_form_copies_parameters_from_a_job(client, store):
    job_id = store.create("train", {**TrainSpec().to_dict(), **spec(lora_rank=8)}, "local", "high")
    page = Elements(client.get(f"/jobs/new?from={job_id}").get_data(as_text=True))
    assert page.find("input", name="lora_rank", value="8")
    assert page.find("input", name="lora_name", value="pages-lora")
    assert [a["value"] for a in page.find("input", name="target_modules") if "checked" in a] == [
        "q", "k", "v"]
    high = [a for a in page.find("option", value="high")]
    assert high and "selected" in high[0]
    assert client.get("/jobs/new?from=nope").status_code == 404


def test_new_job_form_copies_parameters_from_a_webui_lora(client, settings):
    from tests.unit.test_specs import WEBUI_PARAMS

    folder = settings.paths.loras / "webui-lora"
    folder.mkdir(parents=True)
    (folder / "training_parameters.json").write_text(json.dumps(WEBUI_PARAMS))
    page = Elements(client.get("/jobs/new?from_lora=webui-lora").get_data(as_text=True))
    assert page.find("input", name="lora_rank", value="32")
    assert [a["value"] for a in page.find("input", name="target_modules") if "checked" in a] == [
        "q", "v", "o"]
    assert page.find(data_testid="copied-from-lora")
    assert client.get("/jobs/new?from_lora=nope").status_code == 404
    api = client.get("/api/v1/loras/webui-lora/parameters").get_json()
    assert api["spec"]["target_modules"] == ["q", "v", "o"]
    assert client.get("/api/v1/loras/nope/parameters").status_code == 404


def test_jobs_page_lists_jobs(client, store):
    empty = client.get("/")
    assert empty.status_code == 200
    assert b'data-testid="jobs-empty"' in empty.data
    job_id = store.create("train", spec(), "ada")
    store.update_progress(job_id, step=5, total_steps=20, loss=1.2345, eta_s=75)
    html = client.get("/jobs").get_data(as_text=True)
    page = Elements(html)
    rows = page.find("tr", data_testid="job-row", data_job_id=job_id)
    assert rows
    assert page.find("span", data_testid="job-row-state", data_state="queued")
    assert "pages-lora" in html and "ada" in html and "1.2345" in html and "5 / 20" in html


def test_job_page_shows_state_params_and_controls(client, store, redis_client, prefix):
    job_id = store.create("train", {**TrainSpec().to_dict(), **spec()}, "ada")
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    page = Elements(html)
    assert page.find(data_testid="job-state", data_state="queued")
    stop = page.find("button", data_testid="stop-button")
    assert stop and "hidden" not in stop[0]
    assert re.search(r'data-testid="stop-button"[^>]*>\s*Cancel\s*<', html)
    download = page.find("a", data_testid="download-lora")
    assert download and "hidden" in download[0]
    chart = page.find(data_testid="loss-chart")
    assert chart and chart[0]["data-points"] == "0" and chart[0]["data-eval-points"] == "0"
    lr_chart = page.find(data_testid="lr-chart")
    assert lr_chart and lr_chart[0]["data-points"] == "0"
    assert page.find(data_testid="log-tail")
    assert page.find(data_testid="params-table")
    assert page.find("tr", data_param="lora_rank")
    assert page.find(data_testid="job-page", data_events_url=f"/api/v1/jobs/{job_id}/events")
    for testid in ("stat-step", "stat-epoch", "stat-loss", "stat-tokens", "stat-eta",
                   "stat-gpu-mem", "job-name", "job-owner", "job-worker", "job-reason"):
        assert page.find(data_testid=testid), testid

    store.transition(job_id, JobState.ASSIGNED, "placed", worker="w0")
    store.transition(job_id, JobState.RUNNING, "started")
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'data-testid="stop-button"[^>]*>\s*Stop\s*<', html)
    assert re.search(r'data-testid="job-worker">w0<', html)

    store.transition(job_id, JobState.FAILED, "CUDA out of memory: lower micro_batch_size")
    page = Elements(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    reason = page.find(data_testid="job-reason")
    assert reason and "hidden" not in reason[0]
    assert "hidden" in page.find("button", data_testid="stop-button")[0]
    assert "CUDA out of memory" in client.get(f"/jobs/{job_id}").get_data(as_text=True)


def test_job_page_offers_the_download_once_a_lora_is_saved(client, store, settings):
    job_id = store.create("train", spec(), "ada")
    folder = settings.paths.loras / "pages-lora"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    store.transition(job_id, JobState.CANCELLED, "stopped by the user")
    page = Elements(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    download = page.find("a", data_testid="download-lora")
    assert download and "hidden" not in download[0]
    assert download[0]["href"] == f"/api/v1/jobs/{job_id}/lora.zip"


def test_unknown_job_page_is_a_friendly_404(client):
    resp = client.get("/jobs/doesnotexist")
    assert resp.status_code == 404
    assert b"no job doesnotexist" in resp.data
    assert b"Traceback" not in resp.data


def test_fleet_page_lists_workers(client, redis_client, prefix):
    html = client.get("/fleet").get_data(as_text=True)
    assert 'data-testid="workers-empty"' in html
    Fleet(redis_client, prefix).heartbeat("gpu1", host="box", card="RTX 4090",
                                          mem_total_mb=24564, mem_free_mb=2048, state="busy",
                                          job="abc123")
    page = Elements(client.get("/fleet").get_data(as_text=True))
    assert page.find("tr", data_testid="worker-row", data_worker="gpu1")
    assert page.find("a", href="/jobs/abc123")
    assert page.find(data_testid="worker-state", data_state="busy")
    html = client.get("/fleet").get_data(as_text=True)
    assert "RTX 4090" in html and "2.0 GiB / 24.0 GiB" in html
    # No utilisation reported: a dash and why (issue 11, point 19).
    assert re.search(r'data-col="load" data-testid="worker-load">— <span class="muted" '
                     r'data-testid="worker-load-note">\(no figures in the heartbeat\)</span></td>',
                     html)


def test_fleet_shows_what_each_card_runs_and_whose_it_is(client, redis_client, prefix, store):
    job_id = store.create("train", spec(lora_name="ada-lora"), "ada")
    Fleet(redis_client, prefix).heartbeat("gpu0", host="box", card="H100", mem_total_mb=81559,
                                          mem_free_mb=70000, state="busy", job=job_id,
                                          util_pct=97, temp_c=61)
    html = client.get("/fleet").get_data(as_text=True)
    assert re.search(rf'<a href="/jobs/{job_id}">ada-lora</a>', html)
    assert re.search(r'data-testid="worker-job-owner">ada<', html)
    assert "97 % · 61 °C" in html
    row = client.get("/api/v1/workers").get_json()["workers"][0]
    assert row["job_owner"] == "ada" and row["job_name"] == "ada-lora"


@pytest.mark.parametrize("path", ["/", "/jobs/new", "/fleet", "/datasets"])
def test_pages_load_only_local_assets(client, path):
    page = Elements(client.get(path).get_data(as_text=True))
    srcs = [a.get("src") for t, a in page.tags if t == "script" and a.get("src")]
    hrefs = [a.get("href") for t, a in page.tags if t == "link"]
    assert srcs
    for url in srcs + hrefs:
        assert url.startswith("/static/"), url
        assert client.get(url).status_code == 200, url


def test_vendored_uplot_is_served(client, store):
    job_id = store.create("train", spec(), "ada")
    page = Elements(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    srcs = [a.get("src") for t, a in page.tags if t == "script" and a.get("src")]
    assert "/static/vendor/uPlot.iife.min.js" in srcs
    # uPlot is loaded before the page's script that draws with it.
    assert srcs.index("/static/vendor/uPlot.iife.min.js") < srcs.index("/static/job.js")
    js = client.get("/static/vendor/uPlot.iife.min.js")
    assert js.status_code == 200 and b"uPlot" in js.data
    assert client.get("/static/vendor/uPlot.min.css").status_code == 200


def test_a_trained_jobs_page_says_which_speed_settings_it_used(client, store):
    job_id = store.create("train", spec(), "ada")
    page = Elements(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    assert not page.find(data_testid="summary-speed")  # nothing to say before a result
    store.set_result(job_id, {"steps": 3, "speed": {
        "loss": "fused (Liger kernel)", "batching": "pack",
        "prepare": {"liger_kernels": "on"}, "upcast": False,
        "checkpointing": "budget: 21 of 32 layers"}})
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert ("Speed settings used: loss fused (Liger kernel) · batching pack · liger_kernels on · "
            "fp32 norms off · checkpointing budget: 21 of 32 layers") in html
