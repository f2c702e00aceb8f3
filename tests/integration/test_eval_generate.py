"""Perplexity and generation jobs through the real fleet: API, worker, evaluations table, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.fleetproc import ROOT, FleetProcs, small_spec

pytestmark = pytest.mark.integration


def post(fleet: FleetProcs, kind: str, spec: dict) -> requests.Response:
    return fleet.http.post(f"{fleet.url}/api/v1/jobs", json={"kind": kind, "spec": spec},
                         timeout=10)


def run_job(fleet: FleetProcs, kind: str, spec: dict) -> dict:
    resp = post(fleet, kind, spec)
    assert resp.status_code == 201, resp.text
    rec = fleet.wait_for_state(resp.json()["id"], ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "succeeded", rec.get("reason")
    return rec


@pytest.fixture(scope="module")
def trained(fleet):
    run_job(fleet, "train", small_spec(lora_name="ppl-lora", epochs=2, learning_rate="2e-2",
                                       lora_rank=8, lora_alpha=16, target_modules=["all"],
                                       batch_size=8, micro_batch_size=8, dataset="", format="",
                                       raw_text_file="story", overlap_len=16,
                                       newline_favor_len=0))
    return "ppl-lora"


def test_perplexity_with_and_without_lora_lands_in_the_table(fleet, trained):
    base = run_job(fleet, "evaluate", {"base_model": "tiny", "text_file": "story.txt",
                                       "stride": 32, "max_length": 64})
    with_lora = run_job(fleet, "evaluate", {"base_model": "tiny", "loras": [trained],
                                            "text_file": "story", "stride": 32,
                                            "max_length": 64, "comment": "after training"})
    ppl_base, ppl_lora = base["result"]["perplexity"], with_lora["result"]["perplexity"]
    # The LoRA was trained on this text: it must predict it better than the random base.
    assert ppl_lora < ppl_base * 0.95, (ppl_base, ppl_lora)
    assert with_lora["name"] == f"perplexity: tiny + {trained}"

    rows = fleet.http.get(f"{fleet.url}/api/v1/evaluations", timeout=5).json()["evaluations"]
    assert [(r["loras"], round(r["perplexity"], 4)) for r in rows[:2]] == [
        ([trained], round(ppl_lora, 4)), ([], round(ppl_base, 4))]
    assert rows[0]["comment"] == "after training" and rows[0]["job"] == with_lora["id"]

    # The same combination again is skipped (the table is unchanged) unless forced.
    again = run_job(fleet, "evaluate", {"base_model": "tiny", "text_file": "story.txt",
                                        "stride": 32, "max_length": 64})
    assert again["result"]["skipped"] is True
    assert again["result"]["perplexity"] == pytest.approx(ppl_base, rel=1e-5)
    assert len(fleet.http.get(f"{fleet.url}/api/v1/evaluations").json()["evaluations"]) == 2
    forced = run_job(fleet, "evaluate", {"base_model": "tiny", "text_file": "story.txt",
                                         "stride": 32, "max_length": 64, "force": True})
    assert forced["result"]["perplexity"] == pytest.approx(ppl_base, rel=1e-4)
    assert len(fleet.http.get(f"{fleet.url}/api/v1/evaluations").json()["evaluations"]) == 3

    # Comments are editable.
    row = rows[0]["id"]
    resp = fleet.http.post(f"{fleet.url}/api/v1/evaluations/{row}", json={"comment": "kept"})
    assert resp.status_code == 200 and resp.json()["comment"] == "kept"


def test_bad_evaluation_specs_are_refused(fleet):
    resp = post(fleet, "evaluate", {"base_model": "tiny", "loras": ["no-such-lora"],
                                    "text_file": "../../etc/passwd", "stride": 0})
    assert resp.status_code == 400
    fields = {e["field"] for e in resp.json()["errors"]}
    assert fields == {"loras", "text_file", "stride"}


def test_generate_from_the_cli_shows_both_answers(fleet, trained):
    res = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "generate", "--model", "tiny", "--lora", trained,
         "--prompt", "The sea is", "--max-new-tokens", "12", "--temperature", "0",
         "--url", fleet.url], capture_output=True, text=True, env=fleet.env, cwd=ROOT,
        timeout=180)
    assert res.returncode == 0, res.stderr
    assert "--- base model (12 tokens)" in res.stdout
    assert f"--- base + {trained} (12 tokens)" in res.stdout
    base_text = res.stdout.split("--- base model (12 tokens)\n")[1].split("\n--- base +")[0]
    lora_text = res.stdout.split(f"--- base + {trained} (12 tokens)\n")[1].rstrip("\n")
    assert base_text != lora_text  # the trained LoRA changes what the model says


def _maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch's shared library mapped (it imported torch)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        return any("libtorch" in line for line in maps)


def test_the_worker_preloads_torch_for_its_job_children(fleet, trained):
    """The worker's main process imports torch and transformers once at start-up (without
    initialising CUDA: it refuses to go on if that happened), so each job's fresh child starts
    with them; the idle child waiting for the next job already has torch."""
    main = fleet.procs["worker-w1"].pid
    assert _maps_torch(main)
    assert "training libraries imported in" in fleet.log("worker-w1")
    # Right after a job the old child may still be a zombie (no memory map) or just forked;
    # wait for the waiting child, which must have torch from its parent.
    fleet.wait_for(lambda: (lambda kids: kids and all(_maps_torch(pid) for pid in kids))(
        fleet.children("worker-w1")), 30, "a fresh pool child with torch already imported")
