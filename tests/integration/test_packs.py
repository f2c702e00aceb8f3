"""Sweeps whose trials train together (packs) through real processes: a real Redis server,
dispatcher and worker processes that train the tiny model on the CPU. A pack's trials each
keep their own record, events, outcome and LoRA folder; one that stops (early stopping, the
user) leaves the pack while the others train on; kill -9 of the process that trains a pack
re-queues its unfinished trials, which resume from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dispatcher.schedule.sweeps.plan import parse_sweep
from dispatcher.schedule.sweeps.store import SweepStore
from tests.faultkit import SLOW, TERMINAL, checkpoints, events, last_step, states
from tests.fleetproc import small_spec

pytestmark = pytest.mark.integration


def make_sweep(f, name: str, parameters: dict, **over) -> list[str]:
    """Queue a sweep (as `lorafleet sweep` does); returns its trials' job ids in trial order."""
    data = {"name": name, "base": small_spec(lora_name=name, **SLOW, **over.pop("base", {})),
            "parameters": parameters, **over}
    plan = parse_sweep(data, f.settings.paths)
    sid = SweepStore(f.store).create(plan, owner="tester")
    return [t["job"] for t in SweepStore(f.store).get(sid)["trials"]]


def train_steps(f, job: str) -> list[int]:
    return [e["step"] for e in events(f, job) if e["type"] == "train"]


def test_a_pack_trains_its_trials_together_and_early_stopping_takes_one_out(fleet_factory):
    """Four trials (two optimizers x two ranks) share the tiny base: one pack on the one
    worker. ASHA at step 3 stops sgd trials (barely learning) inside the pack; the others
    train on without a restart and succeed, each with its own LoRA folder."""
    f = fleet_factory(workers=("a",))
    ids = make_sweep(f, "pk", {"optimizer": ["adamw_torch", "sgd"], "lora_rank": [4, 8]},
                     base={"learning_rate": "1e-2", "epochs": 40},
                     early_stopping={"policy": "asha", "rungs": [3], "reduction_factor": 2})
    recs = [f.wait_for_state(j, TERMINAL, 240) for j in ids]
    # One pack: every trial was assigned with the others, to one worker, once.
    assert {r["pack"] for r in recs} == {"1"} and {r["worker"] for r in recs} == {"a"}
    assert all(r["pack_jobs"].split(",") == ids for r in recs)
    assert all(states(f, j)[:3] == ["queued", "assigned", "running"] for j in ids)
    adam, sgd = recs[:2], recs[2:]
    assert [r["state"] for r in adam] == ["succeeded", "succeeded"], [r["reason"] for r in adam]
    stopped = [r for r in sgd if r["state"] == "cancelled"]
    assert stopped, [r["reason"] for r in sgd]  # at most one sgd trial can be judged first
    for r in stopped:
        assert r["reason"].startswith("stopped early: training loss ")
        assert r["reason"].endswith("the incomplete LoRA was saved")
        steps = train_steps(f, r["id"])
        assert steps == list(range(1, steps[-1] + 1)) and 3 <= steps[-1] < r["total_steps"]
    for r in adam:  # no restart: one run, steps 1..40 once each, past the stopped trials
        assert train_steps(f, r["id"]) == list(range(1, 41))
        assert states(f, r["id"]) == ["queued", "assigned", "running", "succeeded"]
    for r in recs:  # a LoRA folder as a run alone writes it, with the trial's own rank
        folder = f.settings.paths.loras / r["spec"]["lora_name"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == r["spec"]["lora_rank"]
        assert (folder / "adapter_model.safetensors").is_file()
        log = json.loads((folder / "training_log.json").read_text())
        assert sorted(log["pack"]) == sorted(x["spec"]["lora_name"] for x in recs)
    # The card's time was charged once: the owner's use is about the pack's length, not 4x.
    runs = f.store.runs(["tester"], 0)["tester"]
    pack_span = max(e for _, e, _ in runs) - min(s for s, _, _ in runs)
    from dispatcher.schedule.queue import used_seconds
    assert used_seconds(runs, [], time.time(), 86400) == pytest.approx(pack_span, rel=0.01)


def test_kill_9_mid_pack_resumes_its_unfinished_trials_and_not_the_one_that_ended(fleet_factory):
    """A trial the user stopped ends alone (cancelled, LoRA saved) while the others train on;
    kill -9 of the process that trains the pack then re-queues the others at once; they form a
    pack again, resume from their checkpoints and succeed. The stopped trial is not rerun."""
    f = fleet_factory(workers=("a",))
    ids = make_sweep(f, "kp", {"lora_rank": [2, 4, 8]},
                     base={"epochs": 60, "save_steps": 5})
    for j in ids:
        f.wait_for_state(j, ("running",) + TERMINAL, 60)
    f.wait_for(lambda: last_step(f, ids[0]) >= 3, 60, "a few steps")
    f.store.cancel(ids[0])
    stopped = f.wait_for_state(ids[0], TERMINAL, 60)
    assert stopped["state"] == "cancelled" and "the incomplete LoRA was saved" in stopped["reason"]
    left_at = stopped["step"]
    lora = f.store.get(ids[1])["spec"]["lora_name"]
    f.wait_for(lambda: checkpoints(f, lora) and last_step(f, ids[1]) >= max(
        left_at + 2, checkpoints(f, lora)[-1] + 1), 120, "a checkpoint after the stop")
    kids = f.children("worker-a")
    assert len(kids) == 1, kids
    os.kill(kids[0], signal.SIGKILL)
    for j in ids[1:]:
        f.wait_for(lambda j=j: "retrying" in states(f, j), 15, "the trials to be re-queued")
    recs = [f.wait_for_state(j, TERMINAL, 240) for j in ids[1:]]
    for r in recs:
        assert r["state"] == "succeeded", r["reason"]
        assert states(f, r["id"]) == ["queued", "assigned", "running", "retrying", "assigned",
                                      "running", "succeeded"]
        assert r["result"]["resumed_from"].startswith("checkpoint-")
        assert r["pack"] == "2" and sorted(r["pack_jobs"].split(",")) == sorted(ids[1:])
        steps = train_steps(f, r["id"])
        assert set(steps) == set(range(1, 61))  # no gap; steps after the checkpoint twice
    # The stopped trial stayed as it ended: never assigned again.
    assert states(f, ids[0]) == ["queued", "assigned", "running", "cancelled"]
    assert f.store.get(ids[0])["step"] == left_at
