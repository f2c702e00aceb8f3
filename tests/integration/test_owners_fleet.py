"""Owners with real processes: the worker's own check of a job's LoRA owner, and the CLI's
`data list` showing owners from a running dashboard."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from dispatcher.access.owners import Owners
from tests.fleetproc import ROOT, small_spec


def test_the_worker_refuses_a_job_into_another_users_lora(fleet):
    """A job record that reached the queue without the dashboard's check (written straight
    into Redis) still does not touch another user's LoRA: the worker fails it first."""
    lora = fleet.settings.paths.loras / "ana-own"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes(b"ana's weights")
    Owners(fleet.r, fleet.prefix).record("loras/ana-own", "ana")
    spec = small_spec(lora_name="ana-own", dataset="tiny.json", always_override=True)
    job_id = fleet.store.create("train", spec, owner="bo")
    rec = fleet.wait_for_state(job_id, ("failed", "succeeded", "cancelled"), timeout=120)
    assert rec["state"] == "failed"
    assert "loras/ana-own belongs to ana, not to this job's owner bo" in rec["reason"]
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_model.safetensors"]
    assert (lora / "adapter_model.safetensors").read_bytes() == b"ana's weights"


def test_data_list_shows_each_files_owner(fleet):
    resp = fleet.http.post(f"{fleet.url}/api/v1/datasets",
                           files={"file": ("bo-data.json", io.BytesIO(json.dumps(
                               [{"instruction": "a", "output": "b"}]).encode()))},
                           headers={"X-Lorafleet-User": "bo"})
    assert resp.status_code == 201, resp.text
    out = subprocess.run([sys.executable, "-m", "dispatcher.cli", "data", "list", "--url",
                          fleet.url], capture_output=True, text=True, env=fleet.env, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # datasets: name, rows, owner (last); format files: name, source, owner, key sets
    lines = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines()
             if line.startswith("  ")}
    assert lines["bo-data.json"] == "bo"
    assert lines["tiny.json"] == "—"  # put there by hand: no one's
    listing = json.loads(subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "data", "list", "--json", "--url", fleet.url],
        capture_output=True, text=True, env=fleet.env, cwd=ROOT, timeout=60).stdout)
    assert {d["name"]: d["owner"] for d in listing["datasets"]}["bo-data.json"] == "bo"


def test_the_worker_does_not_take_over_a_hand_made_lora(fleet):
    """REVIEW #10: a job record that skipped the dashboard (no admin's lora_admitted_by) into a
    LoRA folder made by hand, which no one owns: the worker fails it and claims nothing (it
    used to claim the folder for the job's owner and train into it)."""
    lora = fleet.settings.paths.loras / "hand-made"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes(b"hand-made weights")
    spec = small_spec(lora_name="hand-made", dataset="tiny.json", always_override=True)
    job_id = fleet.store.create("train", spec, owner="bo")
    rec = fleet.wait_for_state(job_id, ("failed", "succeeded", "cancelled"), timeout=120)
    assert rec["state"] == "failed"
    assert rec["reason"] == ("loras/hand-made was put in the data folder by hand and belongs "
                             "to no one: the job does not touch it (only an admin may admit a "
                             "job into it)")
    assert Owners(fleet.r, fleet.prefix).get("loras/hand-made") is None
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_model.safetensors"]
