"""What a job came to, in a few words, for the job lists (dashboard and `lorafleet status`):
a perplexity for an evaluation, "answered" for a generation, the final loss for training, and
how long the job ran. Evaluation and generation jobs have no steps, so a progress column alone
would make them look stuck."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from dispatcher.jobs.record import JobRecord


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def outcome(job: JobRecord | Mapping[str, Any]) -> str:
    """The job's result as a short text; "" while it has none."""
    rec = JobRecord.of(job)
    result = rec.result or {}
    if rec.kind == "evaluate":
        ppl = _number(result.get("perplexity"))
        return f"perplexity {ppl:.4f}" if ppl is not None else ""
    if rec.kind == "generate":
        if result.get("base") or result.get("lora"):
            return "answered" + (" (stopped)" if result.get("stopped") else "")
        return ""
    loss = _number(result.get("final_loss"))
    if loss is None and rec.terminal:
        loss = _number(rec.get("loss"))
    return f"final loss {loss:.4f}" if loss is not None else ""


def duration_s(job: JobRecord | Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds from start to end (to now while it runs); None before it started."""
    rec = JobRecord.of(job)
    started = _number(rec.started)
    if started is None:
        return None
    end = _number(rec.finished) if rec.terminal else None
    if end is None:
        end = time.time() if now is None else now
    return max(0.0, end - started)


def list_fields(job: JobRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The job lists' columns that are worked out from the record."""
    rec = JobRecord.of(job)
    return {"kind": rec.kind, "outcome": outcome(rec), "duration_s": duration_s(rec)}
