"""Drive a running multi-card fleet (`lorafleet up --gpus all`) the way a team uses it, and
measure what the fleet adds around training:

- jobs: N short 4-bit training jobs from two users (the first user queues most of them, then the
  second queues the rest), each followed by its own SSE client on `/api/v1/jobs/<id>/events`
  (what the Job page reads). Reports each card's busy time, the makespan against the ideal
  (sum of job times / cards), the delay from one job's end to the next start on the same card,
  the order in which the users' jobs started, and the latency from a training event being written
  by the worker (its `time`) to its arrival at the SSE client.
- sweep (with --sweep FILE, its base model replaced by --model): submits the sweep file, waits
  for every trial, and reports the makespan against (sum of trial times / cards) and the GPU
  time that early stopping saved (for each trial stopped early: the steps it did not run x its
  own mean step time).

    python -m bench.gpu_team --model llama-3.2-1b-random --jobs 8 --out team.json [--sweep s.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from dispatcher.cli.client import Client
from dispatcher.jobs.states import TERMINAL_VALUES

JOB = {"dataset": "alpaca-sample", "format": "alpaca-format", "precision": "4bit",
       "lora_rank": 16, "lora_alpha": 32, "target_modules": ["all"], "micro_batch_size": 4,
       "batch_size": 8, "epochs": 2, "learning_rate": "2e-4", "warmup_steps": 2,
       "cutoff_len": 256}


class SseLatency(threading.Thread):
    """Follows one job's event stream; records (arrival - event time) of its training events."""

    def __init__(self, url: str, job: str):
        super().__init__(daemon=True)
        self.url, self.job = url, job
        self.latencies: list[float] = []

    def run(self) -> None:
        # The CLI's follower: it reconnects with Last-Event-ID as a browser does, so a dropped
        # stream shows up as late events, not as missing ones.
        for ev in Client(self.url).follow(self.job):
            now = time.time()
            if ev.get("type") == "train" and ev.get("time"):
                self.latencies.append(now - float(ev["time"]))


