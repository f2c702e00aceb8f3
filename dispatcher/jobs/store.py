"""Job records in Redis, and the one function that changes a job's state.

Keys (prefix `lf` by default):
  {p}:job:{id}            hash: the record (spec as JSON, state, owner, worker, progress)
  {p}:job:{id}:history    list: every transition as JSON {state, time, reason}
  {p}:job:{id}:written    token of the last watched write to the job (a transition, a run's
                          events), so a retry of a write already applied, whose reply a dropped
                          connection lost, does not write it twice; expires
  {p}:jobs                sorted set of every job id by creation time
  {p}:pending             sorted set of queued/retrying job ids by creation time
  {p}:pending-owner:{owner}  the same, of one owner only (kept in the same MULTI as {p}:pending,
                          so counting a user's waiting jobs is one ZCARD, not a scan)
  {p}:pending-owners      present once the per-owner sets hold every pending job (set by
                          the first count after an upgrade, see pending_count)
  {p}:pending-rev         counter raised by every change a pending job can see (submission,
                          transition, priority): the dispatcher re-reads its queue only then
  {p}:active              set of assigned/running job ids
  {p}:stop:{id}           present when the user asked a running job to stop
  {p}:usage:{owner}, {p}:durations   finished runs, for the scheduler (dispatcher/jobs/usage.py)
  {p}:sweeps:dirty        ids of sweeps one of whose jobs changed state since the dispatcher's
                          last sweep pass
  (sweeps: dispatcher/schedule/sweeps/store.py; a trial's record has `sweep` and `sweep_cap`
  fields, a sweep's perplexity job `sweep_eval`)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import redis as redis_lib

from dispatcher.jobs.events import EventLog
from dispatcher.jobs.record import JobRecord, decode_job, job_name
from dispatcher.jobs.states import (
    ACTIVE,
    PENDING,
    PENDING_VALUES,
    JobState,
    TransitionError,
    check_transition,
)
from dispatcher.jobs.usage import RunLog

PRIORITIES = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
KINDS = ("train", "evaluate", "generate")
# The record fields that can change while a job is queued or retrying.
WAITING_FIELDS = ("state", "updated", "priority", "attempt", "reason")


class JobNotFound(KeyError):
    pass


def _check_run(job_id: str, rec: JobRecord, worker: str | None, attempt: int | None) -> None:
    """Refuse (TransitionError) a write of a run that is no longer the job's: the job was
    given to another worker, or again to the same worker name (a later attempt)."""
    if worker is not None and rec.worker != worker:
        raise TransitionError(f"job {job_id} is no longer assigned to {worker}")
    # (A record from before attempts were counted reads 0: its one run is attempt 1.)
    if attempt is not None and (rec.attempt or 1) != attempt:
        raise TransitionError(f"job {job_id} is at attempt {rec.attempt or 1}, no longer at "
                              f"attempt {attempt}")


STOP_KEY_TTL_S = 24 * 3600
# The mark of a job's last watched write (append_to_run, _watched) is needed only while that
# write is retried (seconds, at most a client's patience with Redis); it is kept far longer.
WRITTEN_TTL_S = 24 * 3600
# The id an event is announced with when the write was applied but its reply, which carried
# the stream ids, was lost: live views use the job and the event, never the id (a job's own
# stream, read by id, has the event in its place).
LOST_ID = ""
USER_STOP = "stopped by the user"  # the end reason of a stop requested without one


class JobStore:
    def __init__(self, redis, prefix: str = "lf", clock: Callable[[], float] = time.time):
        self.r = redis
        self.p = prefix
        self.clock = clock
        self.events = EventLog(redis, prefix, clock)
        self.usage = RunLog(redis, prefix)

    # keys -------------------------------------------------------------------------------------
    def key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _history_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:history"

    def _written_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:written"

    @property
    def pending_key(self) -> str:
        return f"{self.p}:pending"

    def pending_owner_key(self, owner: str) -> str:
        return f"{self.p}:pending-owner:{owner or 'local'}"

    @property
    def pending_rev_key(self) -> str:
        return f"{self.p}:pending-rev"

    @property
    def dirty_sweeps_key(self) -> str:
        return f"{self.p}:sweeps:dirty"

    @property
    def active_key(self) -> str:
        return f"{self.p}:active"

    def stop_key(self, job_id: str) -> str:
        return f"{self.p}:stop:{job_id}"

    # records ----------------------------------------------------------------------------------
    def create(self, kind: str, spec: dict[str, Any], owner: str = "local",
               priority: str = "normal", gpu_memory_mb: int = 0,
               fields: dict[str, Any] | None = None) -> str:
        """Queue a job. `gpu_memory_mb` is the card memory it needs (dispatcher.schedule.estimate);
        `fields` are extra record fields (a sweep's trials carry `sweep` and `sweep_cap`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        job_id = uuid.uuid4().hex[:12]
        now = self.clock()
        record = {
            "id": job_id, "kind": kind, "owner": owner, "priority": priority,
            "state": JobState.QUEUED.value, "spec": json.dumps(spec), "created": now,
            "updated": now, "name": job_name(kind, spec), "worker": "", "reason": "",
            "attempt": 0, "gpu_memory_mb": int(gpu_memory_mb), **(fields or {}),
        }
        # The "queued" event goes into the stream in the same transaction that makes the job
        # pending: written after it, a dispatcher could assign the job (and add "assigned")
        # first, and the job's events would be out of order.
        event = self.events.event("state", state=JobState.QUEUED.value, reason="submitted",
                                  time=now)
        with self.r.pipeline() as pipe:
            pipe.xadd(self.events.stream_key(job_id), {"data": self.events.payload(event)})
            pipe.hset(self.key(job_id), mapping=record)
            pipe.rpush(self._history_key(job_id), json.dumps(
                {"state": JobState.QUEUED.value, "time": now, "reason": "submitted"}))
            pipe.zadd(f"{self.p}:jobs", {job_id: now})
            pipe.zadd(self.pending_key, {job_id: now})
            pipe.zadd(self.pending_owner_key(owner), {job_id: now})
            pipe.incr(self.pending_rev_key)
            event_id = pipe.execute()[0]
        self.events.announce(job_id, event_id, event)
        return job_id

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's record as a dict (JobNotFound if there is none); `record` types it."""
        raw = self.r.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return decode_job(raw)

    def record(self, job_id: str) -> JobRecord | None:
        """The job's record, typed; None if there is no such job."""
        raw = self.r.hgetall(self.key(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(self._history_key(job_id), 0, -1)]

    def get_many(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The records of `ids` in that order, in one round trip; a missing job is left out."""
        with self.r.pipeline() as pipe:
            for i in ids:
                pipe.hgetall(self.key(i))
            raws = pipe.execute()
        return [decode_job(raw) for raw in raws if raw]

    def list(self, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        ids = self.r.zrevrange(f"{self.p}:jobs", offset, offset + limit - 1)
        return self.get_many(ids)

    def page(self, limit: int = 50, offset: int = 0, states: Collection[str] = (),
             owners: Collection[str] = (), before: str | None = None
             ) -> tuple[list[dict[str, Any]], int]:
        """One page of jobs, newest first, and how many match in all. Without filters it reads
        only the page from the sorted index; with a state or owner filter it reads those two
        fields of every job in one round trip (about 55 ms for 5,000 jobs) and then the page.

        `before` (a job id) starts the page just after that job in the list, whatever changed
        meanwhile: a client reading a filtered list page by page passes the last id it got,
        so a job that leaves the filter (or a new one) never shifts a job out of its reading.
        KeyError if there is no such job. `total` still counts every match."""
        key = f"{self.p}:jobs"
        if before is None and not states and not owners:
            return self.list(limit, offset), int(self.r.zcard(key))
        ids = self.r.zrevrange(key, 0, -1)
        start = 0
        if before is not None:
            try:
                start = ids.index(before) + 1
            except ValueError:
                raise KeyError(before) from None
        with self.r.pipeline() as pipe:
            for i in ids:
                pipe.hmget(self.key(i), "state", "owner")
            rows = pipe.execute()
        match = [i for i, (state, owner) in zip(ids, rows, strict=True)
                 if state is not None and (not states or state in states)
                 and (not owners or owner in owners)]
        after = set(ids[start:]) if start else None
        picked = [i for i in match if after is None or i in after][offset:offset + limit]
        return self.get_many(picked), len(match)

    def pending(self) -> list[dict[str, Any]]:
        ids = self.r.zrange(self.pending_key, 0, -1)
        return self.get_many(ids)

    def pending_rev(self) -> int:
        return int(self.r.get(self.pending_rev_key) or 0)

    def pending_heads(self) -> list[tuple[str, dict[str, Any]]]:
        """The pending job ids, in order, each with the fields that change while a job waits
        (state, priority, attempt, reason, updated): one pipelined read, no spec decoded."""
        ids = self.r.zrange(self.pending_key, 0, -1)
        with self.r.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hmget(self.key(i), *WAITING_FIELDS)
            rows = pipe.execute()
        return [(i, decode_job({k: v for k, v in zip(WAITING_FIELDS, row, strict=True)
                                  if v is not None}))
                for i, row in zip(ids, rows, strict=True) if row[0] is not None]

    def pending_count(self, owner: str) -> int:
        """How many of `owner`'s jobs are waiting (queued or retrying): one ZCARD."""
        if not self.r.exists(f"{self.p}:pending-owners"):
            self._index_pending_owners()
        return int(self.r.zcard(self.pending_owner_key(owner)))

    def _index_pending_owners(self) -> None:
        """Fill the per-owner pending sets from {p}:pending, once: jobs queued by a version
        that kept no per-owner sets are counted too. Retried if the queue changes meanwhile."""
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self.pending_key)
                    ids = pipe.zrange(self.pending_key, 0, -1, withscores=True)
                    owners = [pipe.hget(self.key(i), "owner") for i, _ in ids]
                    pipe.multi()
                    for (job_id, score), owner in zip(ids, owners, strict=True):
                        pipe.zadd(self.pending_owner_key(owner or ""), {job_id: score})
                    pipe.set(f"{self.p}:pending-owners", 1)
                    pipe.execute()
                    return
                except redis_lib.WatchError:
                    continue

    def active(self) -> list[dict[str, Any]]:
        ids = sorted(self.r.smembers(self.active_key))
        return [self.get(i) for i in ids if self.r.exists(self.key(i))]

    def update_progress(self, job_id: str, **fields: Any) -> None:
        """Progress fields shown in lists (step, total_steps, loss, eta_s, epoch)."""
        self.r.hset(self.key(job_id), mapping={k: v for k, v in fields.items() if v is not None})

    def set_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.r.hset(self.key(job_id), "result", json.dumps(result))

    # state ------------------------------------------------------------------------------------
    def _watched(self, job_id: str, write: Callable[[Any, dict[str, str]], None],
                 results: Callable[[Any], None] | None = None) -> dict[str, str]:
        """Read a job's record and change it atomically: `write(pipe, record)` checks the record
        (raising refuses the change) and queues its writes after `pipe.multi()`; a concurrent
        change to the record makes it run again on the new record. Returns the record read;
        `results`, when given, gets each queued write's answer in order (e.g. XADD's ids).

        Applied once, like append_to_run: the transaction marks the job with a token of this
        change, and a try after the first looks for it. When a connection drops after EXEC was
        applied but before its reply came back (redis-py raises WatchError while watching), the
        retry finds the token and returns the record the applied try read, without `results`
        (the answers were lost), where it would otherwise check the change again against its own
        outcome and refuse it (a job already succeeded cannot move to succeeded)."""
        key, mark = self.key(job_id), self._written_key(job_id)
        token = uuid.uuid4().hex
        retry, raw = False, {}
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key, mark)
                    if retry and pipe.get(mark) == token:
                        return raw
                    raw = pipe.hgetall(key)
                    if not raw:
                        raise JobNotFound(job_id)
                    write(pipe, raw)
                    pipe.set(mark, token, ex=WRITTEN_TTL_S)
                    answers = pipe.execute()[:-1]
                    if results is not None:
                        for answer in answers:
                            results(answer)
                    return raw
                except redis_lib.WatchError:
                    retry = True
                    continue

    def append_to_run(self, job_id: str, worker: str, attempt: int,
                      events: Sequence[tuple[str, dict[str, Any]]],
                      progress: dict[str, Any] | None = None) -> bool:
        """Add `events` (type, fields) to the job's stream, and set the record's `progress`
        fields, only if the job is still running on `worker` at `attempt`: the check and the
        writes are one transaction, so a process whose run was fenced out writes nothing.
        Returns False (nothing written) when the run is no longer the job's.

        Written once: the transaction also marks the job with a token of this write, and a try
        after the first looks for it. A connection lost after EXEC was applied but before its
        reply came back surfaces as a WatchError (redis-py, while watching), and the retry
        would otherwise add the events a second time."""
        made = [self.events.event(kind, **data) for kind, data in events]
        key, mark = self.key(job_id), self._written_key(job_id)
        token = uuid.uuid4().hex
        retry = False
        while True:  # (a training step's events come this way: three fields read, not all)
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key, mark)
                    if retry and pipe.get(mark) == token:
                        # An earlier try was applied, its reply (with the events' ids) lost:
                        # announce them without ids (LOST_ID), below.
                        ids = [LOST_ID] * len(made)
                        break
                    state, on, at = pipe.hmget(key, "state", "worker", "attempt")
                    if (state != JobState.RUNNING.value or on != worker
                            or (int(float(at or 0)) or 1) != attempt):
                        return False
                    pipe.multi()
                    for event in made:
                        pipe.xadd(self.events.stream_key(job_id),
                                  {"data": self.events.payload(event)})
                    if progress:
                        pipe.hset(key, mapping=progress)
                    # (one writer at a time: only this run passes the check above)
                    pipe.set(mark, token, ex=WRITTEN_TTL_S)
                    ids = pipe.execute()
                    break
                except redis_lib.WatchError:
                    retry = True
                    continue
        for event_id, event in zip(ids[:len(made)], made, strict=True):
            self.events.announce(job_id, event_id, event)
        return True

    def transition(self, job_id: str, new: JobState, reason: str = "",
                   expect_worker: str | None = None, expect_state: JobState | None = None,
                   expect_attempt: int | None = None,
                   events: Sequence[tuple[str, dict[str, Any]]] = (),
                   **fields: Any) -> dict[str, Any]:
        """Move a job to `new`, atomically, recording time and reason.

        `expect_worker` and `expect_attempt` fence a worker's run: the change is refused
        (TransitionError) unless the job is still assigned to that worker at that attempt, so
        a worker that lost its job, or a process of a worker's earlier life whose job was
        given again to the same worker name, cannot write to it. `expect_state` refuses the
        change unless the job is still in that state. `events` (type, fields), then the
        change's `state` event, go into the job's stream in the same transaction: written with
        the change, once, or not at all. `fields` are more record fields, set with the state.
        """

        key = self.key(job_id)
        mapping: dict[str, Any] = {}
        extra = [self.events.event(kind, **data) for kind, data in events]
        answers: list[Any] = []
        state_event: dict[str, Any] = {}

        def write(pipe: Any, raw: dict[str, str]) -> None:
            rec = JobRecord.from_hash(raw)
            old = rec.state
            if expect_state is not None and old != expect_state:
                raise TransitionError(f"job {job_id} is {old.value}, "
                                      f"no longer {expect_state.value}")
            check_transition(old, new)
            _check_run(job_id, rec, expect_worker, expect_attempt)
            now = self.clock()
            mapping.clear()
            mapping.update({"state": new.value, "updated": now, "reason": reason, **fields})
            if new == JobState.RUNNING:
                mapping.setdefault("started", now)
            if new.terminal:
                mapping["finished"] = now
            state_event.clear()
            state_event.update(self.events.event("state", state=new.value, reason=reason,
                                                 time=now))
            pipe.multi()
            for event in (*extra, state_event):  # the state event last, with the change
                pipe.xadd(self.events.stream_key(job_id), {"data": self.events.payload(event)})
            pipe.hset(key, mapping=mapping)
            pipe.rpush(self._history_key(job_id), json.dumps(
                {"state": new.value, "time": now, "reason": reason}))
            mine = self.pending_owner_key(rec.owner)
            if new in PENDING:
                pipe.zadd(self.pending_key, {job_id: rec.created})
                pipe.zadd(mine, {job_id: rec.created})
            else:
                pipe.zrem(self.pending_key, job_id)
                pipe.zrem(mine, job_id)
            pipe.incr(self.pending_rev_key)
            if rec.sweep or rec.get("sweep_eval"):
                pipe.sadd(self.dirty_sweeps_key, rec.sweep or rec.get("sweep_eval"))
            if new in ACTIVE:
                pipe.sadd(self.active_key, job_id)
            else:
                pipe.srem(self.active_key, job_id)
            if new.terminal:
                pipe.delete(self.stop_key(job_id))
            if old == JobState.RUNNING and new != JobState.RUNNING and rec.started is not None:
                self.usage.record_run(pipe, rec, now, new)

        raw = self._watched(job_id, write, answers.append)
        made = (*extra, state_event)
        # (Applied with its reply lost: no ids came back; announced all the same, LOST_ID.)
        ids = answers[:len(made)] or [LOST_ID] * len(made)
        for event_id, event in zip(ids, made, strict=True):
            self.events.announce(job_id, event_id, event)
        after = dict(raw)
        after.update({k: str(v) for k, v in mapping.items()})
        return decode_job(after)

    # scheduling inputs (dispatcher/jobs/usage.py) -------------------------------------------
    def runs(self, owners: list[str], since: float) -> dict[str, list[tuple[float, float]]]:
        """Each owner's finished runs (start, end) that ended after `since`."""
        return self.usage.runs(owners, since)

    def recent_durations(self) -> list[dict[str, Any]]:
        """The latest succeeded runs, newest first: {kind, base_model, seconds}."""
        return self.usage.recent_durations()

    def set_priority(self, job_id: str, priority: str) -> dict[str, Any]:
        """Re-prioritise a pending job; TransitionError unless it is queued or retrying."""

        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        def write(pipe: Any, raw: dict[str, str]) -> None:
            if raw["state"] not in PENDING_VALUES:
                raise TransitionError(f"job {job_id} is {raw['state']}: only a queued "
                                      "or retrying job can be re-prioritised")
            pipe.multi()
            pipe.hset(self.key(job_id), mapping={"priority": priority, "updated": self.clock()})
            pipe.incr(self.pending_rev_key)

        old = self._watched(job_id, write).get("priority", "normal")
        if old != priority:
            self.events.append(job_id, "priority", priority=priority, previous=old,
                               time=self.clock())
            self.events.append(job_id, "log", line=f"priority changed from {old} to {priority}",
                               time=self.clock())
        return self.get(job_id)

    # stopping ---------------------------------------------------------------------------------
    def request_stop(self, job_id: str, reason: str = "") -> None:
        """Ask a running job to stop after its current step; `reason` (e.g. a sweep's early
        stopping) becomes the job's end reason instead of "stopped by the user"."""
        # The first request's reason stands (a Stop pressed after a sweep stopped the trial
        # early keeps "stopped early"). A request that arrives after the job ended would leave
        # a key that nothing deletes: it expires after a day, long after any trainer answered.
        self.r.set(self.stop_key(job_id), reason or "1", nx=True, ex=STOP_KEY_TTL_S)

    def stop_reason(self, job_id: str) -> str | None:
        """The reason given with a stop request, if one was given."""
        value = self.r.get(self.stop_key(job_id))
        return None if value in (None, "1") else value

    def stop_cause(self, job_id: str) -> str:
        """Why a stopping job stops: the request's reason, else "stopped by the user"."""
        return self.stop_reason(job_id) or USER_STOP

    def stop_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self.stop_key(job_id)))

    def answer_stop(self, job_id: str) -> None:
        """The trainer saw the stop request and is stopping (the worker then does not kill it)."""
        self.r.hset(self.key(job_id), "stop_answered", self.clock())

    def cancel(self, job_id: str, reason: str = "cancelled by the user",
               stop_reason: str = "") -> dict[str, Any]:
        """Cancel a job: a pending one at once (`reason`); a running one stops after its current
        step (`stop_reason`, default "stopped by the user", becomes its end reason)."""
        rec = self.record(job_id)
        if rec is None:
            raise JobNotFound(job_id)
        state = rec.state
        if state in PENDING:
            return self.transition(job_id, JobState.CANCELLED, reason)
        if state == JobState.ASSIGNED:
            # Sent to a worker that has not started it: cancel it outright (the worker then skips
            # it). If the worker started it in the meantime, fall through and ask it to stop.
            try:
                return self.transition(job_id, JobState.CANCELLED, f"{reason} before it started",
                                       expect_state=JobState.ASSIGNED)
            except TransitionError:
                state = JobState(self.get(job_id)["state"])
        if state in ACTIVE:
            self.request_stop(job_id, stop_reason)
            self.events.append(job_id, "log", line="stop requested: the trainer stops after the "
                                                   "current step and saves the LoRA")
            return self.get(job_id)
        return rec.to_dict()
