"""The one re-queue policy (dispatcher.schedule.requeue), as the dispatcher (a lost worker) and
the worker (a task that ended without an outcome) apply it, on a real Redis server."""

from __future__ import annotations

import subprocess
import sys

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.requeue import MAX_ATTEMPTS, Crashed, LostWorker, next_state, settle
from dispatcher.settings import Settings
from gpuworker.errors import EngineError
from gpuworker.tasks import _reason, requeue_after_crash
from gpuworker.worker import release_orphans


def test_the_policy_itself():
    assert next_state(1, stopping=False) == JobState.RETRYING
    assert next_state(MAX_ATTEMPTS - 1, stopping=False) == JobState.RETRYING
    assert next_state(MAX_ATTEMPTS, stopping=False) == JobState.FAILED
    assert next_state(1, stopping=True) == JobState.CANCELLED
    assert next_state(MAX_ATTEMPTS, stopping=True) == JobState.CANCELLED


def running(store: JobStore, worker: str, attempt: int = 1) -> str:
    job = store.create("train", {"lora_name": "a"})
    store.transition(job, JobState.ASSIGNED, "a", worker=worker, attempt=attempt)
    store.transition(job, JobState.RUNNING, "r", expect_worker=worker)
    return job


def test_reasons_name_what_happened(store):
    lost = running(store, "w1")
    assert settle(store, lost, 1, LostWorker("w1")) == JobState.RETRYING
    rec = store.get(lost)
    assert rec["reason"] == "worker w1 stopped answering; re-queued" and rec["worker"] == ""

    crashed = running(store, "w2", attempt=MAX_ATTEMPTS)
    assert settle(store, crashed, MAX_ATTEMPTS, Crashed("it died")) == JobState.FAILED
    assert store.get(crashed)["reason"] == f"it died; it happened {MAX_ATTEMPTS} times, giving up"

    stopping = running(store, "w3")
    store.request_stop(stopping, "stopped early: rank 3 of 3")
    assert settle(store, stopping, 1, Crashed("it died")) == JobState.CANCELLED
    assert store.get(stopping)["reason"] == (
        "stopped early: rank 3 of 3; it died before the job stopped (its last checkpoint, if "
        "any, stays)")


def test_a_job_on_another_worker_is_left_alone(store):
    job = running(store, "w1")
    assert settle(store, job, 1, Crashed("x"), expect_worker="w2") is None
    assert store.get(job)["state"] == "running"


def test_the_worker_requeues_its_crashed_job_and_goes_idle(redis_server, redis_client, prefix):
    settings = Settings(redis_url=redis_server, prefix=prefix)
    store = JobStore(redis_client, prefix)
    job = running(store, "w1")
    assert requeue_after_crash(settings, job, "w1", "the process died") == "retrying"
    assert store.get(job)["reason"] == "the process died; re-queued"
    assert redis_client.hget(Fleet(redis_client, prefix).key("w1"), "state") == "idle"
    # Ended jobs stay ended; a job of another worker is not this worker's to settle.
    store.cancel(job)
    assert requeue_after_crash(settings, job, "w1", "again") is None
    other = running(store, "w2")
    assert requeue_after_crash(settings, other, "w1", "x") is None
    assert store.get(other)["state"] == "running"


def test_a_restarted_worker_takes_nothing_before_its_first_heartbeat(redis_server, redis_client,
                                                                    prefix):
    """A worker restarted under its name (faster than the heartbeat timeout) gives back its
    earlier process's job, and its name counts as gone until the new process reports: the
    dispatcher must not assign the job straight back to a process still importing torch."""
    settings = Settings(redis_url=redis_server, prefix=prefix)
    store = JobStore(redis_client, prefix)
    fleet = Fleet(redis_client, prefix, timeout=settings.worker_timeout)
    fleet.heartbeat("w1", state="busy", job="x")
    job = running(store, "w1")
    assert [w["name"] for w in fleet.alive()] == ["w1"]
    release_orphans(settings, "w1")
    assert store.get(job)["state"] == "retrying"
    assert "worker w1 restarted" in store.get(job)["reason"]
    # Not alive for any reader, whatever its timeout (the heartbeat is seconds old), and said
    # so on the Fleet page.
    assert fleet.alive() == [] and Fleet(redis_client, prefix, timeout=3600).alive() == []
    assert [(w["state"], w["job"]) for w in fleet.workers()] == [("starting", "")]
    fleet.heartbeat("w1", state="idle", job="")  # the new process's first heartbeat
    assert [w["name"] for w in fleet.alive()] == ["w1"]
    # A name never seen gets no record from this.
    release_orphans(settings, "w9")
    assert not redis_client.exists(fleet.key("w9"))


def test_engine_errors_are_told_as_they_are():
    class Sub(EngineError):
        pass

    assert _reason(EngineError("lower cutoff_len")) == "lower cutoff_len"
    assert _reason(Sub("set base_model")) == "set base_model"
    assert _reason(ValueError("bad")) == "ValueError: bad"


def test_the_failure_reason_needs_no_torch():
    """A job whose imports failed (torch missing) is still marked failed with its reason: the
    worker's failure handler imports nothing that imports torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from gpuworker.errors import EngineError\n"
        "from gpuworker.tasks import _reason\n"
        "print(_reason(EngineError('set base_model')))\n"
        "assert sys.modules['torch'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "set base_model"


def test_a_jobs_run_in_its_folder_leaves_out_assignments_that_never_reached_it():
    """folder_run: which run of the job in its LoRA folder an attempt is. Assignments refused
    on a locked folder or never delivered read and wrote nothing there (the run resumes
    nothing on their account); a pack split's trial did train, so it counts."""
    from gpuworker.tasks import folder_run

    assert folder_run(1, {}) == 1
    assert folder_run(3, {"lock_requeues": 1, "unsent_requeues": 1}) == 1
    assert folder_run(2, {"unsent_requeues": "1"}) == 1
    assert folder_run(2, {"pack_splits": 1}) == 2
    assert folder_run(4, {"lock_requeues": 1, "pack_splits": 1}) == 3
