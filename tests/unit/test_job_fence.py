"""A job's run is fenced on (state, worker, attempt): a process of a worker's earlier life
that still trains a job given again to the same worker name stops writing to it."""

from __future__ import annotations

import warnings

import pytest

from dispatcher.jobs.states import JobState
from gpuworker.tasks import JobFenced, JobRun, record_failure, record_result


def test_a_run_of_an_earlier_attempt_on_the_same_worker_name_is_fenced(store):
    job = store.create("train", {"lora_name": "fenced"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    first = JobRun(store, job, "w1", store.get(job))
    assert first.still_mine() and not first.should_stop()
    first.progress({"type": "train", "step": 1, "loss": 2.0})
    # The worker's main process died and came back as w1; the job went back to the queue and
    # was given to w1 again: attempt 2. The old process must not write to it any more.
    store.transition(job, JobState.RETRYING, "lost")
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    store.transition(job, JobState.RUNNING, "r")
    second = JobRun(store, job, "w1", store.get(job))
    assert second.still_mine() and not first.still_mine()
    with pytest.raises(JobFenced):  # it stops without writing anything more (not even a save)
        first.should_stop()
    second.progress({"type": "train", "step": 1, "loss": 2.0})
    events = [e for _, e in store.events.history(job) if e["type"] == "train"]
    assert [e["attempt"] for e in events] == [1, 2]  # every event carries its attempt


def _given_again(store, job: str) -> JobRun:
    """Attempt 1 on w1 (returned: the orphan), then the job is re-queued and given to w1 again:
    attempt 2 runs."""
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    orphan = JobRun(store, job, "w1", store.get(job))
    store.transition(job, JobState.RETRYING, "w1 restarted while the job was on it")
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    store.transition(job, JobState.RUNNING, "r")
    return orphan


def test_an_orphan_of_an_earlier_attempt_writes_nothing_to_the_jobs_new_run(store):
    """review15 H1: every write of a run is fenced on its attempt, not only on the worker's
    name: the failure, the result and the log lines of a process of the worker's earlier life
    leave the job's attempt 2 running and its stream as it was."""
    job = store.create("train", {"lora_name": "orphaned"})
    orphan = _given_again(store, job)
    second = JobRun(store, job, "w1", store.get(job))
    second.log("attempt 2: resuming from the latest checkpoint")
    record, stream = store.get(job), store.r.xrange(store.events.stream_key(job))

    orphan.log("a line of the orphan")
    try:
        raise FileNotFoundError("loras/orphaned/.checkpoint-4-x/training_state.pt")
    except FileNotFoundError as e:  # raised, so its traceback's lines are at hand too
        record_failure(orphan, e)
    with pytest.raises(JobFenced):
        record_result(orphan, {"lora_dir": "loras/orphaned", "saved": True, "steps": 4,
                               "stopped": False, "reason": "finished"})
    with pytest.raises(JobFenced):
        orphan.progress({"type": "train", "step": 5, "total_steps": 5, "loss": 1.0})

    assert store.get(job) == record  # running, attempt 2, no result, no progress of the orphan
    assert record["state"] == "running" and record["attempt"] == 2 and "result" not in record
    assert store.r.xrange(store.events.stream_key(job)) == stream

    # The run that owns the job still writes, and ends it.
    second.log("still mine")
    assert record_result(second, {"lora_dir": "loras/orphaned", "saved": True, "steps": 5,
                                  "stopped": False, "reason": "finished"}) == JobState.SUCCEEDED
    rec = store.get(job)
    assert rec["state"] == "succeeded" and rec["result"]["steps"] == 5
    events = [e for _, e in store.events.history(job)]
    assert [e["type"] for e in events[-3:]] == ["log", "result", "state"]
    assert {e.get("attempt") for e in events if e["type"] == "log"} == {2}


def test_a_failure_is_recorded_with_its_traceback_by_the_run_that_owns_the_job(store):
    job = store.create("train", {"lora_name": "owned"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    run = JobRun(store, job, "w1", store.get(job))
    try:
        raise FileNotFoundError("gone")
    except FileNotFoundError as e:
        record_failure(run, e)
    rec = store.get(job)
    assert rec["state"] == "failed" and rec["reason"] == "FileNotFoundError: gone"
    lines = [e["line"] for _, e in store.events.history(job) if e["type"] == "log"]
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "FileNotFoundError: gone"


def test_the_crash_handler_settles_only_the_attempt_it_read(store):
    """settle's attempt fence: a job given again to the same worker name between the read and
    the write is another run's and is left alone."""
    from dispatcher.schedule.requeue import Crashed, settle

    job = store.create("train", {"lora_name": "settled"})
    _given_again(store, job)
    assert settle(store, job, 1, Crashed("died"), expect_worker="w1", expect_attempt=1) is None
    assert store.get(job)["state"] == "running"
    assert settle(store, job, 2, Crashed("died"), expect_worker="w1",
                  expect_attempt=2) == JobState.RETRYING


# review15b M4: a task carries the attempt it was sent for, and the worker fences on it --------


@pytest.fixture
def worker_app(redis_server, prefix, tmp_path):
    """A worker's Celery app with its tasks and signal handlers registered, on the real Redis;
    the handlers are taken off Celery's (process-wide) signals afterwards."""
    from celery.exceptions import DuplicateTaskNameWarning
    from celery.signals import task_failure, task_received

    from dispatcher.jobs.celery_app import make_celery
    from dispatcher.settings import Settings
    from gpuworker.tasks import register_tasks

    saved = {s: list(s.receivers) for s in (task_failure, task_received)}
    settings = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    celery = make_celery(settings)
    register_tasks(celery, settings)
    with warnings.catch_warnings():
        # Tasks are shared between the Celery apps of one process: each test's app meets the
        # tasks an earlier test registered (a worker process has one app).
        warnings.simplefilter("ignore", DuplicateTaskNameWarning)
        celery.finalize()
    yield celery
    for signal, receivers in saved.items():
        signal.receivers[:] = receivers
        signal.sender_receivers_cache.clear()


def _task_failed(celery, task: str, args: list) -> None:
    """What Celery does when a task ends without returning (its child died, say)."""
    from celery.signals import task_failure

    task_failure.send(sender=celery.tasks[task], task_id="t-1", args=args, kwargs={},
                      exception=RuntimeError("the child was killed"), traceback=None,
                      einfo=None)


def test_a_late_crash_of_attempt_1_leaves_attempt_2_on_the_same_worker_name_alone(store,
                                                                                  worker_app):
    """The re-queue after a crash is fenced on the attempt the task was sent for, not on the
    one the record holds when the crash is seen: attempt 1's child dying after the job was
    re-queued and given again to w1 (attempt 2, waiting in w1's queue) neither counts an
    attempt against attempt 2 nor takes it away."""
    from dispatcher.jobs.celery_app import RUN_JOB_TASK

    job = store.create("train", {"lora_name": "late"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    store.transition(job, JobState.RETRYING, "worker w1 stopped answering; re-queued",
                     worker="")
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    before = store.get(job)

    _task_failed(worker_app, RUN_JOB_TASK, [job, "w1", 1])
    assert store.get(job) == before  # assigned to w1 at attempt 2, untouched

    store.transition(job, JobState.RUNNING, "r")
    _task_failed(worker_app, RUN_JOB_TASK, [job, "w1", 2])  # attempt 2's own crash counts
    rec = store.get(job)
    assert rec["state"] == "retrying" and rec["worker"] == ""
    assert rec["reason"].endswith("(RuntimeError: the child was killed); re-queued")


def test_a_pack_tasks_crash_settles_only_the_trials_at_the_attempts_it_was_sent_for(
        store, worker_app):
    from dispatcher.jobs.celery_app import RUN_PACK_TASK

    moved, mine = (store.create("train", {"lora_name": n}) for n in ("moved", "mine"))
    for j in (moved, mine):
        store.transition(j, JobState.ASSIGNED, "a", worker="w1", attempt=1)
        store.transition(j, JobState.RUNNING, "r")
    # `moved` was re-queued meanwhile and given to w1 again (to train alone, say).
    store.transition(moved, JobState.RETRYING, "re-queued", worker="")
    store.transition(moved, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    before = store.get(moved)

    _task_failed(worker_app, RUN_PACK_TASK, ["s1:1", [moved, mine], "w1", {moved: 1, mine: 1}])
    assert store.get(moved) == before
    assert store.get(mine)["state"] == "retrying"


def test_a_task_message_without_an_attempt_is_settled_as_before(store, worker_app):
    """A message of a dispatcher from before tasks carried their attempt (one still queued
    at an upgrade) is settled on the attempt the record holds: there is nothing else to go
    by."""
    from dispatcher.jobs.celery_app import RUN_JOB_TASK

    job = store.create("train", {"lora_name": "old"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    store.transition(job, JobState.RUNNING, "r")
    _task_failed(worker_app, RUN_JOB_TASK, [job, "w1"])
    assert store.get(job)["state"] == "retrying"


def test_a_task_starts_only_the_attempt_it_was_sent_for(store, tmp_path):
    """A message that turns up after its job was given again to the same worker (the
    dispatcher re-queued it as never received) is skipped; the later message runs the job,
    and every write of that run is fenced on its attempt."""
    from dispatcher.jobs.fleet import Fleet
    from dispatcher.settings import Settings
    from gpuworker.tasks import perform_job

    settings = Settings(home=tmp_path / "home", redis_url="", prefix=store.p)
    fleet = Fleet(store.r, store.p)
    job = store.create("train", {"lora_name": "twice-sent"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RETRYING, "w1 never received the job; re-queued", worker="")
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    runs: list[int] = []

    def run(kind, spec, settings, job_id, attempt, progress, should_stop, log):
        runs.append(attempt)
        progress({"type": "train", "step": 1, "total_steps": 1, "loss": 1.0})
        return {"stopped": False, "saved": True, "reason": "finished"}

    assert perform_job(job, "w1", store, fleet, run, settings, attempt=1) == "skipped"
    assert store.get(job)["state"] == "assigned" and runs == []
    assert perform_job(job, "w1", store, fleet, run, settings, attempt=2) == "succeeded"
    assert runs == [2]
    train = [e for _, e in store.events.history(job) if e["type"] == "train"]
    assert [e["attempt"] for e in train] == [2]

    # A message without an attempt (from an older dispatcher) runs the attempt the record has.
    old = store.create("train", {"lora_name": "old-message"})
    store.transition(old, JobState.ASSIGNED, "a", worker="w1", attempt=3)
    assert perform_job(old, "w1", store, fleet, run, settings) == "succeeded"
    assert runs == [2, 3]
