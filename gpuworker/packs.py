"""The bookkeeping of a pack: a sweep's trials trained together in one task over one base model.

The dispatcher assigns every trial of a pack to this worker and sends one task with their ids
(dispatcher.schedule.scheduler). `perform_pack` does for each trial what `perform_job` does
for a job alone (the fence, `running`, events, the outcome), and calls the engine's `run_pack`
once for all of them. Each trial ends the moment its own lane does (a stop, early stopping,
`stop_at_loss`, its last step); the others train on.

A failure of the pack itself ends every trial still training: out of the card's memory, the
trials go back to the queue with a pack size of half as many (down to one: a trial that does
not fit alone fails as it would alone), resuming from their checkpoints; anything else fails
them with its reason. A process that dies is the task_failure handler's (tasks.py): every
trial not yet ended is re-queued, and resumes from its checkpoint in whatever pack it joins.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState, TransitionError, WorkerState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.requeue import requeue_free
from dispatcher.settings import Settings
from gpuworker.errors import EngineError
from gpuworker.jobs import resume_point
from gpuworker.tasks import (
    JobFenced,
    JobRun,
    check_lora_owner,
    folder_run,
    record_failure,
    record_result,
    release_memory,
    start_job,
)

log = logging.getLogger("lorafleet.worker")


class PackTrial:
    """One trial's callbacks inside a pack: a JobRun whose fence ends this trial alone. A
    trial whose job is no longer this worker's (moved away, re-queued) leaves the pack at once
    and writes nothing more, not to its record nor to its LoRA folder: its report raises an
    EngineError, which ends only its lane, unsaved."""

    def __init__(self, job: JobRun):
        self.job = job
        self.ended = False  # its outcome is recorded (or it is not ours to record)
        self.fenced = False

    def _fence(self, why: str) -> None:
        self.fenced = True
        log.warning("%s", why)
        raise EngineError(why)

    def progress(self, event: dict[str, Any]) -> None:
        if self.fenced:
            self._fence(f"job {self.job.job_id} is no longer on {self.job.worker_name}")
        try:
            self.job.progress(event)
        except JobFenced as e:
            self._fence(str(e))

    def should_stop(self) -> bool:
        if self.fenced:
            self._fence(f"job {self.job.job_id} was moved away from {self.job.worker_name}")
        try:
            return self.job.should_stop()
        except JobFenced as e:
            self._fence(str(e))
            raise  # (not reached: _fence raises)

    def on_result(self, result: Any) -> None:
        """The engine's result for this trial (a dict), or its EngineError. Left unrecorded
        when recording fails (Redis away too long): perform_pack settles it at the end."""
        if self.fenced:
            self.ended = True
            return
        try:
            if isinstance(result, Exception):
                record_failure(self.job, result)
            else:
                record_result(self.job, result)
        except JobFenced as e:
            log.warning("%s", e)
        self.ended = True


def perform_pack(label: str, job_ids: list[str], worker_name: str, store: JobStore,
                 fleet: Fleet, settings: Settings,
                 attempts: dict[str, int] | None = None) -> dict[str, str]:
    """Train the trials `job_ids` together, each at the attempt `attempts` names (the one it
    was assigned in this pack; see start_job); returns each started trial's end state."""
    started: list[tuple[str, dict[str, Any]]] = []
    for job_id in job_ids:
        given = (attempts or {}).get(job_id)
        rec = start_job(store, job_id, worker_name, None if given is None else int(given))
        if rec is not None:
            started.append((job_id, rec))
    if not started:
        return {}
    ids = [j for j, _ in started]
    fleet.heartbeat(worker_name, state=WorkerState.BUSY.value, job=ids[0], jobs=",".join(ids),
                    pack=label, job_pid=os.getpid())
    trials: dict[str, PackTrial] = {}
    try:
        members = []
        for job_id, rec in started:
            job = JobRun(store, job_id, worker_name, rec)
            try:
                check_lora_owner(store, rec, settings)
                member = _member(job, rec, settings)
            except Exception as e:  # this trial alone cannot run
                record_failure(job, e)
                continue
            trials[job_id] = member[0]
            members.append(member[1])
        if members:
            _run(members, trials, store, worker_name)
    finally:
        fleet.heartbeat(worker_name, state=WorkerState.IDLE.value, job="", jobs="", pack="",
                        job_pid="")
        release_memory()
    return {j: str(store.r.hget(store.key(j), "state") or "") for j in ids}


