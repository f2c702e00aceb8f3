"""The scheduling policy against a real Redis server, with fake heartbeats and a recording
`send`: placement by memory, fair share between users, priorities, re-prioritising, the
per-user card limit and the queue positions the dashboard shows."""

from __future__ import annotations

import pytest

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.queue import (
    DEFAULT_DURATION_S,
    estimate_starts,
    plan_queue,
    queue_view,
    used_seconds,
)
from dispatcher.schedule.scheduler import Dispatcher
from tests.clock import Clock


@pytest.fixture
def env(redis_client, prefix):
    clock = Clock(100_000.0)
    store = JobStore(redis_client, prefix, clock=clock)
    fleet = Fleet(redis_client, prefix, timeout=1e9, clock=clock)
    sent: list[tuple[str, str]] = []
    d = Dispatcher(store, fleet, lambda job, w, attempt: sent.append((job, w["name"])),
                   clock=clock, fair_window_s=86400, max_cards_per_user=0)
    return store, fleet, d, sent, clock


def submit(store, clock, owner, name, priority="normal", mem=0, **spec):
    clock.t += 1
    return store.create("train", {"lora_name": name, "base_model": "m", **spec}, owner=owner,
                        priority=priority, gpu_memory_mb=mem)


def run_and_finish(store, clock, job_id, seconds, state=JobState.SUCCEEDED):
    store.transition(job_id, JobState.RUNNING, "r")
    clock.t += seconds
    store.transition(job_id, state, "done")


def start(store, job_ids):
    for j in job_ids:
        store.transition(j, JobState.RUNNING, "r")


def gpu(fleet, name, total, free=None):
    fleet.heartbeat(name, device="cuda:0", mem_total_mb=total,
                    mem_free_mb=total if free is None else free)


# memory ------------------------------------------------------------------------------------
def test_job_too_big_for_the_card_waits_for_a_bigger_one(env):
    store, fleet, d, sent, clock = env
    big = submit(store, clock, "ada", "big", mem=40000, precision="4bit")
    small = submit(store, clock, "ada", "small", mem=6000, precision="4bit")
    gpu(fleet, "g24", 24000)
    assert d.tick() == [(small, "g24")]
    assert store.get(big)["state"] == "queued"
    assert store.get(big)["reason"] == "waiting for a card with 40000 MB free"
    gpu(fleet, "g80", 81000)
    assert d.tick() == [(big, "g80")]


def test_job_waits_until_the_card_has_enough_free_memory(env):
    store, fleet, d, sent, clock = env
    j = submit(store, clock, "ada", "j", mem=20000, precision="4bit")
    gpu(fleet, "g0", 81000, free=10000)  # something outside lorafleet holds 71 GB
    assert d.tick() == []
    assert store.get(j)["reason"] == "waiting for a card with 20000 MB free"
    gpu(fleet, "g0", 81000, free=60000)
    assert d.tick() == [(j, "g0")]


def test_smallest_card_that_fits_is_chosen_and_cpu_takes_plain_jobs(env):
    store, fleet, d, sent, clock = env
    gpu(fleet, "g80", 81000)
    gpu(fleet, "g24", 24000)
    fleet.heartbeat("cpu", device="cpu")
    a = submit(store, clock, "ada", "a", mem=20000, precision="4bit")
    b = submit(store, clock, "ada", "b", mem=30000, precision="4bit")
    c = submit(store, clock, "ada", "c", mem=90000, precision="fp32")  # no card: the CPU
    assert d.tick() == [(a, "g24"), (b, "g80"), (c, "cpu")]


# fair share --------------------------------------------------------------------------------
def test_a_second_user_goes_before_the_first_users_backlog(env):
    store, fleet, d, sent, clock = env
    fleet.heartbeat("w1", device="cpu")
    fleet.heartbeat("w2", device="cpu")
    a_jobs = [submit(store, clock, "alice", f"a{i}") for i in range(20)]
    assert [j for j, _ in d.tick()] == a_jobs[:2]
    start(store, a_jobs[:2])
    clock.t += 100
    b_jobs = [submit(store, clock, "bob", f"b{i}") for i in range(2)]
    store.transition(a_jobs[0], JobState.SUCCEEDED, "done")
    # One card free: bob has used nothing, alice ~200 s.
    assert [j for j, _ in d.tick()] == [b_jobs[0]]
    start(store, [b_jobs[0]])
    clock.t += 50
    store.transition(a_jobs[1], JobState.SUCCEEDED, "done")
    assert [j for j, _ in d.tick()] == [b_jobs[1]]  # bob 50 s < alice 250 s
    start(store, [b_jobs[1]])
    clock.t += 30
    store.transition(b_jobs[0], JobState.SUCCEEDED, "done")
    assert [j for j, _ in d.tick()] == [a_jobs[2]]  # bob has nothing left pending
    started = [j for j, _ in sent]
    assert started == a_jobs[:2] + b_jobs + [a_jobs[2]]


