"""A LoRA folder is one job's at a time, and a job is one run's at a time, in a real fleet (real
Redis, dispatcher and worker processes training the tiny model; review15 H1, H2):

  - two jobs with one lora_name and two workers: the dispatcher holds the second back until
    the first has ended, and nothing of the first one's folder is touched meanwhile;
  - a worker's main process killed alone (its training child dies with it: Celery's pool
    children get SIGKILL when their parent dies) and restarted under its name: the job's new
    attempt succeeds, and nothing of attempt 1 comes after attempt 2's first event.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.faultkit import SLOW, TERMINAL, checkpoints, events, last_step, submit

pytestmark = pytest.mark.integration


def test_a_second_job_on_a_lora_in_training_waits_for_it_and_leaves_its_files(fleet_factory):
    """Two workers, two jobs training into one LoRA: the dispatcher holds the second back
    (with its reason) while the first trains, touching none of its files; once the first has
    ended, the second runs. (A process that reaches a folder another holds is refused by the
    folder's lock itself: tests/unit/test_lora_lock.py.)"""
    f = fleet_factory(workers=("a", "b"))
    lora = "lock-shared"
    first = submit(f, lora_name=lora, epochs=60, save_steps=4, **SLOW)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, first) >= 6, 90,
               "the first job to train and save a checkpoint")
    folder = f.settings.paths.loras / lora
    params = (folder / "training_parameters.json").read_bytes()

    second = submit(f, lora_name=lora, epochs=1, always_override=True)
    waiting = f"waiting: loras/{lora} is being trained by job {first}"
    f.wait_for(lambda: f.store.get(second).get("reason") == waiting, 30, "the second to wait")
    time.sleep(3)  # a worker idle all the while: still held back
    assert f.store.get(second)["state"] == "queued"
    assert f.store.get(first)["state"] == "running"
    # Nothing of the first's was moved aside, cleared or overwritten by the second.
    assert not [p.name for p in folder.iterdir() if p.name.startswith("backup-")]
    assert (folder / "training_parameters.json").read_bytes() == params

    # The first goes on undisturbed: stopped, it saves its LoRA and ends as a stop ends;
    # then the second trains.
    f.store.cancel(first)
    rec = f.wait_for_state(first, TERMINAL, 90)
    assert rec["state"] == "cancelled" and "the incomplete LoRA was saved" in rec["reason"]
    steps = [e["step"] for e in events(f, first) if e["type"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
    rec = f.wait_for_state(second, TERMINAL, 120)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert (folder / "adapter_model.safetensors").is_file()


def test_a_worker_main_process_killed_alone_the_job_runs_again_and_nothing_interleaves(
        fleet_factory):
    """kill -9 of the worker's main process alone. Its training child does not live on as an
    orphan: Celery's prefork pool has the kernel send its children SIGKILL when the main
    process dies (PR_SET_PDEATHSIG), and the test checks that this still holds (if it ever
    stops holding, the orphan's writes are fenced on its attempt: tests/unit/test_job_fence.py
    runs such an orphan's calls). The worker restarts under its name and gives the job back;
    the job runs again on it (attempt 2): every event of attempt 1 comes before attempt 2's
    first, and the job succeeds."""
    f = fleet_factory(workers=("a",))
    lora = "lock-orphan"
    job = submit(f, lora_name=lora, epochs=60, save_steps=4, **SLOW)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= 6, 90, "a checkpoint")
    children = f.children("worker-a")
    assert children, "the worker has no pool child"
    main = f.procs.pop("worker-a")
    os.kill(main.pid, signal.SIGKILL)  # the main process only
    main.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)], "a pool child outlived its worker"
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


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115, PTH123
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

