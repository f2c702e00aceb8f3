"""A settable clock, the dispatcher set up against it, and a store full of jobs, on the tests'
real Redis server."""

from __future__ import annotations

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.scheduler import Dispatcher


class Clock:
    """time.time() for the code under test; a test moves it by setting `t`."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class TickingClock(Clock):
    """A clock that moves one second at every reading: records made one after another get
    distinct, ordered times (the job list sorts by creation time)."""

    def __init__(self, t: float = 1_700_000_000.0):
        super().__init__(t)

    def __call__(self) -> float:
        self.t += 1
        return self.t


def dispatcher_env(redis_client, prefix: str, clock: Clock | None = None):
    """(store, fleet, dispatcher, sent, clock): `sent` records the (job, worker) pairs the
    dispatcher hands to Celery."""
    clock = clock or Clock()
    store = JobStore(redis_client, prefix, clock=clock)
    fleet = Fleet(redis_client, prefix, timeout=10, clock=clock)
    sent: list[tuple[str, str]] = []
    d = Dispatcher(store, fleet, lambda job, w, attempt: sent.append((job, w["name"])), clock=clock)
    return store, fleet, d, sent, clock


def many_jobs(redis_client, prefix: str, n: int = 520) -> tuple[JobStore, list[str]]:
    """`n` jobs created one a second: every 4th is ada's (the rest bo's), every 10th has
    succeeded. Returns the store and the ids newest first, as the job list shows them."""
    store = JobStore(redis_client, prefix, clock=TickingClock())
    ids = []
    for i in range(n):
        j = store.create("train", {"lora_name": f"lora-{i}"}, owner="ada" if i % 4 == 0 else "bo")
        if i % 10 == 0:
            store.transition(j, JobState.ASSIGNED, "a", worker="w")
            store.transition(j, JobState.RUNNING, "r")
            store.transition(j, JobState.SUCCEEDED, "done")
        ids.append(j)
    return store, ids[::-1]