def test_two_free_cards_at_once_are_shared_by_turns(env):
    store, fleet, d, sent, clock = env
    # Alice ran for 1000 s yesterday evening (inside the window), bob for 300 s.
    old_a = submit(store, clock, "alice", "old-a")
    old_b = submit(store, clock, "bob", "old-b")
    fleet.heartbeat("w1", device="cpu")
    fleet.heartbeat("w2", device="cpu")
    d.tick()
    run_and_finish(store, clock, old_a, 1000)
    run_and_finish(store, clock, old_b, 300)
    a = [submit(store, clock, "alice", f"a{i}") for i in range(3)]
    b = [submit(store, clock, "bob", f"b{i}") for i in range(3)]
    # Expected duration = the mean of the two finished runs on this model, 650 s. Bob (300 s)
    # gets the first card and is charged 650 -> 950, still under alice's 1000: the second too.
    assert [j for j, _ in d.tick()] == [b[0], b[1]]
    # Assigned jobs have not run yet, so the next plan starts again from 300 vs 1000:
    # bob's last job, then alice's three.
    view = queue_view(store, clock(), 86400)
    assert [j["id"] for j in view.order] == [b[2], a[0], a[1], a[2]]
    assert view.used == {"alice": 1000.0, "bob": 300.0}


def test_usage_is_clipped_to_the_window():
    now = 10_000.0
    runs = [(0.0, 1000.0), (8_500.0, 9_000.0), (9_500.0, 9_800.0)]
    assert used_seconds(runs, [9_900.0], now, window_s=2_000) == 500 + 300 + 100
    assert used_seconds(runs, [], now, window_s=1_200) == 200 + 300  # 8800..9000 and 9500..9800


def test_runs_sharing_a_card_at_once_count_its_time_once():
    """A pack's trials run side by side on one card: the owner used that card's time, once;
    runs on different cards, or one after another, each count."""
    now = 10_000.0
    pack = [(9_000.0, 9_600.0, "gpu0"), (9_000.0, 9_300.0, "gpu0"), (9_100.0, 9_800.0, "gpu0")]
    assert used_seconds(pack, [], now, window_s=5_000) == 800  # 9000..9800
    assert used_seconds(pack + [(9_000.0, 9_500.0, "gpu1")], [], now, 5_000) == 800 + 500
    # still running on gpu0 from 9_700 (overlaps 9_700..9_800), and one elsewhere
    assert used_seconds(pack, [(9_700.0, "gpu0"), (9_950.0, "gpu1")], now, 5_000) == 1000 + 50
    # runs recorded without a card (before packs) count each on its own, as before
    assert used_seconds([(9_000.0, 9_600.0, ""), (9_000.0, 9_600.0, "")], [], now, 5_000) == 1200


def test_runs_are_recorded_once_per_run_and_out_of_window_runs_do_not_count(env):
    store, fleet, d, sent, clock = env
    fleet.heartbeat("w1", device="cpu")
    j = submit(store, clock, "ada", "j")
    d.tick()
    run_and_finish(store, clock, j, 120)
    assert store.runs(["ada"], 0) == {"ada": [(clock.t - 120, clock.t, "w1")]}
    clock.t += 86400 + 1
    assert store.runs(["ada"], clock.t - 86400) == {"ada": []}


