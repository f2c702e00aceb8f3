"""The spine, end to end, with real processes: a real Redis server, the dispatcher, a Celery
worker process that really trains a tiny Llama, the dashboard's REST API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dispatcher.cli.client import Client
from dispatcher.jobs.specs import parse_train_spec
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
    # Every number the Job page shows, as the page gets it (the REST history); the card memory
    # is None on this CPU worker, so the page shows a dash rather than a made-up 0.
    served = [e for e in Client(fleet.url, token=fleet.token).history(job) if e["type"] == "train"]
    assert [e["step"] for e in served] == [e["step"] for e in train]
    for e in served:
        assert e["total_steps"] == rec["total_steps"]
        for key in ("epoch", "loss", "learning_rate", "tokens_per_s", "eta_s", "time"):
            assert isinstance(e[key], (int, float)) and e[key] >= 0, (key, e)
        assert e["gpu_mem_mb"] is None, e
    assert served[-1]["epoch"] == pytest.approx(2.0) and served[-1]["eta_s"] == 0
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
    assert "row 1" in rec["reason"], rec["reason"]
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


def _cli(fleet: FleetProcs, *args: str, timeout: float = 240,
         url_first: bool = False) -> subprocess.CompletedProcess:
    """`lorafleet ARGS --url URL`, or `lorafleet --url URL ARGS` with url_first."""
    argv = ["--url", fleet.url, *args] if url_first else [*args, "--url", fleet.url]
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *argv],
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
    # --url before the command works too, and so do the filters, applied by the dashboard.
    mine = _cli(fleet, "status", "--owner", "local", "--state", "succeeded", url_first=True)
    assert mine.returncode == 0, mine.stderr
    assert job in mine.stdout
    others = _cli(fleet, "status", "--owner", "nobody-here", url_first=True)
    assert others.returncode == 0 and job not in others.stdout
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

    # A model and a dataset that are not in the data folder, and a LoRA name that climbs out
    # of loras/: each field is named with the value it got, and still nothing is queued.
    spec = write_json(tmp_path / "missing.json", small_spec(
        lora_name="../../etc/passwd", base_model="no-such-model", dataset="no-such-data"))
    res = _cli(fleet, "submit", str(spec))
    assert res.returncode == 2, res.stderr
    errors = {line.split(":", 2)[1].strip(): line.split(":", 2)[2]
              for line in res.stderr.splitlines() if line.startswith("error: ")}
    assert set(errors) == {"lora_name", "base_model", "dataset"}, res.stderr
    assert "'../../etc/passwd'" in errors["lora_name"]
    assert "'no-such-model' was not found in models/" in errors["base_model"]
    assert "'no-such-data' was not found in datasets/" in errors["dataset"]
    assert res.stdout == ""
    assert len(fleet.store.list()) == before
    assert not (fleet.settings.paths.loras / "../../etc/passwd").exists()


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
