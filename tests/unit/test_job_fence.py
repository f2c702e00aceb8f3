"""A job's run is fenced on (state, worker, attempt): a process of a worker's earlier life
that still trains a job given again to the same worker name stops writing to it."""

from __future__ import annotations

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
