"""The pack task's bookkeeping (gpuworker/packs.py) on a real Redis: an out-of-memory pack
re-queues its unfinished trials in packs of half the size, without counting the attempt, and
ends a trial that was being stopped; a trial that had ended keeps its outcome."""

from __future__ import annotations

from typing import Any

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.schedule.requeue import MAX_ATTEMPTS, Crashed, settle
from dispatcher.settings import Settings
from gpuworker.engine import train_pack
from gpuworker.engine.cleanup import OutOfGpuMemory
from gpuworker.packs import perform_pack
from tests.unit.test_engine import make_spec, paths, tiny_model_dir  # noqa: F401


def assigned_pack(store, names: list[str]) -> list[str]:
    ids = [store.create("train", make_spec(lora_name=n, lora_rank=4 + i).to_dict(),
                        fields={"sweep": "s1", "pack_max": 8})
           for i, n in enumerate(names)]
    for j in ids:
        store.transition(j, JobState.ASSIGNED, "a", worker="w1", attempt=1, pack="1",
                         pack_jobs=",".join(ids))
    return ids


def test_an_out_of_memory_pack_is_split_and_requeued(paths, store, monkeypatch):  # noqa: F811
    settings = Settings(home=paths.home, redis_url="", prefix=store.p)
    ids = assigned_pack(store, ["p0", "p1", "p2", "p3"])
    store.request_stop(ids[3], "stopped by the user")

    def out_of_memory(members: list[Any], device: Any = None) -> None:
        # The first trial ended (and was recorded) before the pack ran out of memory.
        members[0].on_result({"stopped": False, "reason": "finished", "steps": 6})
        raise OutOfGpuMemory("out of GPU memory: lower micro_batch_size")

    monkeypatch.setattr(train_pack, "run_pack", out_of_memory)
    fleet = Fleet(store.r, store.p)
    ends = perform_pack("s1:1", ids, "w1", store, fleet, settings)
    recs = [store.get(j) for j in ids]
    assert [r["state"] for r in recs] == ["succeeded", "retrying", "retrying", "cancelled"]
    for r in recs[1:3]:
        assert r["pack_max"] == 1 and r["worker"] == "" and r["pack_splits"] == 1
        assert r["reason"] == ("out of GPU memory in a pack of 3 on w1: re-queued to train in "
                               "packs of at most 1")
    assert recs[3]["reason"].startswith("stopped by the user; out of GPU memory in a pack of 3")
    assert ends == {j: r["state"] for j, r in zip(ids, recs, strict=True)}
    # The worker is idle again; the split did not use up an attempt of the re-queued trials.
    assert fleet.r.hget(fleet.key("w1"), "state") == "idle"
    j = ids[1]
    for attempt in (2, 3):
        store.transition(j, JobState.ASSIGNED, "a", worker="w1", attempt=attempt)
        store.transition(j, JobState.RUNNING, "r")
        assert settle(store, j, attempt, Crashed("died"), expect_worker="w1") == (
            JobState.RETRYING)  # attempt 3 counts as 2: one of them was the split's
    store.transition(j, JobState.ASSIGNED, "a", worker="w1", attempt=MAX_ATTEMPTS + 1)
    store.transition(j, JobState.RUNNING, "r")
    assert settle(store, j, MAX_ATTEMPTS + 1, Crashed("died"), expect_worker="w1") == (
        JobState.FAILED)


def test_a_pack_starts_only_the_trials_at_the_attempts_it_was_sent_for(paths, store,  # noqa: F811
                                                                      monkeypatch):
    """review15b M4: a trial given again to this worker since the pack's message was sent (a
    later attempt, whose own message follows) is left to that message."""
    settings = Settings(home=paths.home, redis_url="", prefix=store.p)
    moved, mine = assigned_pack(store, ["m0", "m1"])
    store.transition(moved, JobState.RETRYING, "w1 never received the pack; re-queued",
                     worker="")
    store.transition(moved, JobState.ASSIGNED, "a", worker="w1", attempt=2)
    trained: list[str] = []

    def finish(members: list[Any], device: Any = None) -> None:
        for m in members:
            trained.append(m.cfg.job_id)
            m.on_result({"stopped": False, "reason": "finished", "steps": 6})

    monkeypatch.setattr(train_pack, "run_pack", finish)
    ends = perform_pack("s1:1", [moved, mine], "w1", store, Fleet(store.r, store.p), settings,
                        attempts={moved: 1, mine: 1})
    assert trained == [mine] and ends == {mine: "succeeded"}
    rec = store.get(moved)
    assert rec["state"] == "assigned" and rec["attempt"] == 2 and rec["worker"] == "w1"
