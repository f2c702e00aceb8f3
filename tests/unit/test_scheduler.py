"""The dispatcher's decisions against a real Redis server, with a recording `send`."""

from __future__ import annotations

import pytest

from dispatcher.jobs.states import JobState, TransitionError
from dispatcher.schedule.requeue import MAX_ATTEMPTS, UNSENT_AFTER_S, Crashed, settle
from dispatcher.schedule.scheduler import Dispatcher
from tests.clock import dispatcher_env


@pytest.fixture
def env(redis_client, prefix):
    return dispatcher_env(redis_client, prefix)


def job(store, clock, name, **spec):
    clock.t += 1
    return store.create("train", {"lora_name": name, **spec})


def test_one_job_per_idle_worker_oldest_first(env):
    store, fleet, d, sent, clock = env
    a, b, c = (job(store, clock, n) for n in "abc")
    fleet.heartbeat("w1", device="cpu")
    fleet.heartbeat("w2", device="cpu")
    assert [j for j, _ in d.tick()] == [a, b]
    assert {w for _, w in sent} == {"w1", "w2"}
    assert store.get(a)["state"] == "assigned" and store.get(c)["state"] == "queued"
    # Nothing more while both are busy.
    assert d.tick() == []
    # w1's job ends: the next tick hands c to w1.
    w1_job = next(j for j, w in sent if w == "w1")
    store.transition(w1_job, JobState.RUNNING, "r")
    store.transition(w1_job, JobState.SUCCEEDED, "done")
    assert d.tick() == [(c, "w1")]


def test_priority_before_age(env):
    store, fleet, d, sent, clock = env
    old = job(store, clock, "old")
    urgent = store.create("train", {"lora_name": "u"}, priority="high")
    fleet.heartbeat("w1", device="cpu")
    assert d.tick() == [(urgent, "w1")]
    assert store.get(old)["state"] == "queued"


def test_quantised_job_waits_for_a_cuda_worker(env):
    store, fleet, d, sent, clock = env
    q = job(store, clock, "q", precision="4bit")
    plain = job(store, clock, "p", precision="fp32")
    fleet.heartbeat("cpu1", device="cpu")
    assert d.tick() == [(plain, "cpu1")]
    assert store.get(q)["reason"] == "waiting for a CUDA GPU worker"
    fleet.heartbeat("gpu0", device="cuda:0")
    assert d.tick() == [(q, "gpu0")]


def test_cancelled_pending_job_is_never_sent(env):
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    store.cancel(a)
    fleet.heartbeat("w1", device="cpu")
    assert d.tick() == [] and sent == []
    assert store.get(a)["state"] == "cancelled"


def test_cancel_between_assignment_and_start(env):
    """A job sent to a worker but not started is cancelled outright and the worker may not start
    it; once it runs, cancel only asks it to stop."""
    store, fleet, d, sent, clock = env
    a, b = job(store, clock, "a"), job(store, clock, "b")
    fleet.heartbeat("w1", device="cpu")
    fleet.heartbeat("w2", device="cpu")
    assert len(d.tick()) == 2
    assert store.cancel(a)["state"] == "cancelled"
    assert "before it started" in store.get(a)["reason"]
    with pytest.raises(TransitionError):
        store.transition(a, JobState.RUNNING, "r", expect_worker=store.get(a)["worker"])
    store.transition(b, JobState.RUNNING, "r")
    assert store.cancel(b)["state"] == "running" and store.stop_requested(b)
    assert [h["state"] for h in store.history(a)] == ["queued", "assigned", "cancelled"]


def test_a_job_assigned_but_never_sent_is_handed_over_again(env):
    """The dispatcher died between assigning a job and sending it: the worker stays idle. After
    UNSENT_AFTER_S the next dispatcher re-queues the job and sends it; before that it waits."""
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu", state="idle", job="")
    store.transition(a, JobState.ASSIGNED, "assigned to w1", worker="w1", attempt=1)  # no send
    clock.t += UNSENT_AFTER_S - 1
    fleet.heartbeat("w1", device="cpu", state="idle", job="")
    assert d.tick() == [] and store.get(a)["state"] == "assigned"
    clock.t += 2
    fleet.heartbeat("w1", device="cpu", state="idle", job="")
    assert d.tick() == [(a, "w1")] and sent == [(a, "w1")]
    states = [h["state"] for h in store.history(a)]
    assert states == ["queued", "assigned", "retrying", "assigned"]
    # A worker that reports the job as its own is never second-guessed.
    clock.t += 100
    fleet.heartbeat("w1", device="cpu", state="busy", job=a)
    assert d.tick() == [] and store.get(a)["state"] == "assigned"
    # The handing-over did not count: the job still has all its attempts (review15c M2):
    # MAX_ATTEMPTS - 1 crashes re-queue it, as for a job that was never re-queued so.
    assert store.get(a)["unsent_requeues"] == 1 and store.get(a)["attempt"] == 2
    store.transition(a, JobState.RUNNING, "r", expect_worker="w1")
    for n in range(2, MAX_ATTEMPTS + 1):
        assert settle(store, a, n, Crashed("died"), expect_worker="w1") == JobState.RETRYING
        store.transition(a, JobState.ASSIGNED, "again", worker="w1", attempt=n + 1)
        store.transition(a, JobState.RUNNING, "r", expect_worker="w1")
    assert settle(store, a, MAX_ATTEMPTS + 1, Crashed("died"),
                  expect_worker="w1") == JobState.FAILED
    assert store.get(a)["reason"] == f"died; it happened {MAX_ATTEMPTS} times, giving up"


