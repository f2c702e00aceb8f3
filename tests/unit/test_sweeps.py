"""Sweeps: expansion (grid, random with a seed, ranges, log-uniform, duplicates) with exact
trials, validation naming every bad field, and against a real Redis: the REST API, the
scheduler's per-sweep cap, early-stopping decisions and perplexity jobs of finished trials."""

from __future__ import annotations

import csv
import io
import json

import pytest

from dashboard.app import create_app
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.specs import SpecError
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.scheduler import Dispatcher
from dispatcher.schedule.sweeps import (
    SweepStore,
    best_trial,
    fmt_number,
    parse_sweep,
    summary,
    tick,
    trial_name,
    trial_rows,
)
from dispatcher.settings import Settings
from tests.appclient import client_for
from tests.clock import Clock


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    (s.paths.models / "tiny").mkdir()
    (s.paths.models / "tiny" / "config.json").write_text("{}")
    (s.paths.datasets / "d.json").write_text(json.dumps([{"instruction": "hi", "output": "yo"}]))
    (s.paths.datasets / "story.txt").write_text("some text " * 20)
    return s


BASE = {"lora_name": "mylora", "base_model": "tiny", "dataset": "d", "format": "alpaca-format"}


def plan(settings, **over):
    return parse_sweep({"base": BASE, **over}, settings.paths)


def trials(p):
    return [(t.name, t.params) for t in p.trials]


# names ---------------------------------------------------------------------------------------
def test_numbers_and_names():
    assert [fmt_number(x) for x in (16, 0.05, 1e-4, 2.5e-5, 3e-4, 1.5, 0.1, 1e6)] == [
        "16", "0.05", "1e-4", "2.5e-5", "3e-4", "1.5", "0.1", "1e6"]
    assert trial_name("mylora", {"lora_rank": 16, "learning_rate": "1e-4"}) == "mylora-r16-lr1e-4"
    assert trial_name("m", {"optimizer": "sgd", "target_modules": ["q", "v"],
                            "add_eos_token": True}) == "m-opt_sgd-tm_q.v-add_eos_token1"
    assert trial_name("m", {"learning_rate": "0.0003"}) == "m-lr3e-4"
    long = trial_name("x" * 95, {"lora_rank": 16, "learning_rate": "1e-4"})
    assert len(long) == 100 and long.startswith("x" * 91 + "-")


# expansion -----------------------------------------------------------------------------------
def test_grid_is_every_combination_first_parameter_slowest(settings):
    p = plan(settings, parameters={"lora_rank": [8, 16], "learning_rate": ["1e-4", "3e-4"]})
    assert trials(p) == [
        ("mylora-r8-lr1e-4", {"lora_rank": 8, "learning_rate": "1e-4"}),
        ("mylora-r8-lr3e-4", {"lora_rank": 8, "learning_rate": "3e-4"}),
        ("mylora-r16-lr1e-4", {"lora_rank": 16, "learning_rate": "1e-4"}),
        ("mylora-r16-lr3e-4", {"lora_rank": 16, "learning_rate": "3e-4"}),
    ]
    spec = p.trials[2].spec
    assert spec["lora_name"] == "mylora-r16-lr1e-4" and spec["lora_rank"] == 16
    assert spec["learning_rate"] == "1e-4" and spec["dataset"] == "d.json"


def test_random_with_a_seed_is_reproducible(settings):
    params = {"lora_rank": [8, 16, 32], "learning_rate": {"min": 1e-5, "max": 1e-3, "log": True}}
    p = plan(settings, method="random", trials=4, seed=42, parameters=params)
    assert trials(p) == [
        ("mylora-r32-lr1.67e-5", {"lora_rank": 32, "learning_rate": "1.67e-5"}),
        ("mylora-r32-lr3.55e-5", {"lora_rank": 32, "learning_rate": "3.55e-5"}),
        ("mylora-r8-lr1.9e-5", {"lora_rank": 8, "learning_rate": "1.9e-5"}),
        ("mylora-r8-lr2.26e-4", {"lora_rank": 8, "learning_rate": "2.26e-4"}),
    ]
    assert trials(plan(settings, method="random", trials=4, seed=42, parameters=params)) == trials(p)
    assert trials(plan(settings, method="random", trials=4, seed=43, parameters=params)) != trials(p)


