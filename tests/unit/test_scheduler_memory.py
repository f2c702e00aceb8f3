"""Placement by memory with cards held by processes outside lorafleet and workers capped with
--memory-mb: the dispatcher against a real Redis, with heartbeats as workers send them."""

from __future__ import annotations

import pytest

from dispatcher.jobs.states import JobState
from dispatcher.schedule.placement import fits
from dispatcher.schedule.queue import estimate_starts
from tests.clock import dispatcher_env


@pytest.fixture
def env(redis_client, prefix):
    store, fleet, d, _, clock = dispatcher_env(redis_client, prefix)
    return store, fleet, d, clock


def submit(store, clock, name, need):
    clock.t += 1
    return store.create("train", {"lora_name": name}, gpu_memory_mb=need)


def test_card_held_outside_lorafleet_gets_no_job_it_cannot_hold(env):
    store, fleet, d, clock = env
    # An 80 GB card with 60 GB held by someone else's process (what the worker's heartbeat
    # says: NVML's free memory, and the outside figure).
    fleet.heartbeat("gpu0", device="cuda:0", mem_total_mb=81559, mem_free_mb=21559,
                    outside_mb=60000, outside_pids="4242", mem_usable_mb=21559)
    big = submit(store, clock, "big", 30000)
    small = submit(store, clock, "small", 8000)
    assert d.tick() == [(small, "gpu0")]
    rec = store.get(big)
    assert rec["state"] == "queued"
    assert rec["reason"] == ("waiting for a card with 30000 MB free "
                             "(gpu0: 60000 MB in use outside lorafleet)")
    # Its estimated start: no live card can hold it while the outside process stays.
    workers = fleet.alive()
    assert estimate_starts([rec], workers, [], lambda j: 60.0, clock.t) == {big: None}
    # The outside process goes away (the next heartbeat): the big job gets the card once free.
    fleet.heartbeat("gpu0", mem_free_mb=81559, outside_mb=0, outside_pids="",
                    mem_usable_mb=81559)
    store.transition(small, JobState.RUNNING, "r")
    store.transition(small, JobState.SUCCEEDED, "done")
    assert d.tick() == [(big, "gpu0")]


def test_capped_cpu_worker_is_gated_on_its_cap(env):
    store, fleet, d, clock = env
    fleet.heartbeat("small", device="cpu", mem_total_mb=300, mem_free_mb=300, mem_limit_mb=300,
                    mem_usable_mb=300)
    big = submit(store, clock, "big", 1000)
    tiny = submit(store, clock, "tiny", 200)
    assert d.tick() == [(tiny, "small")]
    assert store.get(big)["reason"] == "waiting for a card with 1000 MB free"
    fleet.heartbeat("large", device="cpu", mem_total_mb=4000, mem_free_mb=4000,
                    mem_limit_mb=4000, mem_usable_mb=4000)
    assert d.tick() == [(big, "large")]


def test_uncapped_cpu_worker_is_not_gated_and_4bit_still_needs_cuda():
    cpu = {"name": "c", "device": "cpu", "mem_total_mb": 100.0, "mem_free_mb": 50.0}
    capped = {**cpu, "mem_limit_mb": 100.0}
    job = {"gpu_memory_mb": 5000, "spec": {"precision": "fp32"}}
    assert fits(job, cpu) and fits(job, cpu, key="mem_total_mb")
    assert not fits(job, capped) and not fits(job, capped, key="mem_total_mb")
    # Now: its free memory (50); once idle: its cap.
    assert not fits({"gpu_memory_mb": 80, "spec": {}}, capped)
    assert fits({"gpu_memory_mb": 80, "spec": {}}, capped, key="mem_total_mb")
    assert fits({"gpu_memory_mb": 50, "spec": {}}, capped)
    q = {"gpu_memory_mb": 10, "spec": {"precision": "4bit"}}
    assert not fits(q, capped) and not fits(q, cpu)
    card = {"name": "g", "device": "cuda:0", "mem_total_mb": 24000.0, "mem_free_mb": 24000.0}
    assert fits(q, card)
    # Once idle: the usable memory (total less what outside processes hold) decides.
    held = card | {"mem_free_mb": 4000.0, "mem_usable_mb": 4000.0}
    assert not fits({"gpu_memory_mb": 5000, "spec": {}}, held, key="mem_total_mb")
    assert fits({"gpu_memory_mb": 5000, "spec": {}}, card, key="mem_total_mb")


def test_worker_command_passes_the_memory_cap_and_refuses_a_bad_one():
    from click.testing import CliRunner

    from dispatcher.cli import main
    from dispatcher.host.up import worker_cmds

    (name, cmd, env), = worker_cmds([None], {}, memory_mb=300)
    assert cmd[-2:] == ["--memory-mb", "300"]
    assert "--memory-mb" not in worker_cmds([0], {})[0][1]
    result = CliRunner().invoke(main, ["worker", "--gpus", "cpu", "--memory-mb", "0"])
    assert result.exit_code == 2 and "--memory-mb" in result.output