def test_a_job_the_queue_refused_is_requeued_without_counting_an_attempt(env):
    """The broker refused the message (Redis went between the assignment and the send): the
    job goes back to the queue, and that assignment is not one of its attempts."""
    store, fleet, _, _, clock = env
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")

    def refuse(*_):
        raise ConnectionError("the broker went away")

    d = Dispatcher(store, fleet, refuse, clock=clock)
    assert d.tick() == []
    rec = store.get(a)
    assert rec["state"] == "retrying" and rec["unsent_requeues"] == 1
    assert rec["reason"] == "could not reach the queue: the broker went away"


def test_lost_worker_job_is_requeued_then_fails_after_max_attempts(env):
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        fleet.heartbeat(f"w{attempt}", device="cpu")
        assert d.tick() == [(a, f"w{attempt}")]
        store.transition(a, JobState.RUNNING, "r", expect_worker=f"w{attempt}")
        clock.t += 60  # every heartbeat is now stale
        d.tick()
        rec = store.get(a)
        if attempt < MAX_ATTEMPTS:
            assert rec["state"] == "retrying" and "stopped answering" in rec["reason"]
        else:
            assert rec["state"] == "failed" and "lost 3 times" in rec["reason"]
    states = [h["state"] for h in store.history(a)]
    assert states.count("retrying") == MAX_ATTEMPTS - 1


def test_a_job_being_stopped_is_not_requeued_when_its_worker_is_lost(env):
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")
    d.tick()
    store.transition(a, JobState.RUNNING, "r", expect_worker="w1")
    store.request_stop(a, "stopped early: ranks 3 of 3")
    store.request_stop(a)  # a Stop pressed afterwards keeps the first reason
    assert store.stop_reason(a) == "stopped early: ranks 3 of 3"
    clock.t += 60  # the worker is gone
    d.tick()
    rec = store.get(a)
    assert rec["state"] == "cancelled" and rec["reason"].startswith("stopped early: ranks 3")
    assert "was lost" in rec["reason"] and sent == [(a, "w1")]


def test_cancel_of_a_running_job_carries_its_stop_reason(env):
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")
    d.tick()
    store.transition(a, JobState.RUNNING, "r", expect_worker="w1")
    store.cancel(a, "cancelled with its sweep", stop_reason="stopped: cancelled with its sweep")
    assert store.stop_reason(a) == "stopped: cancelled with its sweep"


def test_fenced_worker_cannot_write_a_moved_job(env):
    store, fleet, d, sent, clock = env
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")
    d.tick()
    with pytest.raises(TransitionError):
        store.transition(a, JobState.RUNNING, "r", expect_worker="w2")


def test_only_one_dispatcher_schedules(env, redis_client, prefix):
    store, fleet, d, sent, clock = env
    other_sent: list = []
    other = Dispatcher(store, fleet, lambda j, w, attempt: other_sent.append(j))
    assert d.hold_lock() and not other.hold_lock()
    job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")
    assert other.tick() == [] and other_sent == []
    d.release_lock()
    assert other.hold_lock()


def test_each_assignment_is_sent_with_its_attempt(redis_client, prefix):
    """review15b M4: the task carries the attempt the job was assigned, so the worker fences
    the run (and its crash handler) on it; the message takes it only to a worker that says
    its tasks take it (an older worker's task would refuse the argument and fail the job)."""
    from dispatcher.jobs.celery_app import TAKES_ATTEMPT, run_job_args, run_pack_args
    from tests.clock import Clock

    clock = Clock()
    store, fleet, _, _, _ = dispatcher_env(redis_client, prefix, clock)
    sent: list[tuple[str, str, int]] = []
    d = Dispatcher(store, fleet, lambda j, w, attempt: sent.append((j, w["name"], attempt)),
                   clock=clock)
    a = job(store, clock, "a")
    fleet.heartbeat("w1", device="cpu")
    d.tick()
    store.transition(a, JobState.RUNNING, "r", expect_worker="w1")
    store.transition(a, JobState.RETRYING, "w1 stopped answering; re-queued", worker="")
    d.tick()
    assert sent == [(a, "w1", 1), (a, "w1", 2)] and store.get(a)["attempt"] == 2

    new, old = {"name": "w1", TAKES_ATTEMPT: "1"}, {"name": "w0"}
    assert run_job_args(a, new, 2) == [a, "w1", 2]
    assert run_job_args(a, old, 2) == [a, "w0"]
    assert run_pack_args("s1:3", {"j1": 1, "j2": 3}, new) == ["s1:3", ["j1", "j2"], "w1",
                                                              {"j1": 1, "j2": 3}]
    assert run_pack_args("s1:3", {"j1": 1, "j2": 3}, old) == ["s1:3", ["j1", "j2"], "w0"]


def test_a_worker_says_its_tasks_take_the_attempt(redis_server, redis_client, prefix, tmp_path):
    import threading
    import time

    from dispatcher.jobs.celery_app import takes_attempt
    from dispatcher.jobs.fleet import Fleet
    from dispatcher.settings import Settings
    from gpuworker.worker import start_heartbeat

    settings = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    stop = threading.Event()
    beat = start_heartbeat(settings, "hb1", None, stop)
    fleet = Fleet(redis_client, prefix)
    try:
        deadline = time.monotonic() + 10
        while not fleet.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [takes_attempt(w) for w in fleet.alive()] == [True]
    finally:
        stop.set()
        beat.join(10)
