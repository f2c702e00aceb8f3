"""A run takes its LoRA folder's lock before it reads anything there (review15b): what it builds
on is the folder as a process that died left it complete, a stop asked for while it waits for
the lock is obeyed without touching the folder (alone and in a pack, for any trial of the pack),
a folder turned into a link while it waited is not written through, a worker's clear is waited
for, and a job whose folder stays locked goes back to the queue instead of failing. Real
processes hold the locks, the real engine trains the tiny model, on a real Redis."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.access.owners import Owners, lora_rel
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.schedule.requeue import Crashed, settle
from dispatcher.settings import DataPaths, Settings
from gpuworker.engine import folder as engine_folder
from gpuworker.engine.boundary import config_from_spec, train
from gpuworker.engine.report import Report
from gpuworker.engine.train_pack import PackMember, run_pack
from gpuworker.errors import EngineError
from gpuworker.folderlock import LOCK_NAME
from gpuworker.jobs import run_job_kind
from gpuworker.tasks import LOCK_REQUEUES, perform_job
from tests.unit.test_engine import (  # noqa: F401
    Recorder,
    lora_weights,
    make_spec,
    paths,
    tiny_model_dir,
)
from tests.unit.test_lora_lock import hold, kill, snapshot

WAITING = "held by an earlier run of this job"


class Waiter(Recorder):
    """A job's callbacks that call `on_wait` once, the first time the run logs that it waits
    for its folder's earlier run, and answer `should_stop` with `stop_when_waiting` from then."""

    def __init__(self, on_wait=lambda: None, stop_when_waiting: bool = False):
        super().__init__()
        self.on_wait, self.stop_when_waiting = on_wait, stop_when_waiting
        self.waiting = False

    def log(self, line: str) -> None:
        self.lines.append(line)
        if WAITING in line and not self.waiting:
            self.waiting = True
            self.on_wait()

    def should_stop(self) -> bool:
        return (self.stop_when_waiting and self.waiting) or super().should_stop()

    def train(self, spec: Any, paths: DataPaths, **kw: Any) -> dict[str, Any]:  # noqa: F811
        return train(spec, paths, self.progress, self.should_stop, self.log, device="cpu", **kw)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = lora_weights(a), lora_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- H1: lock, then read


def test_a_run_continues_the_final_save_a_killed_process_had_made(paths):  # noqa: F811
    """A process killed inside its final save, after the first of its renames: the new
    adapter_config.json is in place, the new weights and training_log.json still in
    .complete-save/. A run continuing the LoRA builds on the whole new set (its weights, its
    steps), and its backup holds that set: the folder is tidied before it is read."""
    folder = paths.loras / "tiny-lora"
    Recorder().run(make_spec(epochs=1), paths)  # the LoRA as it was: 6 steps
    Recorder().run(make_spec(lora_name="new", epochs=2, seed=7), paths)  # the set being saved
    new = paths.loras / "new"
    assert json.loads((new / "training_log.json").read_text())["current_steps"] == 12
    done = folder / ".complete-save"
    done.mkdir()
    for name in ("adapter_model.safetensors", "training_log.json"):
        shutil.copy2(new / name, done / name)
    shutil.copy2(new / "adapter_config.json", folder / "adapter_config.json")  # renamed first
    assert not same_weights(folder, new)

    # Learning rate 0: the continued weights come out as they went in.
    rec = Recorder()
    result = rec.run(make_spec(epochs=0.5, learning_rate="0", lr_scheduler_type="constant"),
                     paths)
    assert result["continues"] == {"lora": "tiny-lora", "step": 12}
    assert same_weights(folder, new)
    backup = next(p for p in folder.iterdir() if p.name.startswith("backup-"))
    assert json.loads((backup / "training_log.json").read_text())["current_steps"] == 12
    assert same_weights(backup, new)
    assert any("Finished the final save" in line for line in rec.lines), rec.lines


@pytest.mark.parametrize("resume_from", ["latest", "checkpoint-3"])
def test_a_run_resumes_from_a_checkpoint_a_killed_replace_had_set_aside(paths,  # noqa: F811
                                                                         resume_from):
    """A process killed while replacing checkpoint-3 (renamed to .old-checkpoint-3, its
    successor not yet in place): a resume finds checkpoint-3 put back and carries on from it,
    instead of "not found" (named) or starting from scratch and then moving it into a backup
    (latest)."""
    folder = paths.loras / "tiny-lora"
    Recorder(stop_after=3).run(make_spec(epochs=1), paths)
    (folder / "checkpoint-3").rename(folder / ".old-checkpoint-3")
    rec = Waiter()
    result = rec.train(make_spec(epochs=1), paths, resume_from=resume_from)
    assert result["resumed_from"] == "checkpoint-3"
    assert [e["step"] for e in rec.of("train")] == [4, 5, 6]
    assert (folder / "checkpoint-3").is_dir()
    assert not [p for p in folder.iterdir() if p.name.startswith("backup-")]


