"""The Celery task and the one wrapper that does every job's bookkeeping.

`run_job` is thin: it hands the job id to `perform_job`, which checks that the job is still
this worker's (a fence against a job that moved to another card), marks it running, calls one
engine function with callbacks that publish events, and records the outcome. Retries after a
lost worker are the dispatcher's business; a task that ended without recording an outcome (its
process died) is settled here, by the same policy (dispatcher.schedule.requeue).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from dispatcher.access.links import inside
from dispatcher.access.owners import OwnerRefused, Owners, job_write_refusal
from dispatcher.jobs.celery_app import RUN_JOB_TASK, RUN_PACK_TASK
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError, WorkerState
from dispatcher.jobs.store import JobNotFound, JobStore
from dispatcher.schedule.requeue import Crashed, requeue_free, settle
from dispatcher.settings import Settings, connect
from gpuworker.checkpoints import clear_staging
from gpuworker.diskspace import says_full
from gpuworker.errors import EngineError, FolderBusy
from gpuworker.folderlock import holder_of, me, try_lock
from gpuworker.oomkills import OomCounts, death_reason, read_oom_counts

log = logging.getLogger("lorafleet.worker")

# How many times a job refused because its LoRA folder stayed locked (FolderBusy) goes back to
# the queue, without counting an attempt, before it fails.
LOCK_REQUEUES = 5

# How often (seconds) at most the job record's progress fields are rewritten; every event still
# goes to the stream. A sweep's early stopping reads `step` from the record, so this bounds how
# late a trial is judged after it passes a rung (plus one dispatcher pass).
_PROGRESS_EVERY_S = 0.2


class JobFenced(RuntimeError):
    """The job no longer belongs to this worker."""


class JobRun:
    """The callbacks one run of a job hands the engine: events and progress, log lines and the
    stop check, each fenced on the job still being this worker's."""

    def __init__(self, store: JobStore, job_id: str, worker_name: str, rec: dict[str, Any]):
        self.store = store
        self.job_id = job_id
        self.worker_name = worker_name
        # Which run of the job this is: every event carries it, and the fence checks it (a
        # worker restarted under the same name may be given the job again while a process of
        # its earlier life still trains it).
        self.attempt = int(rec.get("attempt") or 1)
        self.best: float | None = rec.get("best_eval_loss")  # a resumed attempt keeps it
        self._progress_at = 0.0
        self._answered = False

    def still_mine(self) -> bool:
        raw = self.store.r.hmget(self.store.key(self.job_id), "state", "worker", "attempt")
        return (raw[0] == JobState.RUNNING.value and raw[1] == self.worker_name
                and _attempt(raw[2]) == self.attempt)

    def check_mine(self) -> None:
        if not self.still_mine():
            raise JobFenced(self.moved())

    def moved(self) -> str:
        return f"job {self.job_id} was moved away from {self.worker_name} (attempt {self.attempt})"

    def append(self, events: list[tuple[str, dict[str, Any]]],
               progress: dict[str, Any] | None = None) -> bool:
        """Write `events` (and record `progress` fields) if the job is still this run's, in one
        transaction with that check; False when it is not (nothing was written)."""
        return self.store.append_to_run(self.job_id, self.worker_name, self.attempt, events,
                                        progress)

    def log(self, line: str) -> None:
        """A line of the job's log; a run fenced out writes nothing (the line stays in the
        worker's own log, marked)."""
        if self.append([("log", {"line": line, "attempt": self.attempt})]):
            log.info("[%s] %s", self.job_id, line)
        else:
            log.info("[%s, fenced out: not written] %s", self.job_id, line)

    def progress(self, event: dict[str, Any]) -> None:
        """Every event goes to the job's stream; training progress to the record at most every
        _PROGRESS_EVERY_S (and at the last step), the best eval loss at every evaluation. Each
        write is fenced on the job still being this run's (JobFenced: nothing was written)."""
        event = dict(event)
        kind = event.pop("type", "train")
        event["attempt"] = self.attempt
        fields: dict[str, Any] | None = None
        best = self.best
        now = time.monotonic()
        if kind == "train" and (now - self._progress_at >= _PROGRESS_EVERY_S
                                or event.get("step") == event.get("total_steps")):
            fields = {k: event.get(k) for k in ("step", "total_steps", "loss", "eta_s", "epoch")}
        elif kind == "eval" and event.get("eval_loss") is not None:
            # Kept on the record, so a job's summary never reads its whole event stream.
            loss = float(event["eval_loss"])
            best = loss if best is None else min(best, loss)
            fields = {"eval_loss": loss, "best_eval_loss": best}
        fields = {k: v for k, v in (fields or {}).items() if v is not None}
        if not self.append([(kind, event)], fields or None):
            raise JobFenced(self.moved())
        if kind == "train" and fields:
            self._progress_at = now
        self.best = best

    def should_stop(self) -> bool:
        # A job moved away (re-queued, given to another worker or to this worker's next life)
        # is not stopped and saved here: this process writes nothing more of it, not even its
        # LoRA folder, which its new run may be using already.
        self.check_mine()
        if not self.store.stop_requested(self.job_id):
            return False
        if not self._answered:  # the worker's watchdog stops waiting to kill this process
            # (JobStore.answer_stop's field, written only while the job is this run's)
            if not self.append([], {"stop_answered": self.store.clock()}):
                raise JobFenced(self.moved())
            self._answered = True
        return True


