"""The dispatcher: decides which pending job goes to which idle worker, and notices lost workers.

Only jobs that can start now are handed to Celery (to that worker's own queue), so cancelling
and re-ordering act on the dispatcher's own pending set. One dispatcher schedules at a time:
each holds a lock in Redis with an expiry and renews it every tick.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from dispatcher.fleet import Fleet
from dispatcher.states import JobState, TransitionError
from dispatcher.store import PRIORITIES, JobStore

log = logging.getLogger("lorafleet.dispatcher")

QUANTISED = ("4bit", "8bit")
MAX_ATTEMPTS = 3


def needs_cuda(job: dict[str, Any]) -> bool:
    return (job.get("spec") or {}).get("precision") in QUANTISED


def can_run_on(job: dict[str, Any], worker: dict[str, Any]) -> bool:
    if needs_cuda(job) and not str(worker.get("device", "")).startswith("cuda"):
        return False
    return True


def queue_order(job: dict[str, Any]) -> tuple:
    """Higher priority first, then older first."""
    return (-PRIORITIES.get(job.get("priority", "normal"), 1), float(job.get("created", 0)))


class Dispatcher:
    def __init__(self, store: JobStore, fleet: Fleet, send: Callable[[str, dict[str, Any]], None],
                 lock_ttl_s: float = 10.0, clock: Callable[[], float] = time.time):
        self.store = store
        self.fleet = fleet
        self.send = send
        self.r = store.r
        self.lock_key = f"{store.p}:dispatcher:lock"
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.ident = uuid.uuid4().hex
        self.clock = clock

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
        active = self.store.active()
        self._recover_lost(active, alive)
        busy = {j.get("worker") for j in self.store.active()}
        idle = [w for w in workers if w["name"] not in busy]
        assigned: list[tuple[str, str]] = []
        for job in sorted(self.store.pending(), key=queue_order):
            if not idle:
                break
            fit = next((w for w in idle if can_run_on(job, w)), None)
            if fit is None:
                self._note_waiting(job, workers)
                continue
            if self._assign(job, fit):
                idle.remove(fit)
                assigned.append((job["id"], fit["name"]))
        return assigned

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
        reason = "waiting for a CUDA GPU worker" if needs_cuda(job) else "waiting for a worker"
        if job.get("reason") != reason:
            self.store.update_progress(job["id"], reason=reason)

    def _recover_lost(self, active: list[dict[str, Any]], alive: set[str]) -> None:
        """A job whose worker stopped sending heartbeats goes back to the queue (or fails)."""
        for job in active:
            if job.get("worker") in alive:
                continue
            attempt = int(job.get("attempt", 0))
            try:
                if attempt >= MAX_ATTEMPTS:
                    self.store.transition(
                        job["id"], JobState.FAILED,
                        f"worker {job.get('worker')} was lost {attempt} times; giving up")
                else:
                    self.store.transition(
                        job["id"], JobState.RETRYING,
                        f"worker {job.get('worker')} stopped answering; re-queued", worker="")
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
