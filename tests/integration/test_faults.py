"""Nothing is lost when a worker fails: kill -9 of a worker or of its training child, and a
worker restarted under its old name, in a real fleet (real Redis server, dispatcher and worker
processes that really train a tiny model on the CPU; no mocks). The fleet-wide faults (Redis
restart, two dispatchers, 500 queued jobs) are in test_faults_fleet.py.

Each test starts its own processes (its own key prefix and data folder) and is bounded in time:
every wait has a deadline, and a process that dies while a test waits fails it with its log.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from dispatcher.jobs.fleet import Fleet
from tests.faultkit import (
    SLOW,
    TERMINAL,
    assert_no_duplicate_delivery,
    checkpoints,
    events,
    last_step,
    run_workers,
    states,
    submit,
)

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------
def test_kill_worker_mid_training_resumes_on_the_other_worker(fleet_factory):
    """kill -9 of a worker's whole process group (main process and the training child) after a
    checkpoint: the dispatcher notices the missing heartbeats, the job goes `retrying`, runs
    on the other worker, resumes from the newest checkpoint written before the kill (steps
    continue at checkpoint + 1, the steps between that checkpoint and the kill are trained
    twice, none is missing), succeeds and leaves the final LoRA. The two runs never overlap."""
    f = fleet_factory(workers=("a", "b"))
    lora = "fault-kill-worker"
    job = submit(f, lora_name=lora, epochs=120, save_steps=10, **SLOW)
    rec = f.wait_for_state(job, ("running",) + TERMINAL, 60)
    assert rec["state"] == "running"
    first = rec["worker"]
    other = ({"a", "b"} - {first}).pop()
    # Past a checkpoint and a couple of steps beyond it, so some steps will run twice.
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= checkpoints(f, lora)[-1] + 2,
               90, "a checkpoint and two more steps")
    saved_before_kill = checkpoints(f, lora)[-1]
    killed_at = time.monotonic()
    f.kill(f"worker-{first}", signal.SIGKILL)
    step_at_kill = last_step(f, job)

    f.wait_for(lambda: "retrying" in states(f, job), 30, "the job to be re-queued")
    hist = f.store.history(job)
    retry = next(h for h in hist if h["state"] == "retrying")
    assert f"worker {first} stopped answering" in retry["reason"]
    # Heartbeat timeout 6 s, dispatcher tick 0.5 s: noticed well within a few heartbeats.
    assert time.monotonic() - killed_at < 20

    rec = f.wait_for_state(job, TERMINAL, 120)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert rec["worker"] == other and rec["attempt"] == 2
    assert states(f, job) == ["queued", "assigned", "running", "retrying", "assigned",
                              "running", "succeeded"]
    assert run_workers(f, job) == [first, other]

    evs = events(f, job)
    cut = next(i for i, e in enumerate(evs) if e["type"] == "state" and e["state"] == "retrying")
    before = [e["step"] for e in evs[:cut] if e["type"] == "train"]
    after = [e["step"] for e in evs[cut:] if e["type"] == "train"]
    total = rec["total_steps"]
    assert total == 120
    # The first run: 1..k without a gap, killed at k (>= what we saw just after the kill).
    k = before[-1]
    assert before == list(range(1, k + 1)) and k >= step_at_kill >= saved_before_kill + 2
    # The second run: from its checkpoint + 1 to the end, without a gap.
    resumed = after[0] - 1
    assert after == list(range(resumed + 1, total + 1))
    assert resumed % 10 == 0 and saved_before_kill <= resumed <= k
    assert rec["result"]["resumed_from"] == f"checkpoint-{resumed}"
    # Every step at least once; exactly the steps after the checkpoint up to the kill twice.
    counts = Counter(before + after)
    assert set(counts) == set(range(1, total + 1))
    assert sorted(s for s, n in counts.items() if n == 2) == list(range(resumed + 1, k + 1))
    assert max(counts.values()) <= 2
    # No overlap: the killed run wrote nothing after the job was taken from it.
    running_again = max(i for i, e in enumerate(evs)
                        if e["type"] == "state" and e["state"] == "running")
    assert all(e["type"] != "train" for e in evs[cut:running_again])

    out = f.settings.paths.loras / lora
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "training_log.json").is_file()
    assert_no_duplicate_delivery(f)


def test_kill_training_child_requeues_through_task_failure(fleet_factory):
    """kill -9 of only the Celery child that trains: the worker's main process survives, its
    task_failure handler marks the job `retrying` at once (long before the heartbeat timeout
    would), and the job runs again, resumes from its checkpoint and succeeds."""
    f = fleet_factory(workers=("a", "b"))
    lora = "fault-kill-child"
    job = submit(f, lora_name=lora, epochs=60, save_steps=10, **SLOW)
    rec = f.wait_for_state(job, ("running",) + TERMINAL, 60)
    assert rec["state"] == "running"
    first = rec["worker"]
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= checkpoints(f, lora)[-1] + 1,
               90, "a checkpoint")
    kids = f.children(f"worker-{first}")
    assert len(kids) == 1, kids  # concurrency 1: one pool process, the one training
    killed_at = time.monotonic()
    os.kill(kids[0], signal.SIGKILL)
    f.wait_for(lambda: "retrying" in states(f, job), 10, "the job to be re-queued")
    # task_failure re-queued it (its reason), before the dispatcher's heartbeat check (6 s)
    # could have.
    assert time.monotonic() - killed_at < 6
    retry = next(h for h in f.store.history(job) if h["state"] == "retrying")
    assert f"the training process on {first} died" in retry["reason"]

    rec = f.wait_for_state(job, TERMINAL, 120)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert rec["attempt"] == 2
    assert states(f, job) == ["queued", "assigned", "running", "retrying", "assigned",
                              "running", "succeeded"]
    assert rec["result"]["resumed_from"].startswith("checkpoint-")
    steps = [e["step"] for e in events(f, job) if e["type"] == "train"]
    assert set(steps) == set(range(1, rec["total_steps"] + 1))
    # The worker whose child died is still up and heartbeating.
    assert f.procs[f"worker-{first}"].poll() is None
    assert first in {w["name"] for w in Fleet(f.r, f.prefix, timeout=6).alive()}
    assert_no_duplicate_delivery(f)


def test_worker_restarted_under_the_same_name_gives_its_job_back(fleet_factory):
    """kill -9 of the only worker and an immediate restart under the same name (what a
    supervisor or `restart: unless-stopped` does), faster than the heartbeat timeout: the new
    process re-queues the job it cannot be running, and the job resumes and succeeds."""
    f = fleet_factory(workers=("a",))
    lora = "fault-restart"
    job = submit(f, lora_name=lora, epochs=60, save_steps=10, **SLOW)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= checkpoints(f, lora)[-1] + 1,
               90, "a checkpoint")
    f.kill("worker-a", signal.SIGKILL)
    f.start_worker("a")
    rec = f.wait_for_state(job, TERMINAL, 120)
    assert rec["state"] == "succeeded", rec.get("reason")
    retry = next(h for h in f.store.history(job) if h["state"] == "retrying")
    assert "worker a restarted" in retry["reason"]
    assert states(f, job) == ["queued", "assigned", "running", "retrying", "assigned",
                              "running", "succeeded"]
    assert rec["result"]["resumed_from"].startswith("checkpoint-")