def _attempt(raw: str | None) -> int:
    try:
        return int(float(raw or 1))
    except ValueError:
        return 1


def perform_job(job_id: str, worker_name: str, store: JobStore, fleet: Fleet,
                run: Callable[..., dict[str, Any]], settings: Settings,
                attempt: int | None = None) -> str:
    """Run attempt `attempt` of one job (see start_job) to an end state; returns that state's
    value (or 'skipped', 'fenced')."""
    rec = start_job(store, job_id, worker_name, attempt)
    if rec is None:
        return "skipped"
    # job_pid: the process to kill if the job does not answer a stop request (gpuworker.watchdog).
    fleet.heartbeat(worker_name, state=WorkerState.BUSY.value, job=job_id, job_pid=os.getpid())
    state = JobState.FAILED
    job = JobRun(store, job_id, worker_name, rec)
    try:
        state = _run(job, rec, run, settings)
    except JobFenced as e:
        log.warning("%s", e)
        return "fenced"
    except Exception as e:  # every failure ends the job with its reason; the worker stays up
        state = record_failure(job, e)
    finally:
        fleet.heartbeat(worker_name, state=WorkerState.IDLE.value, job="", job_pid="")
        release_memory()
    return state.value


def start_job(store: JobStore, job_id: str, worker_name: str,
              attempt: int | None = None) -> dict[str, Any] | None:
    """Mark the job running on this worker at `attempt`, the assignment its task was sent for;
    None (logged) when it is not this worker's to run: gone, cancelled, assigned elsewhere or
    assigned again (a later attempt) since the message was sent. A message without an attempt
    (sent by a dispatcher of an earlier version) runs the attempt the record holds now. Either
    way the record returned names the attempt every write of this run is fenced on."""
    try:
        rec = store.get(job_id)
    except JobNotFound:
        log.warning("job %s does not exist; skipping", job_id)
        return None
    if rec["state"] != JobState.ASSIGNED.value or rec.get("worker") != worker_name:
        log.warning("job %s is %s on %r, not assigned to %s; skipping", job_id, rec["state"],
                    rec.get("worker"), worker_name)
        return None
    current = int(rec.get("attempt") or 1)
    if attempt is not None and attempt != current:
        log.warning("job %s is at attempt %d on %s, not at attempt %d, which this task was "
                    "sent for; skipping", job_id, current, worker_name, attempt)
        return None
    try:
        store.transition(job_id, JobState.RUNNING, f"running on {worker_name}",
                         expect_worker=worker_name, expect_attempt=current)
    except TransitionError as e:
        log.warning("job %s: %s", job_id, e)
        return None
    return rec


def _run(job: JobRun, rec: dict[str, Any], run: Callable[..., dict[str, Any]],
         settings: Settings) -> JobState:
    """Call the engine and record its outcome: succeeded, or cancelled when it stopped."""
    store, job_id = job.store, job.job_id
    kind = rec.get("kind", "train")
    if kind == "train":
        check_lora_owner(store, rec, settings)
    result = run(kind, rec["spec"], settings, job_id=job_id,
                 attempt=folder_run(job.attempt, rec), progress=job.progress,
                 should_stop=job.should_stop, log=job.log)
    return record_result(job, result)


