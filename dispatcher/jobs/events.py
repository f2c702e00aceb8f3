"""Job events: a durable Redis Stream per job, announced on pub/sub for live views.

Every event is a flat JSON object with at least `type` and `time`. Types:
  state   {state, reason}                         a job changed state
  train   {step, total_steps, epoch, loss, learning_rate, tokens_per_s, eta_s,
           gpu_mem_mb, time}                       one logged optimizer step
  eval    {step, eval_loss}                        an evaluation pass
  log     {line}                                   a line of the worker's log
  warning {message}                                something the user should see on the chart
  continues {lora, step}                          a training job continues an existing LoRA
  result  {lora_dir, ...}                          the outcome of a finished job
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


class EventLog:
    def __init__(self, redis, prefix: str = "lf", clock: Callable[[], float] = time.time):
        self.r = redis
        self.prefix = prefix
        self.clock = clock

    def stream_key(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    @property
    def channel(self) -> str:
        """Pub/sub channel announcing every event of every job (payload: job id and event)."""
        return f"{self.prefix}:live"

    def append(self, job_id: str, type: str, **data: Any) -> str:
        event = self.event(type, **data)
        event_id = self.r.xadd(self.stream_key(job_id), {"data": self.payload(event)})
        self.announce(job_id, event_id, event)
        return event_id

    def event(self, type: str, **data: Any) -> dict[str, Any]:
        return {"type": type, "time": data.pop("time", None) or self.clock(), **data}

    @staticmethod
    def payload(event: dict[str, Any]) -> str:
        return json.dumps(event, separators=(",", ":"))

    def announce(self, job_id: str, event_id: str, event: dict[str, Any]) -> None:
        """Tell live listeners about an event already in the job's stream."""
        self.r.publish(self.channel, json.dumps({"job": job_id, "id": event_id, "event": event}))

    def history(self, job_id: str, after: str | None = None,
                count: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Events after the stream id `after` (all of them when None), oldest first."""
        start = f"({after}" if after else "-"
        rows = self.r.xrange(self.stream_key(job_id), min=start, max="+", count=count)
        return [(eid, json.loads(fields["data"])) for eid, fields in rows]

    def wait(self, job_id: str, after: str, block_ms: int = 15000
             ) -> list[tuple[str, dict[str, Any]]]:
        """Block until events newer than `after` arrive (or the timeout passes)."""
        res = self.r.xread({self.stream_key(job_id): after or "0-0"}, block=block_ms, count=500)
        if not res:
            return []
        return [(eid, json.loads(fields["data"])) for eid, fields in res[0][1]]