def test_ranges_with_a_step_and_log_spaced_grids(settings):
    p = plan(settings, parameters={"lora_dropout": {"min": 0, "max": 0.1, "step": 0.05},
                                   "lora_alpha": {"min": 8, "max": 16, "step": 8}})
    assert [t.name for t in p.trials] == ["mylora-do0-a8", "mylora-do0-a16", "mylora-do0.05-a8",
                                          "mylora-do0.05-a16", "mylora-do0.1-a8", "mylora-do0.1-a16"]
    assert [t.params["lora_dropout"] for t in p.trials][::2] == [0.0, 0.05, 0.1]
    p = plan(settings, parameters={"learning_rate": {"min": "1e-5", "max": "1e-3", "log": True,
                                                     "count": 3},
                                   "lora_rank": {"min": 4, "max": 16, "log": True, "count": 3}})
    assert [t.name for t in p.trials] == [
        "mylora-lr1e-5-r4", "mylora-lr1e-5-r8", "mylora-lr1e-5-r16", "mylora-lr1e-4-r4",
        "mylora-lr1e-4-r8", "mylora-lr1e-4-r16", "mylora-lr1e-3-r4", "mylora-lr1e-3-r8",
        "mylora-lr1e-3-r16"]
    p = plan(settings, parameters={"learning_rate": {"min": "1e-4", "max": "3e-4", "step": "1e-4"}})
    assert [t.params["learning_rate"] for t in p.trials] == ["1e-4", "2e-4", "3e-4"]


def test_duplicates_are_skipped(settings):
    # 0.0001 and "1e-4" are the same learning rate; the rank list names 8 twice.
    p = plan(settings, parameters={"lora_rank": [8, 8, 16],
                                   "learning_rate": ["1e-4", 0.0001]})
    assert [t.name for t in p.trials] == ["mylora-r8-lr1e-4", "mylora-r16-lr1e-4"]
    assert [(s["params"], s["same_as"]) for s in p.skipped] == [
        ({"lora_rank": 8, "learning_rate": "1e-4"}, "mylora-r8-lr1e-4"),
        ({"lora_rank": 8, "learning_rate": "1e-4"}, "mylora-r8-lr1e-4"),
        ({"lora_rank": 8, "learning_rate": "1e-4"}, "mylora-r8-lr1e-4"),
        ({"lora_rank": 16, "learning_rate": "1e-4"}, "mylora-r16-lr1e-4"),
    ]
    # Random samples that repeat a point are skipped too.
    p = plan(settings, method="random", trials=10, seed=1, parameters={"lora_rank": [8, 16]})
    assert sorted(t.name for t in p.trials) == ["mylora-r16", "mylora-r8"]
    assert len(p.skipped) == 8


def test_every_bad_field_is_named(settings):
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": {**BASE, "epochs": 0}, "method": "grd", "max_concurrent": -1,
                     "colour": "blue",
                     "parameters": {"lora_rank": [8], "foo": [1], "lora_name": ["a"],
                                    "lora_dropout": {"min": 0, "max": 1},
                                    "learning_rate": {"min": 0, "max": 1e-3, "log": True}},
                     "early_stopping": {"policy": "asha", "rungs": [20, 10]},
                     "evaluate": {"text_file": "nope"}}, settings.paths)
    fields = [x["field"] for x in e.value.errors]
    assert fields == ["colour", "method", "max_concurrent", "parameters.foo",
                      "parameters.lora_name", "parameters.lora_dropout.step",
                      "parameters.learning_rate.min", "early_stopping.rungs", "base.epochs",
                      "evaluate.text_file"]


def test_a_value_that_clashes_with_the_base_names_the_trial(settings):
    """For raw text, cutoff_len 64 is fine alone, but not with the base's overlap_len 128: the
    message says which trial, so the user knows to lower overlap_len rather than hunt in the
    base. A dataset sweep ignores the overlap, so the same trials are accepted."""
    raw = {**BASE, "dataset": "", "format": "", "raw_text_file": "story"}
    with pytest.raises(SpecError) as e:
        plan(settings, base=raw, parameters={"cutoff_len": [64, 256]})
    assert e.value.errors == [{"field": "base.overlap_len", "message":
                               "must be less than cutoff_len (64) "
                               "(in trial mylora-cl64: cutoff_len=64)"}]
    assert [t.name for t in plan(settings, base={**raw, "overlap_len": 32},
                                 parameters={"cutoff_len": [64, 256]}).trials] == [
        "mylora-cl64", "mylora-cl256"]
    assert [t.name for t in plan(settings, parameters={"cutoff_len": [64, 256]}).trials] == [
        "mylora-cl64", "mylora-cl256"]


