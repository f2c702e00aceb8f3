"""The dispatcher: decides which pending job goes to which idle worker, and notices lost workers.

Only jobs that can start now are handed to Celery (to that worker's own queue), so cancelling
and re-ordering act on the dispatcher's own pending set. One dispatcher schedules at a time:
each holds a lock in Redis with an expiry and renews it every tick.

The policy (README, "Scheduling"), as pure functions that the dashboard uses too, so the queue
positions it shows are the dispatcher's real order:
  - `plan_queue`: urgent jobs first (oldest first); then, one job at a time, the pending user
    who has used the least worker time in the fair-share window, that user's highest-priority
    oldest job; ties between users go by that job's priority, then its age.
  - `fits`: quantised jobs need a CUDA card; a card needs as much free memory as the job's
    `gpu_memory_mb` (its estimate), and once idle as much as it has beyond what processes
    outside lorafleet hold; a CPU worker takes any other job (host memory not gated) unless
    it was started with `--memory-mb`, which gates it like a card.
  - a user may hold at most `max_cards_per_user` workers at once (0 = no limit).
  - a sweep's trials hold at most its `max_concurrent` workers at once (`sweep_full`); the
    skipped trial keeps its place and the next job in the same order may take the card.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError
from dispatcher.jobs.store import PRIORITIES, JobStore

log = logging.getLogger("lorafleet.dispatcher")

QUANTISED = ("4bit", "8bit")
MAX_ATTEMPTS = 3
# An assigned job whose (live, idle) worker has not started it this long after the assignment
# was never handed over: the dispatcher that assigned it died before sending it.
UNSENT_AFTER_S = 30.0
DEFAULT_FAIR_WINDOW_S = 24 * 3600.0
# What a job is expected to take when no similar job has finished yet.
DEFAULT_DURATION_S = 600.0
# How many recent runs of similar jobs the expected duration averages.
DURATION_SAMPLES = 20
# Every unfinished sweep is looked at this often even when none of its jobs moved.
FULL_SWEEP_PASS_S = 60.0
# The kept copy of the queue (PendingCache) is read again in full at least this often.
FULL_PENDING_READ_S = 60.0
# A pass that placed nothing is not planned again, while nothing it looked at changed, for up to
# this long (a free card that no queued job fits would otherwise replan the queue every pass).
REPLAN_UNCHANGED_S = 10.0


def scheduling_env(env: dict[str, str] | None = None) -> tuple[float, int]:
    """(fair-share window in seconds, cards per user at once, 0 = no limit) from
    LORAFLEET_FAIR_WINDOW_S and LORAFLEET_MAX_CARDS_PER_USER."""
    env = os.environ if env is None else env
    window = float(env.get("LORAFLEET_FAIR_WINDOW_S") or DEFAULT_FAIR_WINDOW_S)
    cards = int(env.get("LORAFLEET_MAX_CARDS_PER_USER") or 0)
    return max(1.0, window), max(0, cards)


def needs_cuda(job: dict[str, Any]) -> bool:
    return (job.get("spec") or {}).get("precision") in QUANTISED


def is_cuda(worker: dict[str, Any]) -> bool:
    return str(worker.get("device", "")).startswith("cuda")


def _mem(worker: dict[str, Any], key: str) -> float | None:
    v = worker.get(key, "")
    return None if v in ("", None) else float(v)


def memory_gated(worker: dict[str, Any]) -> bool:
    """Cards are placed by memory; a CPU worker only when it advertises a cap (--memory-mb)."""
    return is_cuda(worker) or _mem(worker, "mem_limit_mb") is not None


def fits(job: dict[str, Any], worker: dict[str, Any], key: str = "mem_free_mb") -> bool:
    """Can `worker` take `job` now (key mem_free_mb), or once idle (key mem_total_mb: then
    `mem_usable_mb` where the worker reports it, the total less memory held outside
    lorafleet, capped by --memory-mb)?"""
    if needs_cuda(job) and not is_cuda(worker):
        return False
    if not memory_gated(worker):
        return True
    need = int(job.get("gpu_memory_mb") or 0)
    have = _mem(worker, key)
    if key == "mem_total_mb" and _mem(worker, "mem_usable_mb") is not None:
        have = _mem(worker, "mem_usable_mb")
    return need <= 0 or have is None or have >= need


def can_run_on(job: dict[str, Any], worker: dict[str, Any]) -> bool:
    return fits(job, worker)


def best_card(job: dict[str, Any], idle: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The idle worker to give `job`: a CUDA card before a CPU worker, and among cards the one
    with the least free memory that is enough (big cards stay free for big jobs)."""
    ok = [w for w in idle if fits(job, w)]
    if not ok:
        return None
    return min(ok, key=lambda w: (not is_cuda(w), _mem(w, "mem_free_mb") or math.inf,
                                  w["name"]))