# --------------------------------------------------------------------------- M3: stop while waiting


def test_a_stop_asked_for_while_waiting_for_the_folder_ends_the_run_untouched(paths):  # noqa: F811
    """The folder is held by an earlier run of the job (fenced out, finishing a save); the
    user stops the job while the new run waits for it. The run ends stopped at once, saving
    nothing and touching nothing of the folder (the earlier run's staging included), while the
    earlier run still holds it."""
    folder = paths.loras / "tiny-lora"
    holder = hold(folder, "job-1")
    try:
        (folder / "notes.txt").write_text("mine")
        before = snapshot(folder)
        # (Should the run not stop, the holder goes after a while, and the run trains.)
        rec = Waiter(on_wait=lambda: threading.Timer(6.0, kill, [holder]).start(),
                     stop_when_waiting=True)
        result = rec.train(make_spec(epochs=1), paths, job_id="job-1")
        holder_alive = holder.poll() is None
        after = snapshot(folder)
    finally:
        kill(holder)
    assert result["stopped"] and not result["saved"], result
    assert result["reason"] == "stopped while waiting for the LoRA folder"
    assert holder_alive and after == before
    assert not rec.of("train")


# --------------------------------------------------------------------------- M6: packs


TRIAL = dict(eval_dataset="heldout.json", eval_steps=2, epochs=2, target_modules=["q", "v"])


@pytest.mark.parametrize("stopping", ["a", "b"])
def test_a_pack_waiting_for_a_trials_folder_answers_every_trials_stop(paths,  # noqa: F811
                                                                      stopping):
    """Trial a's folder is held by an earlier run of a's job; the pack waits for it. A stop
    asked for meanwhile, of the waiting trial (a) or of another (b), is answered at once (not
    once the wait ends, after the worker's watchdog would have killed the pack): that trial
    leaves the pack unsaved, its folder untouched; the other trains to its end."""
    folder_a = paths.loras / "a"
    holder = hold(folder_a, "job-a")
    (folder_a / "notes.txt").write_text("mine")
    before = snapshot(folder_a)
    waiting = threading.Event()
    results: dict[str, Any] = {}
    alive_at: dict[str, bool] = {}

    def start_wait() -> None:
        waiting.set()
        threading.Timer(6.0, kill, [holder]).start()

    recs = {"a": Waiter(on_wait=start_wait, stop_when_waiting=stopping == "a"),
            "b": Waiter()}
    if stopping == "b":
        recs["b"].should_stop = waiting.is_set  # type: ignore[method-assign]

    def got(name: str, result: Any) -> None:
        results[name] = result
        alive_at[name] = holder.poll() is None

    members = [PackMember(replace(config_from_spec(make_spec(lora_name=n, lora_rank=r, **TRIAL),
                                                   paths), job_id=f"job-{n}"),
                          Report(recs[n].progress, recs[n].should_stop, recs[n].log),
                          on_result=lambda res, n=n: got(n, res))
               for n, r in (("a", 8), ("b", 4))]
    try:
        run_pack(members, device="cpu")
        after = snapshot(folder_a) if stopping == "a" else None
    finally:
        kill(holder)
    other = "b" if stopping == "a" else "a"
    stopped = results[stopping]
    assert alive_at[stopping], "the stop was answered only once the wait was over"
    assert not isinstance(stopped, Exception), stopped
    assert stopped["stopped"] and not stopped["saved"]
    assert stopped["reason"] == "stopped while waiting for the LoRA folder"
    assert not recs[stopping].of("train")
    if stopping == "a":
        assert after == before
    else:
        assert not (paths.loras / "b").exists()  # its folder was never taken
    done = results[other]
    assert not isinstance(done, Exception), done
    assert done["saved"] and done["steps"] == done["total_steps"] == 12
    assert (paths.loras / other / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- L7: links


def test_a_folder_swapped_for_a_link_while_the_run_waited_is_not_written_through(
        paths, tmp_path):  # noqa: F811
    """While the run waits for its folder's lock, loras/tiny-lora is moved away and a link to a
    folder outside the data folder put in its place. The lock the run then takes is the link's
    target's; the run refuses it, naming the link, and the outside folder is left as it was
    (its hidden staging-like folder not cleared, no lock file left)."""
    folder = paths.loras / "tiny-lora"
    outside = tmp_path / "outside"
    (outside / ".saving-q").mkdir(parents=True)
    (outside / "notes.txt").write_text("someone's")
    before = snapshot(outside)
    holder = hold(folder, "job-1")

    def swap() -> None:
        folder.rename(paths.loras / ".moved-away")
        folder.symlink_to(outside)

    try:
        rec = Waiter(on_wait=swap)
        with pytest.raises(EngineError, match="loras/tiny-lora is a link"):
            rec.train(make_spec(epochs=1), paths, job_id="job-1")
    finally:
        kill(holder)
    assert snapshot(outside) == before and not (outside / LOCK_NAME).exists()


def test_the_workers_clear_does_not_follow_a_link_put_in_place_before_its_lock(
        tmp_path, redis_server, redis_client, prefix, monkeypatch):
    """The worker clearing a dead process's leftovers: loras/<name> becomes a link out of the
    data folder between the worker's check and its lock (injected there, the real lock taken
    after it): the worker clears nothing through it."""
    from dispatcher.jobs.store import JobStore
    from gpuworker import tasks
    from tests.unit.test_lora_lock import running

    settings = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    settings.paths.ensure()
    folder = settings.paths.loras / "swapped"
    (folder / ".saving-x").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / ".saving-q").mkdir(parents=True)
    real = tasks.try_lock

    def swapped_first(lora_dir: Path, holder: dict[str, Any]) -> Any:
        folder.rename(settings.paths.loras / ".moved-away")
        folder.symlink_to(outside)
        return real(lora_dir, holder)

    monkeypatch.setattr(tasks, "try_lock", swapped_first)
    job = running(JobStore(redis_client, prefix), "swapped")
    assert tasks.requeue_after_crash(settings, job, "w1", "the process died") == "retrying"
    assert (outside / ".saving-q").is_dir() and not (outside / LOCK_NAME).exists()


