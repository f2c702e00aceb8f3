"""The dispatcher: decides which pending job goes to which idle worker, and notices lost workers.

Only jobs that can start now are handed to Celery (to that worker's own queue), so cancelling
and re-ordering act on the dispatcher's own pending set. One dispatcher schedules at a time:
each holds a lock in Redis with an expiry and renews it every tick.

The policy (README, "Scheduling") lives in pure functions next to this module: the order of
the queue in dispatcher.schedule.queue, which card fits which job in
dispatcher.schedule.placement, and what becomes of a job whose worker was lost in
dispatcher.schedule.requeue. On top of them a pass here applies two limits:
  - a user may hold at most `max_cards_per_user` workers at once (0 = no limit);
  - a sweep's trials hold at most its `max_concurrent` workers at once (`sweep_full`); the
    skipped trial keeps its place and the next job in the same order may take the card.
A trial whose sweep packs (`pack_max` > 1) takes with it onto its card the sweep's other queued
trials that can share its base model (dispatcher.schedule.sweeps.packs), as many as the card's
free memory, the pack size and `max_concurrent` (which counts trials) allow: a pack, one Celery
task that trains them together. Each keeps its own record; they share the card.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError
from dispatcher.jobs.store import JobStore
from dispatcher.schedule import sweeps
from dispatcher.schedule.estimate import pack_memory_mb
from dispatcher.schedule.pending import PendingCache
from dispatcher.schedule.placement import (
    best_card,
    fits,
    fits_any,
    is_cuda,
    memory_gated,
    memory_mb,
    sweep_full,
    waiting_reason,
)
from dispatcher.schedule.queue import queue_view
from dispatcher.schedule.requeue import recover_lost, recover_unsent, unsent
from dispatcher.schedule.sweeps.packs import MAX_PACK, share_key
from dispatcher.settings import scheduling_env

log = logging.getLogger("lorafleet.dispatcher")

# Every unfinished sweep is looked at this often even when none of its jobs moved.
FULL_SWEEP_PASS_S = 60.0
# A pass that placed nothing is not planned again, while nothing it looked at changed, for up to
# this long (a free card that no queued job fits would otherwise replan the queue every pass).
REPLAN_UNCHANGED_S = 10.0

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


class Dispatcher:
    """The scheduling loop: `tick` is one pass, `run` passes until told to stop."""

    def __init__(self, store: JobStore, fleet: Fleet,
                 send: Callable[[str, dict[str, Any], int], None],
                 lock_ttl_s: float = 10.0, clock: Callable[[], float] = time.time,
                 fair_window_s: float | None = None, max_cards_per_user: int | None = None,
                 send_pack: Callable[[str, dict[str, int], dict[str, Any]], None] | None = None):
        env_window, env_cards = scheduling_env()
        self.fair_window_s = env_window if fair_window_s is None else fair_window_s
        self.max_cards_per_user = env_cards if max_cards_per_user is None else max_cards_per_user
        self.store = store
        self.fleet = fleet
        # (job id, worker, attempt): the task that runs that attempt of the job on the worker.
        self.send = send
        # (pack label, {job id: attempt} in pack order, worker): one task that trains the jobs
        # together; without it no pack is formed (every job goes alone through `send`).
        self.send_pack = send_pack
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
        recover_lost(self.store, self.store.active(), {w["name"] for w in workers})
        recover_unsent(self.store, self.store.active(), workers, self.clock())
        self._sweeps(self.store.active())
        active = self.store.active()
        busy = {j.get("worker") for j in active}
        idle = [w for w in workers if w["name"] not in busy]
        pending = self.pending.read()
        if not idle:  # nothing can start: only say why jobs no live worker can take wait
            for job in pending:
                if workers and not fits_any(job, workers):
                    self._note(job, waiting_reason(job, workers))
            return []
        looked_at = _pass_inputs(self.pending.version, active, workers, idle)
        if self._unchanged(looked_at):
            return []
        view = queue_view(self.store, self.clock(), self.fair_window_s, active=active,
                          pending=pending)
        assigned = self._place(view.order, active, workers, idle)
        self._fruitless = None if assigned else (looked_at, self.clock())
        return assigned

    def _place(self, order: list[dict[str, Any]], active: list[dict[str, Any]],
               workers: list[dict[str, Any]], idle: list[dict[str, Any]]
               ) -> list[tuple[str, str]]:
        """Hand the jobs, in the queue's order, to the idle workers they fit, within the
        per-user and per-sweep limits; every job left waiting gets its reason."""
        # Cards per user (a pack's trials share one), trials per sweep.
        in_use = Counter(owner for owner, _ in {(j.get("owner") or "local", j.get("worker"))
                                                for j in active})
        in_sweep = Counter(j["sweep"] for j in active if j.get("sweep"))
        # A LoRA folder is trained by one process at a time (it holds the folder's lock): a
        # job for a LoRA that another job is training waits for it instead of failing there.
        # Training: assigned, or named by its worker's heartbeat (a record left running by a
        # settle that never came holds nothing back).
        named = {j for w in workers for f in ("job", "jobs")
                 for j in str(w.get(f) or "").replace(",", " ").split()}
        training = {_lora_of(j): j["id"] for j in active if _lora_of(j) and (
            j.get("state") == "assigned" or j["id"] in named)}
        assigned: list[tuple[str, str]] = []
        taken: set[str] = set()  # placed in this pass as a pack's member
        for job in order:
            if job["id"] in taken:
                continue
            lora = _lora_of(job)
            if lora and training.get(lora, job["id"]) != job["id"]:
                self._note(job, f"waiting: loras/{lora} is being trained by job "
                                f"{training[lora]}")
                continue
            if workers and not fits_any(job, workers):
                self._note(job, waiting_reason(job, workers))
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
                self._note(job, waiting_reason(job, workers))
                continue
            if self._may_pack(job, fit):
                # A trial that can take others along goes to the card with the most room.
                fit = max((w for w in idle if fits(job, w) and self._may_pack(job, w)),
                          key=lambda w: (is_cuda(w), memory_mb(w, "mem_free_mb") or math.inf))
            pack = [job] + self._pack_mates(job, order, fit, in_sweep, taken, training)
            placed = self._assign_pack(pack, fit) if len(pack) > 1 else (
                [job] if self._assign(job, fit) else [])
            if placed:
                idle.remove(fit)
                in_use[owner] += 1
                for j in placed:
                    taken.add(j["id"])
                    if _lora_of(j):
                        training[_lora_of(j)] = j["id"]
                    if j.get("sweep"):
                        in_sweep[j["sweep"]] += 1
                    assigned.append((j["id"], fit["name"]))
        return assigned

    def _pack_mates(self, job: dict[str, Any], order: list[dict[str, Any]],
                    worker: dict[str, Any], in_sweep: Counter, taken: set[str],
                    training: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The queued trials that train together with `job` on `worker`: of its sweep, able
        to share its base (packs.share_key), in queue order, while the pack's memory
        estimate fits the card's free memory, within the sweep's pack size and the trials its
        `max_concurrent` still allows."""
        most = min(int(job.get("pack_max") or 1), MAX_PACK)
        if not self._may_pack(job, worker):
            return []
        cap = int(job.get("sweep_cap") or 0)
        if cap > 0:
            most = min(most, cap - in_sweep[job["sweep"]])
        free = memory_mb(worker, "mem_free_mb") if memory_gated(worker) else None
        key = share_key(job.get("spec") or {})
        sizes = [_pack_size(job)]
        mates: list[dict[str, Any]] = []
        loras = {_lora_of(job)}  # one LoRA folder per process at a time, none in training
        for other in order:
            if len(mates) + 1 >= most:
                break
            if _lora_of(other) in loras or _lora_of(other) in (training or {}):
                continue
            if (other is job or other["id"] in taken or other.get("sweep") != job["sweep"]
                    or other.get("kind") != "train" or share_key(other.get("spec") or {}) != key
                    # every member's own limit holds (one halved by an out-of-memory split)
                    or int(other.get("pack_max") or 1) < len(mates) + 2):
                continue
            size = _pack_size(other)
            if free is not None and pack_memory_mb([*sizes, size]) > free:
                continue  # a smaller trial further on may still fit
            sizes.append(size)
            mates.append(other)
            loras.add(_lora_of(other))
        return mates

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
        now = self.clock()
        full = now - self._full_sweep_pass >= FULL_SWEEP_PASS_S
        try:
            sweeps.tick(self.store, None if full else active)
            if full:
                self._full_sweep_pass = now
        except Exception:  # a sweep's bookkeeping must never stop the scheduling
            log.exception("sweep pass failed")

    def _may_pack(self, job: dict[str, Any], worker: dict[str, Any]) -> bool:
        """Could `job` take other trials along onto `worker`: a sweep's training trial that
        allows packs, and a worker that runs them (one of an older version does not)."""
        return (self.send_pack is not None and int(job.get("pack_max") or 1) > 1
                and bool(job.get("sweep")) and job.get("kind") == "train"
                and str(worker.get("packs") or "") == "1")

    def _assign(self, job: dict[str, Any], worker: dict[str, Any]) -> bool:
        attempt = int(job.get("attempt", 0)) + 1
        # A trial that trained in a pack before (and now runs alone) no longer shows one.
        was_packed = {"pack": "", "pack_jobs": ""} if job.get("pack") else {}
        try:
            self.store.transition(job["id"], JobState.ASSIGNED, f"assigned to {worker['name']}",
                                  worker=worker["name"], attempt=attempt, **was_packed)
        except TransitionError:
            return False  # cancelled meanwhile
        try:
            self.send(job["id"], worker, attempt)
        except Exception as e:  # the broker refused: put the job back
            log.exception("could not hand job %s to %s", job["id"], worker["name"])
            with contextlib.suppress(TransitionError):
                unsent(self.store, job, f"could not reach the queue: {e}")
            return False
        return True

    def _assign_pack(self, jobs: list[dict[str, Any]], worker: dict[str, Any]
                     ) -> list[dict[str, Any]]:
        """Assign `jobs` (trials of one sweep) to `worker` as one pack; returns those placed
        (a trial cancelled meanwhile is left out; one left alone goes as a job of its own)."""
        sweep = jobs[0]["sweep"]
        number = int(self.r.incr(f"{self.store.p}:sweep:{sweep}:packs"))
        label = f"pack {number}"
        ids = ",".join(j["id"] for j in jobs)
        placed: list[dict[str, Any]] = []
        attempts: dict[str, int] = {}  # the attempt each placed trial was assigned
        for job in jobs:
            attempt = int(job.get("attempt", 0)) + 1
            try:
                self.store.transition(
                    job["id"], JobState.ASSIGNED,
                    f"assigned to {worker['name']} ({label} of sweep {sweep}, {len(jobs)} trials)",
                    worker=worker["name"], attempt=attempt, pack=str(number), pack_jobs=ids)
                placed.append(job)
                attempts[job["id"]] = attempt
            except TransitionError:
                continue  # cancelled meanwhile
        if len(placed) < len(jobs):
            self._repack(placed)
        if not placed:
            return []
        try:
            if len(placed) == 1:
                self.send(placed[0]["id"], worker, attempts[placed[0]["id"]])
            else:
                self.send_pack(f"{sweep}:{number}", attempts, worker)
        except Exception as e:  # the broker refused: put the trials back
            log.exception("could not hand %s of sweep %s to %s", label, sweep, worker["name"])
            for job in placed:
                with contextlib.suppress(TransitionError):
                    unsent(self.store, job, f"could not reach the queue: {e}")
            return []
        return placed

    def _repack(self, placed: list[dict[str, Any]]) -> None:
        """The pack lost members before it was sent: its records name the ones it has."""
        ids = ",".join(j["id"] for j in placed)
        for job in placed:
            fields = {"pack_jobs": ids} if len(placed) > 1 else {"pack": "", "pack_jobs": ""}
            self.store.update_progress(job["id"], **fields)

    def _note(self, job: dict[str, Any], reason: str) -> None:
        """Say why a job waits (written only when the reason changed)."""
        if job.get("reason") != reason:
            self.store.update_progress(job["id"], reason=reason)
            job["reason"] = reason

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


def _pack_size(job: dict[str, Any]) -> tuple[int, int, int]:
    """A trial's figures for estimate.pack_memory_mb."""
    return (int(job.get("gpu_memory_mb") or 0), int(job.get("pack_base_mb") or 0),
            int(job.get("pack_lane_mb") or 0))


def _lora_of(job: dict[str, Any]) -> str:
    """The LoRA folder a training job writes ("" for other kinds)."""
    if job.get("kind") != "train":
        return ""
    return str((job.get("spec") or {}).get("lora_name") or "")
