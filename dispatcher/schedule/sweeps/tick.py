"""What the dispatcher does for sweeps on each pass: early-stopping decisions for trials that
reached a rung (dispatcher.schedule.early_stop), a perplexity job for each trial that
succeeded (when the sweep evaluates), and marking a sweep finished once all its jobs ended.
The trials themselves are queued when the sweep is created (SweepStore.create) and placed
like any job."""

from __future__ import annotations

import json
from typing import Any

from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.early_stop import Decision, Policy, decide, rung_value
from dispatcher.schedule.sweeps.plan import EVAL_DEFAULTS
from dispatcher.schedule.sweeps.store import SweepNotFound, SweepStore


def tick(store: JobStore, active: list[dict[str, Any]] | None = None) -> None:
    """One pass over the sweeps that may have work: with `active` (the running and assigned
    jobs), only the sweeps one of whose jobs changed state since the last pass
    (JobStore.transition marks them) or is on a worker (early stopping follows its steps);
    without, every unfinished sweep. A sweep of 1,000 queued trials costs nothing until one of
    them moves."""
    sweeps = SweepStore(store)
    with sweeps.r.pipeline() as pipe:  # take the marks: a change from now on marks again
        pipe.smembers(store.dirty_sweeps_key)
        pipe.delete(store.dirty_sweeps_key)
        pipe.smembers(sweeps.active_key)
        dirty, _, unfinished = pipe.execute()
    if active is not None:
        wanted = set(dirty) | {j.get("sweep") or j.get("sweep_eval") for j in active}
        unfinished &= wanted
    for sweep_id in sorted(unfinished):
        try:
            tick_one(sweeps, sweep_id)
        except SweepNotFound:  # deleted: nothing left to do for it
            sweeps.r.srem(sweeps.active_key, sweep_id)


def tick_one(sweeps: SweepStore, sweep_id: str) -> None:
    """Early stopping, evaluations, and the end of one sweep."""
    rec = sweeps.get(sweep_id)
    jobs = sweeps.trial_jobs(rec)
    policy = sweeps.policy(rec)
    if policy.active and not rec["cancelled"]:
        early_stopping(sweeps, rec, jobs, policy)
    evals = sweeps.evals(sweep_id)
    if rec.get("evaluate") and not rec["cancelled"]:
        evals = queue_evaluations(sweeps, rec, jobs, evals)
    ended = all(JobState(j["state"]).terminal for j in jobs)
    if ended and evals:
        with sweeps.r.pipeline() as pipe:
            for e in evals.values():
                pipe.hget(sweeps.store.key(e), "state")
            states = pipe.execute()
        ended = all(s is None or JobState(s).terminal for s in states)
    if ended and rec["trials"]:
        sweeps.r.hset(sweeps.key(sweep_id), "finished", sweeps.clock())
        sweeps.r.srem(sweeps.active_key, sweep_id)
        sweeps.announce(sweep_id, "finished")


# ---------------------------------------------------------------------------------------------
# early stopping


def early_stopping(sweeps: SweepStore, rec: dict[str, Any], jobs: list[dict[str, Any]],
                   policy: Policy) -> None:
    """Judge every running (or newly ended) trial at each rung it reached and was not judged
    at; an ended trial whose rungs were all read is marked scanned and not read again."""
    sid = rec["id"]
    decided = sweeps.decisions(sid)
    scanned = sweeps.r.smembers(sweeps.key(sid, "scanned"))
    metric = rec.get("metric") or "loss"
    for job in jobs:
        state = JobState(job["state"])
        if (state != JobState.RUNNING and not state.terminal) or job["id"] in scanned:
            continue
        if not any(decided.get(f"{job['id']}:{r}", {}).get("stop") for r in policy.rungs):
            _judge(sweeps, sid, job, policy, decided, metric)
        if state.terminal:
            sweeps.r.sadd(sweeps.key(sid, "scanned"), job["id"])


def _judge(sweeps: SweepStore, sid: str, job: dict[str, Any], policy: Policy,
           decided: dict[str, dict[str, Any]], metric: str) -> None:
    """Decide `job` at the rungs it reached, in order, until one stops it."""
    jid = job["id"]
    ended = JobState(job["state"]).terminal
    step = int(job.get("step") or 0)
    events: list[dict[str, Any]] | None = None
    for rung in policy.rungs:
        if f"{jid}:{rung}" in decided:
            continue
        if not ended and step < rung:
            return
        if events is None:
            events = [e for _, e in sweeps.store.events.history(jid)]
        value = rung_value(events, rung, policy.previous_rung(rung), metric)
        if value is None:
            return
        earlier = [v for _, v in sweeps.rung_values(sid, rung)]
        if ended:  # it ended before it was judged here: its value still counts
            d = Decision(False, f"ended before the check at step {rung}", value, rung)
        else:
            d = decide(policy, rung, value, earlier, metric)
        if not _record(sweeps, sid, jid, rung, value, d):
            continue  # decided already (by another dispatcher): never decide twice
        if d.stop:
            sweeps.store.request_stop(jid, reason=d.reason)
            sweeps.store.events.append(jid, "log", line=f"sweep {sid}: {d.reason}")
            return


def _record(sweeps: SweepStore, sid: str, jid: str, rung: int, value: float,
            d: Decision) -> bool:
    """Keep a decision once (False when one was kept already) and the trial's rung value as
    it was read (a NaN stays NaN here; `decide` ranks it as the worst)."""
    record = {"rung": rung, "value": value, "stop": d.stop, "reason": d.reason,
              "rank": d.rank, "compared": d.compared, "time": sweeps.clock()}
    if not sweeps.r.hsetnx(sweeps.key(sid, "decisions"), f"{jid}:{rung}", json.dumps(record)):
        return False
    sweeps.r.rpush(sweeps.key(sid, f"rung:{rung}"), json.dumps([jid, value]))
    return True


# ---------------------------------------------------------------------------------------------
# perplexity of the trials


def queue_evaluations(sweeps: SweepStore, rec: dict[str, Any], jobs: list[dict[str, Any]],
                      evals: dict[str, str]) -> dict[str, str]:
    """A perplexity job for each trial that succeeded, once; returns trial job -> its
    perplexity job."""
    template = rec["evaluate"]
    for job in jobs:
        if job["state"] != JobState.SUCCEEDED.value or job["id"] in evals:
            continue
        spec_full = job.get("spec") or {}
        spec = {**EVAL_DEFAULTS, **template, "base_model": spec_full.get("base_model", ""),
                "loras": [spec_full.get("lora_name", "")],
                "comment": f"sweep {rec['name']} ({rec['id']}): {job.get('name', '')}"}
        # Claim the slot first, so two passes never queue two evaluations of one trial.
        if not sweeps.r.hsetnx(sweeps.key(rec["id"], "evals"), job["id"], "pending"):
            continue
        need = int((rec.get("eval_memory_mb") or {}).get(spec["base_model"], 0))
        eval_id = sweeps.store.create("evaluate", spec, rec.get("owner") or "local",
                                      rec.get("priority") or "normal", gpu_memory_mb=need,
                                      fields={"sweep_eval": rec["id"]})
        sweeps.r.hset(sweeps.key(rec["id"], "evals"), job["id"], eval_id)
        evals[job["id"]] = eval_id
    return {k: v for k, v in evals.items() if v != "pending"}