def test_a_bad_value_is_named_with_its_parameter(settings):
    with pytest.raises(SpecError) as e:
        plan(settings, parameters={"lora_rank": [0, 8, 4096], "optimizer": ["adamw_torch"]})
    assert e.value.errors == [
        {"field": "parameters.lora_rank",
         "message": "value 0: must be between 1 and 1024 (2048 with higher_rank_limit)"},
        {"field": "parameters.lora_rank",
         "message": "value 4096: must be between 1 and 1024 (2048 with higher_rank_limit)"}]
    with pytest.raises(SpecError) as e:
        plan(settings, parameters={"learning_rate": {"min": 1e-5, "max": 1e-3, "log": True}})
    assert e.value.errors[0]["field"] == "parameters.learning_rate"
    assert "needs count" in e.value.errors[0]["message"]
    with pytest.raises(SpecError) as e:
        plan(settings, method="random", parameters={"lora_rank": [8]})
    assert e.value.errors[0]["field"] == "trials"


def test_eval_rungs_must_fall_on_evaluations(settings):
    with pytest.raises(SpecError) as e:
        plan(settings, base={**BASE, "eval_dataset": "d", "eval_steps": 4},
             parameters={"lora_rank": [8, 16]},
             early_stopping={"policy": "asha", "rungs": [4, 6]})
    assert e.value.errors[0]["field"] == "early_stopping.rungs"
    p = parse_sweep({"base": {**BASE, "eval_dataset": "d", "eval_steps": 4},
                     "parameters": {"lora_rank": [8, 16]},
                     "early_stopping": {"policy": "median", "rungs": "4, 8"}}, settings.paths)
    assert p.metric == "eval_loss" and p.policy.rungs == (4, 8)


# the REST API ---------------------------------------------------------------------------------
class OrderedClient:
    """Posts JSON as written: Flask's test client sorts keys, and a sweep's parameters are
    ordered (the first varies slowest and comes first in trial names), as every real client
    (requests, the browser's JSON.stringify) keeps them."""

    def __init__(self, client):
        self.c = client

    def post(self, url, json=None):
        import json as j

        return self.c.post(url, data=j.dumps(json), content_type="application/json")

    def get(self, url):
        return self.c.get(url)


@pytest.fixture
def client(settings):
    app = create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True})
    return OrderedClient(client_for(app))


DEF = {"base": BASE, "parameters": {"lora_rank": [8, 16], "learning_rate": ["1e-4", "3e-4"]},
       "max_concurrent": 2, "early_stopping": {"policy": "asha", "rungs": [10, 20]}}


def test_api_preview_create_get_csv_and_cancel(client, store):
    r = client.post("/api/v1/sweeps?dry_run=1", json=DEF)
    assert r.status_code == 200 and r.json["count"] == 4 and r.json["dry_run"]
    assert store.list() == []  # a preview queues nothing
    assert client.post("/api/v1/sweeps/preview", json=DEF).json["count"] == 4

    r = client.post("/api/v1/sweeps", json=DEF)
    assert r.status_code == 201, r.json
    sid = r.json["id"]
    jobs = store.list()
    assert len(jobs) == 4
    assert {j["sweep"] for j in jobs} == {sid} and {j["sweep_cap"] for j in jobs} == {"2"}
    assert sorted(j["name"] for j in jobs) == ["mylora-r16-lr1e-4", "mylora-r16-lr3e-4",
                                               "mylora-r8-lr1e-4", "mylora-r8-lr3e-4"]

    d = client.get(f"/api/v1/sweeps/{sid}").json
    assert [row["name"] for row in d["rows"]] == [t["name"] for t in r.json["trials"]]
    assert d["summary"] == {"trials": 4, "succeeded": 0, "failed": 0, "stopped_early": 0,
                            "cancelled": 0, "running": 0, "queued": 4, "state": "running"}
    assert [s["id"] for s in client.get("/api/v1/sweeps").json["sweeps"]] == [sid]
    # The same definition again would train on top of these trials' LoRAs: refused, named.
    again = client.post("/api/v1/sweeps", json=DEF)
    assert again.status_code == 400 and again.json["errors"][0]["field"] == "base.lora_name"
    assert "mylora-r8-lr1e-4" in again.json["errors"][0]["message"] and len(store.list()) == 4

    text = client.get(f"/api/v1/sweeps/{sid}/trials.csv").get_data(as_text=True)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["trial", "job", "lora_rank", "learning_rate", "state", "final_loss",
                       "best_eval_loss", "perplexity", "tokens_per_s", "gpu_time_s", "best",
                       "reason"]
    assert rows[1][:5] == ["mylora-r8-lr1e-4", d["rows"][0]["id"], "8", "1e-4", "queued"]

    r = client.post(f"/api/v1/sweeps/{sid}/cancel")
    assert r.status_code == 200
    assert r.json["summary"]["cancelled"] == 4
    assert {j["state"] for j in store.list()} == {"cancelled"}
    for page in ("/sweeps", f"/sweeps/{sid}", "/sweeps/new"):
        assert client.get(page).status_code == 200, page
    assert client.get("/api/v1/sweeps/nope").status_code == 404