# --------------------------------------------------------------------------- L10: a clear


def test_a_run_waits_for_the_workers_clear_of_its_folder(paths):  # noqa: F811
    """The worker clearing what a dead process left (a large staging folder: longer than a
    moment) holds the folder's lock under another job's id: the run waits for the clear, saying
    so, instead of failing as if another job trained there; then it trains."""
    folder = paths.loras / "tiny-lora"
    holder = hold(folder, "other-job", doing="clearing")
    # Longer than the 5 s the run used to give a holder that did not say it trained.
    release = threading.Timer(8.0, kill, [holder])

    class Timed(Waiter):
        timing = False

        def should_stop(self) -> bool:  # first asked once the run is at its folder
            if not self.timing:
                self.timing = True
                release.start()
            return False

    rec = Timed()
    try:
        result = rec.train(make_spec(epochs=1), paths)
    finally:
        kill(holder)
    assert result["saved"] and result["steps"] == 6
    assert any("is being cleared of what an interrupted process left" in line
               for line in rec.lines), rec.lines


# --------------------------------------------------------------------------- M5c: re-queued


def test_a_job_whose_folder_stays_locked_is_requeued_without_counting_an_attempt(
        paths, store, monkeypatch):  # noqa: F811
    """A job's LoRA folder is held by another job's process that the dispatcher no longer
    counts as training it (an orphan whose job was moved away), longer than the run waits: the
    job goes back to the queue, not to `failed`, and the refused attempt is not counted: its
    next run does not take the folder's earlier checkpoint for its own (it continues the
    LoRA), and the crash policy gives it its full attempts. After LOCK_REQUEUES such re-queues
    it fails, saying so."""
    monkeypatch.setattr(engine_folder, "OTHER_HOLDER_WAIT_S", 1.0)
    settings = Settings(home=paths.home, redis_url="", prefix=store.p)
    fleet = Fleet(store.r, store.p)
    # The folder as an earlier job of the same owner left it: stopped at step 3, a
    # checkpoint of that job's settings.
    Recorder(stop_after=3).run(make_spec(epochs=1), paths)
    Owners(store.r, store.p).claim(lora_rel("tiny-lora"), "local")
    job = store.create("train", make_spec(epochs=1, seed=9).to_dict())

    def attempt(n: int) -> str:
        store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=n)
        return perform_job(job, "w1", store, fleet, run_job_kind, settings)

    holder = hold(paths.loras / "tiny-lora", "orphaned-job")
    try:
        assert attempt(1) == "retrying", store.get(job)["reason"]
    finally:
        kill(holder)
    rec = store.get(job)
    assert rec["worker"] == "" and rec["lock_requeues"] == 1
    assert rec["reason"].startswith("loras/tiny-lora is being trained by another job "
                                    "(orphaned-job)")
    assert rec["reason"].endswith("; re-queued (not counted as an attempt)")

    assert attempt(2) == "succeeded", store.get(job)["reason"]
    lines = [e["line"] for _, e in store.events.history(job) if e["type"] == "log"]
    assert not any("resuming from this job's latest checkpoint" in line for line in lines)
    assert store.get(job)["result"]["continues"] == {"lora": "tiny-lora", "step": 3}

    # The crash policy: attempt 3 counts as the job's second (one of them was the lock's).
    other = store.create("train", make_spec(lora_name="other").to_dict())
    store.transition(other, JobState.ASSIGNED, "a", worker="w1", attempt=3)
    store.transition(other, JobState.RUNNING, "r", lock_requeues=1)
    assert settle(store, other, 3, Crashed("died"), expect_worker="w1") == JobState.RETRYING

    # Re-queued LOCK_REQUEUES times already: the next refusal fails the job.
    last = store.create("train", make_spec(epochs=1).to_dict(),
                        fields={"lock_requeues": LOCK_REQUEUES})
    store.transition(last, JobState.ASSIGNED, "a", worker="w1", attempt=LOCK_REQUEUES + 1)
    holder = hold(paths.loras / "tiny-lora", "orphaned-job")
    try:
        assert perform_job(last, "w1", store, fleet, run_job_kind, settings) == "failed"
    finally:
        kill(holder)
    assert store.get(last)["reason"].endswith(
        f"it was re-queued {LOCK_REQUEUES} times for this already: run the job again once "
        "that process has ended")