def sweep_full(job: dict[str, Any], in_sweep: Counter) -> bool:
    """Is `job` a trial of a sweep that already has its `sweep_cap` trials on workers?"""
    cap = int(job.get("sweep_cap") or 0)
    return bool(job.get("sweep")) and cap > 0 and in_sweep[job["sweep"]] >= cap


def _prio(job: dict[str, Any]) -> int:
    return PRIORITIES.get(job.get("priority", "normal"), 1)


def queue_order(job: dict[str, Any]) -> tuple:
    """Within one user: higher priority first, then older first."""
    return (-_prio(job), float(job.get("created", 0)))


def used_seconds(runs: Iterable[tuple[float, float]], running_since: Iterable[float],
                 now: float, window_s: float) -> float:
    """Worker time in (now - window, now]: finished runs (start, end) and runs still going
    since a start time, each clipped to the window."""
    lo = now - window_s
    total = sum(max(0.0, min(end, now) - max(start, lo)) for start, end in runs)
    total += sum(max(0.0, now - max(start, lo)) for start in running_since)
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

    @property
    def positions(self) -> dict[str, int]:
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
    running: dict[str, list[float]] = {}
    for j in active:
        if j.get("state") == JobState.RUNNING.value and j.get("started") not in (None, ""):
            running.setdefault(j.get("owner") or "local", []).append(float(j["started"]))
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


_WORKER_FIELDS = ("device", "mem_free_mb", "mem_total_mb", "mem_usable_mb", "mem_limit_mb",
                  "outside_mb")


def _pass_inputs(pending_version: int, active: list[dict[str, Any]],
                 workers: list[dict[str, Any]], idle: list[dict[str, Any]]) -> tuple:
    """Everything a pass's placement depends on, but the clock (fair share only orders jobs)."""
    return (pending_version,
            tuple(sorted((j["id"], j.get("worker"), j.get("owner"), j.get("sweep"))
                         for j in active)),
            tuple((w["name"], *(w.get(k) for k in _WORKER_FIELDS)) for w in workers),
            tuple(w["name"] for w in idle))


