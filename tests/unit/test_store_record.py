"""The typed job record (dispatcher/jobs/record.py): the store hands out a JobRecord whose
fields are typed and whose to_dict() is exactly the dict `get` returns; one decoder of Redis
hashes serves job records and sweep records alike."""

from __future__ import annotations

import pytest

from dispatcher.jobs.record import JobRecord, decode_hash, decode_job
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobNotFound, JobStore
from tests.clock import Clock


@pytest.fixture
def clocked(redis_client, prefix):
    clock = Clock(1000.0)
    return JobStore(redis_client, prefix, clock=clock), clock


def test_a_queued_job_as_a_record(clocked):
    store, _ = clocked
    job = store.create("train", {"lora_name": "a", "base_model": "m"}, owner="ada",
                       priority="high", gpu_memory_mb=1234, fields={"sweep": "s1"})
    rec = store.record(job)
    assert rec == JobRecord(id=job, kind="train", state=JobState.QUEUED, owner="ada",
                            priority="high", spec={"lora_name": "a", "base_model": "m"},
                            name="a", created=1000.0, updated=1000.0, gpu_memory_mb=1234,
                            sweep="s1")
    assert rec.started is None and rec.finished is None and not rec.terminal
    assert rec.to_dict() == store.get(job)


def test_a_finished_job_as_a_record(clocked):
    store, clock = clocked
    job = store.create("evaluate", {"base_model": "m", "loras": ["x"]})
    store.transition(job, JobState.ASSIGNED, worker="w1")
    clock.t = 1010.0
    store.transition(job, JobState.RUNNING, attempt=1)
    store.update_progress(job, step=3, loss=0.5)
    store.set_result(job, {"perplexity": 7.5})
    clock.t = 1070.0
    store.transition(job, JobState.SUCCEEDED, "done")
    rec = store.record(job)
    assert (rec.state, rec.worker, rec.attempt, rec.started, rec.finished, rec.reason) == (
        JobState.SUCCEEDED, "w1", 1, 1010.0, 1070.0, "done")
    assert rec.terminal and rec.result == {"perplexity": 7.5} and rec.name == "perplexity: m + x"
    assert rec.get("step") == 3 and rec.get("loss") == 0.5 and rec.get("eta_s") is None
    assert rec.to_dict() == store.get(job)
    rec.to_dict()["spec"]["base_model"] = "changed"  # a copy: the record stays as it was
    assert rec.spec["base_model"] == "m"
    assert store.recent_durations() == [{"kind": "evaluate", "base_model": "m", "seconds": 60.0}]


def test_no_such_job(clocked):
    store, _ = clocked
    assert store.record("nope") is None
    with pytest.raises(JobNotFound):
        store.cancel("nope")


def test_of_takes_a_record_or_its_dict(clocked):
    store, _ = clocked
    rec = store.record(store.create("generate", {"base_model": "m", "prompt": "hi"}))
    assert JobRecord.of(rec) is rec
    assert JobRecord.of(rec.to_dict()) == rec


def test_one_decoder_for_jobs_and_sweeps():
    raw = {"spec": '{"a": 1}', "result": "", "created": "5.5", "attempt": "2.0", "step": ""}
    assert decode_job(raw) == {"spec": {"a": 1}, "result": "", "created": 5.5, "attempt": 2,
                               "step": ""}
    # The sweep store's way: an empty or missing field becomes None.
    assert decode_hash({"trials": "[1]", "base": "", "seed": "7"}, json_fields=("trials", "base",
                       "skipped"), number_fields=("seed", "finished"), int_fields=("seed",),
                       absent_as_none=True) == {"trials": [1], "base": None, "skipped": None,
                                                "seed": 7, "finished": None}
