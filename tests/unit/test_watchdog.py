"""The stop watchdog against a real Redis and a real stuck child process (no Celery here: the
integration test in tests/integration/test_fleet_control.py runs the whole worker)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from gpuworker.watchdog import StopWatchdog, kill_child


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env(redis_client, prefix, tmp_path):
    store = JobStore(redis_client, prefix)
    fleet = Fleet(redis_client, prefix)
    clock = Clock()
    dog = StopWatchdog(store, fleet, "w1", grace_s=5, loras=tmp_path, clock=clock)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield store, fleet, clock, dog, child, tmp_path
    child.kill()
    child.wait()


def running_job(store, fleet, child, lora="stuck"):
    job = store.create("train", {"lora_name": lora})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1")
    store.transition(job, JobState.RUNNING, "running on w1", expect_worker="w1")
    fleet.heartbeat("w1", state="busy", job=job, job_pid=child.pid)
    return job


def test_unanswered_stop_is_killed_after_the_grace_period(env):
    store, fleet, clock, dog, child, loras = env
    (loras / "stuck" / "checkpoint-10").mkdir(parents=True)
    (loras / "stuck" / "checkpoint-20").mkdir()
    job = running_job(store, fleet, child)
    assert dog.check() is None  # no stop requested: nothing to do
    store.cancel(job)
    assert dog.check() is None  # first seen now: the clock starts
    assert store.r.hget(fleet.key("w1"), "state") == "stopping"
    clock.t += 4.9
    assert dog.check() is None and child.poll() is None
    clock.t += 0.2
    assert dog.check() == job
    assert child.wait(5) == -9  # SIGKILL
    rec = store.get(job)
    assert rec["state"] == "cancelled"
    assert rec["reason"] == ("stopped by the user: the training process was killed after not "
                             "answering the stop request within 5 s; the LoRA of its last "
                             "checkpoint (checkpoint-20) stays")
    w = store.r.hgetall(fleet.key("w1"))
    assert (w["state"], w["job"], w["job_pid"]) == ("idle", "", "")
    logs = [e["line"] for _, e in store.events.history(job) if e["type"] == "log"]
    assert any("has 5 s to answer" in x for x in logs)
    assert any(f"killed the training process (pid {child.pid})" in x for x in logs)


def test_answered_stop_is_left_to_finish(env):
    store, fleet, clock, dog, child, _ = env
    job = running_job(store, fleet, child, lora="polite")
    store.request_stop(job, "early stopping: loss above the median")
    dog.check()
    store.answer_stop(job)  # the trainer saw it and is saving
    clock.t += 60
    assert dog.check() is None and child.poll() is None
    assert store.get(job)["state"] == "running"


def test_a_job_that_ends_meanwhile_is_not_touched(env):
    store, fleet, clock, dog, child, _ = env
    job = running_job(store, fleet, child, lora="quick")
    store.request_stop(job, "early stopping: loss above the median")
    dog.check()
    store.transition(job, JobState.CANCELLED, "early stopping: loss above the median",
                     expect_worker="w1")
    clock.t += 60
    assert dog.check() is None and child.poll() is None
    assert store.get(job)["reason"] == "early stopping: loss above the median"


def test_stop_reason_and_no_checkpoint_in_the_kill_reason(env):
    store, fleet, clock, dog, child, _ = env
    job = running_job(store, fleet, child, lora="fresh")
    store.request_stop(job, "early stopping: loss above the median")
    dog.check()
    clock.t += 5
    assert dog.check() == job
    assert store.get(job)["reason"] == (
        "early stopping: loss above the median: the training process was killed after not "
        "answering the stop request within 5 s; no checkpoint had been saved")
    assert json.loads(store.r.lrange(f"{store.p}:job:{job}:history", -1, -1)[0])["state"] == \
        "cancelled"


def test_kill_child_refuses_a_process_that_is_not_its_child(env):
    *_, child, _ = env
    # Our child, named by pid: killed. Not our child (parent 1 / another tree): refused, and
    # with more than one child of ours it cannot guess.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert kill_child(child.pid, parent=other.pid) is None
        assert child.poll() is None and other.poll() is None
        assert kill_child(child.pid) == child.pid
        assert child.wait(5) == -9
    finally:
        other.kill()
        other.wait()
