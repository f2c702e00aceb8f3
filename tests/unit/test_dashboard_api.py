"""The dashboard's REST API and SSE endpoints against a real Redis server."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import pytest

from dashboard.app import create_app
from dispatcher.jobs.events import EventLog
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings
from tests.appclient import client_for
from tests.datafolder import small_data_folder


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix, files={
        "datasets/notes.txt": "raw text\n",
        "formats/alpaca-format.json": json.dumps({
            "instruction,output": "### Instruction:\n%instruction%\n\n### Response:\n%output%"})})


@pytest.fixture
def app(settings):
    return create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True,
                       "LORAFLEET_SSE_BLOCK_MS": 200, "LORAFLEET_SSE_GRACE_MS": 50})


@pytest.fixture
def client(app):
    return client_for(app)


@pytest.fixture
def events(redis_client, prefix):
    return EventLog(redis_client, prefix)


def good_spec(**over):
    spec = {"lora_name": "my-lora", "base_model": "tiny", "dataset": "d.json",
            "format": "alpaca-format", "epochs": 1, "micro_batch_size": 1, "batch_size": 2}
    spec.update(over)
    return spec


def submit(client, spec, **envelope):
    return client.post("/api/v1/jobs", json={"kind": "train", "spec": spec, **envelope})


def read_sse(resp, limit_bytes: int = 200_000, until: bytes | None = None) -> str:
    """Read a streaming response up to a byte limit, or until `until` appears, then close it."""
    buf = b""
    try:
        for chunk in resp.response:
            buf += chunk if isinstance(chunk, bytes) else chunk.encode()
            if len(buf) >= limit_bytes or (until and until in buf):
                break
    finally:
        resp.close()
    return buf.decode()


def parse_sse(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        msg: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            if field == "data":
                msg["data"] = json.loads(value)
            elif field in ("id", "event"):
                msg[field] = value
        if "data" in msg:
            out.append(msg)
    return out


# app factory ----------------------------------------------------------------------------------
def test_create_app_makes_no_redis_connection(tmp_path):
    # A port where nothing listens: creating the app must still work (no connection yet).
    app = create_app({"LORAFLEET_SETTINGS": Settings(home=tmp_path,
                                                     redis_url="redis://127.0.0.1:1/0")})
    resp = client_for(app).get("/api/v1/jobs")
    assert resp.status_code == 503
    assert "cannot reach Redis" in resp.get_json()["error"]


# submitting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("over, field", [
    ({"lora_rank": 0}, "lora_rank"),
    ({"learning_rate": "abc"}, "learning_rate"),
    ({"overlap_len": 256, "cutoff_len": 256, "dataset": "", "format": "",
      "raw_text_file": "notes"}, "overlap_len"),
    ({"dataset": ""}, "dataset"),
    ({"base_model": "no-such-model"}, "base_model"),
    ({"lora_name": "../../etc/passwd"}, "lora_name"),
    ({"lora_rank": "many"}, "lora_rank"),
    ({"bogus_key": 1}, "bogus_key"),
])
def test_bad_spec_is_refused_with_its_field_named(client, over, field):
    resp = submit(client, good_spec(**over))
    assert resp.status_code == 400
    body = resp.get_json()
    assert field in [e["field"] for e in body["errors"]], body
    assert all(e["message"] for e in body["errors"])
    assert client.get("/api/v1/jobs").get_json()["jobs"] == []


def test_every_problem_is_reported_at_once(client):
    resp = submit(client, good_spec(lora_rank=0, learning_rate="abc", base_model="nope",
                                    lora_name="../../etc/passwd"))
    fields = {e["field"] for e in resp.get_json()["errors"]}
    assert {"lora_rank", "learning_rate", "base_model", "lora_name"} <= fields


def test_bad_envelope_fields_are_refused(client):
    resp = submit(client, good_spec(), priority="whenever", kind="sweep", colour="red")
    assert resp.status_code == 400
    fields = {e["field"] for e in resp.get_json()["errors"]}
    assert fields == {"priority", "kind", "colour"}
    assert client.get("/api/v1/jobs").get_json()["jobs"] == []


def test_non_json_body_is_a_json_error(client):
    resp = client.post("/api/v1/jobs", data="lora_rank=4", content_type="text/plain")
    assert resp.status_code == 400
    assert "JSON" in resp.get_json()["error"]
    resp = client.post("/api/v1/jobs", json=[1, 2])
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["field"] == "spec"


def test_good_spec_is_queued_listed_and_readable(client):
    resp = submit(client, good_spec(), priority="high", owner="ada")
    assert resp.status_code == 201
    job_id = resp.get_json()["id"]

    jobs = client.get("/api/v1/jobs").get_json()["jobs"]
    assert [j["id"] for j in jobs] == [job_id]
    row = jobs[0]
    assert row["name"] == "my-lora" and row["state"] == "queued" and row["owner"] == "ada"
    for key in ("step", "total_steps", "loss", "eta_s", "created", "worker"):
        assert key in row

    rec = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert rec["state"] == "queued"
    assert rec["priority"] == "high"
    # The stored spec is the validated one: names resolved, defaults filled in.
    assert rec["spec"]["dataset"] == "d.json"
    assert rec["spec"]["format"] == "alpaca-format"
    assert rec["spec"]["lora_rank"] == 32
    assert [h["state"] for h in rec["history"]] == ["queued"]
    assert rec["lora_available"] is False


def test_bare_spec_body_and_user_header(client):
    resp = client.post("/api/v1/jobs", json=good_spec(), headers={"X-Lorafleet-User": "grace"})
    assert resp.status_code == 201
    rec = client.get(f"/api/v1/jobs/{resp.get_json()['id']}").get_json()
    assert rec["owner"] == "grace"
    assert rec["priority"] == "normal"


def test_jobs_are_listed_newest_first(client):
    ids = []
    for name in ("a", "b", "c"):
        ids.append(submit(client, good_spec(lora_name=name)).get_json()["id"])
        time.sleep(0.01)
    listed = [j["id"] for j in client.get("/api/v1/jobs").get_json()["jobs"]]
    assert listed == ids[::-1]


def test_unknown_job_is_a_json_404(client):
    for url in ("/api/v1/jobs/nope", "/api/v1/jobs/nope/events",
                "/api/v1/jobs/nope/events?format=json", "/api/v1/jobs/nope/lora.zip"):
        resp = client.get(url)
        assert resp.status_code == 404, url
        assert "nope" in resp.get_json()["error"]
    resp = client.post("/api/v1/jobs/nope/cancel")
    assert resp.status_code == 404
    resp = client.get("/api/v1/no-such-endpoint")
    assert resp.status_code == 404 and "error" in resp.get_json()


# events ---------------------------------------------------------------------------------------
def _job_with_events(store: JobStore, events: EventLog, final: JobState | None = None) -> str:
    job_id = store.create("train", good_spec(), "local")
    store.transition(job_id, JobState.ASSIGNED, "placed", worker="w0")
    store.transition(job_id, JobState.RUNNING, "started")
    for step in (1, 2, 3):
        events.append(job_id, "train", step=step, total_steps=3, epoch=step / 3,
                      loss=2.0 - step * 0.1, learning_rate=1e-4, tokens_per_s=100.0,
                      eta_s=3 - step, gpu_mem_mb=1000)
    events.append(job_id, "eval", step=3, eval_loss=1.5)
    events.append(job_id, "log", line="saving")
    if final is not None:
        store.transition(job_id, final, "done")
    return job_id


def test_events_json_history(client, store, events):
    job_id = _job_with_events(store, events)
    evs = client.get(f"/api/v1/jobs/{job_id}/events?format=json").get_json()
    assert isinstance(evs, list)  # the bare history, as the README's REST API table says
    assert [e["type"] for e in evs] == ["state", "state", "state", "train", "train", "train",
                                        "eval", "log"]
    assert [e["loss"] for e in evs if e["type"] == "train"] == pytest.approx([1.9, 1.8, 1.7])
    assert all(e["id"] for e in evs)
    # ?after= gives only the newer events.
    after = evs[4]["id"]
    newer = client.get(f"/api/v1/jobs/{job_id}/events?format=json&after={after}").get_json()
    assert [e["id"] for e in newer] == [e["id"] for e in evs[5:]]
    last = evs[-1]["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/events?format=json&after={last}").get_json() == []


def test_sse_replays_history_then_ends_for_a_finished_job(client, store, events):
    job_id = _job_with_events(store, events, final=JobState.SUCCEEDED)
    resp = client.get(f"/api/v1/jobs/{job_id}/events")
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    text = read_sse(resp, until=b"event: end")
    msgs = parse_sse(text)
    history = [e for e in msgs if "event" not in e]
    stored = client.get(f"/api/v1/jobs/{job_id}/events?format=json").get_json()
    assert [m["id"] for m in history] == [e["id"] for e in stored]
    assert [m["data"] for m in history] == stored  # each message carries its stream id too
    assert msgs[-1]["event"] == "end"
    assert msgs[-1]["data"]["state"] == "succeeded"


def test_sse_resumes_after_last_event_id(client, store, events):
    job_id = _job_with_events(store, events, final=JobState.FAILED)
    stored = client.get(f"/api/v1/jobs/{job_id}/events?format=json").get_json()
    resp = client.get(f"/api/v1/jobs/{job_id}/events",
                      headers={"Last-Event-ID": stored[5]["id"]})
    msgs = parse_sse(read_sse(resp, until=b"event: end"))
    assert [m["id"] for m in msgs if "id" in m] == [e["id"] for e in stored[6:]]
    bad = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x; DROP"})
    assert bad.status_code == 400


def test_sse_follows_live_events_until_the_job_ends(client, store, events):
    job_id = _job_with_events(store, events)

    def worker():
        time.sleep(0.3)
        events.append(job_id, "train", step=4, total_steps=4, loss=1.0, learning_rate=1e-4)
        time.sleep(0.3)  # longer than a keep-alive interval
        store.transition(job_id, JobState.SUCCEEDED, "finished")
        events.append(job_id, "result", lora_dir="loras/my-lora")

    t = threading.Thread(target=worker)
    t.start()
    started = time.monotonic()
    text = read_sse(client.get(f"/api/v1/jobs/{job_id}/events"), until=b"event: end")
    t.join()
    assert time.monotonic() - started < 10
    assert ": keep-alive" in text
    msgs = parse_sse(text)
    types = [m["data"].get("type") for m in msgs if "event" not in m]
    assert types[-3:] == ["train", "state", "result"]
    assert msgs[-1]["event"] == "end"


def test_live_feed_announces_job_events(client, store, events):
    job_id = store.create("train", good_spec(), "local")
    resp = client.get("/api/v1/live?types=train")
    assert resp.mimetype == "text/event-stream"
    it = iter(resp.response)
    first = next(it)
    assert b"connected" in first  # subscribed: nothing published from now on is missed
    events.append(job_id, "log", line="not a train event")
    events.append(job_id, "train", step=1, total_steps=2, loss=1.25)
    buf = b""
    for chunk in it:
        buf += chunk
        if b"event: job" in buf and buf.endswith(b"\n\n"):
            break
    resp.close()
    msgs = parse_sse(buf.decode())
    assert len(msgs) == 1
    assert msgs[0]["data"]["job"] == job_id
    assert msgs[0]["data"]["event"]["loss"] == 1.25


# cancel, workers, choices ---------------------------------------------------------------------
def test_cancel_a_queued_job(client):
    job_id = submit(client, good_spec()).get_json()["id"]
    resp = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200
    assert resp.get_json()["state"] == "cancelled"
    rec = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert rec["state"] == "cancelled"
    assert rec["reason"] == "cancelled by the user"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert "cancelled" in again.get_json()["error"]


def test_cancel_a_running_job_requests_a_stop(client, store):
    job_id = submit(client, good_spec()).get_json()["id"]
    store.transition(job_id, JobState.ASSIGNED, "placed", worker="w0")
    store.transition(job_id, JobState.RUNNING, "started")
    body = client.post(f"/api/v1/jobs/{job_id}/cancel").get_json()
    assert body["state"] == "running"
    assert body["stop_requested"] is True
    assert store.stop_requested(job_id)
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["stop_requested"] is True


def test_workers_list_after_heartbeat(client, redis_client, prefix):
    assert client.get("/api/v1/workers").get_json() == {"workers": []}
    Fleet(redis_client, prefix).heartbeat("gpu0", host="box", card="H100", mem_total_mb=81559,
                                          mem_free_mb=80000, state="idle", job="")
    workers = client.get("/api/v1/workers").get_json()["workers"]
    assert len(workers) == 1
    w = workers[0]
    assert (w["name"], w["host"], w["card"], w["state"], w["alive"]) == (
        "gpu0", "box", "H100", "idle", True)
    assert w["mem_total_mb"] == 81559


def test_choices_and_defaults(client):
    choices = client.get("/api/v1/choices").get_json()
    assert choices["models"] == ["tiny"]
    assert choices["datasets"] == ["d.json"]
    assert "alpaca-format" in choices["formats"]
    body = client.get("/api/v1/spec/defaults").get_json()
    assert body["spec"]["lora_rank"] == 32
    assert body["docs"]["lora_rank"].startswith("LoRA rank")
    by_name = {f["name"]: f for f in body["fields"]}
    assert by_name["base_model"]["widget"] == "select"
    assert by_name["base_model"]["choices"] == ["tiny"]
    assert by_name["target_modules"]["choices"][-1] == "all"


# LoRA download --------------------------------------------------------------------------------
def test_lora_zip_download(client, store, settings):
    job_id = submit(client, good_spec()).get_json()["id"]
    folder = settings.paths.loras / "my-lora"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5000)
    (folder / "training_log.json").write_text("{}")
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x01" * 100)
    # Not finished yet: the trainer may still be writing it.
    assert client.get(f"/api/v1/jobs/{job_id}/lora.zip").status_code == 409
    store.transition(job_id, JobState.ASSIGNED, "placed", worker="w0")
    store.transition(job_id, JobState.RUNNING, "started")
    store.transition(job_id, JobState.SUCCEEDED, "finished")
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["lora_available"] is True

    resp = client.get(f"/api/v1/jobs/{job_id}/lora.zip")
    assert resp.status_code == 200
    assert resp.mimetype == "application/zip"
    assert 'filename="my-lora.zip"' in resp.headers["Content-Disposition"]
    zf = zipfile.ZipFile(io.BytesIO(resp.get_data()))
    assert zf.testzip() is None
    assert sorted(zf.namelist()) == ["my-lora/adapter_config.json",
                                     "my-lora/adapter_model.safetensors",
                                     "my-lora/training_log.json"]
    assert zf.read("my-lora/adapter_model.safetensors") == b"\x00" * 5000
    with_ckpt = client.get(f"/api/v1/jobs/{job_id}/lora.zip?checkpoints=1").get_data()
    assert "my-lora/checkpoint-10/optimizer.pt" in zipfile.ZipFile(io.BytesIO(with_ckpt)).namelist()


def test_lora_zip_404_when_the_job_saved_none(client, store):
    job_id = submit(client, good_spec()).get_json()["id"]
    store.transition(job_id, JobState.CANCELLED, "stop")
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["lora_available"] is False
    resp = client.get(f"/api/v1/jobs/{job_id}/lora.zip")
    assert resp.status_code == 404
    assert "no adapter" in resp.get_json()["error"]


def test_lora_zip_refuses_a_name_outside_loras(client, store, settings, redis_client):
    # A record whose spec was tampered with in Redis must not serve files outside loras/.
    job_id = submit(client, good_spec()).get_json()["id"]
    store.transition(job_id, JobState.CANCELLED, "stop")
    spec = store.get(job_id)["spec"]
    spec["lora_name"] = "../models"
    redis_client.hset(store.key(job_id), "spec", json.dumps(spec))
    resp = client.get(f"/api/v1/jobs/{job_id}/lora.zip")
    assert resp.status_code == 404
    assert resp.get_json()["error"]


def test_errors_are_json_not_tracebacks(client, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(JobStore, "list", boom)
    resp = client.get("/api/v1/jobs")
    assert resp.status_code == 500
    body = resp.get_json()
    assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    assert resp.status_code == 500
    page = client.get("/jobs")
    assert page.status_code == 500 and b"Traceback" not in page.data


def test_a_quiet_job_stream_waits_past_redis_default_timeout(settings, store):
    """A queued job sends nothing for longer than redis-py's default 5 s socket timeout: the
    stream must keep waiting (and send a keep-alive), not break off as "interrupted"."""
    app = create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True,
                      "LORAFLEET_SSE_BLOCK_MS": 6500})  # Redis connected from the settings
    job_id = store.create("train", good_spec(), "ada")
    resp = client_for(app).get(f"/api/v1/jobs/{job_id}/events")
    text = read_sse(resp, until=b": keep-alive")
    assert ": keep-alive" in text and "interrupted" not in text
