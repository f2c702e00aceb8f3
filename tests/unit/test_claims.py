"""LoRA name claims cared for by the dispatcher (dispatcher/schedule/claims.py), on a real Redis with
job records made through JobStore: names of ended jobs that made no folder are released
(REVIEW #9), and owners are back-filled once after an upgrade (REVIEW #16)."""

from __future__ import annotations

from dispatcher.access.owners import Owners, claim_loras
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.claims import backfill, release_unused
from tests.clock import TickingClock


def spec(name):
    return {"lora_name": name, "base_model": "tiny", "dataset": "d.json"}


def test_a_name_is_released_when_no_job_will_make_its_folder(redis_client, prefix, tmp_path):
    store, reg, loras = JobStore(redis_client, prefix), Owners(redis_client, prefix), tmp_path
    for name in ("gone", "kept", "made", "busy"):
        assert claim_loras(reg, [name], "bo") == {}
    store.cancel(store.create("train", spec("gone"), owner="bo"))
    store.cancel(store.create("train", spec("kept"), owner="bo"))
    store.create("train", spec("kept"), owner="bo")  # another job of bo still uses it
    store.cancel(store.create("train", spec("made"), owner="bo"))
    (loras / "made").mkdir()  # the job made the folder before it was cancelled
    busy = store.create("train", spec("busy"), owner="bo")
    assert release_unused(reg, store, loras) == ["loras/gone"]
    assert reg.owned_by("bo") == ["loras/busy", "loras/kept", "loras/made"]
    assert claim_loras(reg, ["gone"], "cy") == {}  # free for anyone now
    store.cancel(busy)
    # While a submission of bo holds bo's lock (claimed, job not yet created), nothing of bo's
    # is released (cy's claim with no job is).
    lock = redis_client.lock(f"{prefix}:queueing:bo", timeout=10)
    assert lock.acquire()
    assert release_unused(reg, store, loras, wait_s=0.1) == ["loras/gone"]
    lock.release()
    assert release_unused(reg, store, loras) == ["loras/busy"]


def test_owners_are_back_filled_once_from_the_job_records(redis_client, prefix, tmp_path):
    clock = TickingClock()
    store, reg, loras = JobStore(redis_client, prefix, clock), Owners(redis_client, prefix), tmp_path
    for name in ("shared", "solo", "hand"):
        (loras / name).mkdir()

    def job(name, owner, end=None, ran=False):
        job_id = store.create("train", spec(name), owner=owner)
        if ran:  # it ran (and so could write its folder), then ended
            store.transition(job_id, JobState.ASSIGNED, worker="w1")
            store.transition(job_id, JobState.RUNNING)
            store.transition(job_id, JobState.SUCCEEDED)
        elif end:
            store.cancel(job_id)
        return job_id

    job("shared", "ana", ran=True)
    job("shared", "bo", ran=True)  # the newest job that ran decides a folder's owner
    job("shared", "cy", end=True)  # (refused before it ran: it never wrote the folder)
    job("solo", "cy", ran=True)
    job("waits", "bo")  # queued before the upgrade: no folder yet
    job("failed-early", "cy", end=True)  # ended without a folder: no owner
    job("waits", "cy", end=True)  # a newer ended job does not take a waiting job's name
    reg.r.hset(reg.key, "datasets/old.json", "ana")  # recorded before the per-user sets
    assert backfill(reg, store, loras) == {"folders": 2, "waiting": 1}
    assert reg.many(["loras/shared", "loras/solo", "loras/hand", "loras/waits",
                     "loras/failed-early"]) == {
        "loras/shared": "bo", "loras/solo": "cy", "loras/hand": None, "loras/waits": "bo",
        "loras/failed-early": None}
    assert reg.owned_by("ana") == ["datasets/old.json"]
    reg.drop("loras/shared")
    assert backfill(reg, store, loras) is None  # once per prefix
    assert reg.get("loras/shared") is None
