"""The order of the queue, as pure functions that the dashboard uses too, so the queue
positions it shows are the dispatcher's real order (README, "Scheduling"):

  - `plan_queue`: urgent jobs first (oldest first); then, one job at a time, the pending user
    who has used the least worker time in the fair-share window, that user's highest-priority
    oldest job; ties between users go by that job's priority, then its age.
  - `estimate_starts`: when each queued job should start, on which live worker frees first.
  - `queue_view`: reads what the policy needs from Redis and plans the queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import PRIORITIES, JobStore
from dispatcher.schedule.placement import fits

# What a job is expected to take when no similar job has finished yet.
DEFAULT_DURATION_S = 600.0
# How many recent runs of similar jobs the expected duration averages.
DURATION_SAMPLES = 20


def _prio(job: dict[str, Any]) -> int:
    return PRIORITIES.get(job.get("priority", "normal"), 1)


def queue_order(job: dict[str, Any]) -> tuple:
    """Within one user: higher priority first, then older first."""
    return (-_prio(job), float(job.get("created", 0)))


def used_seconds(runs: Iterable[tuple], running_since: Iterable[Any],
                 now: float, window_s: float) -> float:
    """Card time in (now - window, now]: finished runs (start, end[, card]) and runs still
    going (a start time, or (start, card)), each clipped to the window. Runs that share a
    card at the same time (the trials of a pack) count that time once: the card's time is
    what the owner used."""
    lo = now - window_s
    spans: dict[Any, list[tuple[float, float]]] = {}
    for n, run in enumerate(runs):
        start, end = float(run[0]), float(run[1])
        card = run[2] if len(run) > 2 and run[2] else ("run", n)
        spans.setdefault(card, []).append((max(start, lo), min(end, now)))
    for n, run in enumerate(running_since):
        start, card = (run, None) if isinstance(run, (int, float)) else (run[0], run[1])
        spans.setdefault(card or ("running", n), []).append((max(float(start), lo), now))
    return sum(_covered(s) for s in spans.values())


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) spans."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end <= start:
            continue
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def expected_duration(job: dict[str, Any], durations: list[dict[str, Any]]) -> float:
    """How long `job` will run: the mean of the latest succeeded runs of the same kind on the
    same base model, else of the same kind, else DEFAULT_DURATION_S."""
    kind = job.get("kind", "train")
    model = (job.get("spec") or {}).get("base_model", "")
    for same in (lambda d: d.get("kind") == kind and d.get("base_model") == model,
                 lambda d: d.get("kind") == kind):
        xs = [float(d["seconds"]) for d in durations if same(d)][:DURATION_SAMPLES]
        if xs:
            return sum(xs) / len(xs)
    return DEFAULT_DURATION_S


def plan_queue(pending: list[dict[str, Any]], used: dict[str, float],
               expected: Callable[[dict[str, Any]], float]) -> list[dict[str, Any]]:
    """The order in which pending jobs get a card.

    Urgent jobs go first, oldest first. The rest are served one at a time to the user with
    the least worker time `used` (seconds in the window); each job handed out counts its
    `expected` duration against its owner, so users with equal needs take turns rather than
    one getting every card of a burst. Ties go to the higher priority, then the older job.
    """
    urgent = sorted((j for j in pending if j.get("priority") == "urgent"),
                    key=lambda j: float(j.get("created", 0)))
    per_user: dict[str, list[dict[str, Any]]] = {}
    for j in pending:
        if j.get("priority") != "urgent":
            per_user.setdefault(j.get("owner") or "local", []).append(j)
    for jobs in per_user.values():
        jobs.sort(key=queue_order, reverse=True)  # pop() takes the first in queue_order
    charged = {o: float(used.get(o, 0.0)) for o in per_user}
    for j in urgent:
        o = j.get("owner") or "local"
        if o in charged:
            charged[o] += expected(j)
    order = list(urgent)
    while per_user:
        owner = min(per_user, key=lambda o: (charged[o], queue_order(per_user[o][-1]), o))
        job = per_user[owner].pop()
        order.append(job)
        charged[owner] += expected(job)
        if not per_user[owner]:
            del per_user[owner]
    return order


def estimate_starts(order: list[dict[str, Any]], workers: list[dict[str, Any]],
                    active: list[dict[str, Any]], expected: Callable[[dict[str, Any]], float],
                    now: float) -> dict[str, float | None]:
    """Seconds from now until each job in `order` should start, or None when no live worker
    could ever take it.

    Each live worker is free after its running job's ETA (`eta_s`, else its expected duration
    less the time it has run); the jobs then take, in order, the worker that frees first
    among those whose card is big enough (its total memory), and keep it for their expected
    duration. The per-user card limit and jobs yet to be submitted are not foreseen.
    """
    by_worker = {j.get("worker"): j for j in active}
    free_at: dict[str, float] = {}
    for w in workers:
        j = by_worker.get(w["name"])
        if j is None:
            free_at[w["name"]] = 0.0
        elif j.get("eta_s") not in (None, ""):
            free_at[w["name"]] = max(0.0, float(j["eta_s"]))
        else:
            ran = now - float(j.get("started") or now)
            free_at[w["name"]] = max(0.0, expected(j) - ran)
    starts: dict[str, float | None] = {}
    for job in order:
        ok = [w for w in workers if fits(job, w, key="mem_total_mb")]
        if not ok:
            starts[job["id"]] = None
            continue
        w = min(ok, key=lambda w: (free_at[w["name"]], w["name"]))
        starts[job["id"]] = round(free_at[w["name"]], 1)
        free_at[w["name"]] += expected(job)
    return starts


@dataclass
class QueueView:
    """The pending jobs in the dispatcher's order, with positions (1 = next) and start times."""

    order: list[dict[str, Any]] = field(default_factory=list)
    used: dict[str, float] = field(default_factory=dict)
    starts: dict[str, float | None] = field(default_factory=dict)

    @cached_property
    def positions(self) -> dict[str, int]:
        """Each pending job's place (worked out once: a job list asks for every job's)."""
        return {j["id"]: i for i, j in enumerate(self.order, start=1)}


def queue_view(store: JobStore, now: float, window_s: float,
               active: list[dict[str, Any]] | None = None,
               workers: list[dict[str, Any]] | None = None,
               pending: list[dict[str, Any]] | None = None) -> QueueView:
    """Read what the policy needs from Redis and plan the queue (starts only with `workers`;
    `pending`: the pending records, when the caller has them already)."""
    pending = store.pending() if pending is None else pending
    active = store.active() if active is None else active
    owners = sorted({j.get("owner") or "local" for j in pending})
    runs = store.runs(owners, now - window_s)
    running: dict[str, list[tuple[float, str]]] = {}
    for j in active:
        if j.get("state") == JobState.RUNNING.value and j.get("started") not in (None, ""):
            running.setdefault(j.get("owner") or "local", []).append(
                (float(j["started"]), j.get("worker") or ""))
    used = {o: used_seconds(runs.get(o, []), running.get(o, []), now, window_s) for o in owners}
    durations = store.recent_durations()
    known: dict[tuple[str, str], float] = {}

    def expected(j: dict[str, Any]) -> float:  # one scan of the durations per kind and model
        key = (j.get("kind", "train"), (j.get("spec") or {}).get("base_model", ""))
        if key not in known:
            known[key] = expected_duration(j, durations)
        return known[key]

    order = plan_queue(pending, used, expected)
    starts = estimate_starts(order, workers, active, expected, now) if workers is not None else {}
    return QueueView(order=order, used=used, starts=starts)
