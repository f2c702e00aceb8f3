"""Job states and the transitions allowed between them. Nothing else decides a state."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# Jobs that hold (or are about to hold) a worker.
ACTIVE = frozenset({JobState.ASSIGNED, JobState.RUNNING})
# Jobs waiting for a worker.
PENDING = frozenset({JobState.QUEUED, JobState.RETRYING})
# The same sets as the strings kept in records and sent over HTTP.
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
ACTIVE_VALUES = frozenset(s.value for s in ACTIVE)
PENDING_VALUES = frozenset(s.value for s in PENDING)


class WorkerState(str, Enum):
    """What a worker's heartbeat says it is doing (GONE: what the registry says of a worker
    whose heartbeats stopped; STOPPING: a worker whose watchdog is ending its job's process;
    STARTING: a new process of a known name that has not sent its first heartbeat yet)."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    GONE = "gone"


ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ASSIGNED, JobState.CANCELLED, JobState.FAILED}),
    JobState.ASSIGNED: frozenset({JobState.RUNNING, JobState.RETRYING, JobState.CANCELLED,
                                  JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                                 JobState.RETRYING}),
    JobState.RETRYING: frozenset({JobState.ASSIGNED, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class TransitionError(RuntimeError):
    pass


def check_transition(old: JobState, new: JobState) -> None:
    if new not in ALLOWED[old]:
        raise TransitionError(f"a job cannot go from {old.value} to {new.value}")