def record_result(job: JobRun, result: dict[str, Any]) -> JobState:
    """End the job with the engine's result: cancelled when it stopped, else succeeded. The
    result (on the record and as an event) and the end state are one transaction, fenced on
    the job still being this run's (JobFenced: nothing was written)."""
    store, job_id = job.store, job.job_id
    job.check_mine()
    if result.get("stopped"):
        state = JobState.CANCELLED
        reason = store.stop_cause(job_id)
        reason += "; the incomplete LoRA was saved" if result.get("saved") else ""
    else:
        state = JobState.SUCCEEDED
        reason = result.get("reason") or "finished"
    try:
        store.transition(job_id, state, reason, expect_state=JobState.RUNNING,
                         expect_worker=job.worker_name, expect_attempt=job.attempt,
                         events=[("result", result)], result=json.dumps(result))
    except TransitionError as e:  # it moved (or ended) since check_mine
        raise JobFenced(f"{job.moved()}: {e}") from e
    return state


def folder_run(attempt: int, rec: dict[str, Any]) -> int:
    """Which run of the job (`rec`, at `attempt`) in its LoRA folder this is: the attempt, less
    the assignments that read and wrote nothing there (refused because the folder stayed
    locked, `lock_requeues`; never delivered, `unsent_requeues`; not pack splits: a split
    trial trained). A run after the first resumes from its own latest checkpoint."""
    skipped = sum(int(rec.get(k) or 0) for k in ("lock_requeues", "unsent_requeues"))
    return max(1, attempt - skipped)


def check_lora_owner(store: JobStore, rec: dict[str, Any], settings: Settings) -> None:
    """Defence in depth: the dashboard checked who may write this LoRA; check again before
    the engine moves or writes anything in its folder (OwnerRefused)."""
    refused = job_write_refusal(Owners(store.r, store.p), settings.paths.loras, rec)
    if refused:
        raise OwnerRefused(refused, "lora_name")


def record_failure(job: JobRun, e: Exception) -> JobState:
    """End the job `failed` with a reason a user can read, and the traceback's tail in its log:
    one transaction, fenced on the job still being this run's (a process whose job ended or
    was given to another run, even on this worker name, writes nothing). A job whose LoRA
    folder stayed locked goes back to the queue instead (requeue_locked_out), up to
    LOCK_REQUEUES times. Returns the state it was given."""
    if isinstance(e, FolderBusy):
        requeued = requeue_locked_out(job, e)
        if requeued is not None:
            return requeued
        e = FolderBusy(f"{e}; it was re-queued {LOCK_REQUEUES} times for this already: run the "
                       "job again once that process has ended")
    lines: list[tuple[str, dict[str, Any]]] = []
    if sys.exc_info()[1] is e:  # (a pack's trial gets its error handed over, not raised)
        lines = [("log", {"line": line, "attempt": job.attempt})
                 for line in traceback.format_exc().rstrip().splitlines()[-12:]]
    try:
        job.store.transition(job.job_id, JobState.FAILED, _reason(e),
                             expect_worker=job.worker_name, expect_attempt=job.attempt,
                             events=lines)
    except TransitionError as moved:  # it ended or moved meanwhile: its record is not ours
        log.warning("job %s failed but could not be marked failed: %s", job.job_id, moved)
    return JobState.FAILED


def requeue_locked_out(job: JobRun, e: FolderBusy) -> JobState | None:
    """Put back in the queue a job whose LoRA folder a process that lets go by itself held too
    long (e: what held it): not the job's fault, so the attempt is not counted (settle and
    folder_run subtract `lock_requeues`); cancelled instead when it was being stopped. Returns
    that state; None once it was put back LOCK_REQUEUES times (it is to fail)."""
    store, job_id = job.store, job.job_id
    if int(store.r.hget(store.key(job_id), "lock_requeues") or 0) >= LOCK_REQUEUES:
        return None
    try:
        return requeue_free(store, job_id, "lock_requeues",
                            f"{e}; re-queued (not counted as an attempt)", stopped=str(e),
                            expect_state=JobState.RUNNING, expect_worker=job.worker_name,
                            expect_attempt=job.attempt)
    except TransitionError as moved:  # it ended or moved meanwhile: its record is not ours
        log.warning("job %s could not be re-queued: %s", job_id, moved)
        return JobState(store.get(job_id)["state"])


