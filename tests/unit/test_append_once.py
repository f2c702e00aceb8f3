"""A run's events are written once even when Redis's reply to the write is lost (review15b
L9): the worker's patient Redis client retries a transaction whose connection dropped, and a
drop after EXEC was applied but before its reply arrived must not write the events again."""

from __future__ import annotations

import json

import redis

from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings
from gpuworker.tasks import JobRun, patient_redis


class LosesExecReply(redis.Connection):
    """A connection that, when `lose` is set, reads the server's reply to the next EXEC (the
    transaction is applied) and then fails as a dropped connection would; when `meddle` is set,
    it calls it just before it sends the next EXEC (a concurrent change)."""

    lose = False
    lost = 0
    meddle = None

    def send_packed_command(self, command, check_health=True):
        chunks = [command] if isinstance(command, (bytes, str)) else command
        sent = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        has_exec = b"\r\nEXEC\r\n" in sent
        if has_exec and LosesExecReply.meddle is not None:
            meddle, LosesExecReply.meddle = LosesExecReply.meddle, None
            meddle()
        self._exec_sent = LosesExecReply.lose and has_exec
        super().send_packed_command(command, check_health)

    def read_response(self, *args, **kwargs):
        reply = super().read_response(*args, **kwargs)
        if getattr(self, "_exec_sent", False) and isinstance(reply, list):
            self._exec_sent = False
            LosesExecReply.lose = False
            LosesExecReply.lost += 1
            self.disconnect()
            raise redis.ConnectionError("Connection closed by server.")
        return reply


def running_job(store: JobStore, name: str) -> str:
    """A job running on w1 at attempt 1."""
    job = store.create("train", {"lora_name": name})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    return job


def patient_client(redis_server: str, prefix: str, connection: type) -> redis.Redis:
    """The worker's own client (patient_redis), on connections of class `connection`."""
    r = patient_redis(Settings(redis_url=redis_server, prefix=prefix), 5.0)
    r.connection_pool.connection_class = connection
    return r


def test_a_step_whose_reply_was_lost_is_written_once(redis_server, store, prefix):
    job = running_job(store, "once")
    r = patient_client(redis_server, prefix, LosesExecReply)  # loses one EXEC reply
    LosesExecReply.lost = 0
    try:
        run = JobRun(JobStore(r, prefix), job, "w1", store.get(job))
        run.progress({"type": "train", "step": 1, "total_steps": 2, "loss": 2.0})
        LosesExecReply.lose = True
        run.progress({"type": "train", "step": 2, "total_steps": 2, "loss": 1.5})
        assert LosesExecReply.lost == 1 and not LosesExecReply.lose  # the reply was lost
        run.log("after the lost reply")
    finally:
        r.close()
    events = [e for _, e in store.events.history(job)]
    assert [e["step"] for e in events if e["type"] == "train"] == [1, 2]
    assert [e["line"] for e in events if e["type"] == "log"] == ["after the lost reply"]
    assert store.get(job)["step"] == 2


def test_a_write_refused_by_a_concurrent_change_is_written_on_its_retry(redis_server, store,
                                                                       prefix):
    """The other way a watched write is retried: the record changed between the read and
    EXEC (EXEC applied nothing). The retry writes the events, once."""
    job = running_job(store, "retried")
    r = patient_client(redis_server, prefix, LosesExecReply)
    changed: list[bool] = []

    def dispatcher_writes() -> None:
        store.update_progress(job, reason="a concurrent change")
        changed.append(True)

    try:
        run = JobRun(JobStore(r, prefix), job, "w1", store.get(job))
        LosesExecReply.meddle = dispatcher_writes
        run.progress({"type": "train", "step": 1, "total_steps": 1, "loss": 2.0})
    finally:
        LosesExecReply.meddle = None
        r.close()
    assert changed == [True]
    events = [e for _, e in store.events.history(job)]
    assert [e["step"] for e in events if e["type"] == "train"] == [1]
    assert store.get(job)["step"] == 1


def test_a_job_end_whose_reply_was_lost_is_applied_once_with_its_state_event(redis_server,
                                                                           store, prefix):
    """The same for a change of state: the run's end (RUNNING -> SUCCEEDED) is applied, its
    reply lost. The retry must see its own change, not refuse it as succeeded -> succeeded
    (the worker would call its run fenced out), and write the state event once."""
    job = running_job(store, "ended")
    r = patient_client(redis_server, prefix, LosesExecReply)
    LosesExecReply.lost = 0
    listener = store.r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(store.events.channel)
    try:
        LosesExecReply.lose = True
        rec = JobStore(r, prefix).transition(
            job, JobState.SUCCEEDED, "done", expect_worker="w1", expect_attempt=1,
            events=[("log", {"line": "saved"})])
        assert LosesExecReply.lost == 1 and not LosesExecReply.lose  # the reply was lost
    finally:
        r.close()
    assert rec["state"] == "succeeded"
    assert [h["state"] for h in store.history(job)] == ["queued", "assigned", "running",
                                                       "succeeded"]
    events = [e for _, e in store.events.history(job)]
    assert [e["line"] for e in events if e["type"] == "log"] == ["saved"]
    assert [e["state"] for e in events if e["type"] == "state"][-1:] == ["succeeded"]
    assert sum(e["type"] == "state" and e["state"] == "succeeded" for e in events) == 1
    # Live views (the Jobs page) hear of the end all the same, once, though without stream ids.
    told = []
    for _ in range(6):  # (the subscription's own confirmation reads as None)
        msg = listener.get_message(timeout=0.3)
        if msg is not None:
            told.append(json.loads(msg["data"]))
    listener.close()
    assert [(m["job"], m["event"]["type"], m["id"]) for m in told] == [
        (job, "log", ""), (job, "state", "")]


class LosesXaddReply(redis.Connection):
    """A connection that, when `lose` is set, sends the next XADD outside a transaction,
    reads its reply (the event is written) and then fails as a dropped connection would."""

    lose = False

    def send_packed_command(self, command, check_health=True):
        chunks = [command] if isinstance(command, (bytes, str)) else command
        sent = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        self._xadd_sent = (LosesXaddReply.lose and b"\r\nXADD\r\n" in sent
                           and b"MULTI" not in sent)
        super().send_packed_command(command, check_health)

    def read_response(self, *args, **kwargs):
        reply = super().read_response(*args, **kwargs)
        if getattr(self, "_xadd_sent", False):
            self._xadd_sent = LosesXaddReply.lose = False
            self.disconnect()
            raise redis.ConnectionError("Connection closed by server.")
        return reply


def test_a_job_ends_with_one_state_event_whatever_reply_is_lost(redis_server, store, prefix):
    """The change's state event is part of its transaction: a client that re-sends a plain
    write whose reply was lost (the worker's patient client does) cannot write it twice."""
    job = running_job(store, "one-end")
    r = patient_client(redis_server, prefix, LosesXaddReply)
    try:
        LosesXaddReply.lose = True
        JobStore(r, prefix).transition(job, JobState.SUCCEEDED, "done", expect_worker="w1",
                                       expect_attempt=1)
        assert LosesXaddReply.lose  # no event was added outside the change's transaction
    finally:
        LosesXaddReply.lose = False
        r.close()
    states = [e["state"] for _, e in store.events.history(job) if e["type"] == "state"]
    assert states == ["queued", "assigned", "running", "succeeded"]
