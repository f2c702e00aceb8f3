"""A job's run is fenced on (state, worker, attempt): a process of a worker's earlier life
that still trains a job given again to the same worker name stops writing to it."""

from __future__ import annotations

import pytest

from dispatcher.jobs.states import JobState
from gpuworker.tasks import JobFenced, JobRun


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
