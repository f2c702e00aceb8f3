"""What finished runs leave behind for the scheduler: each owner's run intervals (fair share)
and the lengths of recent successful runs (estimated start times).

Keys (prefix `lf` by default):
  {p}:usage:{owner}   sorted set of the owner's finished runs: member "{id}:{started}:{worker}"
                      ("{id}:{started}" before packs), score the time the run ended (what
                      fair share sums over its window; runs on one worker at once, a pack's
                      trials, count their card time once)
  {p}:durations       list of recent succeeded runs as JSON {kind, base_model, seconds}
Written in the same MULTI as the transition that ends the run (JobStore.transition).
"""

from __future__ import annotations

import json
from typing import Any

from dispatcher.jobs.record import JobRecord
from dispatcher.jobs.states import JobState

# Runs older than this are dropped from the usage sets (any fair-share window is shorter).
USAGE_KEEP_S = 30 * 86400
DURATIONS_KEPT = 200


class RunLog:
    def __init__(self, redis: Any, prefix: str = "lf"):
        self.r = redis
        self.p = prefix

    def usage_key(self, owner: str) -> str:
        return f"{self.p}:usage:{owner}"

    @property
    def durations_key(self) -> str:
        return f"{self.p}:durations"

    def record_run(self, pipe: Any, rec: JobRecord, now: float, new: JobState) -> None:
        """`rec`'s run just ended in state `new` (queued on `pipe`): its interval goes to the
        owner's usage and, if it succeeded, its length to the recent durations."""
        started = float(rec.started or 0.0)
        owner = rec.owner or "local"
        pipe.zadd(self.usage_key(owner), {f"{rec.id}:{started!r}:{rec.worker}": now})
        pipe.zremrangebyscore(self.usage_key(owner), "-inf", now - USAGE_KEEP_S)
        if new == JobState.SUCCEEDED:
            pipe.lpush(self.durations_key, json.dumps({
                "kind": rec.kind, "base_model": rec.spec.get("base_model", ""),
                "seconds": max(0.0, now - started)}))
            pipe.ltrim(self.durations_key, 0, DURATIONS_KEPT - 1)

    def runs(self, owners: list[str], since: float
             ) -> dict[str, list[tuple[float, float, str]]]:
        """Each owner's finished runs (start, end, worker) that ended after `since` (worker ""
        for a run recorded before workers were)."""
        with self.r.pipeline() as pipe:
            for o in owners:
                pipe.zrangebyscore(self.usage_key(o), since, "+inf", withscores=True)
            raws = pipe.execute()
        out: dict[str, list[tuple[float, float]]] = {}
        for owner, rows in zip(owners, raws, strict=True):
            out[owner] = [_run(member, float(end)) for member, end in rows]
        return out

    def recent_durations(self) -> list[dict[str, Any]]:
        """The latest succeeded runs, newest first: {kind, base_model, seconds}."""
        return [json.loads(x) for x in self.r.lrange(self.durations_key, 0, -1)]


def _run(member: str, end: float) -> tuple[float, float, str]:
    parts = member.split(":", 2)
    return float(parts[1]), end, parts[2] if len(parts) > 2 else ""