def test_api_refuses_a_bad_sweep_and_queues_nothing(client, store, redis_client, prefix):
    bad = {**DEF, "priority": "whenever", "parameters": {"lora_rank": [0]}}
    r = client.post("/api/v1/sweeps", json=bad)
    assert r.status_code == 400
    assert [e["field"] for e in r.json["errors"]] == ["priority", "parameters.lora_rank"]
    assert store.list() == [] and not redis_client.keys(f"{prefix}:sweep*")


def test_base_job_gives_the_base_parameters(client, store, settings):
    job = store.create("train", {**BASE, "lora_rank": 4, "epochs": 2.0, "dataset": "d.json"})
    r = client.post("/api/v1/sweeps?dry_run=1", json={"base_job": job,
                                                      "parameters": {"learning_rate": ["1e-4"]}})
    assert r.status_code == 200, r.json
    assert r.json["trials"][0]["name"] == "mylora-lr1e-4"
    r = client.post("/api/v1/sweeps", json={"base_job": "nope", "parameters": {"lora_rank": [4]}})
    assert r.json["errors"][0] == {"field": "base_job", "message": "no training job nope"}
    assert client.get(f"/sweeps/new?from={job}").status_code == 200


# the dispatcher ---------------------------------------------------------------------------------
def make_sweep(settings, store, **over):
    p = parse_sweep({**DEF, **over}, settings.paths)
    sweeps = SweepStore(store)
    sid = sweeps.create(p, owner="ann")
    return sweeps, sid, [t["job"] for t in sweeps.get(sid)["trials"]]


def test_cap_limits_a_sweeps_trials_on_workers(settings, redis_client, prefix):
    clock = Clock()
    store = JobStore(redis_client, prefix, clock=clock)
    fleet = Fleet(redis_client, prefix, timeout=10, clock=clock)
    sent = []
    d = Dispatcher(store, fleet, lambda j, w, attempt: sent.append(j), clock=clock)
    _, sid, ids = make_sweep(settings, store)
    clock.t += 1
    other = store.create("train", {"lora_name": "bob-lora"}, owner="bob")
    for w in ("w1", "w2", "w3", "w4"):
        fleet.heartbeat(w, device="cpu")
    assigned = [j for j, _ in d.tick()]
    # Two of the sweep's four trials at once; bob's job takes a third card, one stays idle.
    running = [j for j in assigned if j in ids]
    assert len(assigned) == 3 and other in assigned and len(running) == 2
    waiting = [j for j in ids if j not in running]
    for j in waiting:
        assert store.get(j)["reason"] == (f"waiting: sweep {sid} already runs 2 of its 2 "
                                          "trials allowed at once")
    assert d.tick() == []
    store.transition(running[0], JobState.RUNNING, "r")
    store.transition(running[0], JobState.FAILED, "out of memory")  # a failure frees its place
    again = [j for j, _ in d.tick()]
    assert len(again) == 1 and again[0] in waiting


