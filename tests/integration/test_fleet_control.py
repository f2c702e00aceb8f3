"""Cancel with a grace period, fair share and placement by memory, in a real fleet: a real
Redis, real dispatcher, CPU worker and dashboard processes that really train a tiny model.

Each test starts its own processes (key prefix, data folder) and every wait has a deadline;
jobs are trivially short (2 rows, cutoff 16, micro batch 1) unless a test needs one to run on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.specs import parse_train_spec
from dispatcher.schedule.estimate import job_memory_mb
from tests.fleetproc import FleetProcs, small_spec
from tests.tiny import make_tiny_model, write_tiny_dataset

pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "cancelled")
TRIVIAL = {"dataset": "two", "micro_batch_size": 1, "batch_size": 1, "cutoff_len": 16, "overlap_len": 8,
           "epochs": 1}
# Runs on for minutes: 24 rows, one optimizer step of 12 micro-batches per epoch.
LONG = {"micro_batch_size": 2, "batch_size": 24, "epochs": 300}
GRACE_S = 4


@pytest.fixture
def make_fleet(redis_server, tmp_path):
    made: list[FleetProcs] = []

    def make(env: dict[str, str] | None = None) -> FleetProcs:
        f = FleetProcs(tmp_path / f"home{len(made)}", redis_server,
                       prefix=f"fc{time.monotonic_ns()}")
        f.env["OMP_NUM_THREADS"] = "1"  # several trainers share a small CPU
        f.env.update(env or {})
        make_tiny_model(f.settings.paths.models / "tiny")
        write_tiny_dataset(f.settings.paths.datasets / "tiny.json")
        write_tiny_dataset(f.settings.paths.datasets / "two.json", n=2)
        f.start_dispatcher()
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


def spec(f: FleetProcs, **over) -> dict:
    return parse_train_spec(small_spec(**over), f.settings.paths).to_dict()


def submit(f: FleetProcs, owner: str = "tester", **over) -> str:
    s = spec(f, **over)
    return f.store.create("train", s, owner=owner,
                          gpu_memory_mb=job_memory_mb("train", s, f.settings.paths.models))


def states(f: FleetProcs, job: str) -> list[str]:
    return [h["state"] for h in f.store.history(job)]


def when(f: FleetProcs, job: str, state: str) -> float | None:
    """The time of the job's first transition to `state`."""
    return next((h["time"] for h in f.store.history(job) if h["state"] == state), None)


def run_workers(f: FleetProcs, job: str) -> list[str]:
    return [h["reason"].removeprefix("running on ") for h in f.store.history(job)
            if h["state"] == "running"]


def last_step(f: FleetProcs, job: str) -> int:
    steps = [e["step"] for _, e in f.store.events.history(job) if e["type"] == "train"]
    return max(steps, default=0)


