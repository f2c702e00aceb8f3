"""The worker registry: heartbeats in, the list of live workers out.

Each worker writes `{p}:worker:{name}` (a hash) every few seconds and adds its name to
`{p}:workers`. A worker whose last heartbeat is older than the timeout counts as gone.
Heartbeat fields: name, host, queue, device (cuda:N or cpu), gpu_index, card, mem_total_mb,
mem_free_mb, state (idle | busy | stopping), job, pid, started, seen; job_pid (the process that
runs the job); outside_mb, outside_pids, outside_how (card memory held by processes that are not
the worker's, gpuworker.telemetry.outside_use); mem_limit_mb (`--memory-mb`: the scheduler
gates even a CPU worker on memory) and mem_usable_mb (what a job could have once the worker is
idle: the total or the cap, less memory held outside lorafleet); task_attempt ("1": its tasks
take the attempt they were sent for, dispatcher.jobs.celery_app).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dispatcher.jobs.states import WorkerState

_NUM = ("mem_total_mb", "mem_free_mb", "seen", "started", "pid", "job_pid", "outside_mb",
        "mem_limit_mb", "mem_usable_mb")


def worker_queue(name: str) -> str:
    """The Celery queue that only this worker consumes: the dispatcher decides placement."""
    return f"lorafleet.worker.{name}"


class Fleet:
    def __init__(self, redis, prefix: str = "lf", timeout: float = 15.0,
                 clock: Callable[[], float] = time.time):
        self.r = redis
        self.p = prefix
        self.timeout = timeout
        self.clock = clock

    def key(self, name: str) -> str:
        return f"{self.p}:worker:{name}"

    def heartbeat(self, name: str, **fields: Any) -> None:
        now = self.clock()
        mapping = {"name": name, "seen": now, **{k: ("" if v is None else v)
                                                  for k, v in fields.items()}}
        with self.r.pipeline() as pipe:
            pipe.hset(self.key(name), mapping=mapping)
            pipe.sadd(f"{self.p}:workers", name)
            pipe.execute()

    def restarting(self, name: str) -> None:
        """A new process of this name starts: until its first heartbeat (which sets its
        state), the name is `starting` and not alive, so nothing is assigned to it, whatever
        its earlier process last reported and whatever timeout the reader uses."""
        if self.r.exists(self.key(name)):
            self.r.hset(self.key(name), mapping={"state": WorkerState.STARTING.value, "job": "",
                                                  "jobs": "", "pack": ""})

    def remove(self, name: str) -> None:
        with self.r.pipeline() as pipe:
            pipe.delete(self.key(name))
            pipe.srem(f"{self.p}:workers", name)
            pipe.execute()

    def workers(self, include_gone: bool = True) -> list[dict[str, Any]]:
        """Every known worker with `alive` set from the age of its last heartbeat."""
        names = sorted(self.r.smembers(f"{self.p}:workers"))
        with self.r.pipeline() as pipe:
            for n in names:
                pipe.hgetall(self.key(n))
            raws = pipe.execute()
        now = self.clock()
        out = []
        for raw in raws:
            if not raw:
                continue
            w: dict[str, Any] = dict(raw)
            for k in _NUM:
                if w.get(k, "") != "":
                    w[k] = float(w[k])
            fresh = now - float(w.get("seen", 0)) <= self.timeout
            starting = w.get("state") == WorkerState.STARTING.value
            w["alive"] = fresh and not starting
            # (A process that died before its first heartbeat is gone once the timeout passes.)
            if not w["alive"] and not (starting and fresh):
                w["state"] = WorkerState.GONE.value
            if include_gone or w["alive"]:
                out.append(w)
        return out

    def alive(self) -> list[dict[str, Any]]:
        return self.workers(include_gone=False)
