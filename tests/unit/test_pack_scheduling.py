"""How the dispatcher forms packs of a sweep's trials and places them (real Redis server, a
recording `send` and `send_pack`)."""

from __future__ import annotations

import pytest

from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.estimate import pack_memory_mb
from dispatcher.schedule.scheduler import REPLAN_UNCHANGED_S, Dispatcher
from tests.clock import Clock


@pytest.fixture
def env(redis_client, prefix):
    clock = Clock()
    store = JobStore(redis_client, prefix, clock=clock)
    fleet = Fleet(redis_client, prefix, timeout=10, clock=clock)
    sent: list[tuple[str, str]] = []
    packs: list[tuple[str, list[str], str]] = []
    d = Dispatcher(store, fleet, lambda job, w, attempt: sent.append((job, w["name"])),
                   clock=clock, send_pack=lambda label, attempts, w: packs.append(
                       (label, list(attempts), w["name"])))
    return store, fleet, d, sent, packs, clock


def trial(store, clock, name, sweep="s1", cap=0, pack_max=8, mb=0, base_mb=0, lane_mb=0,
          owner="ada", **spec):
    clock.t += 1
    return store.create("train", {"lora_name": name, "base_model": "m", "dataset": "d.json",
                                  **spec}, owner, gpu_memory_mb=mb,
                        fields={"sweep": sweep, "sweep_cap": cap, "pack_max": pack_max,
                                "pack_base_mb": base_mb, "pack_lane_mb": lane_mb})


def test_trials_that_can_share_go_to_one_card_as_one_pack(env):
    store, fleet, d, sent, packs, clock = env
    ids = [trial(store, clock, f"t{r}-{lr}", lora_rank=r, learning_rate=lr)
           for r in (8, 16) for lr in ("1e-4", "1e-3")]
    fleet.heartbeat("w1", device="cpu", packs="1")
    assert sorted(d.tick()) == sorted((j, "w1") for j in ids)
    assert sent == [] and packs == [("s1:1", ids, "w1")]
    for j in ids:
        rec = store.get(j)
        assert rec["state"] == "assigned" and rec["worker"] == "w1" and rec["attempt"] == 1
        assert rec["pack"] == "1" and rec["pack_jobs"] == ",".join(ids)
        assert "pack 1 of sweep s1, 4 trials" in rec["reason"]


def test_pack_off_and_trials_that_cannot_share_run_alone(env):
    store, fleet, d, sent, packs, clock = env
    off = [trial(store, clock, f"o{i}", sweep="s2", pack_max=1, lora_rank=8 * (i + 1))
           for i in range(2)]
    fleet.heartbeat("w1", device="cpu", packs="1")
    fleet.heartbeat("w2", device="cpu", packs="1")
    assert d.tick() == [(off[0], "w1"), (off[1], "w2")] and packs == []
    assert store.get(off[0]).get("pack") is None
    # Two trials of one sweep on different base models share nothing.
    a = trial(store, clock, "a", sweep="s3", base_model="m1")
    b = trial(store, clock, "b", sweep="s3", base_model="m2")
    for j in off:
        store.transition(j, JobState.RUNNING, "r")
        store.transition(j, JobState.SUCCEEDED, "done")
    assert d.tick() == [(a, "w1"), (b, "w2")] and packs == []


def test_the_card_memory_and_pack_size_bound_a_pack(env):
    store, fleet, d, sent, packs, clock = env
    # Each trial alone: 3000 MB, of which 2000 MB is the base, and 100 MB of stacks in a pack:
    # a pack of k needs 2000 + 1100 k.
    ids = [trial(store, clock, f"t{i}", mb=3000, base_mb=2000, lane_mb=100, lora_rank=i + 1)
           for i in range(5)]
    assert pack_memory_mb([(3000, 2000, 100)] * 3) == 5300
    fleet.heartbeat("gpu0", device="cuda:0", packs="1", mem_free_mb=5250, mem_total_mb=8000)
    d.tick()
    # Two (4200 MB) fit in 5250; three would without their stacks (5000), not with (5300).
    assert packs[0] == ("s1:1", ids[:2], "gpu0")
    # Two more cards: the lead trial takes the one with the most room for a pack.
    fleet.heartbeat("gpu1", device="cuda:1", packs="1", mem_free_mb=80000, mem_total_mb=80000)
    fleet.heartbeat("gpu2", device="cuda:2", packs="1", mem_free_mb=3200, mem_total_mb=8000)
    d.tick()
    assert packs[1] == ("s1:2", ids[2:], "gpu1")
    # pack_size 2 (pack_max) caps a pack on a card that would hold more.
    more = [trial(store, clock, f"u{i}", sweep="s9", pack_max=2, lora_rank=i + 1)
            for i in range(3)]
    fleet.heartbeat("w9", device="cpu", packs="1")
    d.tick()
    assert packs[2][:2] == ("s9:1", more[:2])


