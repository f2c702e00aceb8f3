"""Per-user limits (dispatcher/access/limits.py) on a real Redis: defaults, the admin setting, the
count of a user's waiting jobs, and the refusals of the API (issue 10, finding 10: three
sweeps of 1,000 trials from one member were all queued)."""

from __future__ import annotations

import json
import threading

import pytest

from dashboard.app import create_app
from dispatcher.access.accounts import Accounts
from dispatcher.access.limits import DEFAULTS, LimitError, Limits
from dispatcher.jobs.states import JobState
from tests.datafolder import small_data_folder


# the settings -----------------------------------------------------------------------------------
def test_a_users_value_beats_everyones_which_beats_the_default(redis_client, prefix):
    lim = Limits(redis_client, prefix)
    assert lim.get("bo", "max_queued_jobs").value == DEFAULTS["max_queued_jobs"]
    lim.set("*", "max_queued_jobs", 50)
    lim.set("bo", "max_queued_jobs", 5)
    assert (lim.get("bo", "max_queued_jobs").value, lim.get("bo", "max_queued_jobs").source) == (
        5, "user")
    assert (lim.get("cy", "max_queued_jobs").value, lim.get("cy", "max_queued_jobs").source) == (
        50, "everyone")
    assert lim.settings() == {"*": {"max_queued_jobs": 50}, "bo": {"max_queued_jobs": 5}}
    lim.set("bo", "max_queued_jobs", None)
    assert lim.get("bo", "max_queued_jobs").value == 50
    with pytest.raises(LimitError, match="no limit named 'max_gpus'"):
        lim.set("*", "max_gpus", 1)
    with pytest.raises(LimitError, match="from 0 \\(no limit\\) to"):
        lim.set("*", "max_sweep_trials", -1)


# the count of waiting jobs ------------------------------------------------------------------------
def test_the_waiting_count_follows_every_transition(store):
    a = store.create("train", {"lora_name": "a"}, "bo")
    b = store.create("train", {"lora_name": "b"}, "bo")
    store.create("train", {"lora_name": "c"}, "cy")
    assert (store.pending_count("bo"), store.pending_count("cy")) == (2, 1)
    store.transition(a, JobState.ASSIGNED, "placed", worker="w")
    assert store.pending_count("bo") == 1
    store.transition(a, JobState.RUNNING, "started")
    store.transition(a, JobState.RETRYING, "worker lost")
    assert store.pending_count("bo") == 2
    store.transition(a, JobState.ASSIGNED, "placed", worker="w")
    store.transition(a, JobState.RUNNING, "started")
    store.transition(a, JobState.SUCCEEDED, "done")
    store.cancel(b)
    assert (store.pending_count("bo"), store.pending_count("cy")) == (0, 1)
    assert store.pending_count("nobody") == 0


def test_jobs_queued_before_the_per_owner_count_are_counted(store, redis_client, prefix):
    for i in range(3):
        store.create("train", {"lora_name": f"x{i}"}, "bo")
    # What a fleet queued with a version that kept no per-owner sets looks like.
    redis_client.delete(f"{prefix}:pending-owner:bo", f"{prefix}:pending-owners")
    assert store.pending_count("bo") == 3
    assert redis_client.exists(f"{prefix}:pending-owners")


# the API -----------------------------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix, users=True)


@pytest.fixture
def app(settings):
    return create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True})


@pytest.fixture
def as_user(app, settings):
    """A test client per user, each with its API token."""
    def make(name: str):
        c = app.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {Accounts(settings.home).new_token(name)}"
        return c
    return make


SPEC = {"lora_name": "l", "base_model": "tiny", "dataset": "d.json", "format": "alpaca-format",
        "epochs": 1, "micro_batch_size": 1, "batch_size": 1}


def sweep(name: str, trials: int) -> dict:
    return {"base": {**SPEC, "lora_name": name},
            "parameters": {"seed": {"min": 1, "max": trials, "step": 1}}}


def test_three_sweeps_of_1000_trials_are_refused_naming_the_limit(as_user, store):
    bo = as_user("bo")
    for i in range(3):
        resp = bo.post("/api/v1/sweeps", json=sweep(f"big{i}", 1000))
        assert resp.status_code == 400
        body = resp.get_json()
        assert body["errors"] == [{"field": "max_sweep_trials", "message": (
            "the sweep's trials for bo would be 1000, over your limit max_sweep_trials = 200; "
            "an admin can raise it (`lorafleet limits set max_sweep_trials N --user NAME`)")}]
    assert store.pending() == []
    # The preview says so too, before anything is queued.
    preview = bo.post("/api/v1/sweeps/preview", json=sweep("big", 1000))
    assert preview.status_code == 400 and "max_sweep_trials" in preview.get_json()["error"] + \
        json.dumps(preview.get_json()["errors"])