def test_a_retried_job_resumes_only_a_checkpoint_of_its_own(paths, store):  # noqa: F811
    """An attempt can be counted without the job having trained (the dispatcher re-queues a
    job whose message never reached its worker). Its next run resumes only a checkpoint that
    this job wrote: one an earlier job of the same LoRA left is that job's run, and the job
    continues the LoRA as its first attempt would. Its own checkpoint is resumed."""
    settings = Settings(home=paths.home, redis_url="", prefix=store.p)
    fleet = Fleet(store.r, store.p)
    Owners(store.r, store.p).claim(lora_rel("tiny-lora"), "local")
    earlier = store.create("train", make_spec(epochs=1).to_dict())
    store.transition(earlier, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    stops = Recorder(stop_after=3)
    store.transition(earlier, JobState.RUNNING, "r")
    result = run_job_kind("train", store.get(earlier)["spec"], settings, job_id=earlier,
                          attempt=1, progress=stops.progress, should_stop=stops.should_stop,
                          log=stops.lines.append)
    assert result["stopped"] and (paths.loras / "tiny-lora" / "checkpoint-3").is_dir()
    state = json.loads((paths.loras / "tiny-lora" / "checkpoint-3" / "training_state.json")
                       .read_text())
    assert state["job"] == earlier

    # Another job of the same LoRA, at attempt 2 without ever having run.
    job = store.create("train", make_spec(epochs=1, seed=9).to_dict())
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    assert perform_job(job, "w1", store, fleet, run_job_kind, settings) == "succeeded"
    lines = [e["line"] for _, e in store.events.history(job) if e["type"] == "log"]
    assert any("No checkpoint of this job's earlier attempts" in line for line in lines)
    assert store.get(job)["result"]["continues"] == {"lora": "tiny-lora", "step": 3}
    assert not store.get(job)["result"].get("resumed_from")

    # The earlier job's own retry (its checkpoint was moved to the backup by the run above,
    # so give it one of its own again): it resumes it.
    again = store.create("train", make_spec(lora_name="again", epochs=1).to_dict())
    Owners(store.r, store.p).claim(lora_rel("again"), "local")
    store.transition(again, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(again, JobState.RUNNING, "r")
    stops = Recorder(stop_after=2)
    run_job_kind("train", store.get(again)["spec"], settings, job_id=again, attempt=1,
                 progress=stops.progress, should_stop=stops.should_stop, log=stops.lines.append)
    store.transition(again, JobState.RETRYING, "died", expect_worker="w1")
    store.transition(again, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    assert perform_job(again, "w1", store, fleet, run_job_kind, settings) == "succeeded"
    assert store.get(again)["result"]["resumed_from"] == "checkpoint-2"
