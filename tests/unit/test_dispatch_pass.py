"""The dispatcher's pass stays cheap with thousands of queued jobs (issue 10, finding 10: with
3,010 queued jobs the dispatcher used 44 % of a core). The pass keeps the pending records from
one pass to the next and reads them again only when the queue changed, and it looks only at
sweeps whose jobs moved. Checked here by what the pass asks Redis for (its command counts on
the real server), and by the scheduling staying exact across every kind of change."""

from __future__ import annotations

import pytest

from dispatcher.jobs.states import JobState
from dispatcher.schedule.early_stop import Policy
from dispatcher.schedule.sweeps import SweepPlan, SweepStore, Trial
from tests.clock import dispatcher_env


@pytest.fixture
def env(redis_client, prefix):
    return dispatcher_env(redis_client, prefix)


def calls(r, *commands: str) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


def a_sweep(store, owner: str, n: int) -> str:
    trials = [Trial(f"t{i}", {"seed": i}, {"lora_name": f"t{i}", "seed": i}) for i in range(n)]
    plan = SweepPlan(name="s", method="grid", seed=0, samples=0, max_concurrent=1,
                     policy=Policy(), metric="loss", parameters={"seed": {}}, base={},
                     trials=trials)
    return SweepStore(store).create(plan, owner)


def test_a_pass_with_nothing_changed_reads_no_job_record(env, redis_client):
    store, fleet, d, sent, clock = env
    for i in range(200):
        clock.t += 1
        store.create("train", {"lora_name": f"j{i}"}, ("bo", "cy", "dee")[i % 3])
    a_sweep(store, "bo", 100)
    running = store.create("train", {"lora_name": "r"}, "ana", priority="urgent")
    fleet.heartbeat("w1", device="cpu", state="busy", job=running)
    assert d.tick() == [(running, "w1")]
    store.transition(running, JobState.RUNNING, "started")
    d.tick()  # reads what changed since
    before = calls(redis_client, "hgetall", "hmget", "hget")
    for _ in range(5):
        assert d.tick() == []
    # Five passes over 300 queued jobs: each reads the worker's record and the running job's
    # (once per step of the pass: active jobs are few), nothing of the queue or of the
    # sweep's 100 queued trials (before: 400 records a pass).
    read = calls(redis_client, "hgetall", "hmget", "hget") - before
    assert read <= 5 * 5, read
    # A change in the queue: the waiting fields of each job are read again, and the one
    # changed record whole; the 299 others not.
    store.set_priority(store.pending()[0]["id"], "high")
    before_all = calls(redis_client, "hgetall")
    d.tick()
    assert calls(redis_client, "hgetall") - before_all <= 5 + 1


def test_the_kept_queue_sees_every_change(env):
    store, fleet, d, sent, clock = env
    ids = []
    for name in "abcd":
        clock.t += 1
        ids.append(store.create("train", {"lora_name": name}, "bo"))
    a, b, c, e = ids
    busy = store.create("train", {"lora_name": "busy"}, "cy")
    fleet.heartbeat("w1", device="cpu")
    assert d.tick() == [(a, "w1")]
    store.transition(a, JobState.RUNNING, "started")
    fleet.heartbeat("w1", device="cpu", state="busy", job=a)
    assert d.tick() == []  # the queue is now kept
    # Changes between passes, none of which moves the clock: a new priority, a cancel, a
    # job that ran and came back to the queue with a new attempt.
    store.set_priority(e, "high")
    store.cancel(b)
    store.transition(a, JobState.RETRYING, "worker lost", worker="")
    fleet.heartbeat("w1", device="cpu", state="idle", job="")
    assert d.tick() == [(e, "w1")]
    assert store.get(e)["attempt"] == 1
    store.transition(e, JobState.RUNNING, "started")
    store.transition(e, JobState.SUCCEEDED, "done")
    assert d.tick() == [(a, "w1")]  # oldest of bo's, a again (c and busy wait)
    assert store.get(a)["attempt"] == 2
    assert b not in [j for j, _ in sent] and c not in [j for j, _ in sent]
    assert busy not in [j for j, _ in sent]


def test_a_sweep_is_looked_at_when_one_of_its_jobs_moves(env, redis_client, prefix):
    store, fleet, d, sent, clock = env
    sid = a_sweep(store, "bo", 3)
    fleet.heartbeat("w1", device="cpu")
    [(trial, _)] = d.tick()  # the first pass looks at every sweep; it hands a trial to w1
    store.transition(trial, JobState.RUNNING, "started")
    for job in [t["job"] for t in SweepStore(store).get(sid)["trials"]]:
        if store.get(job)["state"] != "running":
            store.cancel(job)
    store.transition(trial, JobState.SUCCEEDED, "done")
    assert redis_client.sismember(f"{prefix}:sweeps:active", sid)
    d.tick()
    # Every trial has ended: the sweep is finished, on the next pass, not the next full one.
    assert not redis_client.sismember(f"{prefix}:sweeps:active", sid)
    assert SweepStore(store).get(sid)["finished"]


def test_a_free_card_that_no_queued_job_fits_is_not_replanned_every_pass(env, redis_client):
    """Review of issue 10, #14: an idle worker that no queued job fits (each needs more memory
    than its card has) made every pass plan the whole queue (3,010 jobs: 49 ms a pass)."""
    from dispatcher.schedule.scheduler import REPLAN_UNCHANGED_S

    store, fleet, d, sent, clock = env
    for i in range(300):
        clock.t += 0.001
        store.create("train", {"lora_name": f"j{i}"}, ("bo", "cy")[i % 2], gpu_memory_mb=4000)
    small = {"device": "cuda:0", "mem_total_mb": 2000, "mem_free_mb": 2000}
    fleet.heartbeat("w1", **small)
    assert d.tick() == []
    d.tick()  # (the first pass's notes "waiting for a card with 4000 MB free" are in)
    planned = calls(redis_client, "lrange", "zrangebyscore")
    for _ in range(5):
        clock.t += 1
        fleet.heartbeat("w1", **small)  # the same card, heard from again
        assert d.tick() == []
    assert calls(redis_client, "lrange", "zrangebyscore") == planned  # no plan made
    assert all(j["reason"] == "waiting for a card with 4000 MB free" for j in store.pending())
    # Whatever could change the answer is seen on the next pass: a job that fits ...
    fits = store.create("train", {"lora_name": "small"}, "dee", gpu_memory_mb=1000)
    assert d.tick() == [(fits, "w1")]
    store.transition(fits, JobState.RUNNING, "started")
    store.transition(fits, JobState.SUCCEEDED, "done")
    assert d.tick() == []
    # ... a bigger card on the same worker ...
    fleet.heartbeat("w1", device="cuda:0", mem_total_mb=8000, mem_free_mb=8000)
    [(job, _)] = d.tick()
    assert store.get(job)["gpu_memory_mb"] == 4000
    store.transition(job, JobState.RUNNING, "started")
    store.transition(job, JobState.SUCCEEDED, "done")
    fleet.heartbeat("w1", **small)
    assert d.tick() == []
    # ... and, whatever happens, a plan at least every REPLAN_UNCHANGED_S.
    planned = calls(redis_client, "lrange", "zrangebyscore")
    clock.t += REPLAN_UNCHANGED_S
    assert d.tick() == [] and calls(redis_client, "lrange", "zrangebyscore") > planned
