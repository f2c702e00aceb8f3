"""Sweep records in Redis. A sweep's trials are ordinary jobs (in JobStore) with a `sweep`
field; this store keeps the sweep itself and what its dispatcher pass decided.

Keys (prefix `lf` by default):
  {p}:sweep:{id}              hash: the record (definition, trials as JSON, owner, ...)
  {p}:sweeps                  sorted set of sweep ids by creation time
  {p}:sweeps:active           set of sweeps with trials or evaluations still to end
  {p}:sweep:{id}:decisions    hash "{job}:{rung}" -> early-stopping decision (JSON), set once
  {p}:sweep:{id}:rung:{step}  list of [job, value] in the order trials reached the rung
  {p}:sweep:{id}:scanned      set of ended trials whose rungs have all been read
  {p}:sweep:{id}:evals        hash job -> id of its perplexity job
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from dispatcher.jobs.record import decode_hash
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import PRIORITIES, JobStore
from dispatcher.schedule.early_stop import Policy
from dispatcher.schedule.sweeps.plan import SweepPlan

log = logging.getLogger("lorafleet.sweeps")


class SweepNotFound(KeyError):
    """No sweep has this id."""


_SWEEP_JSON = ("trials", "skipped", "parameters", "base", "early_stopping", "evaluate",
               "eval_memory_mb")
_SWEEP_NUM = ("created", "finished", "cancelled", "max_concurrent", "seed", "samples",
              "pack_size")


class SweepStore:
    """The sweeps of one Redis prefix, next to that prefix's JobStore."""

    def __init__(self, store: JobStore):
        self.store = store
        self.r = store.r
        self.p = store.p
        self.clock = store.clock

    def key(self, sweep_id: str, part: str = "") -> str:
        return f"{self.p}:sweep:{sweep_id}" + (f":{part}" if part else "")

    @property
    def index_key(self) -> str:
        return f"{self.p}:sweeps"

    @property
    def active_key(self) -> str:
        return f"{self.p}:sweeps:active"

    def create(self, plan: SweepPlan, owner: str = "local", priority: str = "normal") -> str:
        """Record the sweep, then queue its trials (each an ordinary training job)."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        sweep_id = "s" + uuid.uuid4().hex[:11]
        now = self.clock()
        record = {
            "id": sweep_id, "name": plan.name, "owner": owner, "priority": priority,
            "created": now, "method": plan.method, "seed": plan.seed, "samples": plan.samples,
            "max_concurrent": plan.max_concurrent, "metric": plan.metric,
            "parameters": json.dumps(plan.parameters), "base": json.dumps(plan.base),
            "early_stopping": json.dumps(plan.policy.to_dict()),
            "evaluate": json.dumps(plan.evaluate), "eval_memory_mb": json.dumps(plan.eval_memory_mb),
            "skipped": json.dumps(plan.skipped), "trials": "[]", "finished": "", "cancelled": "",
            "pack": plan.pack, "pack_size": plan.pack_size,
        }
        with self.r.pipeline() as pipe:
            pipe.hset(self.key(sweep_id), mapping=record)
            pipe.zadd(self.index_key, {sweep_id: now})
            pipe.sadd(self.active_key, sweep_id)
            pipe.execute()
        for t in plan.trials:
            t.job = self.store.create("train", t.spec, owner, priority,
                                      gpu_memory_mb=t.gpu_memory_mb,
                                      fields={"sweep": sweep_id,
                                              "sweep_cap": plan.max_concurrent,
                                              # how many trials may share a card (packs.py)
                                              "pack_max": plan.pack_max,
                                              "pack_base_mb": t.base_mb,
                                              "pack_lane_mb": t.lane_mb})
        self.r.hset(self.key(sweep_id), "trials", json.dumps([t.to_dict() for t in plan.trials]))
        return sweep_id

    def get(self, sweep_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.key(sweep_id))
        if not raw:
            raise SweepNotFound(sweep_id)
        rec = decode_hash(raw, json_fields=_SWEEP_JSON, number_fields=_SWEEP_NUM,
                          int_fields=("max_concurrent", "seed", "samples", "pack_size"),
                          absent_as_none=True)
        rec["pack"] = rec.get("pack") or "off"  # a sweep from before packs ran its trials alone
        rec["trials"] = rec["trials"] or []
        return rec

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        ids = self.r.zrevrange(self.index_key, 0, limit - 1)
        out = []
        for i in ids:
            try:
                out.append(self.get(i))
            except SweepNotFound:
                pass  # deleted between reading the index and its record: not listed
        return out

    def policy(self, rec: dict[str, Any]) -> Policy:
        es = rec.get("early_stopping") or {}
        return Policy(kind=es.get("policy", "none"), rungs=tuple(es.get("rungs", ())),
                      reduction_factor=int(es.get("reduction_factor", 3)),
                      min_trials=int(es.get("min_trials", 3)))

    def trial_jobs(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """The trials' job records, in trial order (a deleted job is left out)."""
        return self.store.get_many(t["job"] for t in rec["trials"])

    def evals(self, sweep_id: str) -> dict[str, str]:
        return self.r.hgetall(self.key(sweep_id, "evals"))

    def decisions(self, sweep_id: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.key(sweep_id, "decisions")).items()}

    def rung_values(self, sweep_id: str, rung: int) -> list[tuple[str, float]]:
        return [tuple(json.loads(x)) for x in self.r.lrange(self.key(sweep_id, f"rung:{rung}"),
                                                            0, -1)]

    def cancel(self, sweep_id: str, reason: str = "cancelled with its sweep") -> dict[str, Any]:
        """Cancel every trial (and perplexity job) that has not ended; queue no more."""
        rec = self.get(sweep_id)
        self.r.hset(self.key(sweep_id), "cancelled", self.clock())
        self.announce(sweep_id, "cancelled")
        jobs = [t["job"] for t in rec["trials"]] + list(self.evals(sweep_id).values())
        for job_id in jobs:
            try:
                job = self.store.get(job_id)
                if JobState(job["state"]).terminal:
                    continue
                self.store.cancel(job_id, reason, stop_reason=f"stopped: {reason}")
            except Exception:  # it ended (or vanished) meanwhile
                log.exception("sweep %s: could not cancel job %s", sweep_id, job_id)
        return self.get(sweep_id)

    def announce(self, sweep_id: str, change: str) -> None:
        """Tell open Sweep pages that the sweep itself changed (cancelled, finished): no job
        event follows a sweep's own end, and a page that re-reads only on job events would
        keep showing the state it read last. Announced on the live channel as an event of
        type `sweep` (not a job's: it goes into no job's stream)."""
        event = {"type": "sweep", "sweep": sweep_id, "change": change, "time": self.clock()}
        self.r.publish(self.store.events.channel,
                       json.dumps({"job": None, "sweep": sweep_id, "event": event}))
