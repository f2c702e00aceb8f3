"""Cancel with a grace period: kill a job's process when its trainer does not answer a stop.

A cancelled running job is asked to stop (`JobStore.request_stop`); the trainer checks the flag
after every optimizer step, answers it (`JobStore.answer_stop`), saves and ends `cancelled`.
A trainer that does not answer within the grace period (`LORAFLEET_STOP_GRACE_S`, a hung
data loader, a deadlocked collective, a process stopped with SIGSTOP) is killed: this runs in
the worker's main process, which never touches the GPU and keeps beating while the child that
runs the job is stuck. The job is ended `cancelled` first, so the Celery task_failure handler
that then sees the child die finds nothing to re-queue; the card is free and the new child
that Celery starts takes the next job.

The grace period is timed on this process's monotonic clock from when it first sees the
request, so clocks of other hosts do not matter; it is checked once per heartbeat.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError, WorkerState
from dispatcher.jobs.store import JobStore
from gpuworker.checkpoints import list_checkpoints
from gpuworker.telemetry import parent_pid

log = logging.getLogger("lorafleet.worker")


def kill_child(pid: int | None, parent: int | None = None) -> int | None:
    """SIGKILL `pid` if it is a child of `parent` (this process); with no usable `pid`, this
    process's only child (the worker's pool has one process). Returns the pid killed."""
    parent = os.getpid() if parent is None else parent
    if pid is None or parent_pid(pid) != parent:
        kids = [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and parent_pid(int(p.name)) == parent]
        if len(kids) != 1:
            log.error("cannot tell which process runs the job (children: %s); none killed", kids)
            return None
        pid = kids[0]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


def last_checkpoint(lora_dir: Path) -> str | None:
    """The newest `checkpoint-<step>` folder name in `lora_dir`, if any."""
    try:
        found = list_checkpoints(lora_dir)
    except OSError:
        return None
    return found[-1].name if found else None


class StopWatchdog:
    """Checked once per heartbeat in the worker's main process; see the module docstring."""

    def __init__(self, store: JobStore, fleet: Fleet, name: str, grace_s: float,
                 loras: Path, clock: Callable[[], float] = time.monotonic,
                 kill: Callable[[int | None], int | None] = kill_child):
        self.store = store
        self.fleet = fleet
        self.name = name
        self.grace_s = grace_s
        self.loras = loras
        self.clock = clock
        self.kill = kill
        self.seen: dict[str, float] = {}  # job id -> when this process first saw its stop

    def check(self) -> str | None:
        """Kill the current job's process if its stop request is unanswered past the grace
        period; returns the id of a job ended that way. A pack's trials (`jobs`) are each
        checked: one that does not answer means the process that trains them all is stuck."""
        job_id, jobs, pid = self.fleet.r.hmget(self.fleet.key(self.name), "job", "jobs",
                                               "job_pid")
        ids = [j for j in (jobs or "").split(",") if j] or ([job_id] if job_id else [])
        self.seen = {j: t for j, t in self.seen.items() if j in ids}
        for one in ids:
            ended = self._check_one(one, pid, alone=len(ids) == 1)
            if ended:
                return ended
        return None

    def _check_one(self, job_id: str, pid: str | None, alone: bool) -> str | None:
        if not self.store.stop_requested(job_id):
            self.seen.pop(job_id, None)
            return None
        state, worker, answered = self.store.r.hmget(self.store.key(job_id), "state", "worker",
                                                     "stop_answered")
        if state != JobState.RUNNING.value or worker != self.name or answered:
            return None
        now = self.clock()
        if job_id not in self.seen:
            self.seen[job_id] = now
            if alone:  # (a pack's other trials train on: the worker is not stopping)
                self._mark_stopping(job_id)
            self.store.events.append(job_id, "log", line=(
                f"worker {self.name}: stop requested; the trainer has {self.grace_s:g} s to "
                "answer before its process is killed"))
            return None
        if now - self.seen[job_id] < self.grace_s:
            return None
        return self._kill(job_id, int(pid) if pid else None)

    def _mark_stopping(self, job_id: str) -> None:
        """The worker's state shows `stopping`, unless the job ended meanwhile (the task then
        set it idle, and that must stay)."""
        key = self.fleet.key(self.name)
        with self.fleet.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.hget(key, "job") == job_id:
                    pipe.multi()
                    pipe.hset(key, "state", WorkerState.STOPPING.value)
                    pipe.execute()
            except redis.WatchError:
                pass  # the task changed the worker's record meanwhile (the job ended): keep it

    def _kill(self, job_id: str, pid: int | None) -> str | None:
        why = self.store.stop_cause(job_id)
        reason = (f"{why}: the training process was killed after not answering the stop "
                  f"request within {self.grace_s:g} s")
        lora = (self.store.get(job_id).get("spec") or {}).get("lora_name")
        if lora:
            ckpt = last_checkpoint(self.loras / lora)
            reason += (f"; the LoRA of its last checkpoint ({ckpt}) stays" if ckpt
                       else "; no checkpoint had been saved")
        try:
            # Ended before the kill, so the task_failure handler that sees the child die
            # finds a finished job and does not re-queue it.
            self.store.transition(job_id, JobState.CANCELLED, reason, expect_worker=self.name,
                                  expect_state=JobState.RUNNING)
        except TransitionError:
            return None  # it ended (or moved) on its own meanwhile
        killed = self.kill(pid)
        log.warning("job %s: %s (killed pid %s)", job_id, reason, killed)
        self.store.events.append(job_id, "log", line=(
            f"worker {self.name}: killed the training process (pid {killed}) after "
            f"{self.grace_s:g} s without an answer to the stop request"))
        self.fleet.heartbeat(self.name, state=WorkerState.IDLE.value, job="", jobs="", pack="",
                             job_pid="")
        self.seen.pop(job_id, None)
        return job_id