def wait_all(c: Client, jobs: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = {j: c.job(j) for j in jobs}
        if all(r["state"] in TERMINAL_VALUES for r in recs.values()):
            return recs
        time.sleep(1)
    raise TimeoutError(f"jobs not finished after {timeout} s")


def card_report(recs: dict[str, dict[str, Any]], t0: float) -> dict[str, Any]:
    """Busy time per card, makespan against the ideal, end-to-next-start gaps."""
    ran = [r for r in recs.values() if r.get("started") and r.get("finished")]
    cards = sorted({r["worker"] for r in ran})
    per_card: dict[str, Any] = {}
    gaps: list[float] = []
    for w in cards:
        mine = sorted((r for r in ran if r["worker"] == w), key=lambda r: float(r["started"]))
        busy = sum(float(r["finished"]) - float(r["started"]) for r in mine)
        card_gaps = [float(b["started"]) - float(a["finished"]) for a, b in zip(mine, mine[1:], strict=False)]
        gaps += card_gaps
        per_card[w] = {"jobs": len(mine), "busy_s": round(busy, 1),
                       "gaps_s": [round(g, 2) for g in card_gaps]}
    job_s = [float(r["finished"]) - float(r["started"]) for r in ran]
    end = max(float(r["finished"]) for r in ran)
    first_start = min(float(r["started"]) for r in ran)
    return {
        "cards": per_card,
        "jobs": len(ran),
        "sum_job_s": round(sum(job_s), 1),
        "ideal_s": round(sum(job_s) / max(len(cards), 1), 1),
        "makespan_from_submit_s": round(end - t0, 1),
        "makespan_from_first_start_s": round(end - first_start, 1),
        "gap_median_s": round(statistics.median(gaps), 2) if gaps else None,
        "gap_max_s": round(max(gaps), 2) if gaps else None,
    }


def run_jobs(c: Client, url: str, model: str, n: int, users: list[str],
             precision: str = "4bit") -> dict[str, Any]:
    t0 = time.time()
    first, second = users
    n_first = n - max(1, n // 4)
    jobs, owners, followers = [], {}, []
    for i in range(n):
        owner = first if i < n_first else second
        job = c.submit({**JOB, "base_model": model, "lora_name": f"team-{owner}-{i}",
                        "precision": precision}, owner=owner)
        jobs.append(job)
        owners[job] = owner
        f = SseLatency(url, job)
        f.start()
        followers.append(f)
    recs = wait_all(c, jobs, 900)
    for f in followers:
        f.join(10)
    lat = sorted(x for f in followers for x in f.latencies)
    started = sorted((float(r["started"]), owners[j]) for j, r in recs.items() if r.get("started"))
    report = card_report(recs, t0)
    report.update({
        "states": {j: recs[j]["state"] for j in jobs},
        "start_order": [o for _, o in started],
        "sse_latency_ms": {
            "events": len(lat),
            "median": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
            "max": round(1000 * lat[-1], 1) if lat else None,
        },
        "tokens_per_s": [recs[j].get("result", {}).get("tokens_per_s") for j in jobs],
    })
    return report


def wait_sweep(c: Client, sweep_id: str, timeout: float, every_s: float = 1.0
               ) -> dict[str, Any]:
    """The sweep's page (its API record) once it has finished or been cancelled."""
    deadline = time.monotonic() + timeout
    info = c.sweep(sweep_id)
    while info["summary"]["state"] not in ("finished", "cancelled"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep {sweep_id} not finished")
        time.sleep(every_s)
        info = c.sweep(sweep_id)
    return info


def run_sweep(c: Client, path: Path, model: str | None) -> dict[str, Any]:
    import yaml

    body = yaml.safe_load(path.read_text())
    if model:
        body["base"]["base_model"] = model
    t0 = time.time()
    sweep_id = c.create_sweep(body)["id"]
    info = wait_sweep(c, sweep_id, 1200, every_s=2)
    rows = info["rows"]
    recs = {r["id"]: c.job(r["id"]) for r in rows}
    report = card_report(recs, t0)
    saved = 0.0
    early = []
    for r in rows:
        rec = recs[r["id"]]
        res = rec.get("result") or {}
        if r["display_state"] == "stopped early":
            steps, total = res.get("steps") or 0, res.get("total_steps") or 0
            run_s = res.get("train_runtime_s") or 0
            if steps and total:  # the steps it did not run, at its own mean step time
                saved += (total - steps) * run_s / steps
            early.append({"name": r["name"], "steps": steps, "total_steps": total,
                          "reason": rec.get("reason")})
    report.update({
        "sweep": sweep_id, "summary": info["summary"], "best": info.get("best"),
        "trials": [{k: r.get(k) for k in ("name", "display_state", "final_loss", "gpu_time_s",
                                          "tokens_per_s", "step", "total_steps")}
                   for r in rows],
        "stopped_early": early, "gpu_s_saved_by_early_stopping": round(saved, 1),
    })
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--model", required=True)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--users", default="ana,bo")
    ap.add_argument("--precision", default="4bit", help="fp32 to try this on a CPU fleet")
    ap.add_argument("--sweep", default=None, help="a sweep file to run after the jobs")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    c = Client(a.url)
    out: dict[str, Any] = {"workers": [
        {k: w.get(k) for k in ("name", "card", "mem_total_mb")} for w in c.workers()]}
    if a.jobs:
        out["jobs"] = run_jobs(c, a.url, a.model, a.jobs, a.users.split(","), a.precision)
        print("JOBS " + json.dumps(out["jobs"]), flush=True)
    if a.sweep:
        out["sweep"] = run_sweep(c, Path(a.sweep), a.model)
        print("SWEEP " + json.dumps(out["sweep"]), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
