"""A LoRA folder is one job's at a time, and a job is one run's at a time, in a real fleet (real
Redis, dispatcher and worker processes training the tiny model; review15 H1, H2):

  - two jobs with one lora_name on two workers: the second is refused at once, naming the
    LoRA, and writes nothing into the first one's folder;
  - a worker's main process killed alone (its training child lives on, an orphan) and
    restarted under its name: the job's new attempt succeeds, and the orphan, fenced out,
    writes nothing more to the job.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.faultkit import SLOW, TERMINAL, checkpoints, events, last_step, submit

pytestmark = pytest.mark.integration


def test_a_second_job_on_a_lora_in_training_is_refused_and_leaves_its_files(fleet_factory):
    f = fleet_factory(workers=("a", "b"))
    lora = "lock-shared"
    first = submit(f, lora_name=lora, epochs=60, save_steps=4, **SLOW)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, first) >= 6, 90,
               "the first job to train and save a checkpoint")
    folder = f.settings.paths.loras / lora
    params = (folder / "training_parameters.json").read_bytes()

    second = submit(f, lora_name=lora, epochs=1, always_override=True)
    rec = f.wait_for_state(second, TERMINAL, 90)
    assert rec["state"] == "failed"
    assert rec["reason"].startswith(
        f"loras/{lora} is being trained by another job ({first}), pid "), rec["reason"]
    # Nothing of the first's was moved aside, cleared or overwritten by the second.
    assert not [p.name for p in folder.iterdir() if p.name.startswith("backup-")]
    assert (folder / "training_parameters.json").read_bytes() == params
    assert f.store.get(first)["state"] == "running"
    lines = [e.get("line", "") for e in events(f, second) if e["type"] == "log"]
    assert not [x for x in lines if "Removed" in x or "Copied" in x or "Moved" in x], lines

    # The first goes on undisturbed: stopped, it saves its LoRA and ends as a stop ends.
    f.store.cancel(first)
    rec = f.wait_for_state(first, TERMINAL, 90)
    assert rec["state"] == "cancelled" and "the incomplete LoRA was saved" in rec["reason"]
    steps = [e["step"] for e in events(f, first) if e["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
    assert (folder / "adapter_model.safetensors").is_file()


def test_an_orphaned_training_process_writes_nothing_to_its_jobs_new_attempt(fleet_factory):
    """kill -9 of the worker's main process alone: its Celery child goes on training as an
    orphan. The worker restarts under its name and gives the job back; the job runs again on
    it (attempt 2). The orphan is fenced out at its next step and writes nothing more: every
    event of attempt 1 comes before attempt 2's first, and the job succeeds."""
    f = fleet_factory(workers=("a",))
    lora = "lock-orphan"
    job = submit(f, lora_name=lora, epochs=60, save_steps=4, **SLOW)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= 6, 90, "a checkpoint")
    children = f.children("worker-a")
    assert children, "the worker has no pool child"
    main = f.procs.pop("worker-a")
    os.kill(main.pid, signal.SIGKILL)  # the main process only: its children live on
    main.wait(10)
    try:
        f.start_worker("a")
        rec = f.wait_for_state(job, TERMINAL, 180)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rec["state"] == "succeeded", rec.get("reason")
    assert rec["attempt"] == 2
    evs = events(f, job)
    first_of_2 = next(i for i, e in enumerate(evs) if e.get("attempt") == 2)
    late = [e for e in evs[first_of_2:] if e.get("attempt") == 1]
    assert late == [], late
    assert [e["type"] for e in evs[-2:]] == ["result", "state"]
