"""What a job came to, in a few words, for the job lists (dashboard and `lorafleet status`):
a perplexity for an evaluation, "answered" for a generation, the final loss for training, and
how long the job ran. Evaluation and generation jobs have no steps, so a progress column alone
would make them look stuck."""

from __future__ import annotations

import math
import time
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def outcome(rec: dict[str, Any]) -> str:
    """The job's result as a short text; "" while it has none."""
    kind = rec.get("kind") or "train"
    result = rec.get("result") if isinstance(rec.get("result"), dict) else {}
    if kind == "evaluate":
        ppl = _number(result.get("perplexity"))
        return f"perplexity {ppl:.4f}" if ppl is not None else ""
    if kind == "generate":
        if result.get("base") or result.get("lora"):
            return "answered" + (" (stopped)" if result.get("stopped") else "")
        return ""
    loss = _number(result.get("final_loss"))
    if loss is None and rec.get("state") in TERMINAL:
        loss = _number(rec.get("loss"))
    return f"final loss {loss:.4f}" if loss is not None else ""


def duration_s(rec: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds from start to end (to now while it runs); None before it started."""
    started = _number(rec.get("started"))
    if started is None:
        return None
    end = _number(rec.get("finished")) if rec.get("state") in TERMINAL else None
    if end is None:
        end = time.time() if now is None else now
    return max(0.0, end - started)


def list_fields(rec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": rec.get("kind") or "train", "outcome": outcome(rec),
            "duration_s": duration_s(rec)}
