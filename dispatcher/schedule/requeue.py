"""The one re-queue policy: what becomes of a job whose run ended without an outcome.

A run ends without one when its worker stops sending heartbeats (the dispatcher notices:
`recover_lost`), when the process that trained dies or its task ends unrecorded (the worker's
task_failure handler notices: gpuworker.tasks.requeue_after_crash), or when a worker restarts
with a job still on its name. Every case goes through `settle`:

  - a job that was being stopped (by its user, a sweep's early stopping or a cancel) ends
    `cancelled` with the stop's reason: running it again would only redo steps;
  - a job that has used MAX_ATTEMPTS attempts ends `failed`;
  - any other goes back to the queue (`retrying`, no worker) and resumes from its latest
    checkpoint when it runs again.

The reasons name what happened (`Interruption`). This module is imported by the worker's main
process too: it imports nothing beyond the job model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dispatcher.jobs.states import JobState, TransitionError, WorkerState
from dispatcher.jobs.store import JobStore

MAX_ATTEMPTS = 3
# An assigned job whose (live, idle) worker has not started it this long after the assignment
# was never handed over: the dispatcher that assigned it died before sending it.
UNSENT_AFTER_S = 30.0
# After a stop, the checkpoints already written are kept.
_CHECKPOINT_STAYS = " before the job stopped (its last checkpoint, if any, stays)"


def next_state(attempt: int, stopping: bool) -> JobState:
    """The policy itself: cancelled when it was being stopped, failed after MAX_ATTEMPTS
    attempts, else back to the queue."""
    if stopping:
        return JobState.CANCELLED
    if attempt >= MAX_ATTEMPTS:
        return JobState.FAILED
    return JobState.RETRYING


@dataclass(frozen=True)
class Crashed:
    """The run's task ended without recording an outcome; `why` says how."""

    why: str  # "the training process on w1 died (...)"

    def requeued(self) -> str:
        return f"{self.why}; re-queued"

    def gave_up(self, attempt: int) -> str:
        return f"{self.why}; it happened {attempt} times, giving up"

    def stopped(self, cause: str) -> str:
        return f"{cause}; {self.why}{_CHECKPOINT_STAYS}"


@dataclass(frozen=True)
class LostWorker:
    """The job's worker stopped sending heartbeats."""

    worker: str

    def requeued(self) -> str:
        return f"worker {self.worker} stopped answering; re-queued"

    def gave_up(self, attempt: int) -> str:
        return f"worker {self.worker} was lost {attempt} times; giving up"

    def stopped(self, cause: str) -> str:
        return f"{cause}; worker {self.worker} was lost{_CHECKPOINT_STAYS}"


# Record fields counting re-queues that were not the job's fault (settle takes them off).
FREE_REQUEUES = ("pack_splits", "lock_requeues", "unsent_requeues")


# What ended a run without an outcome, as the job's reason tells it.
Interruption = Crashed | LostWorker


def settle(store: JobStore, job_id: str, attempt: int, what: Interruption,
           expect_worker: str | None = None, expect_attempt: int | None = None
           ) -> JobState | None:
    """Apply the policy to a job that was interrupted at attempt `attempt`; returns its new
    state, or None when it could not move (it ended, or moved to another worker, meanwhile;
    with `expect_worker`, only a job still on that worker changes; with `expect_attempt`,
    only a job still at that attempt: one given again to the same worker name meanwhile is
    another run's)."""
    # A pack split for want of memory, a LoRA folder that stayed locked, or an assignment that
    # never reached its worker re-queued the job without a fault of its own: those assignments
    # do not count against MAX_ATTEMPTS (gpuworker.packs, gpuworker.tasks.requeue_locked_out,
    # unsent below).
    free = store.r.hmget(store.key(job_id), *FREE_REQUEUES)
    attempt -= sum(int(n or 0) for n in free)
    new = next_state(attempt, store.stop_requested(job_id))
    extra: dict[str, Any] = {}
    if new == JobState.CANCELLED:
        reason = what.stopped(store.stop_cause(job_id))
    elif new == JobState.FAILED:
        reason = what.gave_up(attempt)
    else:
        reason, extra = what.requeued(), {"worker": ""}
    try:
        store.transition(job_id, new, reason, expect_worker=expect_worker,
                         expect_attempt=expect_attempt, **extra)
    except TransitionError:
        return None
    return new


# ---------------------------------------------------------------------------------------------
# the dispatcher's checks


def recover_lost(store: JobStore, active: list[dict[str, Any]], alive: set[str]) -> None:
    """A job whose worker stopped sending heartbeats goes back to the queue (or fails, or ends
    cancelled when it was being stopped)."""
    for job in active:
        if job.get("worker") not in alive:
            settle(store, job["id"], int(job.get("attempt", 0)),
                   LostWorker(str(job.get("worker"))))


def recover_unsent(store: JobStore, active: list[dict[str, Any]],
                   workers: list[dict[str, Any]], now: float) -> None:
    """An assigned job that its worker, alive and idle, has not started UNSENT_AFTER_S after
    the assignment goes back to the queue: its message never reached the worker (the
    dispatcher died between assigning and sending). Should the message turn up late
    anyway, the worker finds the job no longer assigned to it and skips it. No attempt is
    counted against it: it never ran."""
    by_name = {w["name"]: w for w in workers}
    for job in active:
        w = by_name.get(job.get("worker"))
        if (job.get("state") != JobState.ASSIGNED.value or w is None
                or w.get("state") != WorkerState.IDLE.value or w.get("job")
                or now - float(job.get("updated") or now) < UNSENT_AFTER_S
                or float(w.get("seen") or 0) < float(job.get("updated") or 0) + 2):
            continue
        try:
            unsent(store, job, f"{job['worker']} never received the job (the dispatcher "
                               "stopped while handing it over); re-queued")
        except TransitionError:
            pass  # the worker started it (or it was cancelled) meanwhile: nothing to undo


def requeue_free(store: JobStore, job_id: str, counter: str, reason: str,
                 stopped: str | None = None, **fence_and_fields: Any) -> JobState:
    """Put a job back in the queue without counting the attempt: it was not the job's fault
    (`counter`, one of FREE_REQUEUES, is raised; settle takes those off). With `stopped` (a
    reason's tail), a job being stopped ends cancelled instead. `fence_and_fields`: the
    transition's fence (expect_worker, expect_attempt, expect_state) and more fields. Returns
    the state given; TransitionError when the fence refuses (the job is no longer that run's)."""
    if counter not in FREE_REQUEUES:
        raise ValueError(f"{counter} is not a count of re-queues settle leaves out")
    if stopped is not None and store.stop_requested(job_id):
        store.transition(job_id, JobState.CANCELLED, f"{store.stop_cause(job_id)}; {stopped}",
                         **{k: v for k, v in fence_and_fields.items() if k.startswith("expect_")})
        return JobState.CANCELLED
    count = int(store.r.hget(store.key(job_id), counter) or 0)
    store.transition(job_id, JobState.RETRYING, reason, worker="", **{counter: count + 1},
                     **fence_and_fields)
    return JobState.RETRYING


def unsent(store: JobStore, job: dict[str, Any], reason: str) -> None:
    """Put an assigned job that never reached its worker back in the queue, without counting
    the attempt its assignment raised. TransitionError when it is no longer assigned (started,
    cancelled)."""
    requeue_free(store, job["id"], "unsent_requeues", reason, expect_state=JobState.ASSIGNED)