class PendingCache:
    """A copy of the pending jobs' records kept from one read to the next: the dispatcher's,
    from one pass to the next, and each dashboard process's, for the queue places of its job
    lists (dashboard/app.py Services.pending).

    Reading and decoding every queued record each half second was most of a busy dispatcher's
    work (3,010 queued jobs: 0.46 s a pass, 44 % of a core). The store raises a counter with
    every change a pending job can see; while it stands still the copy is used as it is, and
    when it moves only the records whose `updated` stamp changed are read again. The
    dispatcher's own notes (`reason`) are written to Redis and to the copy alike. A write that
    does not go through JobStore moves no counter: every `full_every_s` the whole queue is
    read again anyway, so such a change is seen within that time. Safe to share between
    threads (the dashboard's requests)."""

    def __init__(self, store: JobStore, full_every_s: float = FULL_PENDING_READ_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.full_every_s = full_every_s
        self.clock = clock
        self.rev: int | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self._full_at = -math.inf
        self._lock = threading.Lock()
        self.version = 0  # raised whenever the copy is read again (what it holds may differ)

    def read(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            if now - self._full_at >= self.full_every_s:
                self.jobs, self._full_at = {}, now  # read every record again below
                self.rev = None
            rev = self.store.pending_rev()  # read first: a change after it is seen next time
            if rev != self.rev:
                self._refresh(rev)
            return [self.jobs[i] for i in self.order]

    def _refresh(self, rev: int) -> None:
        heads = self.store.pending_heads()
        # A record whose `updated` moved went through more than a waiting job's changes
        # (it ran, say): read it whole; a new one too. Others take the waiting fields.
        again = [i for i, head in heads if i not in self.jobs
                 or self.jobs[i].get("updated") != head.get("updated")]
        fresh = {j["id"]: j for j in self.store.get_many(again)}
        jobs: dict[str, dict[str, Any]] = {}
        for i, head in heads:
            if i in fresh:
                jobs[i] = fresh[i]
            elif i in self.jobs and i not in again:
                jobs[i] = {**self.jobs[i], **head}
        self.jobs, self.order, self.rev = jobs, [i for i, _ in heads if i in jobs], rev
        self.version += 1


class Dispatcher:
    def __init__(self, store: JobStore, fleet: Fleet, send: Callable[[str, dict[str, Any]], None],
                 lock_ttl_s: float = 10.0, clock: Callable[[], float] = time.time,
                 fair_window_s: float | None = None, max_cards_per_user: int | None = None):
        env_window, env_cards = scheduling_env()
        self.fair_window_s = env_window if fair_window_s is None else fair_window_s
        self.max_cards_per_user = env_cards if max_cards_per_user is None else max_cards_per_user
        self.store = store
        self.fleet = fleet
        self.send = send
        self.r = store.r
        self.lock_key = f"{store.p}:dispatcher:lock"
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.ident = uuid.uuid4().hex
        self.clock = clock
        self.pending = PendingCache(store)
        self._full_sweep_pass = -math.inf
        # What the last pass that placed nothing looked at, and when (see _unchanged).
        self._fruitless: tuple[tuple, float] | None = None

    # leadership ------------------------------------------------------------------------------
    def hold_lock(self) -> bool:
        """Take the lock, or renew it if this dispatcher holds it already."""
        if self.r.set(self.lock_key, self.ident, nx=True, px=self.lock_ttl_ms):
            return True
        # Renew only our own lock (compare-and-set in one script).
        renewed = self.r.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
            1, self.lock_key, self.ident, self.lock_ttl_ms)
        return bool(renewed)

    def release_lock(self) -> None:
        self.r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                    "return redis.call('del', KEYS[1]) else return 0 end",
                    1, self.lock_key, self.ident)

    # one pass ---------------------------------------------------------------------------------
    def tick(self) -> list[tuple[str, str]]:
        """Recover lost jobs, then assign pending jobs to idle workers. Returns assignments."""
        if not self.hold_lock():
            return []
        workers = self.fleet.alive()
        alive = {w["name"] for w in workers}
        self._recover_lost(self.store.active(), alive)
        self._recover_unsent(self.store.active(), workers)
        self._sweeps(self.store.active())
        active = self.store.active()
        busy = {j.get("worker") for j in active}
        idle = [w for w in workers if w["name"] not in busy]
        pending = self.pending.read()
        if not idle:  # nothing can start: only say why jobs no live worker can take wait
            for job in pending:
                if workers and not any(fits(job, w, key="mem_total_mb") for w in workers):
                    self._note_waiting(job, workers)
            return []
        looked_at = _pass_inputs(self.pending.version, active, workers, idle)
        if self._unchanged(looked_at):
            return []
        in_use = Counter(j.get("owner") or "local" for j in active)
        in_sweep = Counter(j["sweep"] for j in active if j.get("sweep"))
        view = queue_view(self.store, self.clock(), self.fair_window_s, active=active,
                          pending=pending)
        assigned: list[tuple[str, str]] = []
        for job in view.order:
            if workers and not any(fits(job, w, key="mem_total_mb") for w in workers):
                self._note_waiting(job, workers)
                continue
            if not idle:
                continue
            owner = job.get("owner") or "local"
            limit = self.max_cards_per_user
            if limit and in_use[owner] >= limit and job.get("priority") != "urgent":
                self._note(job, f"waiting: {owner} already uses {in_use[owner]} of "
                                f"{limit} cards allowed per user")
                continue
            if sweep_full(job, in_sweep):
                self._note(job, f"waiting: sweep {job['sweep']} already runs "
                                f"{in_sweep[job['sweep']]} of its {job['sweep_cap']} trials "
                                "allowed at once")
                continue
            fit = best_card(job, idle)
            if fit is None:
                self._note_waiting(job, workers)
                continue
            if self._assign(job, fit):
                idle.remove(fit)
                in_use[owner] += 1
                if job.get("sweep"):
                    in_sweep[job["sweep"]] += 1
                assigned.append((job["id"], fit["name"]))
        self._fruitless = None if assigned else (looked_at, self.clock())
        return assigned

    def _unchanged(self, looked_at: tuple) -> bool:
        """Did the last pass place nothing with exactly these inputs, not long ago? Then this
        one would place nothing either: a job is placed only when the queue, the running jobs
        (per-user and per-sweep counts) or the idle cards change."""
        if self._fruitless is None:
            return False
        before, at = self._fruitless
        return before == looked_at and 0 <= self.clock() - at < REPLAN_UNCHANGED_S

    def _sweeps(self, active: list[dict[str, Any]]) -> None:
        """Early-stopping decisions and perplexity jobs of sweeps (dispatcher.schedule.sweeps): the
        sweeps whose jobs moved, and every unfinished sweep at the first pass and once every
        FULL_SWEEP_PASS_S (a mark lost with a dispatcher that died mid-pass is caught up)."""
        from dispatcher.schedule import sweeps

        now = self.clock()
        full = now - self._full_sweep_pass >= FULL_SWEEP_PASS_S
        try:
            sweeps.tick(self.store, None if full else active)
            if full:
                self._full_sweep_pass = now
        except Exception:  # a sweep's bookkeeping must never stop the scheduling
            log.exception("sweep pass failed")

    def _assign(self, job: dict[str, Any], worker: dict[str, Any]) -> bool:
        attempt = int(job.get("attempt", 0)) + 1
        try:
            self.store.transition(job["id"], JobState.ASSIGNED, f"assigned to {worker['name']}",
                                  worker=worker["name"], attempt=attempt)
        except TransitionError:
            return False  # cancelled meanwhile
        try:
            self.send(job["id"], worker)
        except Exception as e:  # the broker refused: put the job back
            log.exception("could not hand job %s to %s", job["id"], worker["name"])
            self.store.transition(job["id"], JobState.RETRYING, f"could not reach the queue: {e}")
            return False
        return True

    def _note_waiting(self, job: dict[str, Any], workers: list[dict[str, Any]]) -> None:
        """Say why a job that no idle worker can take is waiting."""
        need = int(job.get("gpu_memory_mb") or 0)
        if needs_cuda(job) and not any(is_cuda(w) for w in workers):
            reason = "waiting for a CUDA GPU worker"
        elif need > 0 and (needs_cuda(job) or all(memory_gated(w) for w in workers)):
            reason = f"waiting for a card with {need} MB free"
            held = [f"{w['name']}: {int(w['outside_mb'])} MB in use outside lorafleet"
                    for w in workers if (_mem(w, "outside_mb") or 0) > 0]
            if held:
                reason += f" ({'; '.join(held)})"
        else:
            reason = "waiting for a worker"
        self._note(job, reason)

    def _note(self, job: dict[str, Any], reason: str) -> None:
        if job.get("reason") != reason:
            self.store.update_progress(job["id"], reason=reason)
            job["reason"] = reason

    def _recover_lost(self, active: list[dict[str, Any]], alive: set[str]) -> None:
        """A job whose worker stopped sending heartbeats goes back to the queue (or fails)."""
        for job in active:
            if job.get("worker") in alive:
                continue
            attempt = int(job.get("attempt", 0))
            try:
                if self.store.stop_requested(job["id"]):
                    # It was being stopped (by its user, a sweep's early stopping or a cancel):
                    # the stop stands; running it again would only redo steps.
                    why = self.store.stop_cause(job["id"])
                    self.store.transition(
                        job["id"], JobState.CANCELLED,
                        f"{why}; worker {job.get('worker')} was lost before the job stopped "
                        "(its last checkpoint, if any, stays)")
                elif attempt >= MAX_ATTEMPTS:
                    self.store.transition(
                        job["id"], JobState.FAILED,
                        f"worker {job.get('worker')} was lost {attempt} times; giving up")
                else:
                    self.store.transition(
                        job["id"], JobState.RETRYING,
                        f"worker {job.get('worker')} stopped answering; re-queued", worker="")
            except TransitionError:
                pass

    def _recover_unsent(self, active: list[dict[str, Any]], workers: list[dict[str, Any]]) -> None:
        """An assigned job that its worker, alive and idle, has not started UNSENT_AFTER_S after
        the assignment goes back to the queue: its message never reached the worker (the
        dispatcher died between assigning and sending). Should the message turn up late
        anyway, the worker finds the job no longer assigned to it and skips it."""
        by_name = {w["name"]: w for w in workers}
        now = self.clock()
        for job in active:
            w = by_name.get(job.get("worker"))
            if (job.get("state") != JobState.ASSIGNED.value or w is None
                    or w.get("state") != "idle" or w.get("job")
                    or now - float(job.get("updated") or now) < UNSENT_AFTER_S
                    or float(w.get("seen") or 0) < float(job.get("updated") or 0) + 2):
                continue
            try:
                self.store.transition(
                    job["id"], JobState.RETRYING, f"{job['worker']} never received the job "
                    "(the dispatcher stopped while handing it over); re-queued", worker="",
                    expect_state=JobState.ASSIGNED)
            except TransitionError:
                pass

    def run(self, interval: float = 0.5, should_stop: Callable[[], bool] = lambda: False) -> None:
        log.info("dispatcher %s started", self.ident[:8])
        try:
            while not should_stop():
                try:
                    for job_id, worker in self.tick():
                        log.info("job %s -> %s", job_id, worker)
                except Exception:  # keep scheduling through a transient Redis error
                    log.exception("dispatcher tick failed")
                time.sleep(interval)
        finally:
            self.release_lock()