def test_max_concurrent_counts_trials_and_the_card_limit_counts_cards(env):
    store, fleet, d, sent, packs, clock = env
    d.max_cards_per_user = 1
    ids = [trial(store, clock, f"t{i}", cap=3, lora_rank=i + 1) for i in range(5)]
    other = trial(store, clock, "bo-job", sweep="", pack_max=1, owner="bo")
    fleet.heartbeat("w1", device="cpu", packs="1")
    fleet.heartbeat("w2", device="cpu", packs="1")
    fleet.heartbeat("w3", device="cpu", packs="1")
    assigned = d.tick()
    # Three trials (max_concurrent 3) in one pack on one card: ada's one card; bo's job next.
    assert packs == [("s1:1", ids[:3], "w1")]
    assert (other, "w2") in assigned and len(assigned) == 4
    assert "ada already uses 1 of 1 cards" in store.get(ids[3])["reason"]
    d.max_cards_per_user = 0
    d._fruitless = None
    d.tick()
    assert "already runs 3 of its 3 trials" in store.get(ids[3])["reason"]


def test_a_trial_cancelled_before_its_pack_is_sent_is_left_out(env, monkeypatch):
    store, fleet, d, sent, packs, clock = env
    ids = [trial(store, clock, f"t{i}", lora_rank=i + 1) for i in range(3)]
    real = store.transition

    def cancel_first(job_id, new, *a, **kw):
        if job_id == ids[1] and new == JobState.ASSIGNED:
            store.cancel(job_id)
        return real(job_id, new, *a, **kw)

    monkeypatch.setattr(store, "transition", cancel_first)
    fleet.heartbeat("w1", device="cpu", packs="1")
    d.tick()
    assert packs == [("s1:1", [ids[0], ids[2]], "w1")]
    assert store.get(ids[0])["pack_jobs"] == f"{ids[0]},{ids[2]}"
    assert store.get(ids[1])["state"] == "cancelled"


def test_a_trial_run_alone_after_a_pack_no_longer_shows_one(env):
    store, fleet, d, sent, packs, clock = env
    ids = [trial(store, clock, f"t{i}", lora_rank=i + 1) for i in range(2)]
    fleet.heartbeat("w1", device="cpu", packs="1")
    d.tick()
    # The pack ran out of memory: the worker re-queued both, in packs of one.
    for j in ids:
        store.transition(j, JobState.RUNNING, "r")
        store.transition(j, JobState.RETRYING, "out of GPU memory", pack_max=1)
    d.tick()
    assert sent == [(ids[0], "w1")]
    rec = store.get(ids[0])
    assert rec["pack"] == "" and rec["pack_jobs"] == "" and rec["attempt"] == 2


def test_workers_that_do_not_run_packs_and_halved_trials_get_none(env):
    """A worker of an older version (no `packs` in its heartbeat) gets trials one by one; a
    trial whose pack size an out-of-memory split halved to 1 joins no pack."""
    store, fleet, d, sent, packs, clock = env
    ids = [trial(store, clock, f"t{i}", lora_rank=i + 1) for i in range(3)]
    fleet.heartbeat("old", device="cpu")
    d.tick()
    assert packs == [] and sent == [(ids[0], "old")]
    # The other two: t2 was halved to packs of one; on a worker that runs packs, t1 goes alone.
    store.transition(ids[2], JobState.CANCELLED, "x")
    t3 = trial(store, clock, "t3", lora_rank=9, pack_max=1)
    fleet.heartbeat("new", device="cpu", packs="1")
    d.tick()
    assert packs == [] and (ids[1], "new") in sent
    assert store.get(t3)["state"] == "queued"