def test_waiting_jobs_over_the_limit_are_refused_and_a_sweep_counts_every_trial(
        as_user, store, redis_client, prefix):
    Limits(redis_client, prefix).set("*", "max_queued_jobs", 5)
    bo, cy = as_user("bo"), as_user("cy")
    assert bo.post("/api/v1/sweeps", json=sweep("s", 4)).status_code == 201
    assert bo.post("/api/v1/jobs", json={"spec": {**SPEC, "lora_name": "one"}}).status_code == 201
    resp = bo.post("/api/v1/jobs", json={"spec": {**SPEC, "lora_name": "two"}})
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["field"] == "max_queued_jobs"
    assert resp.get_json()["error"].startswith(
        "the job was not queued: bo's waiting jobs (queued or retrying: 5 now, 1 more asked "
        "for) would be 6, over your limit max_queued_jobs = 5")
    # cy's queue is cy's own; a sweep that would go over queues none of its trials.
    assert cy.post("/api/v1/sweeps", json=sweep("t", 6)).status_code == 400
    assert cy.post("/api/v1/sweeps", json=sweep("t", 5)).status_code == 201
    assert (store.pending_count("bo"), store.pending_count("cy")) == (5, 5)
    # A job that starts frees its place.
    job = store.pending()[0]["id"]
    store.transition(job, JobState.ASSIGNED, "placed", worker="w")
    owner = store.get(job)["owner"]
    who = bo if owner == "bo" else cy
    assert who.post("/api/v1/jobs", json={"spec": {**SPEC, "lora_name": "three"}}).status_code == 201


def test_parallel_submissions_cannot_pass_the_limit_together(as_user, store, redis_client,
                                                             prefix):
    Limits(redis_client, prefix).set("bo", "max_queued_jobs", 3)
    clients = [as_user("bo") for _ in range(12)]
    codes: list[int] = []

    def send(i: int) -> None:
        codes.append(clients[i].post("/api/v1/jobs", json={
            "spec": {**SPEC, "lora_name": f"p{i}"}}).status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 3 + [400] * 9
    assert store.pending_count("bo") == 3


def test_admins_set_limits_members_read_their_own(as_user, redis_client, prefix):
    ana, bo = as_user("ana"), as_user("bo")
    refused = bo.post("/api/v1/limits", json={"name": "max_queued_jobs", "value": 1, "user": "bo"})
    assert refused.status_code == 403
    assert ana.post("/api/v1/limits", json={"name": "max_queued_jobs", "value": 7,
                                            "user": "bo"}).status_code == 200
    assert ana.post("/api/v1/limits", json={"name": "max_sweep_trials", "value": 50,
                                            "user": "*"}).status_code == 200
    mine = bo.get("/api/v1/limits").get_json()
    assert mine["user"] == "bo" and mine["waiting"] == 0 and "settings" not in mine
    assert mine["limits"]["max_queued_jobs"] == {
        "value": 7, "source": "user", "help": "jobs a user may have waiting in the queue at once"}
    assert mine["limits"]["max_sweep_trials"]["value"] == 50
    assert mine["limits"]["upload_space_mb"]["source"] == "default"
    everything = ana.get("/api/v1/limits").get_json()
    assert everything["settings"] == {"bo": {"max_queued_jobs": 7}, "*": {"max_sweep_trials": 50}}
    assert everything["defaults"] == DEFAULTS
    # Unset, and refusals naming the field.
    assert ana.post("/api/v1/limits", json={"name": "max_queued_jobs", "value": None,
                                            "user": "bo"}).status_code == 200
    assert Limits(redis_client, prefix).settings() == {"*": {"max_sweep_trials": 50}}
    bad = ana.post("/api/v1/limits", json={"name": "max_queued_jobs", "value": "lots"})
    assert bad.status_code == 400 and bad.get_json()["errors"][0]["field"] == "max_queued_jobs"
    bad = ana.post("/api/v1/limits", json={"name": "nope", "value": 1})
    assert bad.status_code == 400 and bad.get_json()["errors"][0]["field"] == "name"
    bad = ana.post("/api/v1/limits", json={"name": "max_queued_jobs", "value": 1, "user": "a b"})
    assert bad.status_code == 400 and bad.get_json()["errors"][0]["field"] == "user"


def test_admins_are_limited_too(as_user, redis_client, prefix):
    Limits(redis_client, prefix).set("*", "max_sweep_trials", 3)
    resp = as_user("ana").post("/api/v1/sweeps", json=sweep("a", 4))
    assert resp.status_code == 400
    assert resp.get_json()["errors"][0]["field"] == "max_sweep_trials"


def test_the_cli_shows_and_sets_limits(settings, redis_server, redis_client, prefix):
    """`lorafleet limits` and `limits set` through the REST client, against a real dashboard
    process in accounts mode."""
    from click.testing import CliRunner

    from dispatcher.cli import main
    from tests.fleetproc import FleetProcs

    fleet = FleetProcs(settings.home, redis_server, prefix)
    try:
        fleet.start_dashboard()
        env = {"LORAFLEET_URL": fleet.url,
               "LORAFLEET_TOKEN": Accounts(settings.home).new_token("ana")}
        run = CliRunner().invoke
        out = run(main, ["limits", "set", "max_queued_jobs", "12", "--user", "bo"], env=env)
        assert out.exit_code == 0, out.output
        assert out.output == "max_queued_jobs = 12 for bo\n"
        out = run(main, ["limits"], env=env)
        assert out.exit_code == 0 and "set for bo: max_queued_jobs=12" in out.output
        assert "max_sweep_trials" in out.output and "(default)" in out.output
        env["LORAFLEET_TOKEN"] = Accounts(settings.home).new_token("bo")
        out = run(main, ["limits", "set", "max_queued_jobs", "100000", "--user", "bo"], env=env)
        assert out.exit_code == 2 and "only an admin may change limits" in out.output
        out = run(main, ["limits", "--json"], env=env)
        assert json.loads(out.output)["limits"]["max_queued_jobs"]["value"] == 12
    finally:
        fleet.stop()
