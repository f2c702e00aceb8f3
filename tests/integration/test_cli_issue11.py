"""Issue 11 through the real CLI against a running fleet: overlap_len refused only for raw text
(point 4), a text-generation-webui training_parameters.json submitted as a spec (point 5), and
`lorafleet status` showing the kind and the result of evaluation and generation jobs (point 7)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fleetproc import ROOT, FleetProcs, small_spec, write_json

pytestmark = pytest.mark.integration

# A training_parameters.json as text-generation-webui writes it: its keys, its "None" for an
# empty choice, names without extension; the webui names no model, so base_model is added.
WEBUI_FILE = {
    "lora_name": "webui-lora", "always_override": False, "all_linear": False,
    "q_proj_en": True, "v_proj_en": True, "k_proj_en": False, "o_proj_en": True,
    "gate_proj_en": False, "down_proj_en": False, "up_proj_en": False, "save_steps": 0,
    "micro_batch_size": 2, "batch_size": 4, "epochs": 1, "learning_rate": "1e-3",
    "lr_scheduler_type": "linear", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.05,
    "cutoff_len": 32, "dataset": "tiny", "eval_dataset": "None", "format": "alpaca-format",
    "eval_steps": 100, "raw_text_file": "None", "overlap_len": 128, "newline_favor_len": 128,
    "higher_rank_limit": False, "warmup_steps": 0, "optimizer": "adamw_torch",
    "hard_cut_string": "\\n\\n\\n", "train_only_after": "", "stop_at_loss": 0,
    "add_eos_token": False, "min_chars": 0, "report_to": "None", "base_model": "tiny"}


def cli(fleet: FleetProcs, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--url", fleet.url],
                          capture_output=True, text=True, env=fleet.env, cwd=ROOT, timeout=240)


@pytest.fixture(scope="module")
def webui_job(fleet, tmp_path_factory) -> str:
    """The webui file, submitted as it is. Its cutoff_len 32 is below the default overlap_len
    128, which a dataset job ignores (point 4)."""
    path = write_json(tmp_path_factory.mktemp("specs") / "training_parameters.json", WEBUI_FILE)
    res = cli(fleet, "submit", str(path), "--wait")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_a_webui_training_parameters_file_trains(fleet, webui_job):
    rec = fleet.store.get(webui_job)
    assert rec["state"] == "succeeded"
    spec = rec["spec"]
    assert (spec["dataset"], spec["eval_dataset"], spec["raw_text_file"]) == ("tiny.json", "", "")
    assert spec["target_modules"] == ["q", "v", "o"]
    assert (spec["cutoff_len"], spec["overlap_len"]) == (32, 128)


def test_the_lora_folders_own_file_is_submitted_again(fleet, webui_job, tmp_path):
    """The file lorafleet wrote into the LoRA folder (webui keys and its own) is a spec too."""
    own = json.loads((fleet.settings.paths.loras / "webui-lora" /
                      "training_parameters.json").read_text())
    assert own["q_proj_en"] is True and own["raw_text_file"] == "None"
    path = write_json(tmp_path / "again.json", {**own, "lora_name": "webui-again"})
    res = cli(fleet, "submit", str(path))
    assert res.returncode == 0, res.stderr
    spec = fleet.store.get(res.stdout.strip())["spec"]
    first = fleet.store.get(webui_job)["spec"]
    assert spec == {**first, "lora_name": "webui-again"}
    fleet.wait_for_state(res.stdout.strip(), ("succeeded", "failed", "cancelled"))


def test_overlap_is_refused_for_raw_text_only(fleet, tmp_path):
    raw = write_json(tmp_path / "raw.json", small_spec(
        lora_name="raw-overlap", dataset="", format="", raw_text_file="story", cutoff_len=32,
        overlap_len=32))
    res = cli(fleet, "submit", str(raw))
    assert res.returncode != 0
    assert "overlap_len: must be less than cutoff_len (32)" in res.stderr


def test_status_shows_kind_and_result_of_evaluations_and_generations(fleet, webui_job):
    ev = cli(fleet, "evaluate", "--model", "tiny", "--lora", "webui-lora", "--text", "story",
             "--stride", "32", "--max-length", "64", "--wait")
    assert ev.returncode == 0, ev.stderr
    ev_id = ev.stdout.split()[0]
    ppl = fleet.store.get(ev_id)["result"]["perplexity"]
    gen = cli(fleet, "generate", "--model", "tiny", "--lora", "webui-lora", "--prompt", "Hi",
              "--max-new-tokens", "4", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    gen_id = gen.stdout.split()[0]
    answers = fleet.wait_for_state(gen_id, ("succeeded", "failed"))["result"]

    listing = cli(fleet, "status").stdout.splitlines()
    assert listing[0].split()[:5] == ["ID", "STATE", "OWNER", "KIND", "PROGRESS"]
    rows = {ln.split()[0]: ln for ln in listing[1:]}
    assert rows[ev_id].split()[1:6] == ["succeeded", "local", "evaluate", "perplexity",
                                        f"{ppl:.4f}"]
    assert rows[gen_id].split()[1:5] == ["succeeded", "local", "generate", "answered"]
    assert rows[webui_job].split()[1:7] == [
        "succeeded", "local", "train", rows[webui_job].split()[4], "final", "loss"]
    assert "0/0" not in rows[ev_id] and "0/0" not in rows[gen_id]

    one = cli(fleet, "status", ev_id).stdout
    assert f"perplexity: {ppl:.4f} over " in one
    one = cli(fleet, "status", gen_id).stdout
    assert f"answer (base model): {answers['base']['text']}" in one
    assert f"answer (with the LoRA): {answers['lora']['text']}" in one

