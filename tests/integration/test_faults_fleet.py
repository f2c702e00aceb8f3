"""Nothing is lost when the fleet around the workers fails: Redis restarted under running jobs,
two dispatchers with the leader killed, 500 queued jobs (real processes, as in test_faults.py).
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import time
from collections import Counter

import pytest

from dispatcher.jobs.specs import parse_train_spec
from tests.faultkit import (
    SLOW,
    TERMINAL,
    OwnRedis,
    assert_no_duplicate_delivery,
    events,
    last_step,
    make_fleet,
    run_workers,
    skipped,
    states,
    submit,
)
from tests.fleetproc import FleetProcs, small_spec

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------
def _snapshot(f: FleetProcs, jobs: list[str]) -> dict:
    r = f.r
    return {
        "records": {j: r.hgetall(f.store.key(j)) for j in jobs},
        "history": {j: r.lrange(f"{f.prefix}:job:{j}:history", 0, -1) for j in jobs},
        "streams": {j: r.xrange(f.store.events.stream_key(j)) for j in jobs},
        "pending": r.zrange(f.store.pending_key, 0, -1, withscores=True),
        "jobs": r.zrange(f"{f.prefix}:jobs", 0, -1, withscores=True),
    }


def test_redis_restart_with_jobs_queued_and_running(tmp_path):
    """Redis stops (and starts again on the same port and folder) while one job trains and three
    wait: every job record, history, queue position and event stream comes back from the
    append-only file, the dispatcher, the worker and the dashboard stay up through the outage,
    the running job carries on, and every job succeeds."""
    redis = OwnRedis(tmp_path)
    f = None
    try:
        f = make_fleet(redis.url, tmp_path / "home", workers=("a",), dashboard=True)
        long = submit(f, lora_name="outage-long", epochs=80, **SLOW)
        f.wait_for(lambda: last_step(f, long) >= 3, 60, "the long job to train")
        queued = [submit(f, lora_name=f"outage-q{i}") for i in range(3)]
        jobs = [long, *queued]
        assert [f.store.get(j)["state"] for j in queued] == ["queued"] * 3
        before = _snapshot(f, jobs)

        redis.stop()
        step_before = max(e["step"] for e in events_from(before["streams"][long]))
        time.sleep(2.5)  # the outage; shorter than the 6 s worker timeout
        for name, p in f.procs.items():
            assert p.poll() is None, f"{name} died with Redis:\n{f.log(name)[-3000:]}"
        redis.start()

        after = _snapshot(f, jobs)
        # The waiting jobs: exactly as they were, position in the queue included.
        for j in queued:
            assert after["records"][j] == before["records"][j]
            assert after["history"][j] == before["history"][j]
            assert after["streams"][j] == before["streams"][j]
        assert after["jobs"] == before["jobs"]
        assert [j for j, _ in after["pending"]] == queued
        assert after["pending"] == before["pending"]
        # The running job: its stream is a continuation of what was there.
        n = len(before["streams"][long])
        assert after["streams"][long][:n] == before["streams"][long]
        assert after["history"][long] == before["history"][long]
        assert after["records"][long]["state"] == "running"

        # Everything finishes, nothing ran twice, and the dashboard is back.
        for j in jobs:
            rec = f.wait_for_state(j, TERMINAL, 120)
            assert rec["state"] == "succeeded", (j, rec.get("reason"))
            assert states(f, j) == ["queued", "assigned", "running", "succeeded"]
        steps = [e["step"] for e in events(f, long) if e["type"] == "train"]
        assert steps == list(range(1, f.store.get(long)["total_steps"] + 1))
        assert step_before < len(steps)
        listed = f.http.get(f.url + "/api/v1/jobs", timeout=5).json()["jobs"]
        assert {j["id"] for j in listed} == set(jobs)
        for name, p in f.procs.items():
            assert p.poll() is None, f"{name} exited:\n{f.log(name)[-3000:]}"
        assert_no_duplicate_delivery(f)
    finally:
        if f is not None:
            f.stop()
        redis.stop()


def events_from(stream: list) -> list[dict]:
    return [json.loads(fields["data"]) for _, fields in stream
            if '"type":"train"' in fields["data"]]


# ---------------------------------------------------------------------------------------------
def _dispatcher_ident(f: FleetProcs, name: str) -> str:
    m = re.search(r"dispatcher ([0-9a-f]{8}) started", f.log(name))
    return m.group(1) if m else ""


def _assignments(log: str) -> list[str]:
    return re.findall(r"job ([0-9a-f]{12}) -> ", log)


def test_two_dispatchers_assign_once_and_take_over(fleet_factory):
    """Two dispatcher processes: only the lock holder assigns, every job is assigned and run
    exactly once; after the leader is killed (kill -9: it cannot release its lock) the other
    takes over within the lock's expiry (10 s) and the rest of the queue still runs once."""
    f = fleet_factory(workers=("a", "b"), dispatchers=("d1", "d2"))
    lock = f"{f.prefix}:dispatcher:lock"
    holder = f.wait_for(lambda: f.r.get(lock), 15, "a dispatcher to hold the lock")
    idents = {n: f.wait_for(lambda n=n: _dispatcher_ident(f, n), 15, f"{n} to start")
              for n in ("d1", "d2")}
    leader = next(n for n, i in idents.items() if holder.startswith(i))
    follower = ({"d1", "d2"} - {leader}).pop()

    jobs = [submit(f, lora_name=f"two-disp-{i}") for i in range(4)]
    f.wait_for(lambda: sum(f.store.get(j)["state"] != "queued" for j in jobs) >= 2, 60,
               "two jobs assigned")
    # The leader logs "job X -> worker" just after the assignment is stored; a kill -9 in
    # between would lose the line (not the job), so wait for every assigned job's line first.
    f.wait_for(lambda: {j for j in jobs if f.store.get(j)["state"] != "queued"}
               <= set(_assignments(f.log(leader))), 15, "the leader to log its assignments")
    assert _assignments(f.log(follower)) == []  # the follower did nothing while it waited
    killed_at = time.monotonic()
    f.kill(leader, signal.SIGKILL)
    f.wait_for(lambda: (f.r.get(lock) or "").startswith(idents[follower]), 15,
               "the other dispatcher to take the lock")
    takeover_s = time.monotonic() - killed_at
    assert takeover_s <= 10 + 2, takeover_s

    for j in jobs:
        rec = f.wait_for_state(j, TERMINAL, 120)
        assert rec["state"] == "succeeded", rec.get("reason")
        assert rec["attempt"] == 1
        assert states(f, j) == ["queued", "assigned", "running", "succeeded"]
        assert len(run_workers(f, j)) == 1
    by_leader, by_follower = _assignments(f.log(leader)), _assignments(f.log(follower))
    assert sorted(by_leader + by_follower) == sorted(jobs)  # each job assigned exactly once
    assert by_leader and by_follower
    assert_no_duplicate_delivery(f)