def _member(job: JobRun, rec: dict[str, Any], settings: Settings) -> tuple[PackTrial, Any]:
    from dispatcher.jobs.specs import spec_from_dict
    from gpuworker.engine.boundary import config_from_spec
    from gpuworker.engine.report import Report
    from gpuworker.engine.train_pack import PackMember

    spec = spec_from_dict(rec["spec"], "train")
    trial = PackTrial(job)
    others = [j for j in (rec.get("pack_jobs") or "").split(",") if j and j != job.job_id]
    job.log(f"training in {_pack_words(rec, others)}")
    resume = resume_point(spec.resume_from_checkpoint, folder_run(job.attempt, rec), job.log)
    report = Report(progress=trial.progress, should_stop=trial.should_stop, log=job.log)
    cfg = replace(config_from_spec(spec, settings.paths), job_id=job.job_id)
    return trial, PackMember(cfg, report, trial.on_result, resume_from=resume)


def _pack_words(rec: dict[str, Any], others: list[str]) -> str:
    return (f"pack {rec.get('pack') or '?'} of sweep {rec.get('sweep')}, together with "
            f"{len(others)} other trial{'s' if len(others) != 1 else ''} ({', '.join(others)})")


def _run(members: list[Any], trials: dict[str, PackTrial], store: JobStore,
         worker_name: str) -> None:
    from gpuworker.engine.cleanup import OutOfGpuMemory
    from gpuworker.engine.train_pack import run_pack

    try:
        run_pack(members)
    except OutOfGpuMemory as e:
        left = [j for j, t in trials.items() if not t.ended and not t.fenced]
        if len(left) > 1:
            _split(store, [trials[j].job for j in left], worker_name, str(e))
            return
        for job_id in left:
            record_failure(trials[job_id].job, e)
    except Exception as e:  # the pack itself failed: each trial still training ends with it
        log.exception("pack on %s failed", worker_name)
        for t in trials.values():
            if not t.ended and not t.fenced:
                record_failure(t.job, e)
    # A trial the engine ended but whose outcome could not be recorded, or (defensively) one
    # it never ended: failed now; should that fail too, the task fails and its task_failure
    # handler re-queues whatever is still running here.
    for t in trials.values():
        if not t.ended and not t.fenced and t.job.still_mine():
            record_failure(t.job,
                           RuntimeError("the pack ended without recording this trial's result"))


def _split(store: JobStore, left: list[JobRun], worker_name: str, why: str) -> None:
    """The pack did not fit: its unfinished trials go back to the queue in packs of half as
    many, to resume from their checkpoints. Each change is fenced on the trial's run (its
    worker and attempt): a trial given to another run meanwhile is left alone."""
    size = max(1, len(left) // 2)
    what = f"{why.split(':')[0]} in a pack of {len(left)} on {worker_name}"
    for job in left:
        job_id = job.job_id
        try:
            # Not the job's fault: the re-assignment does not count against its attempts; a
            # trial being stopped ends here.
            requeue_free(store, job_id, "pack_splits",
                         f"{what}: re-queued to train in packs of at most {size}",
                         stopped=f"{what} (its last checkpoint, if any, stays)", pack_max=size,
                         expect_worker=job.worker_name, expect_attempt=job.attempt,
                         expect_state=JobState.RUNNING)
        except TransitionError as e:
            log.warning("job %s: %s", job_id, e)