def checkpoints(f: FleetProcs, lora: str) -> list[str]:
    return sorted(p.name for p in (f.settings.paths.loras / lora).glob("checkpoint-*"))


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------------------------
def test_cancel_kills_a_trainer_that_does_not_answer(make_fleet):
    """The training child is frozen with SIGSTOP mid-training (a trainer that cannot answer),
    then the job is cancelled through the REST API: within the grace period plus a heartbeat
    or two the worker's main process kills the child, the job ends `cancelled` with a reason
    saying so and naming the checkpoint that stays, it is not re-queued, and the same worker
    runs the next job."""
    f = make_fleet({"LORAFLEET_STOP_GRACE_S": str(GRACE_S)})
    f.start_worker("a")
    f.start_dashboard()
    f.wait_for_workers(1)
    lora = "grace-frozen"
    job = submit(f, lora_name=lora, save_steps=2, **LONG)
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, job) >= 3, 90,
               "a checkpoint and a step past it")
    kids = f.children("worker-a")
    assert len(kids) == 1, kids  # the pool's one process: the one training
    child = kids[0]
    assert int(f.r.hget(Fleet(f.r, f.prefix).key("a"), "job_pid")) == child
    os.kill(child, signal.SIGSTOP)
    frozen_at_step = last_step(f, job)

    cancelled_at = time.monotonic()
    resp = f.http.post(f"{f.url}/api/v1/jobs/{job}/cancel", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["stop_requested"] is True
    rec = f.wait_for_state(job, TERMINAL, GRACE_S + 15)
    took = time.monotonic() - cancelled_at
    assert rec["state"] == "cancelled", rec.get("reason")
    # Not before the grace period; within it plus two heartbeats (0.5 s here) and some slack.
    assert GRACE_S <= took < GRACE_S + 4, took
    saved = checkpoints(f, lora)[-1]
    assert rec["reason"] == (
        f"stopped by the user: the training process was killed after not answering the stop "
        f"request within {GRACE_S} s; the LoRA of its last checkpoint ({saved}) stays")
    f.wait_for(lambda: not alive(child), 10, "the frozen child to be gone")
    assert last_step(f, job) == frozen_at_step  # it never trained again
    assert (f.settings.paths.loras / lora / saved / "adapter_model.safetensors").is_file()

    # Celery saw its child die (task_failure) and left the cancelled job alone.
    f.wait_for(lambda: "not re-queued" in f.log("worker-a"), 15,
               "the task_failure handler to see the killed child")
    assert states(f, job) == ["queued", "assigned", "running", "cancelled"]
    assert f.store.get(job)["state"] == "cancelled"

    # The card is free and the worker takes the next job.
    nxt = submit(f, lora_name="grace-next", **TRIVIAL)
    rec = f.wait_for_state(nxt, TERMINAL, 90)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert run_workers(f, nxt) == ["a"]
    assert f.procs["worker-a"].poll() is None
    assert states(f, job) == ["queued", "assigned", "running", "cancelled"]


# ---------------------------------------------------------------------------------------------
def test_fair_share_a_second_users_jobs_go_before_the_first_users_backlog(make_fleet):
    """alice queues 20 jobs on two CPU workers; once she has used some worker time, bob queues
    2: his two jobs are the next two to start, before any of alice's remaining ones."""
    f = make_fleet()
    f.start_worker("a")
    f.start_worker("b")
    f.wait_for_workers(2)
    alice = [submit(f, "alice", lora_name=f"alice-{i}", **TRIVIAL) for i in range(20)]
    f.wait_for(lambda: sum(f.store.get(j)["state"] == "succeeded" for j in alice) >= 4, 150,
               "four of alice's jobs to finish")
    bob = [submit(f, "bob", lora_name=f"bob-{i}", **TRIVIAL) for i in range(2)]
    submitted = f.store.get(bob[1])["created"]
    waiting = [j for j in alice if f.store.get(j)["state"] == "queued"]
    assert len(waiting) >= 10  # alice still has a backlog when bob arrives

    for j in bob:
        rec = f.wait_for_state(j, TERMINAL, 120)
        assert rec["state"] == "succeeded", rec.get("reason")
    f.wait_for(lambda: any(when(f, j, "running") for j in waiting), 120,
               "one of alice's waiting jobs to start after bob's")
    for j in alice:
        f.store.cancel(j)
    f.wait_for(lambda: all(f.store.get(j)["state"] in TERMINAL for j in alice), 120,
               "alice's jobs to end")

    # A dispatcher pass that read the queue just before bob's jobs existed may hand out one
    # of alice's in the next moment; every later decision saw bob's jobs.
    later = [j for j in waiting if (when(f, j, "assigned") or 0) > submitted + 1.0]
    assert later
    # Fair share decides who gets a card: every later job of alice's was handed out after both
    # of bob's. (Its start on the worker can then come a few milliseconds before bob's second,
    # when bob's worker was slower to replace its Celery child.)
    bob_assigned = max(when(f, j, "assigned") for j in bob)
    assert all(when(f, j, "assigned") > bob_assigned for j in later)
    for j in later:
        started = when(f, j, "running")
        assert started is None or started > bob_assigned, (j, started, bob_assigned)


# ---------------------------------------------------------------------------------------------
def test_job_waits_for_a_worker_with_enough_memory(make_fleet):
    """A worker capped with --memory-mb below a job's estimate does not get it: the job waits
    with a reason while that worker runs a smaller job, and runs as soon as a worker that
    advertises enough memory joins."""
    f = make_fleet()
    need = job_memory_mb("train", spec(f, **TRIVIAL), f.settings.paths.models)
    assert need > 100
    small_cap, large_cap = need // 2, need * 4
    f.start_worker("small", "--memory-mb", str(small_cap))
    f.wait_for_workers(1)
    w = Fleet(f.r, f.prefix).alive()[0]
    assert (w["mem_total_mb"], w["mem_limit_mb"]) == (small_cap, small_cap)

    big = submit(f, lora_name="needs-more", **TRIVIAL)
    fits = submit(f, lora_name="fits-small", min_gpu_memory_mb=small_cap // 2, **TRIVIAL)
    rec = f.wait_for_state(fits, TERMINAL, 90)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert run_workers(f, fits) == ["small"]
    time.sleep(1.5)  # a few more dispatcher passes with "small" idle
    rec = f.store.get(big)
    assert rec["state"] == "queued"
    assert rec["reason"] == f"waiting for a card with {need} MB free"
    assert states(f, big) == ["queued"]

    f.start_worker("large", "--memory-mb", str(large_cap))
    rec = f.wait_for_state(big, TERMINAL, 90)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert run_workers(f, big) == ["large"]