def test_pack_off_in_a_yaml_file_is_off(tmp_path):
    import yaml

    from dispatcher.schedule.sweeps.plan import parse_sweep
    from dispatcher.settings import DataPaths
    from tests.tiny import make_tiny_model, write_tiny_dataset

    data = yaml.safe_load("""
name: s
base: {lora_name: s, base_model: tiny, dataset: tiny, format: alpaca-format}
parameters: {lora_rank: [4, 8]}
pack: off
""")
    assert data["pack"] is False  # what YAML makes of it
    paths = DataPaths(tmp_path)
    paths.ensure()
    make_tiny_model(paths.models / "tiny")
    write_tiny_dataset(paths.datasets / "tiny.json")
    plan = parse_sweep(data, paths)
    assert plan.pack == "off" and plan.pack_max == 1


def test_a_job_for_a_lora_another_job_trains_waits_for_it(env):
    """Two jobs training into one LoRA folder: the second waits (with its reason) until the
    first has ended, instead of failing on the folder's lock; other LoRAs go ahead."""
    store, fleet, d, sent, packs, clock = env
    first = trial(store, clock, "shared", sweep="", pack_max=1)
    second = trial(store, clock, "shared", sweep="", pack_max=1)
    other = trial(store, clock, "other", sweep="", pack_max=1)
    for w in ("w1", "w2", "w3"):
        fleet.heartbeat(w, device="cpu")
    d.tick()
    assert sorted(job for job, _ in sent) == sorted([first, other])
    assert store.get(second)["reason"] == f"waiting: loras/shared is being trained by job {first}"
    store.transition(first, JobState.RUNNING, "r")
    worker = dict(sent)[first]
    fleet.heartbeat(worker, device="cpu", job=first)  # its task runs it
    d.tick()
    assert second not in [job for job, _ in sent]
    # A record left running that no worker names any more holds nothing back.
    clock.t += REPLAN_UNCHANGED_S + 1  # (a pass that placed nothing is redone after this)
    for w in ("w1", "w2", "w3"):
        fleet.heartbeat(w, device="cpu", job="")
    d.tick()
    assert second in [job for job, _ in sent]



def test_a_pack_leaves_out_a_trial_whose_lora_another_job_trains(env):
    store, fleet, d, sent, packs, clock = env
    busy = trial(store, clock, "s1-b", sweep="", pack_max=1)
    fleet.heartbeat("w0", device="cpu")
    d.tick()
    store.transition(busy, JobState.RUNNING, "r")
    fleet.heartbeat("w0", device="cpu", job=busy)  # its task runs it
    ids = [trial(store, clock, f"s1-{n}", lora_rank=r) for n, r in (("a", 4), ("b", 8),
                                                                      ("c", 16))]
    fleet.heartbeat("gpu0", device="cuda:0", packs="1", mem_free_mb=80000, mem_total_mb=80000)
    d.tick()
    assert packs[0][1] == [ids[0], ids[2]]
    assert store.get(ids[1])["reason"] == f"waiting: loras/s1-b is being trained by job {busy}"


def test_a_pack_is_sent_with_the_attempt_each_trial_was_assigned(redis_client, prefix):
    """review15b M4: each trial of a pack is fenced on its own attempt."""
    clock = Clock()
    store = JobStore(redis_client, prefix, clock=clock)
    fleet = Fleet(redis_client, prefix, timeout=10, clock=clock)
    sent: list[tuple[str, dict[str, int], str]] = []
    d = Dispatcher(store, fleet, lambda job, w, attempt: None, clock=clock,
                   send_pack=lambda label, attempts, w: sent.append((label, attempts, w["name"])))
    again, fresh = (trial(store, clock, f"t{r}", lora_rank=r) for r in (8, 16))
    store.transition(again, JobState.ASSIGNED, "a", worker="w0", attempt=1)
    store.transition(again, JobState.RUNNING, "r")
    store.transition(again, JobState.RETRYING, "w0 stopped answering; re-queued", worker="")
    fleet.heartbeat("w1", device="cpu", packs="1")
    d.tick()
    assert sent == [("s1:1", {again: 2, fresh: 1}, "w1")]
    assert [store.get(j)["attempt"] for j in (again, fresh)] == [2, 1]
