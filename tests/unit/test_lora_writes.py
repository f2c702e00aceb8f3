"""A training job whose LoRA folder cannot be written is refused before it is queued, and a job
page offers Resume only from its own run's checkpoint, never into a folder another job writes
(real Redis, the dashboard app)."""

from __future__ import annotations

import json
import os
import time

import pytest

from dashboard.app import create_app
from dashboard.job_summary import summary
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from tests.appclient import client_for
from tests.datafolder import small_data_folder


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix, users=False)


@pytest.fixture
def client(settings):
    return client_for(create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True}))


def spec(**over):
    return {"lora_name": "kept", "base_model": "tiny", "dataset": "d.json",
            "format": "alpaca-format", "epochs": 1, "micro_batch_size": 1, "batch_size": 2,
            "lora_rank": 8, **over}


def trained(settings, name="kept", rank=8, checkpoint=None):
    d = settings.paths.loras / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "adapter_config.json").write_text(json.dumps({"r": rank}))
    if checkpoint is not None:
        (d / f"checkpoint-{checkpoint}").mkdir()
    return d


def test_continuing_with_another_rank_is_refused_before_it_is_queued(client, settings, store):
    trained(settings, rank=8)
    resp = client.post("/api/v1/jobs", json=spec(lora_rank=32))
    assert resp.status_code == 400
    assert resp.get_json()["errors"] == [{"field": "lora_rank", "message": (
        "LoRA 'kept' already exists with rank 8, and lora_rank is 32: the rank cannot change "
        "when continuing a LoRA. Set lora_rank to 8, pick another lora_name, or set "
        "always_override to start over")}]
    assert store.page()[1] == 0  # nothing queued
    assert client.post("/api/v1/jobs", json=spec(lora_rank=8)).status_code == 201
    assert client.post("/api/v1/jobs", json=spec(lora_name="other", lora_rank=32,
                                                 )).status_code == 201
    over = client.post("/api/v1/jobs", json=spec(lora_rank=32, always_override=True))
    assert over.status_code == 201  # starting over: the old rank does not matter


def test_resuming_a_lora_that_another_job_writes_is_refused(client, settings, store):
    trained(settings, checkpoint=2)
    first = client.post("/api/v1/jobs", json=spec()).get_json()["id"]
    resp = client.post("/api/v1/jobs", json=spec(resume_from_checkpoint="latest"))
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["field"] == "resume_from_checkpoint"
    store.cancel(first)
    assert client.post("/api/v1/jobs", json=spec(resume_from_checkpoint="latest")
                       ).status_code == 201


def test_resume_is_offered_only_from_this_runs_checkpoint(settings, redis_client, prefix):
    store = JobStore(redis_client, prefix)
    d = trained(settings, checkpoint=3)
    old = time.time() - 3600
    os.utime(d / "checkpoint-3", (old, old))  # an earlier run's checkpoint
    never_ran = store.get(store.create("train", spec(), "ana"))
    store.cancel(never_ran["id"])
    never_ran = store.get(never_ran["id"])
    assert summary(never_ran, settings.paths, set())["resume_step"] is None
    ran = store.create("train", spec(), "ana")
    store.transition(ran, JobState.ASSIGNED, worker="w1")
    store.transition(ran, JobState.RUNNING)
    rec = store.get(ran)
    assert summary(rec, settings.paths, set())["resume_step"] is None  # 3 is older than the run
    (d / "checkpoint-5").mkdir()  # written by this run
    store.transition(ran, JobState.CANCELLED, "stopped by the user")
    rec = store.get(ran)
    assert summary(rec, settings.paths, set())["resume_step"] == 5
    assert summary(rec, settings.paths, {"kept"})["resume_step"] is None  # another job writes it
    store.update_progress(ran, eval_loss=0.75, best_eval_loss=0.5)
    got = summary(store.get(ran), settings.paths, set())
    assert (got["final_eval_loss"], got["best_eval_loss"]) == (0.75, 0.5)
