"""A small sweep through real processes: the CLI queues it through the dashboard's API, the
dispatcher schedules the trials and stops one early, a real worker trains the tiny model, one
trial is refused by the engine at run time, and the succeeded trial gets a perplexity job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fleetproc import ROOT, FleetProcs, small_spec, write_json

pytestmark = pytest.mark.integration

# adamw_torch learns at 1e-2; sgd barely moves in 3 steps (mean loss 5.97 against 5.96), so
# ASHA with reduction factor 2 stops it at step 3 (300 steps of ~20 ms leave the dispatcher
# time to see the rung); adamw_torch_fused passes validation but a CPU worker's engine refuses
# it before any step.
SWEEP = {
    "name": "it-sweep",
    "base": small_spec(lora_name="it-sweep", learning_rate="1e-2", epochs=50),
    "parameters": {"optimizer": ["adamw_torch", "sgd", "adamw_torch_fused"]},
    "max_concurrent": 1,
    "early_stopping": {"policy": "asha", "rungs": [3], "reduction_factor": 2},
    "evaluate": {"text_file": "story", "stride": 32, "max_length": 64},
}


def _cli(fleet: FleetProcs, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--url", fleet.url],
                          capture_output=True, text=True, env=fleet.env, cwd=ROOT,
                          timeout=timeout)


def test_sweep_with_a_stopped_and_a_failed_trial(fleet, tmp_path):
    path = write_json(tmp_path / "sweep.json", SWEEP)
    before = len(fleet.store.list())
    dry = _cli(fleet, "sweep", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[0] for line in dry.stdout.splitlines()] == [
        "it-sweep-opt_adamw_torch", "it-sweep-opt_sgd", "it-sweep-opt_adamw_torch_fused"]
    assert "3 trials" in dry.stderr and len(fleet.store.list()) == before

    res = _cli(fleet, "sweep", str(path), "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    sid = res.stdout.strip()
    assert "best: it-sweep-opt_adamw_torch" in res.stderr

    d = fleet.http.get(f"{fleet.url}/api/v1/sweeps/{sid}", timeout=10).json()
    rows = {r["name"]: r for r in d["rows"]}
    ok, sgd, fused = (rows[f"it-sweep-opt_{o}"] for o in ("adamw_torch", "sgd",
                                                           "adamw_torch_fused"))
    assert ok["display_state"] == "succeeded", ok["reason"]
    assert sgd["display_state"] == "stopped early", (d["decisions"], sgd["reason"])
    assert sgd["state"] == "cancelled"
    assert sgd["reason"].startswith("stopped early: training loss ")
    assert "at step 3 ranks 2 of 2 trials, not in the best 1 (ASHA" in sgd["reason"]
    assert sgd["reason"].endswith("the incomplete LoRA was saved")
    assert 3 <= sgd["step"] < sgd["total_steps"] == 300
    assert (fleet.settings.paths.loras / sgd["name"] / "adapter_model.safetensors").is_file()
    assert fused["display_state"] == "failed"
    assert "adamw_torch_fused needs a CUDA GPU" in fused["reason"]
    assert d["summary"] == {"trials": 3, "succeeded": 1, "failed": 1, "stopped_early": 1,
                            "cancelled": 0, "running": 0, "queued": 0, "state": "finished"}
    assert d["best"] == ok["id"]
    # The rung values are the real losses, and the decision was made once per trial.
    assert sorted(d["decisions"]) == sorted([f"{ok['id']}:3", f"{sgd['id']}:3"])
    assert d["decisions"][f"{ok['id']}:3"]["value"] < d["decisions"][f"{sgd['id']}:3"]["value"]
    # Table columns: losses, tokens/s and GPU time of a trained trial; its perplexity job ran.
    assert ok["final_loss"] > 0 and ok["tokens_per_s"] > 0 and ok["gpu_time_s"] > 0
    assert ok["eval_state"] == "succeeded" and ok["perplexity"] > 1
    assert sgd["perplexity"] is None and sgd["eval_job"] is None
    ev = fleet.store.get(ok["eval_job"])
    assert ev["spec"]["loras"] == ["it-sweep-opt_adamw_torch"]

    # Each trial is an ordinary job: it carries its sweep, and `lorafleet status` shows it.
    st = _cli(fleet, "status", ok["id"])
    assert f"sweep: {sid}" in st.stdout
    listing = _cli(fleet, "sweeps", sid)
    assert "stopped early" in listing.stdout and "*best*" in listing.stdout
    csv_text = fleet.http.get(f"{fleet.url}/api/v1/sweeps/{sid}/trials.csv", timeout=10).text
    assert csv_text.splitlines()[0].startswith("trial,job,optimizer,state,")


def test_cli_refuses_a_bad_sweep_and_queues_nothing(fleet, tmp_path):
    before = len(fleet.store.list())
    bad = write_json(tmp_path / "bad.json", {**SWEEP, "parameters": {"lora_rank": [0, 8]},
                                             "early_stopping": {"policy": "sometimes"}})
    res = _cli(fleet, "sweep", str(bad))
    assert res.returncode == 2
    assert "error: parameters.lora_rank: value 0:" in res.stderr
    assert "error: early_stopping.policy:" in res.stderr
    assert len(fleet.store.list()) == before
    assert json.loads(_cli(fleet, "sweeps", "--json").stdout) is not None
