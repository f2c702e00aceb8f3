"""The scheduling parts of the REST API and the CLI: the memory estimate, re-prioritising, and
queue positions with estimated start times, against a real Redis server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dashboard.app import create_app
from dispatcher import cli
from dispatcher.cli.client import ApiError, Client
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.settings import Settings
from tests.appclient import client_for

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": True}


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    (s.paths.models / "llama").mkdir()
    (s.paths.models / "llama" / "config.json").write_text(json.dumps(LLAMA_1B))
    (s.paths.datasets / "d.json").write_text(json.dumps([{"instruction": "hi", "output": "yo"}]))
    return s


@pytest.fixture
def client(settings):
    return client_for(create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True}))


def spec(**over):
    s = {"lora_name": "l", "base_model": "llama", "dataset": "d.json",
         "format": "alpaca-format", "precision": "4bit", "lora_rank": 32,
         "target_modules": ["all"], "micro_batch_size": 4, "cutoff_len": 512}
    s.update(over)
    return s


def test_estimate_endpoint(client):
    resp = client.post("/api/v1/estimate", json={"kind": "train", "spec": spec()})
    assert resp.status_code == 200
    # The fused loss (a speed setting on by default) holds no full logits; without it, 6400.
    assert resp.get_json() == {"gpu_memory_mb": 5056, "source": "estimate"}
    resp = client.post("/api/v1/estimate", json={"kind": "train", "spec": spec(fused_loss=False)})
    assert resp.get_json() == {"gpu_memory_mb": 6400, "source": "estimate"}
    # A bare spec works too, with the form's text values; the user's minimum wins.
    resp = client.post("/api/v1/estimate", json=spec(micro_batch_size="4",
                                                     min_gpu_memory_mb="9000"))
    assert resp.get_json() == {"gpu_memory_mb": 9000, "source": "user"}
    resp = client.post("/api/v1/estimate", json=spec(base_model=""))
    assert resp.get_json() == {"gpu_memory_mb": 0, "source": "unknown"}
    resp = client.post("/api/v1/estimate", json=spec(cutoff_len="lots"))
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["field"] == "cutoff_len"


def test_submitted_job_carries_its_memory_need(client, store):
    resp = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec()})
    assert resp.status_code == 201, resp.get_json()
    assert store.get(resp.get_json()["id"])["gpu_memory_mb"] == 5056  # the estimate endpoint's
    bad = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec(min_gpu_memory_mb=-1)})
    assert bad.status_code == 400
    assert [e["field"] for e in bad.get_json()["errors"]] == ["min_gpu_memory_mb"]


def test_priority_endpoint(client, store):
    a = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec()}).get_json()["id"]
    b = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec()}).get_json()["id"]
    resp = client.post(f"/api/v1/jobs/{b}/priority", json={"priority": "high"})
    assert resp.status_code == 200
    assert resp.get_json()["priority"] == "high" and resp.get_json()["position"] == 1
    assert client.get(f"/api/v1/jobs/{a}").get_json()["position"] == 2
    assert client.post(f"/api/v1/jobs/{b}/priority", json={"priority": "asap"}).status_code == 400
    assert client.post("/api/v1/jobs/nope/priority", json={"priority": "low"}).status_code == 404
    store.transition(b, JobState.ASSIGNED, "a", worker="w")
    resp = client.post(f"/api/v1/jobs/{b}/priority", json={"priority": "low"})
    assert resp.status_code == 409 and "assigned" in resp.get_json()["error"]
    assert store.get(b)["priority"] == "high"


def test_job_list_shows_queue_positions_and_estimated_starts(client, store, redis_client,
                                                             prefix):
    fleet = Fleet(redis_client, prefix)
    fleet.heartbeat("g0", device="cuda:0", mem_total_mb=81000, mem_free_mb=1000)
    running = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec()}).get_json()["id"]
    store.transition(running, JobState.ASSIGNED, "a", worker="g0")
    store.transition(running, JobState.RUNNING, "r")
    store.update_progress(running, eta_s=120)
    ids = [client.post("/api/v1/jobs", json={"kind": "train", "spec": spec(), "owner": o}
                       ).get_json()["id"] for o in ("ada", "bo")]
    too_big = client.post("/api/v1/jobs", json={"kind": "train", "owner": "cy",
                                                 "spec": spec(min_gpu_memory_mb=90000)}
                          ).get_json()["id"]
    jobs = {j["id"]: j for j in client.get("/api/v1/jobs").get_json()["jobs"]}
    assert jobs[running]["position"] is None and jobs[running]["estimated_start_s"] is None
    # Nothing has finished yet: each job is expected to take 600 s.
    assert [(jobs[i]["position"], jobs[i]["estimated_start_s"]) for i in ids] == \
        [(1, 120.0), (2, 720.0)]
    assert (jobs[too_big]["position"], jobs[too_big]["estimated_start_s"]) == (3, None)
    page = client.get("/jobs").get_data(as_text=True)
    assert "#2" in page and "no card fits" in page


def test_cli_priority_command(client, store, monkeypatch):
    a = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec()}).get_json()["id"]

    def fake_call(self, method, path, **kw):
        resp = client.open("/api/v1" + path, method=method, json=kw.get("json"))
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.get_json()["error"])
        return resp.get_json()

    monkeypatch.setattr(Client, "_call", fake_call)
    result = CliRunner().invoke(cli.main, ["priority", a, "urgent"])
    assert result.exit_code == 0, result.output
    assert result.output == f"{a} priority urgent, position 1 in the queue\n"
    assert store.get(a)["priority"] == "urgent"
    result = CliRunner().invoke(cli.main, ["priority", a, "soon"])
    assert result.exit_code == 2 and "soon" in result.output


def test_the_estimate_reads_a_speed_setting_as_the_spec_does(client):
    """Text values as the job's parse reads them: "false" and 0 off, "true" and 1 on; an empty
    value is a field not filled in yet, as everywhere in the estimate: the default (on)."""
    def mb(value):
        return client.post("/api/v1/estimate", json={"kind": "train",
                                                      "spec": spec(fused_loss=value)}
                           ).get_json()["gpu_memory_mb"]

    assert mb("false") == mb(0) == mb(False) == 6400
    assert mb("true") == mb(1) == mb(True) == mb("") == 5056
