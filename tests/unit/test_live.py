"""Live views share one subscription per dashboard process (dashboard/live.py): caps per user
and in all with a 429 naming the cap, slots freed when a view closes, and an interruption (then
a fresh subscription) when Redis goes away."""

from __future__ import annotations

import json

import pytest

from dashboard.app import create_app
from dispatcher.host.embedded import free_port, start_server, stop_server
from dispatcher.jobs.events import EventLog
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings
from tests.appclient import client_for


@pytest.fixture
def app(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    return create_app({"LORAFLEET_SETTINGS": s, "TESTING": True, "LORAFLEET_SSE_BLOCK_MS": 200,
                       "LORAFLEET_LIVE_PER_USER": 3, "LORAFLEET_LIVE_TOTAL": 5})


def open_view(client, path: str, user: str):
    resp = client.get(path, headers={"X-Lorafleet-User": user})
    if resp.status_code == 200:
        resp.chunks = iter(resp.response)
        assert next(resp.chunks).startswith(b"retry:")
    return resp


def test_caps_per_user_and_in_all_answer_429_and_closing_frees_the_slot(app, store):
    c = client_for(app)
    hub = app.extensions["lorafleet"].live
    job = store.create("train", {"lora_name": "x"}, "bo")
    bo = [open_view(c, "/api/v1/live", "bo"), open_view(c, f"/api/v1/jobs/{job}/events", "bo"),
          open_view(c, "/api/v1/live?types=train", "bo")]
    assert [r.status_code for r in bo] == [200, 200, 200]
    refused = open_view(c, "/api/v1/live", "bo")
    assert refused.status_code == 429
    assert refused.get_json() == {"error": "too many live views open for bo (3): close some tabs"}
    assert open_view(c, f"/api/v1/jobs/{job}/events", "bo").status_code == 429
    cy = [open_view(c, "/api/v1/live", "cy") for _ in range(2)]
    assert open_view(c, "/api/v1/live", "dee").get_json() == {
        "error": "too many live views open on this dashboard (5): try again in a minute"}
    assert (hub.open_count("bo"), hub.open_count()) == (3, 5)
    bo.pop().close()  # the server closes the response when its client goes away
    assert (hub.open_count("bo"), hub.open_count()) == (2, 4)
    again = open_view(c, "/api/v1/live", "bo")
    assert again.status_code == 200
    for r in [*bo, *cy, again]:
        r.close()
    assert hub.open_count() == 0


def test_a_view_closed_before_its_stream_began_frees_its_slot(app):
    c = client_for(app)
    resp = c.get("/api/v1/live", headers={"X-Lorafleet-User": "bo"})
    assert app.extensions["lorafleet"].live.open_count("bo") == 1
    resp.close()  # never read: the generator never ran, its `finally` cannot free the slot
    assert app.extensions["lorafleet"].live.open_count("bo") == 0


def test_views_are_interrupted_when_redis_goes_and_follow_again_after(tmp_path, prefix):
    data = tmp_path / "redis"
    data.mkdir()
    port = free_port()
    url = f"redis://:pw-{prefix}@127.0.0.1:{port}/0"
    proc = start_server(data, port, password=f"pw-{prefix}", log_file=data / "redis.log")
    try:
        s = Settings(home=tmp_path / "home", redis_url=url, prefix=prefix)
        s.paths.ensure()
        app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": True,
                          "LORAFLEET_SSE_BLOCK_MS": 200})
        c = client_for(app)
        import redis

        r = redis.Redis.from_url(url, decode_responses=True)
        job = JobStore(r, prefix).create("train", {"lora_name": "x"}, "bo")
        live = open_view(c, "/api/v1/live", "bo")
        events = open_view(c, f"/api/v1/jobs/{job}/events", "bo")
        stop_server(proc)
        for view, what in ((live, "live feed"), (events, "event stream")):
            text = b"".join(view.chunks).decode()  # ends by itself
            assert f"event: interrupted\ndata: {{\"error\":\"the {what} was interrupted; " \
                   "reconnecting\"}" in text
        assert app.extensions["lorafleet"].live.open_count() == 0
        proc = start_server(data, port, password=f"pw-{prefix}", log_file=data / "redis.log")
        again = open_view(c, "/api/v1/live", "bo")
        assert again.status_code == 200  # a fresh subscription
        EventLog(r, prefix).append(job, "train", step=1, loss=0.5)
        buf = b""
        for chunk in again.chunks:
            buf += chunk
            if b"event: job" in buf and buf.endswith(b"\n\n"):
                break
        again.close()
        payload = json.loads(buf.decode().split("event: job\ndata: ")[1].split("\n")[0])
        assert payload["job"] == job and payload["event"]["loss"] == 0.5
        r.close()
    finally:
        stop_server(proc)