# ---------------------------------------------------------------------------------------------
N_JOBS = 500
RUN_BUDGET_S = 20


def _time_job_list(f: FleetProcs, n: int = 5) -> dict[str, float]:
    """Median seconds of `n` requests for the job list: the API (default page, and all jobs)
    and the Jobs page."""
    timings: dict[str, list[float]] = {"api": [], "api_all": [], "page": []}
    for _ in range(n):
        for key, path in (("api", "/api/v1/jobs"), ("api_all", "/api/v1/jobs?limit=1000"),
                          ("page", "/jobs")):
            t = time.perf_counter()
            resp = f.http.get(f.url + path, timeout=10)
            timings[key].append(time.perf_counter() - t)
            assert resp.status_code == 200 and resp.content
    return {k: round(statistics.median(v), 3) for k, v in timings.items()}


def test_500_queued_jobs_over_three_workers(fleet_factory):
    """500 real training jobs (trivially short: 2 rows, micro batch 1, cutoff 16, 2 optimizer
    steps) queued at once, then three CPU workers. Each job costs a few seconds, nearly all
    of it the fresh training process importing torch, so 500 cannot run in a test: the fleet
    works for RUN_BUDGET_S, then the whole queue is cancelled while the dispatcher keeps going.

    What it proves: with 500 jobs queued, the job list (`GET /api/v1/jobs`, the same with all
    500, and the Jobs page) answers, complete, before and while three CPU workers train (how
    fast is a benchmark's question, not a test's: `bench/job_list.py`); every
    job that started ran on exactly one worker, once, and finished; every job cancelled before
    it started never ran and left no LoRA; at the end each of the 500 jobs is in exactly one
    terminal state, with one terminal entry in its history, and the queue and the active set
    are empty. What it does not prove: that 500 jobs run to the end (only those that fit the
    time budget run; typically a few dozen)."""
    f = fleet_factory(workers=(), dashboard=True)
    base = parse_train_spec(small_spec(
        lora_name="many-0", dataset="two", micro_batch_size=1, batch_size=1, cutoff_len=16, overlap_len=8,
        epochs=1), f.settings.paths).to_dict()
    jobs = [f.store.create("train", {**base, "lora_name": f"many-{i}"}, owner=f"user{i % 4}")
            for i in range(N_JOBS)]
    assert f.r.zcard(f.store.pending_key) == N_JOBS

    # The job list with 500 jobs queued, idle and then while three CPU workers train. The
    # times are printed only: the 300 ms requirement is measured by bench/job_list.py (a timed
    # assertion here failed on a busy 2-core machine running other test files at once).
    idle = _time_job_list(f)
    all_jobs = f.http.get(f.url + "/api/v1/jobs?limit=1000", timeout=10).json()["jobs"]
    assert len(all_jobs) == N_JOBS and {j["id"] for j in all_jobs} == set(jobs)
    for w in ("a", "b", "c"):
        f.start_worker(w)
    f.wait_for_workers(3)
    started = time.monotonic()
    # Some job training (not the first job in particular: fair share may start another
    # user's first, and a tiny job can end between two looks).
    f.wait_for(lambda: any(f.store.get(j)["state"] == "running" for j in jobs[:12]), 60,
               "a job to run")
    loaded = _time_job_list(f)
    print(f"job list with {N_JOBS} jobs, median seconds: idle {idle}, while training {loaded}")

    time.sleep(max(0.0, RUN_BUDGET_S - (time.monotonic() - started)))
    # Cancel the whole queue while the dispatcher keeps running: a queued job is cancelled at
    # once; one that has started is asked to stop after its current step.
    for j in jobs:
        f.store.cancel(j)
    # A job already sent to a worker may still be starting; wait for every job to end.
    f.wait_for(lambda: all(f.store.get(j)["state"] in TERMINAL for j in jobs), 90,
               "every job to end")
    time.sleep(1.5)  # a few dispatcher ticks: nothing cancelled may be picked up
    ran = {j for j in jobs if "running" in states(f, j)}

    succeeded = never_ran = 0
    for j in jobs:
        rec, hist = f.store.get(j), states(f, j)
        assert rec["state"] in TERMINAL and hist[-1] == rec["state"]
        assert sum(s in TERMINAL for s in hist) == 1
        assert hist.count("assigned") <= 1 and hist.count("running") <= 1
        if j in ran:
            assert rec["state"] in ("succeeded", "cancelled"), rec.get("reason")
            assert len(run_workers(f, j)) == 1
            succeeded += rec["state"] == "succeeded"
        else:
            # Cancelled while queued (or in the instant between assignment and start).
            assert hist in (["queued", "cancelled"], ["queued", "assigned", "cancelled"]), hist
            assert not (f.settings.paths.loras / rec["spec"]["lora_name"]).exists()
            never_ran += 1
    assert f.r.zcard(f.store.pending_key) == 0 and f.r.scard(f.store.active_key) == 0
    # A worker only skips a job that was cancelled before it started, never one that ran.
    assert not set(skipped(f)) & ran
    workers_used = Counter(run_workers(f, j)[0] for j in ran)
    print(f"{len(ran)} jobs ran in {RUN_BUDGET_S} s ({succeeded} succeeded) on "
          f"{dict(workers_used)}; {never_ran} cancelled before they ran")
    assert len(ran) + never_ran == N_JOBS
    assert succeeded >= 3 and len(workers_used) == 3
