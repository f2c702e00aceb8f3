"""What the fault tests share: a fleet of real processes on a tiny model, and readers of its
jobs' records, events, checkpoints and logs (tests/integration/test_faults*.py)."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from dispatcher.host.embedded import free_port, start_server, stop_server
from dispatcher.jobs.specs import parse_train_spec
from tests.fleetproc import FleetProcs, small_spec
from tests.tiny import make_tiny_model, write_tiny_dataset

TERMINAL = ("succeeded", "failed", "cancelled")
# A training job that runs for several seconds: 24 rows, micro batch 2, batch 24 -> one
# optimizer step (12 micro-batches) per epoch.
SLOW = {"micro_batch_size": 2, "batch_size": 24}


class OwnRedis:
    """A Redis server of the test's own, append-only with every write synced, that the test
    stops and starts again on the same port and folder (an outage that loses nothing)."""

    def __init__(self, tmp_path: Path):
        self.port, self.data = free_port(), tmp_path / "redis"
        self.password, self.log = secrets.token_urlsafe(16), tmp_path / "redis.log"
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = start_server(self.data, self.port, password=self.password,
                                   log_file=self.log, appendfsync="always")

    def stop(self) -> None:
        stop_server(self.server)


def make_fleet(redis_url: str, home: Path, workers: tuple[str, ...] = ("a",),
               dispatchers: tuple[str, ...] = ("dispatcher",),
               dashboard: bool = False) -> FleetProcs:
    f = FleetProcs(home, redis_url, prefix=f"ft{time.monotonic_ns()}")
    # One thread per training process: several trainers share a small CPU here, and OpenMP
    # threads waiting on each other on an oversubscribed CPU slow a step down many times over.
    f.env["OMP_NUM_THREADS"] = "1"
    make_tiny_model(f.settings.paths.models / "tiny")
    write_tiny_dataset(f.settings.paths.datasets / "tiny.json")
    write_tiny_dataset(f.settings.paths.datasets / "two.json", n=2)
    for d in dispatchers:
        f.start_dispatcher(d)
    for w in workers:
        f.start_worker(w)
    if dashboard:
        f.start_dashboard()
    f.wait_for_workers(len(workers))
    return f


def submit(f: FleetProcs, **over) -> str:
    spec = parse_train_spec(small_spec(**over), f.settings.paths)
    return f.store.create("train", spec.to_dict(), owner="tester")


def events(f: FleetProcs, job: str) -> list[dict]:
    return [e for _, e in f.store.events.history(job)]


def states(f: FleetProcs, job: str) -> list[str]:
    return [h["state"] for h in f.store.history(job)]


def last_step(f: FleetProcs, job: str) -> int:
    """The newest train event's step (read from the stream, not the once-a-second record)."""
    for _, fields in f.r.xrevrange(f.store.events.stream_key(job), count=20):
        if '"type":"train"' in fields["data"]:
            return int(re.search(r'"step":(\d+)', fields["data"]).group(1))
    return 0


def checkpoints(f: FleetProcs, lora: str) -> list[int]:
    folder = f.settings.paths.loras / lora
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")
                  if p.name.split("-")[1].isdigit())


def run_workers(f: FleetProcs, job: str) -> list[str]:
    """The worker of each `running` transition, in order (reason: 'running on <name>')."""
    return [h["reason"].removeprefix("running on ") for h in f.store.history(job)
            if h["state"] == "running"]


def skipped(f: FleetProcs) -> list[str]:
    """Jobs a worker received but did not run because they were not (or no longer) its own."""
    return [j for name in f.procs if name.startswith("worker-")
            for j in re.findall(r"job ([0-9a-f]{12}) is \w+ on .*; skipping", f.log(name))]


def assert_no_duplicate_delivery(f: FleetProcs) -> None:
    assert skipped(f) == [], [f.log(n)[-3000:] for n in f.procs if n.startswith("worker-")]