def _run(store, job, losses):
    store.transition(job, JobState.ASSIGNED, "a", worker="w")
    store.transition(job, JobState.RUNNING, "r")
    for i, loss in enumerate(losses, start=1):
        store.events.append(job, "train", step=i, total_steps=100, loss=loss)
    store.update_progress(job, step=len(losses), total_steps=100)


def test_early_stopping_decides_once_and_asks_the_loser_to_stop(settings, redis_client, prefix):
    store = JobStore(redis_client, prefix)
    sweeps, sid, (a, b, c, e) = make_sweep(settings, store, early_stopping={
        "policy": "asha", "rungs": [2, 4], "reduction_factor": 2})
    _run(store, a, [5.0, 4.0])
    tick(sweeps.store)
    _run(store, b, [5.0, 5.0, 5.0])
    tick(sweeps.store)
    tick(sweeps.store)  # idempotent: nothing is decided twice
    dec = sweeps.decisions(sid)
    assert sorted(dec) == sorted([f"{a}:2", f"{b}:2"])
    assert not dec[f"{a}:2"]["stop"] and dec[f"{b}:2"]["stop"]
    assert sweeps.rung_values(sid, 2) == [(a, 4.5), (b, 5.0)]
    reason = ("stopped early: training loss 5.0000 at step 2 ranks 2 of 2 trials, not in the "
              "best 1 (ASHA, reduction factor 2)")
    assert store.stop_reason(b) == reason and not store.stop_requested(a)
    # The worker ends the stopped run as cancelled with that reason: counted as stopped early.
    store.transition(b, JobState.CANCELLED, reason + "; the incomplete LoRA was saved")
    # A trial that ended before it was judged still adds its value at the rung.
    _run(store, c, [1.0, 1.0, 1.0, 1.0])
    store.transition(c, JobState.SUCCEEDED, "finished")
    tick(sweeps.store)
    assert sweeps.rung_values(sid, 2)[-1] == (c, 1.0)
    assert sweeps.rung_values(sid, 4) == [(c, 1.0)]
    store.cancel(e)
    store.transition(a, JobState.SUCCEEDED, "finished")
    tick(sweeps.store)
    rec = sweeps.get(sid)
    assert rec["finished"] and sid not in redis_client.smembers(sweeps.active_key)
    rows = trial_rows(sweeps, rec)
    assert [r["display_state"] for r in rows] == ["succeeded", "stopped early", "succeeded",
                                                  "cancelled"]
    s = summary(rec, rows)
    assert (s["succeeded"], s["stopped_early"], s["cancelled"], s["state"]) == (2, 1, 1, "finished")
    assert best_trial(rows) == c  # the lowest final training loss


def test_perplexity_job_for_each_succeeded_trial_once(settings, redis_client, prefix):
    store = JobStore(redis_client, prefix)
    sweeps, sid, ids = make_sweep(settings, store, early_stopping=None,
                                  evaluate={"text_file": "story", "stride": 32})
    _run(store, ids[0], [3.0])
    store.transition(ids[0], JobState.SUCCEEDED, "finished")
    tick(sweeps.store)
    tick(sweeps.store)
    evals = sweeps.evals(sid)
    assert list(evals) == [ids[0]]
    ev = store.get(evals[ids[0]])
    assert ev["kind"] == "evaluate" and ev["sweep_eval"] == sid and ev["owner"] == "ann"
    assert ev["spec"]["loras"] == ["mylora-r8-lr1e-4"] and ev["spec"]["text_file"] == "story.txt"
    assert ev["spec"]["stride"] == 32
    store.transition(ev["id"], JobState.ASSIGNED, "a", worker="w")
    store.transition(ev["id"], JobState.RUNNING, "r")
    store.set_result(ev["id"], {"perplexity": 12.5})
    store.transition(ev["id"], JobState.SUCCEEDED, "done")
    rows = {r["id"]: r for r in trial_rows(sweeps, sweeps.get(sid))}
    assert rows[ids[0]]["perplexity"] == 12.5


def test_csv_cells_cannot_be_formulas():
    from dashboard.sweeps import _csv_value

    assert _csv_value("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert _csv_value("@SUM(A1)") == "'@SUM(A1)" and _csv_value("+1+2") == "'+1+2"
    assert _csv_value("-5e-4") == "-5e-4" and _csv_value(-3) == "-3"
    assert _csv_value(["q", "v"]) == "q v" and _csv_value(None) == ""
