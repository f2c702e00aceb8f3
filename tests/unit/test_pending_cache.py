"""The job list does not read every queued record per request, and the kept copy of the queue
does not stay stale for ever (review of issue 10, #13 and #15). Real Redis: what a request asks
of it is counted with INFO commandstats, as tests/unit/test_dispatch_pass.py does."""

from __future__ import annotations

import pytest

from dashboard.app import create_app
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.pending import FULL_PENDING_READ_S, PendingCache
from dispatcher.settings import Settings
from tests.appclient import client_for
from tests.clock import Clock, TickingClock
from tests.unit.test_dispatch_pass import calls

RECORD_READS = ("hgetall", "hmget", "hget")


@pytest.fixture
def app(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    return create_app({"LORAFLEET_SETTINGS": s, "TESTING": True})


def _queue(redis_client, prefix: str, n: int) -> JobStore:
    store = JobStore(redis_client, prefix, clock=TickingClock())
    for i in range(n):
        store.create("train", {"lora_name": f"j{i}"}, ("bo", "cy", "dee")[i % 3])
    return store


def test_the_job_list_reads_only_its_page_with_2000_queued_jobs(app, redis_client, prefix):
    _queue(redis_client, prefix, 2000)
    c = client_for(app)
    first = c.get("/api/v1/jobs?limit=20").get_json()
    assert first["total"] == 2000 and first["jobs"][0]["position"] is not None
    for _ in range(3):  # (the Jobs page, the API and `lorafleet status` all go this way)
        before = calls(redis_client, *RECORD_READS)
        again = c.get("/api/v1/jobs?limit=20").get_json()
        read = calls(redis_client, *RECORD_READS) - before
        # The page's 20 records (and nothing of the other 1,980; before: 2,000 a request).
        assert read <= 40, read
        assert [j["position"] for j in again["jobs"]] == [j["position"] for j in first["jobs"]]
    before = calls(redis_client, *RECORD_READS)
    assert c.get("/jobs").status_code == 200
    assert calls(redis_client, *RECORD_READS) - before <= 250  # the page's rows, not the queue


def test_a_change_behind_the_stores_back_is_seen_after_the_full_read(redis_client, prefix):
    store = _queue(redis_client, prefix, 5)
    clock = Clock(0.0)
    cache = PendingCache(store, clock=clock)
    assert cache.full_every_s == FULL_PENDING_READ_S <= 60
    last = cache.read()[-1]["id"]
    # Someone writes a record without JobStore (no counter moves): not seen at once ...
    redis_client.hset(store.key(last), "priority", "urgent")
    clock.t += 1
    assert {j["id"]: j["priority"] for j in cache.read()}[last] == "normal"
    # ... but after the full read, at most a minute later.
    clock.t += FULL_PENDING_READ_S
    assert {j["id"]: j["priority"] for j in cache.read()}[last] == "urgent"
    # A change through the store is seen at once, as before.
    store.set_priority(last, "high")
    assert {j["id"]: j["priority"] for j in cache.read()}[last] == "high"


def test_the_dashboards_queue_places_see_it_too(app, redis_client, prefix):
    store = _queue(redis_client, prefix, 5)
    c = client_for(app)
    with app.app_context():
        from dashboard.services import services

        cache = services().pending
    cache.clock = clock = Clock(0.0)

    def place(job_id: str) -> int:
        return c.get(f"/api/v1/jobs/{job_id}").get_json()["position"]

    oldest = store.pending()[-1]["id"]
    assert place(oldest) == 5
    redis_client.hset(store.key(oldest), "priority", "urgent")
    clock.t += FULL_PENDING_READ_S
    assert place(oldest) == 1