# priorities --------------------------------------------------------------------------------
def test_priority_orders_a_users_jobs_and_breaks_ties_between_users(env):
    store, fleet, d, sent, clock = env
    lo = submit(store, clock, "ada", "lo", priority="low")
    no = submit(store, clock, "ada", "no")
    hi = submit(store, clock, "ada", "hi", priority="high")
    other = submit(store, clock, "bo", "other", priority="high")
    view = queue_view(store, clock(), 86400)
    # Both users have used nothing: the tie goes to the higher priority, then the older job.
    assert [j["id"] for j in view.order] == [hi, other, no, lo]


def test_urgent_jumps_the_fair_share_order(env):
    store, fleet, d, sent, clock = env
    fleet.heartbeat("w1", device="cpu")
    hog = submit(store, clock, "alice", "hog")
    d.tick()
    run_and_finish(store, clock, hog, 5000)
    b = submit(store, clock, "bob", "b")
    u = submit(store, clock, "alice", "u", priority="urgent")
    assert d.tick() == [(u, "w1")]
    assert store.get(b)["state"] == "queued"


def test_reprioritise_a_queued_job(env):
    store, fleet, d, sent, clock = env
    a = submit(store, clock, "ada", "a")
    b = submit(store, clock, "ada", "b")
    assert [j["id"] for j in queue_view(store, clock(), 86400).order] == [a, b]
    rec = store.set_priority(b, "high")
    assert rec["priority"] == "high"
    assert [j["id"] for j in queue_view(store, clock(), 86400).order] == [b, a]
    events = [e for _, e in store.events.history(b)]
    assert events[-1]["line"] == "priority changed from normal to high"
    fleet.heartbeat("w1", device="cpu")
    assert d.tick() == [(b, "w1")]
    with pytest.raises(TransitionError, match="only a queued or retrying job"):
        store.set_priority(b, "low")
    with pytest.raises(ValueError):
        store.set_priority(a, "asap")
    assert store.get(b)["priority"] == "high"


# per-user limit ------------------------------------------------------------------------------
def test_per_user_card_limit(env):
    store, fleet, d, sent, clock = env
    d.max_cards_per_user = 1
    for n in ("w1", "w2", "w3"):
        fleet.heartbeat(n, device="cpu")
    a = [submit(store, clock, "alice", f"a{i}") for i in range(3)]
    b = submit(store, clock, "bob", "b")
    assert d.tick() == [(a[0], "w1"), (b, "w2")]
    assert store.get(a[1])["reason"] == "waiting: alice already uses 1 of 1 cards allowed per user"
    assert d.tick() == []
    start(store, [a[0]])
    store.transition(a[0], JobState.SUCCEEDED, "done")
    assert d.tick() == [(a[1], "w1")]


# queue positions and estimated start ---------------------------------------------------------
def test_estimated_start_from_etas_and_expected_durations():
    now = 1000.0
    workers = [{"name": "g1", "device": "cuda:0", "mem_total_mb": 24000},
               {"name": "g2", "device": "cuda:1", "mem_total_mb": 80000}]
    active = [{"id": "r1", "worker": "g1", "eta_s": 100.0, "state": "running"},
              {"id": "r2", "worker": "g2", "eta_s": None, "started": 900.0, "state": "running"}]
    order = [{"id": "p1", "gpu_memory_mb": 1000}, {"id": "p2", "gpu_memory_mb": 50000},
             {"id": "p3", "gpu_memory_mb": 1000}, {"id": "p4", "gpu_memory_mb": 99000}]
    starts = estimate_starts(order, workers, active, lambda j: 300.0, now)
    # g1 frees at 100 s; g2 at 300 - 100 = 200 s. p1 -> g1 at 100 (busy till 400);
    # p2 fits only g2 -> 200 (till 500); p3 -> g1 at 400; p4 fits nothing.
    assert starts == {"p1": 100.0, "p2": 200.0, "p3": 400.0, "p4": None}


def test_plan_queue_takes_turns_by_charged_time():
    pending = [{"id": f"a{i}", "owner": "a", "created": i, "priority": "normal"} for i in range(3)]
    pending += [{"id": "b0", "owner": "b", "created": 10, "priority": "normal"}]
    order = plan_queue(pending, {"a": 0.0, "b": 50.0}, lambda j: 100.0)
    # a (0) -> a0, now a 100 > b 50 -> b0, b 150 > a 100 -> a1, a2.
    assert [j["id"] for j in order] == ["a0", "b0", "a1", "a2"]
    assert DEFAULT_DURATION_S == 600.0