def _reason(e: BaseException) -> str:
    """A user-facing reason: engine errors and refusals as they are, anything else with its
    type."""
    if isinstance(e, (EngineError, OwnerRefused)):
        return str(e)
    if says_full(e):  # a write the engine does not name itself (its own say which folder)
        return f"no space left on the device ({type(e).__name__}: {str(e)[:300]})"
    if "out of memory" in str(e).lower():
        return ("out of GPU memory: lower micro_batch_size, cutoff_len or lora_rank "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return f"{type(e).__name__}: {str(e)[:500]}"


def release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # never imported here only to free memory
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # the child exits after this job anyway, freeing all it held
        log.warning("could not release the GPU memory cache", exc_info=True)


def patient_redis(settings: Settings, patience_s: float):
    """A Redis client that waits out a Redis restart: a command that cannot reach the server
    is retried with backoff (at most 1 s apart) for about `patience_s` seconds, then raises.

    A job's bookkeeping uses it, so a training run pauses while Redis is away instead of
    losing its job (a job whose writes failed would stay `running` on a live worker)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return connect(
        settings, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05),
                              retries=max(1, int(patience_s))),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


# How long (seconds) a job's bookkeeping waits for Redis before it gives up.
REDIS_PATIENCE_S = 120.0


def requeue_after_crash(settings: Settings, job_id: str, name: str, why: str,
                        mark_idle: bool = True, attempt: int | None = None) -> str | None:
    """Settle a job whose task ended without recording an outcome, by the one re-queue policy
    (dispatcher.schedule.requeue: back to the queue, failed after MAX_ATTEMPTS, cancelled when
    it was being stopped). Fenced: only a job still assigned to `name` at `attempt` (the one
    the task was sent for) changes; a job given again to `name` since then is another run's.
    Without `attempt` (a restarted worker settling what its earlier life left on its name, or
    a task message from before tasks carried their attempt), whatever attempt the record holds.
    Returns the new state, or None when the job was not (or no longer) this run's."""
    r = patient_redis(settings, REDIS_PATIENCE_S)
    try:
        store = JobStore(r, settings.prefix)
        rec = store.get(job_id)
        if JobState(rec["state"]).terminal:
            # Ended already: e.g. cancelled by the watchdog that killed the process for not
            # answering a stop request. Such a job must not run again; what its process was
            # saving when it was killed is cleared all the same.
            log.info("job %s is %s (%s): not re-queued", job_id, rec["state"], rec.get("reason"))
            if rec.get("worker") == name:
                _clear_half_saved(settings, rec)
            return None
        if attempt is None:
            attempt = int(rec.get("attempt") or 1)
        new = settle(store, job_id, attempt, Crashed(why), expect_worker=name,
                     expect_attempt=attempt)
        if new is None:
            return None
        _clear_half_saved(settings, rec)
        if mark_idle:  # (not for a worker still starting: its first heartbeat says idle)
            Fleet(r, settings.prefix, settings.worker_timeout).heartbeat(
                name, state=WorkerState.IDLE.value, job="", jobs="", pack="")
        return new.value
    except JobNotFound:
        return None
    finally:
        r.close()


def _clear_half_saved(settings: Settings, rec: dict[str, Any]) -> None:
    """What the process that trained `rec` was saving when it died (a hidden staging folder,
    a temporary file, a checkpoint it was replacing) is tidied, whether or not the job runs
    again: only under the LoRA folder's lock, taken without waiting. A process that still
    holds it is alive (an orphan of this worker's earlier life, or another job on the LoRA),
    and its staging is its work in progress: left alone; whoever takes the lock next tidies."""
    name = str((rec.get("spec") or {}).get("lora_name") or "") if rec.get("kind") == "train" \
        else ""
    if not name or "/" in name or name.startswith("."):
        return
    loras = settings.paths.loras
    folder = loras / name
    # Never through a link: a loras/<name> that leads out of the data folder is not cleared.
    if folder.is_symlink() or not inside(folder, loras) or not folder.is_dir():
        return
    try:
        lock = try_lock(folder, me(job=str(rec.get("id") or ""), doing="clearing"))
        if lock is None:
            log.info("loras/%s: not cleared: a live process holds it (%s)", name,
                     holder_of(folder) or "unknown")
            return
        with lock:
            # (again, now that the lock is held: a link put in the folder's place meanwhile)
            if folder.is_symlink() or not inside(folder, loras):
                return
            tidied = clear_staging(folder)
    except OSError:
        log.warning("could not clear loras/%s of half-saved files", name, exc_info=True)
        return
    for line in tidied.lines():
        log.info("loras/%s: %s, left by the process that died", name, line)


def crashed_runs(task: str, args: Any, kwargs: Any
                 ) -> tuple[str, list[tuple[str, int | None]]] | None:
    """What a task that ended without an outcome was running: its worker's name, and each job
    with the attempt the task was sent for (None from a message of a dispatcher that sent
    none); None for a task that is not a job's."""
    args, kwargs = list(args or ()), dict(kwargs or {})
    if task == RUN_JOB_TASK and len(args) >= 2:
        attempt = args[2] if len(args) >= 3 else kwargs.get("attempt")
        return args[1], [(args[0], _given_attempt(attempt))]
    if task == RUN_PACK_TASK and len(args) >= 3:
        attempts = (args[3] if len(args) >= 4 else kwargs.get("attempts")) or {}
        # every trial of the pack, ended or not (an ended one is left as it is)
        return args[2], [(j, _given_attempt(attempts.get(j))) for j in args[1]]
    return None


def _given_attempt(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def register_tasks(celery, settings: Settings) -> None:
    """Define the task on this worker's Celery app. Redis is connected in the child, per task."""
    from billiard.exceptions import WorkerLostError
    from celery.signals import task_failure, task_received

    # The kernel's OOM-kill counts when the task now running was received (in the main
    # process, which receives every task; one at a time), to tell an OOM kill of its child.
    started: dict[str, OomCounts] = {}

    @task_received.connect(weak=False)
    def on_task_received(request=None, **kw) -> None:
        started.clear()
        if request is not None:
            started[request.id] = read_oom_counts()

    @task_failure.connect(weak=False)
    def on_task_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None,
                        **kw) -> None:
        # perform_job records every outcome itself, so a run_job that fails ended without one:
        # the child that trained died (kill -9, the kernel's OOM killer; this handler then runs
        # in the worker's main process), or Redis stayed away longer than the bookkeeping
        # waited. The job would otherwise stay "assigned"/"running" on a live worker forever.
        found = crashed_runs(getattr(sender, "name", RUN_JOB_TASK), args, kwargs)
        if found is None:
            return
        name, runs = found
        if isinstance(exception, WorkerLostError):
            why = death_reason(name, str(exception), started.pop(task_id, None),
                               read_oom_counts())
        else:
            why = (f"the task on {name} ended without recording an outcome "
                   f"({type(exception).__name__}: {str(exception)[:200]})")
        for job_id, attempt in runs:
            try:
                requeue_after_crash(settings, job_id, name, why, attempt=attempt)
            except Exception:
                log.exception("could not re-queue job %s after its task failed", job_id)

    # `attempt` (`attempts`: job id -> attempt) is the assignment the task was sent for; a
    # message from a dispatcher of an earlier version has none (start_job).
    @celery.task(name=RUN_JOB_TASK)
    def run_job(job_id: str, worker_name: str, attempt: int | None = None) -> str:
        from gpuworker.jobs import run_job_kind

        r = patient_redis(settings, REDIS_PATIENCE_S)
        try:
            return perform_job(job_id, worker_name, JobStore(r, settings.prefix),
                               Fleet(r, settings.prefix, settings.worker_timeout), run_job_kind,
                               settings, attempt=_given_attempt(attempt))
        finally:
            r.close()

    @celery.task(name=RUN_PACK_TASK)
    def run_pack(label: str, job_ids: list[str], worker_name: str,
                 attempts: dict[str, int] | None = None) -> dict[str, str]:
        from gpuworker.packs import perform_pack

        r = patient_redis(settings, REDIS_PATIENCE_S)
        try:
            return perform_pack(label, list(job_ids), worker_name, JobStore(r, settings.prefix),
                                Fleet(r, settings.prefix, settings.worker_timeout), settings,
                                attempts=attempts)
        finally:
            r.close()
