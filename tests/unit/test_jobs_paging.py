"""The Jobs page in pages of 50 with filters, GET /api/v1/jobs with its total, and the Fleet
page's word on cards held outside lorafleet: rendered by the real app from a real Redis."""

from __future__ import annotations

import re
import time

import pytest

from dashboard.app import create_app
from dispatcher.jobs.fleet import Fleet
from dispatcher.settings import Settings
from tests.appclient import client_for
from tests.clock import many_jobs
from tests.unit.test_dashboard_pages import Elements


@pytest.fixture
def client(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    return client_for(create_app({"LORAFLEET_SETTINGS": s, "TESTING": True}))


@pytest.fixture
def jobs(redis_client, prefix):
    """520 jobs, one a second: every 4th is ada's, every 10th has succeeded."""
    return many_jobs(redis_client, prefix)  # ids newest first


def rows(html: str) -> list[str]:
    # (The row template for live updates has an empty id.)
    return [a["data-job-id"] for a in Elements(html).find("tr", data_testid="job-row")
            if a["data-job-id"]]


def test_jobs_page_pages_of_fifty_newest_first(client, jobs):
    store, newest = jobs
    html = client.get("/jobs").get_data(as_text=True)
    assert rows(html) == newest[:50]
    page = Elements(html)
    assert page.find("span", data_testid="jobs-count", data_total="520")
    assert "1&ndash;50 of 520 jobs" in html or "1–50 of 520 jobs" in html
    assert "page 1 of <span class=\"pages\">11</span>" in html
    assert not page.find("a", data_testid="jobs-prev")
    assert page.find("a", data_testid="jobs-next", href="/jobs?page=2")

    html = client.get("/jobs?page=2").get_data(as_text=True)
    assert rows(html) == newest[50:100]
    page = Elements(html)
    assert page.find("a", data_testid="jobs-prev", href="/jobs?page=1")
    assert page.find("a", data_testid="jobs-next", href="/jobs?page=3")
    # The last page: the 20 oldest, no next link.
    html = client.get("/jobs?page=11").get_data(as_text=True)
    assert rows(html) == newest[500:]
    assert "501&ndash;520 of 520" in html
    assert not Elements(html).find("a", data_testid="jobs-next")
    # Past the end: no rows, a way back.
    html = client.get("/jobs?page=12").get_data(as_text=True)
    assert rows(html) == [] and "Page 12 is past the last page (11)" in html
    assert Elements(html).find("a", data_testid="jobs-prev", href="/jobs?page=11")


def test_jobs_page_filters_by_state_and_owner(client, jobs):
    store, newest = jobs
    ada = [j for j in newest if store.get(j)["owner"] == "ada"]
    done = [j for j in newest if store.get(j)["state"] == "succeeded"]
    assert len(ada) == 130 and len(done) == 52

    html = client.get("/jobs?owner=ada").get_data(as_text=True)
    assert rows(html) == ada[:50] and "of 130 jobs</span> matching" in html
    html = client.get("/jobs?owner=ada&page=3").get_data(as_text=True)
    assert rows(html) == ada[100:]
    page = Elements(html)
    assert page.find("a", data_testid="jobs-prev", href="/jobs?page=2&owner=ada")
    assert not page.find("a", data_testid="jobs-next")
    assert page.find("input", data_testid="filter-owner", value="ada")

    html = client.get("/jobs?state=succeeded&owner=ada").get_data(as_text=True)
    both = [j for j in done if j in ada]  # i % 20 == 0: 26 jobs
    assert rows(html) == both and len(both) == 26
    assert ["succeeded"] == [a["value"] for a in Elements(html).find("option") if "selected" in a]
    html = client.get("/jobs?state=failed").get_data(as_text=True)
    assert rows(html) == [] and "No jobs match these filters" in html
    # Several states, comma-separated.
    assert len(rows(client.get("/jobs?state=queued,succeeded").get_data(as_text=True))) == 50


def test_jobs_page_says_what_is_wrong_with_bad_parameters(client, jobs):
    for query, message in (("page=0", "page must be a whole number from 1, not '0'"),
                           ("page=two", "page must be a whole number from 1, not 'two'"),
                           ("state=done", "unknown job state 'done': use one of queued")):
        resp = client.get(f"/jobs?{query}")
        assert resp.status_code == 400, query
        assert message in resp.get_data(as_text=True).replace("&#39;", "'"), query


def test_jobs_page_is_quick_with_520_jobs(client, jobs):
    for path in ("/jobs", "/jobs?page=6", "/jobs?owner=ada&page=2", "/api/v1/jobs?state=queued"):
        client.get(path)  # warm up templates
        t = time.perf_counter()
        assert client.get(path).status_code == 200
        assert time.perf_counter() - t < 0.3, path


def test_api_job_list_filters_before_paging_and_gives_the_total(client, jobs):
    store, newest = jobs
    body = client.get("/api/v1/jobs?limit=10&offset=5").get_json()
    assert [j["id"] for j in body["jobs"]] == newest[5:15]
    assert (body["total"], body["limit"], body["offset"]) == (520, 10, 5)
    body = client.get("/api/v1/jobs?state=succeeded&limit=100").get_json()
    assert body["total"] == 52 and len(body["jobs"]) == 52
    assert all(j["state"] == "succeeded" for j in body["jobs"])
    body = client.get("/api/v1/jobs?owner=ada,nobody&limit=5&offset=128").get_json()
    assert body["total"] == 130 and len(body["jobs"]) == 2


def test_fleet_page_shows_a_card_held_outside_lorafleet(client, redis_client, prefix):
    fleet = Fleet(redis_client, prefix)
    fleet.heartbeat("gpu0", host="box", device="cuda:0", card="H100", mem_total_mb=81559,
                    mem_free_mb=21559, state="idle", job="", outside_mb=60000,
                    outside_pids="4242,4343", outside_how="processes")
    fleet.heartbeat("gpu1", host="box", device="cuda:1", card="H100", mem_total_mb=40000,
                    mem_free_mb=40000, state="idle", job="", outside_mb=0, outside_pids="",
                    mem_limit_mb=40000)
    fleet.heartbeat("gpu2", host="box", device="cuda:2", card="H100", mem_total_mb=81559,
                    mem_free_mb=73559, state="idle", job="", outside_mb=8000, outside_pids="",
                    outside_how="idle memory")
    html = client.get("/fleet").get_data(as_text=True)
    cells = {name: re.search(rf'data-worker="{name}">.*?data-col="memory">(.*?)</td>', html,
                             re.S).group(1) for name in ("gpu0", "gpu1", "gpu2")}
    assert "in use outside lorafleet (60000 MB, pids 4242, 4343)" in cells["gpu0"]
    assert "outside" not in cells["gpu1"] and "capped at 40000 MB" in cells["gpu1"]
    assert "in use outside lorafleet (8000 MB, pid unknown)" in cells["gpu2"]
    workers = {w["name"]: w for w in client.get("/api/v1/workers").get_json()["workers"]}
    assert workers["gpu0"]["outside_mb"] == 60000 and workers["gpu0"]["outside_pids"] == "4242,4343"
