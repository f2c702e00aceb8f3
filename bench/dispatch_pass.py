"""The dispatcher's pass with thousands of queued jobs (issue 10, finding 10).

Queues three sweeps of 1,000 trials (one with early stopping) and a few single jobs from
several users on a private redis-server, with one worker busy on a running job (no free
card), then measures (1) the mean time of `Dispatcher.tick` in this process and (2) the CPU
share of a real `python -m dispatcher` process left idle with that queue for a while.

With --free-unfit a second worker, w2, is idle the whole time with a card too small for every
queued job (2,000 MB; each needs 4,000): a free card that nothing in the queue fits, so every
pass gets as far as planning the queue and places nothing (review of issue 10, #14).

    PYTHONPATH=. python -m bench.dispatch_pass [--jobs-per-sweep 1000] [--seconds 20] [--free-unfit]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from dispatcher.host.embedded import free_port, start_server, stop_server
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.early_stop import Policy
from dispatcher.schedule.scheduler import Dispatcher
from dispatcher.schedule.sweeps import SweepPlan, SweepStore, Trial

PREFIX = "bench"
SPEC = {"lora_name": "x", "base_model": "tiny", "dataset": "d.json", "format": "alpaca-format",
        "precision": "bf16", "micro_batch_size": 4, "batch_size": 128, "lora_rank": 32}


def fill(r: redis.Redis, per_sweep: int) -> None:
    store = JobStore(r, PREFIX)
    sweeps = SweepStore(store)
    for n, (owner, policy) in enumerate((("bo", Policy()), ("cy", Policy("asha", (10, 20))),
                                         ("dee", Policy()))):
        trials = [Trial(f"s{n}-t{i}", {"seed": i}, {**SPEC, "lora_name": f"s{n}-t{i}",
                                                     "seed": i}, 4000) for i in range(per_sweep)]
        plan = SweepPlan(name=f"sweep{n}", method="grid", seed=0, samples=0, max_concurrent=2,
                         policy=policy, metric="loss", parameters={"seed": {}}, base=SPEC,
                         trials=trials)
        sweeps.create(plan, owner)
    for i in range(10):
        store.create("train", {**SPEC, "lora_name": f"single{i}"}, ("ana", "eve")[i % 2],
                     gpu_memory_mb=4000)
    running = store.create("train", {**SPEC, "lora_name": "running"}, "ana", gpu_memory_mb=4000)
    store.transition(running, JobState.ASSIGNED, "placed", worker="w1")
    store.transition(running, JobState.RUNNING, "started")


def heartbeat(r: redis.Redis, stop: threading.Event, free_unfit: bool = False) -> None:
    fleet = Fleet(r, PREFIX)
    job = JobStore(r, PREFIX).active()[0]["id"]
    while not stop.is_set():
        fleet.heartbeat("w1", state="busy", job=job, device="cuda:0", mem_total_mb=81559,
                        mem_free_mb=60000)
        if free_unfit:  # idle, and too small for any queued job (each needs 4,000 MB)
            fleet.heartbeat("w2", state="idle", job="", device="cuda:1", mem_total_mb=2000,
                            mem_free_mb=2000)
        stop.wait(1.0)


def time_ticks(r: redis.Redis, passes: int = 20) -> float:
    d = Dispatcher(JobStore(r, PREFIX), Fleet(r, PREFIX), send=lambda *a: None)
    d.tick()  # the first pass fills whatever the dispatcher keeps between passes
    started = time.perf_counter()
    for _ in range(passes):
        assert d.tick() == []
    d.release_lock()
    return (time.perf_counter() - started) / passes


def cpu_share(url: str, seconds: float, home: Path) -> float:
    env = {**os.environ, "LORAFLEET_REDIS_URL": url, "LORAFLEET_PREFIX": PREFIX,
           "LORAFLEET_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-m", "dispatcher"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # imports, first pass
        t0, c0 = time.monotonic(), _cpu(p.pid)
        time.sleep(seconds)
        return (_cpu(p.pid) - c0) / (time.monotonic() - t0)
    finally:
        p.terminate()
        p.wait(10)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs-per-sweep", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--free-unfit", action="store_true",
                    help="also an idle worker whose card no queued job fits")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(Path(tmp), port, password="bench", log_file=Path(tmp) / "redis.log")
        url = f"redis://:bench@127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url, decode_responses=True)
        stop = threading.Event()
        try:
            fill(r, args.jobs_per_sweep)
            threading.Thread(target=heartbeat, args=(r, stop, args.free_unfit),
                             daemon=True).start()
            time.sleep(0.2)
            queued = r.zcard(f"{PREFIX}:pending")
            per_pass = time_ticks(r)
            share = cpu_share(url, args.seconds, Path(tmp))
            case = "a free card no queued job fits" if args.free_unfit else "no free card"
            print(f"{case}; queued jobs: {queued}; one pass: {per_pass * 1000:.1f} ms; dispatcher "
                  f"process (passes every 0.5 s): {share * 100:.1f} % of a core")
        finally:
            stop.set()
            r.close()
            stop_server(proc)


if __name__ == "__main__":
    main()
