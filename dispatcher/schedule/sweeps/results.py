"""A sweep's results: one row per trial (the Sweep page, the API and the CSV), the best trial,
the packs its trials trained in, and counts of the trials by outcome with the sweep's own
state."""

from __future__ import annotations

import time
from typing import Any

from dispatcher.jobs.states import ACTIVE_VALUES, TERMINAL_VALUES, JobState
from dispatcher.schedule.sweeps.store import SweepStore

# How a trial cancelled by early stopping reads (its reason starts with it), apart from one
# cancelled by its user or with its sweep.
STOPPED_EARLY = "stopped early"


def is_stopped_early(rec: dict[str, Any]) -> bool:
    return rec.get("state") == JobState.CANCELLED.value and str(
        rec.get("reason", "")).startswith(STOPPED_EARLY)


def trial_rows(sweeps: SweepStore, rec: dict[str, Any], now: float | None = None,
               with_curves: bool = False) -> list[dict[str, Any]]:
    """One row per trial for the Sweep page, the API and the CSV: varied values, state
    ("stopped early" counted apart from cancelled), final training loss, best eval loss,
    perplexity (when evaluated), tokens/s, GPU time (seconds on a worker), its worker and its
    pack (the number of the pack it was last assigned with; None before it was assigned, or
    when it was last assigned alone)."""
    now = time.time() if now is None else now
    store = sweeps.store
    jobs = {j["id"]: j for j in sweeps.trial_jobs(rec)}
    eval_jobs: dict[str, dict[str, Any]] = {}
    for trial_job, eval_id in sweeps.evals(rec["id"]).items():
        try:
            eval_jobs[trial_job] = store.get(eval_id)
        except KeyError:
            pass  # its perplexity job was deleted: the row shows no perplexity
    rows = []
    for t in rec["trials"]:
        job = jobs.get(t["job"])
        if job is None:
            continue
        events = [e for _, e in store.events.history(t["job"])]
        rows.append(_row(t, job, events, eval_jobs.get(t["job"]), now, with_curves))
    return rows


def _row(trial: dict[str, Any], job: dict[str, Any], events: list[dict[str, Any]],
         eval_job: dict[str, Any] | None, now: float, with_curves: bool) -> dict[str, Any]:
    """One trial's row from its job record, its events and its perplexity job."""
    train = [(int(e["step"]), float(e["loss"])) for e in events
             if e.get("type") == "train" and e.get("loss") is not None]
    ev = [(int(e["step"]), float(e["eval_loss"])) for e in events
          if e.get("type") == "eval" and e.get("eval_loss") is not None]
    result = job.get("result") or {}
    tps = result.get("tokens_per_s")
    if tps in (None, ""):
        tps = next((e.get("tokens_per_s") for e in reversed(events)
                    if e.get("type") == "train" and e.get("tokens_per_s") is not None), None)
    final = result.get("final_loss")
    if final in (None, ""):
        final = train[-1][1] if train else job.get("loss")
    started = job.get("started")
    gpu_time = None
    if started not in (None, ""):
        gpu_time = round(float(job.get("finished") or now) - float(started), 1)
    perplexity = (eval_job.get("result") or {}).get("perplexity") if eval_job else None
    state = job["state"]
    row = {
        "id": trial["job"], "name": trial["name"], "params": trial["params"], "state": state,
        "display_state": STOPPED_EARLY if is_stopped_early(job) else state,
        "reason": job.get("reason", ""), "step": job.get("step"),
        "total_steps": job.get("total_steps"), "final_loss": final,
        "best_eval_loss": min(v for _, v in ev) if ev else None,
        "perplexity": perplexity, "tokens_per_s": tps, "gpu_time_s": gpu_time,
        "eval_job": eval_job["id"] if eval_job else None,
        "eval_state": eval_job["state"] if eval_job else None,
        "owner": job.get("owner"), "worker": job.get("worker") or "",
        # The dispatcher's pack number ("" once the trial was assigned alone; absent before).
        "pack": job.get("pack") or None,
    }
    if with_curves:
        row["curve"] = train
        row["eval_curve"] = ev
    return row


def best_trial(rows: list[dict[str, Any]]) -> str | None:
    """The succeeded trial with the lowest best eval loss (the lowest final training loss when
    no trial was evaluated during training)."""
    done = [r for r in rows if r["state"] == JobState.SUCCEEDED.value]
    key = "best_eval_loss" if any(r["best_eval_loss"] is not None for r in done) else "final_loss"
    scored = [r for r in done if r.get(key) is not None]
    return min(scored, key=lambda r: float(r[key]))["id"] if scored else None


def trial_packs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The packs the sweep's trials were trained in, in pack-number order: the rows grouped by
    their `pack`, each with its worker (its trials' records name it), its trials' names and job
    ids in trial order, and `running` while one of them holds the card (assigned or running).
    A trial counts in the pack it was last assigned with (a pack split or re-queued for lack of
    memory leaves its trials in the next one)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("pack"):
            groups.setdefault(str(r["pack"]), []).append(r)
    return [{"pack": number,
             "worker": next((r["worker"] for r in members if r.get("worker")), ""),
             "trials": [r["name"] for r in members], "jobs": [r["id"] for r in members],
             "running": any(r["state"] in ACTIVE_VALUES for r in members)}
            for number, members in sorted(groups.items(), key=_pack_order)]


def _pack_order(item: tuple[str, Any]) -> tuple[int, int, str]:
    """Pack numbers count up from 1 (dispatcher.schedule.scheduler): 2 before 10 (anything
    else after them)."""
    number = item[0]
    return (0, int(number), "") if number.isdigit() else (1, 0, number)


def summary(rec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of the trials by outcome and the sweep's own state."""
    counts = {"trials": len(rows), "succeeded": 0, "failed": 0, "stopped_early": 0,
              "cancelled": 0, "running": 0, "queued": 0}
    for r in rows:
        s = r["state"]
        if r["display_state"] == STOPPED_EARLY:
            counts["stopped_early"] += 1
        elif s in TERMINAL_VALUES:
            counts[s] += 1
        elif s in ACTIVE_VALUES:
            counts["running"] += 1
        else:
            counts["queued"] += 1
    ended = all(r["state"] in TERMINAL_VALUES for r in rows)
    if rec.get("finished"):
        state = "cancelled" if rec.get("cancelled") else "finished"
    elif rec.get("cancelled"):
        state = "cancelling" if not ended else "cancelled"
    else:
        state = "finished" if ended and not rec.get("evaluate") else (
            "evaluating" if ended else "running")
    return {**counts, "state": state}
