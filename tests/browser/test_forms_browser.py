"""The job forms as a new user meets them (issue 11): an existing LoRA name said before anything
is queued (form, CLI, job page, Copy parameters proposing a free name); Copy parameters of an
evaluation or generation job opening its own form; errors that go as the field is fixed; Try a
LoRA answering on its page; the only model picked; the New sweep form showing each setting
where it applies. One fleet for the file: the tiny model is the data folder's only model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.fleetproc import ROOT, small_spec, tiny_fleet

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("formshome"), "fm", rows=8)
    (f.settings.paths.datasets / "story.txt").write_text("The sea is wide and deep. " * 20)
    f.start_fleet("fw1")
    yield f
    f.stop()


def _submit_cli(fleet, spec_path) -> tuple[str, list[str]]:
    """`lorafleet submit SPEC --wait`: the job id and every line it printed (stderr into
    stdout, in the order printed)."""
    res = subprocess.run([sys.executable, "-m", "dispatcher.cli", "submit", str(spec_path),
                          "--wait", "--url", fleet.url], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=fleet.env, cwd=ROOT,
                         timeout=240)
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    job_id = next(ln for ln in lines if re.fullmatch(r"[0-9a-f]{12}", ln.strip()))
    return job_id.strip(), lines


def _api_job(fleet, kind, spec) -> str:
    res = fleet.http.post(fleet.url + "/api/v1/jobs", json={"kind": kind, "spec": spec})
    assert res.status_code == 201 or res.ok, res.text
    return res.json()["id"]


def test_an_existing_lora_name_is_said_before_it_is_continued(fleet, page, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(small_spec(lora_name="cont-lora", dataset="tiny.json")))
    first, lines = _submit_cli(fleet, spec)
    assert not any("exists" in ln for ln in lines), lines
    steps = fleet.store.get(first)["result"]["steps"]
    assert steps >= 1 and fleet.store.get(first)["result"]["continues"] is None

    # The same name again: the CLI says it will be continued, before the job id.
    second, lines = _submit_cli(fleet, spec)
    notice = (f"cont-lora: a LoRA of this name exists (rank 4, {steps} steps): it will be "
              "continued — rename it, or set always_override: true to start over")
    assert notice in lines, lines
    assert lines.index(notice) < lines.index(second)
    rec = fleet.store.get(second)
    assert rec["result"]["continues"] == {"lora": "cont-lora", "step": steps}

    # The job page says what it continued.
    page.goto(f"{fleet.url}/jobs/{second}")
    line = page.locator("[data-testid='job-continues']")
    line.wait_for(state="visible", timeout=15000)
    assert line.inner_text().strip() == f"continues LoRA cont-lora from step {steps}"
    page.goto(f"{fleet.url}/jobs/{first}")
    assert page.locator("[data-testid='job-continues']").is_hidden()

    # Copy parameters proposes a free name, and the form says nothing about it.
    page.locator("[data-testid='copy-job']").click()
    page.wait_for_url(re.compile(r"/jobs/new\?from="))
    assert page.locator("[name='lora_name']").input_value() == "cont-lora-2"
    form_line = page.locator("[data-testid='lora-notice']")
    page.wait_for_timeout(400)
    assert form_line.is_hidden()

    # Typing the existing name back shows the line as it is typed; always_override changes it.
    page.locator("[name='lora_name']").fill("cont-lora")
    total = fleet.store.get(second)["result"]["steps"]
    form_line.wait_for(state="visible", timeout=5000)
    assert form_line.inner_text().strip() == (
        f"a LoRA of this name exists (rank 4, {total} steps): it will be continued — rename "
        "it, or tick always_override to start over")
    page.locator("[name='always_override']").check()
    page.wait_for_function("() => /starts over/.test(document.querySelector("
                           "\"[data-testid='lora-notice']\").textContent)", timeout=5000)
    page.locator("[name='lora_name']").fill("a-new-name")
    form_line.wait_for(state="hidden", timeout=5000)


def test_copy_parameters_opens_the_form_of_the_jobs_kind(fleet, page):
    ev = _api_job(fleet, "evaluate", {"base_model": "tiny", "text_file": "story.txt",
                                      "stride": 16, "max_length": 32, "comment": "copied"})
    gen = _api_job(fleet, "generate", {"base_model": "tiny", "prompt": "Say hello.",
                                       "max_new_tokens": 5, "temperature": 0.3, "seed": 7})
    page.goto(f"{fleet.url}/jobs/{ev}")
    page.locator("[data-testid='copy-job']").click()
    page.wait_for_url(re.compile(r"/evaluations\?from="))
    form = page.locator("[data-testid='eval-form']")
    assert form.locator("[name='text_file']").input_value() == "story.txt"
    assert form.locator("[name='stride']").input_value() == "16"
    assert form.locator("[name='max_length']").input_value() == "32"
    assert form.locator("[name='comment']").input_value() == "copied"
    assert form.locator("[name='base_model']").input_value() == "tiny"

    page.goto(f"{fleet.url}/jobs/{gen}")
    page.locator("[data-testid='copy-job']").click()
    page.wait_for_url(re.compile(r"/generate\?from="))
    form = page.locator("[data-testid='generate-form']")
    assert form.locator("[name='prompt']").input_value() == "Say hello."
    assert form.locator("[name='max_new_tokens']").input_value() == "5"
    assert form.locator("[name='temperature']").input_value() == "0.3"
    assert form.locator("[name='seed']").input_value() == "7"


def test_errors_go_as_each_field_is_fixed(fleet, page):
    page.goto(fleet.url + "/jobs/new")
    page.locator("[data-testid='submit-job']").click()
    banner = page.locator("[data-testid='form-error']")
    banner.wait_for(state="visible", timeout=10000)
    name_error = page.locator("[data-testid='error-lora_name']")
    assert name_error.is_visible() and "required" in name_error.inner_text()
    shown = page.locator(".field-error:visible").count()
    n = int(re.search(r"(\d+) problems?", banner.inner_text()).group(1))
    assert n >= shown >= 2
    page.locator("[name='lora_name']").fill("fixed-name")
    assert name_error.is_hidden()
    assert page.locator("[data-testid='field-lora_name']").get_attribute("class").count("invalid") == 0
    left = int(re.search(r"(\d+) problems?", banner.inner_text()).group(1))
    assert left == n - 1
    # Edit every other field that has a message: the banner goes with the last one.
    for field in page.locator(".field.invalid").all():
        field.locator("input, select").first.dispatch_event("change")
    assert banner.is_hidden()
    assert page.locator(".field-error:visible").count() == 0

    # The New sweep form shows and clears its errors the same way.
    page.goto(fleet.url + "/sweeps/new")
    page.locator("[data-testid='vary-values']").fill("")
    page.locator("[data-testid='submit-sweep']").click()
    banner.wait_for(state="visible", timeout=10000)
    name_error = page.locator("[data-testid='field-lora_name'] .field-error")
    name_error.wait_for(state="visible")
    page.locator("#base-fields [name='lora_name']").fill("sweep-name")
    assert name_error.is_hidden()


def test_try_a_lora_answers_on_its_page(fleet, page):
    page.goto(fleet.url + "/generate")
    form = page.locator("[data-testid='generate-form']")
    assert form.locator("[name='base_model']").input_value() == "tiny"  # the only model
    form.locator("[name='prompt']").fill("The sea is")
    form.locator("[name='max_new_tokens']").fill("6")
    form.locator("[name='temperature']").fill("0")
    page.locator("[data-testid='submit-generate']").click()
    entries = page.locator("[data-testid='try-result'] [data-testid='try-entry']")
    entries.first.locator("[data-testid='answer-base']").wait_for(timeout=120000)
    assert page.url.endswith("/generate")
    assert "6 tokens" in entries.first.locator("[data-testid='answer-base']").inner_text()
    assert entries.first.locator("[data-testid='prompt-text']").inner_text() == "The sea is"
    assert form.locator("[name='prompt']").input_value() == "The sea is"  # kept for the next

    form.locator("[name='prompt']").fill("A cat")
    page.locator("[data-testid='submit-generate']").click()
    page.wait_for_function("() => document.querySelectorAll(\"[data-testid='try-entry'] "
                           "[data-testid='answer-base']\").length === 2", timeout=120000)
    assert entries.count() == 2
    assert entries.nth(0).locator("[data-testid='prompt-text']").inner_text() == "A cat"
    assert entries.nth(1).locator("[data-testid='prompt-text']").inner_text() == "The sea is"
    gen_id = entries.nth(0).get_attribute("data-job-id")
    assert fleet.store.get(gen_id)["kind"] == "generate"


def test_the_only_model_is_picked(fleet, page):
    for path, selector in (("/jobs/new", "[data-testid='new-job-form'] [name='base_model']"),
                           ("/generate", "[data-testid='generate-form'] [name='base_model']"),
                           ("/evaluations", "[data-testid='eval-form'] [name='base_model']"),
                           ("/datasets", "[data-testid='preview-model']")):
        page.goto(fleet.url + path)
        select = page.locator(selector)
        assert select.input_value() == "tiny", path
        assert "— choose —" not in select.inner_text(), path


def test_new_sweep_shows_each_setting_where_it_applies(fleet, page):
    page.goto(fleet.url + "/sweeps/new")
    setting = lambda name: page.locator(f".field[data-setting='{name}']")  # noqa: E731
    page.locator("[name='s-method']").select_option("grid")
    assert setting("trials").is_hidden() and setting("seed").is_hidden()
    page.locator("[name='s-method']").select_option("random")
    assert setting("trials").is_visible() and setting("seed").is_visible()

    policy = page.locator("[name='s-policy']")
    policy.select_option("none")
    for name in ("rungs", "reduction_factor", "min_trials"):
        assert setting(f"early_stopping.{name}").is_hidden()
    policy.select_option("asha")
    assert setting("early_stopping.rungs").is_visible()
    assert setting("early_stopping.reduction_factor").is_visible()
    assert setting("early_stopping.min_trials").is_hidden()
    policy.select_option("median")
    assert setting("early_stopping.min_trials").is_visible()
    assert setting("early_stopping.reduction_factor").is_hidden()

    # The base field a parameter row varies is marked "swept".
    mark = lambda field: page.locator(  # noqa: E731
        f"#base-fields [data-testid='field-{field}'] [data-testid='swept-mark']")
    assert mark("lora_rank").count() == 1 and mark("learning_rate").count() == 0
    page.locator("[data-testid='vary-param']").select_option("learning_rate")
    assert mark("lora_rank").count() == 0 and mark("learning_rate").count() == 1
    page.locator("[data-testid='add-vary']").click()
    page.locator("[data-testid='vary-param']").nth(1).select_option("lora_rank")
    assert mark("lora_rank").count() == 1
    page.locator(".vary-remove").nth(1).click()
    assert mark("lora_rank").count() == 0
