"""The spine, end to end, with real processes: a real Redis server, the dispatcher, a Celery
worker process that really trains a tiny Llama, the dashboard's REST API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dispatcher.specs import parse_train_spec
from tests.fleetproc import ROOT, FleetProcs, small_spec, write_json

pytestmark = pytest.mark.integration


def submit(fleet: FleetProcs, **over) -> str:
    spec = parse_train_spec(small_spec(**over), fleet.settings.paths)
    return fleet.store.create("train", spec.to_dict(), owner="tester")


def test_job_trains_and_leaves_a_loadable_lora(fleet):
    job = submit(fleet, lora_name="spine-ok", epochs=2)
    rec = fleet.wait_for_state(job, ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "succeeded", rec.get("reason")
    events = [e for _, e in fleet.store.events.history(job)]
    train = [e for e in events if e["type"] == "train"]
    assert len(train) == rec["total_steps"] >= 2
    assert [e["step"] for e in train] == list(range(1, len(train) + 1))
    for e in train:
        for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_s",
                    "eta_s", "time"):
            assert key in e, key
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["queued", "assigned", "running", "succeeded"]
    assert rec["worker"] == "w1"

    lora = fleet.settings.paths.loras / "spine-ok"
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_parameters.json",
                 "training_prompt.json", "training_log.json"):
        assert (lora / name).is_file(), name
    params = json.loads((lora / "training_parameters.json").read_text())
    assert params["lora_rank"] == 4 and params["learning_rate"] == "1e-3"

    # peft loads it onto the base model and the adapter changes the output.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(fleet.settings.paths.models / "tiny")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, lora)
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_failing_job_ends_failed_with_reason_and_worker_takes_next(fleet):
    bad_fmt = write_json(fleet.settings.paths.formats / "only-text.json", {"text": "%text%"})
    job = submit(fleet, lora_name="spine-bad", format=bad_fmt.stem)
    rec = fleet.wait_for_state(job, ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "failed"
    assert "row 0" in rec["reason"], rec["reason"]
    assert not (fleet.settings.paths.loras / "spine-bad" / "adapter_model.safetensors").exists()
    good = submit(fleet, lora_name="spine-after-fail")
    assert fleet.wait_for_state(good, ("succeeded", "failed"))["state"] == "succeeded"


def test_stop_saves_incomplete_lora(fleet):
    job = submit(fleet, lora_name="spine-stop", epochs=40)
    fleet.wait_for(lambda: fleet.store.get(job).get("step", 0) >= 1, 120, "first step")
    fleet.store.cancel(job)
    rec = fleet.wait_for_state(job, ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "cancelled"
    assert "incomplete LoRA was saved" in rec["reason"]
    assert rec["step"] < rec["total_steps"]
    assert (fleet.settings.paths.loras / "spine-stop" / "adapter_model.safetensors").is_file()


def _cli(fleet: FleetProcs, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--url", fleet.url],
                          capture_output=True, text=True, env=fleet.env, cwd=ROOT,
                          timeout=timeout)


def test_cli_submit_wait_status_logs(fleet, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in
                              small_spec(lora_name="spine-cli").items()))
    res = _cli(fleet, "submit", str(spec), "--wait")
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip()
    assert len(job) == 12
    assert "loss" in res.stderr and "succeeded" in res.stderr

    st = _cli(fleet, "status", job, "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "succeeded"
    listing = _cli(fleet, "status")
    assert job in listing.stdout
    logs = _cli(fleet, "logs", job)
    assert "state: succeeded" in logs.stdout
    follow = _cli(fleet, "logs", "-f", job)
    assert follow.returncode == 0 and "loss" in follow.stdout


def test_cli_refuses_bad_spec_and_queues_nothing(fleet, tmp_path):
    before = len(fleet.store.list())
    (fleet.settings.paths.datasets / "notes.txt").write_text("some raw text\n" * 20)
    spec = write_json(tmp_path / "bad.json", small_spec(
        lora_name="../../etc/passwd", lora_rank=0, learning_rate="abc", overlap_len=64,
        dataset="", format="", raw_text_file="notes"))
    res = _cli(fleet, "submit", str(spec))
    assert res.returncode == 2
    for field in ("lora_name", "lora_rank", "learning_rate", "overlap_len"):
        assert f"error: {field}:" in res.stderr, res.stderr
    assert len(fleet.store.list()) == before


def test_cli_copies_parameters_from_a_lora(fleet, tmp_path):
    import yaml

    res = _cli(fleet, "params", "spine-ok")
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load(res.stdout)
    assert spec["lora_name"] == "spine-ok" and spec["lora_rank"] == 4 and spec["epochs"] == 2
    override = write_json(tmp_path / "o.json", {"lora_name": "spine-copied", "epochs": 1})
    res = _cli(fleet, "submit", str(override), "--from-lora", "spine-ok", "--wait")
    assert res.returncode == 0, res.stderr
    rec = fleet.store.get(res.stdout.strip())
    assert rec["spec"]["lora_rank"] == 4 and rec["spec"]["epochs"] == 1
    assert rec["spec"]["lora_name"] == "spine-copied"
    res = _cli(fleet, "params", "no-such-lora")
    assert res.returncode == 2 and "has no training_parameters.json" in res.stderr


def test_eval_dataset_sends_eval_events(fleet):
    job = submit(fleet, lora_name="spine-eval", eval_dataset="tiny", eval_steps=2, epochs=1)
    rec = fleet.wait_for_state(job, ("succeeded", "failed", "cancelled"))
    assert rec["state"] == "succeeded", rec.get("reason")
    evals = [e for _, e in fleet.store.events.history(job) if e["type"] == "eval"]
    # 24 samples, micro batch 2, batch 4: 6 steps; evaluated at steps 2, 4 and 6 (the last).
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert all(e["eval_loss"] > 0 for e in evals)
