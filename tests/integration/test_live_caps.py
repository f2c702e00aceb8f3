"""One member cannot take the dashboard down with live views (issue 10, finding 6: 100 open
`GET /api/v1/live` used up the Redis pool and every page of every user answered 503).

A real dashboard process in accounts mode: bo opens 130 live streams (the feed and job event
streams), more than redis-py's pool of 100 connections; cy's pages and API calls keep answering
200 quickly; past the caps the dashboard answers 429 naming the cap; closed streams free their
slots."""

from __future__ import annotations

import time

import pytest

from dispatcher.access.accounts import Accounts
from dispatcher.jobs.events import EventLog
from tests.fleetproc import FleetProcs

PER_USER, TOTAL = 130, 160


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = FleetProcs(tmp_path_factory.mktemp("home"), redis_server, f"live{time.monotonic_ns()}")
    f.env.update(LORAFLEET_LIVE_PER_USER=str(PER_USER), LORAFLEET_LIVE_TOTAL=str(TOTAL))
    acc = Accounts(f.home)
    acc.add("ana", "a long admin password", "admin")
    acc.add("bo", "a long member password", "member")
    acc.add("cy", "another member password", "member")
    f.start_dashboard()
    f.tokens = {n: {"Authorization": f"Bearer {acc.new_token(n)}"} for n in ("bo", "cy")}
    yield f
    f.stop()


def open_stream(fleet, path: str, who: str):
    resp = fleet.http.get(fleet.url + path, headers=fleet.tokens[who], stream=True,
                          timeout=(5, 30))
    if resp.status_code == 200:
        # Kept with the response: a reader left to the garbage collector closes the connection.
        resp.chunks = resp.iter_content(chunk_size=None)
        first = next(resp.chunks)  # the stream has begun
        assert first.startswith(b"retry:"), first
    return resp


def test_one_members_live_views_do_not_stop_anyone_else(fleet):
    job = fleet.store.create("train", {"lora_name": "cy-lora"}, "cy")  # stays queued
    streams = []
    try:
        for i in range(PER_USER):
            path = "/api/v1/live" if i % 2 else f"/api/v1/jobs/{job}/events"
            resp = open_stream(fleet, path, "bo")
            assert resp.status_code == 200, (i, resp.text)
            streams.append(resp)
        # More than the Redis pool holds are open, and every stream still follows its job.
        EventLog(fleet.r, fleet.prefix).append(job, "log", line="hello")
        # cy's pages and API calls answer, and quickly.
        for path in ("/jobs", "/fleet", "/api/v1/jobs", f"/api/v1/jobs/{job}", "/api/v1/workers"):
            started = time.monotonic()
            resp = fleet.http.get(fleet.url + path, headers=fleet.tokens["cy"], timeout=10)
            assert resp.status_code == 200, (path, resp.text[:300])
            assert time.monotonic() - started < 2, path
        # bo's next view is refused, naming the cap; cy may still open some.
        over = open_stream(fleet, "/api/v1/live", "bo")
        assert over.status_code == 429
        assert over.json() == {"error": f"too many live views open for bo ({PER_USER}): "
                                        "close some tabs"}
        for _ in range(TOTAL - PER_USER):
            resp = open_stream(fleet, "/api/v1/live", "cy")
            assert resp.status_code == 200
            streams.append(resp)
        full = open_stream(fleet, f"/api/v1/jobs/{job}/events", "cy")
        assert full.status_code == 429
        assert full.json()["error"] == (f"too many live views open on this dashboard ({TOTAL}): "
                                        "try again in a minute")

        # bo closes 30 tabs: once the server notices (its next write fails), the slots return.
        for resp in streams[:30]:
            resp.close()
        del streams[:30]
        log = EventLog(fleet.r, fleet.prefix)
        reopened = []
        deadline = time.monotonic() + 40
        while len(reopened) < 30 and time.monotonic() < deadline:
            log.append(job, "log", line="wake the streams")  # every open view writes
            resp = open_stream(fleet, "/api/v1/live", "bo")
            if resp.status_code == 200:
                reopened.append(resp)
            else:
                time.sleep(0.3)
        streams.extend(reopened)
        assert len(reopened) == 30
        assert open_stream(fleet, "/api/v1/live", "bo").status_code == 429
    finally:
        for resp in streams:
            resp.close()
