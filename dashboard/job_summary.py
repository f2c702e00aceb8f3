"""A job page's summary (issue 11, point 8): how long it ran, when it finished, its final and
best evaluation loss, and whether it can be resumed from a checkpoint of its LoRA folder.

Resume is offered on a training job that ended without finishing (stopped, cancelled or
failed) whose LoRA folder holds a `checkpoint-<step>/`; the page queues it again through the
ordinary submit API with `resume_from_checkpoint: latest`, so the owner rules of a new job hold.
"""

from __future__ import annotations

import re
from typing import Any

from dispatcher.access.links import inside
from dispatcher.jobs.outcome import duration_s
from dispatcher.jobs.specs import LORA_NAME_RE
from dispatcher.jobs.states import TERMINAL_VALUES, JobState
from dispatcher.settings import DataPaths

RESUMABLE_STATES = (JobState.CANCELLED.value, JobState.FAILED.value)
# gpuworker/checkpoints.py's name pattern (the dashboard does not import the worker).
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def last_checkpoint_step(rec: dict[str, Any], paths: DataPaths) -> int | None:
    """The step of the newest checkpoint this job's run wrote in its LoRA folder, or None: the
    job must have started, and the checkpoint be written since (an older run's checkpoint in
    the same folder is not this job's to resume)."""
    name = str((rec.get("spec") or {}).get("lora_name", ""))
    started = _float(rec.get("started"))
    if not LORA_NAME_RE.match(name) or started is None:
        return None
    folder = paths.loras / name
    if not inside(folder, paths.loras) or not folder.is_dir():
        return None
    steps = [int(m.group(1)) for p in folder.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
             and p.stat().st_mtime >= started - 1]  # (a coarse file-system clock)
    return max(steps) if steps else None


def summary(rec: dict[str, Any], paths: DataPaths, busy_names: set[str]) -> dict[str, Any]:
    """The summary of `rec`; `busy_names` are the LoRA names waiting or running jobs write (no
    Resume into a folder another job is writing)."""
    result = rec.get("result") if isinstance(rec.get("result"), dict) else {}
    final_loss = _float(result.get("final_loss"))
    if final_loss is None and rec.get("state") in TERMINAL_VALUES:
        final_loss = _float(rec.get("loss"))
    out: dict[str, Any] = {
        "duration_s": duration_s(rec), "finished": _float(rec.get("finished")),
        "final_loss": final_loss, "final_eval_loss": _float(rec.get("eval_loss")),
        "best_eval_loss": _float(rec.get("best_eval_loss")), "resume_step": None}
    name = (rec.get("spec") or {}).get("lora_name")
    if (rec.get("kind", "train") == "train" and rec.get("state") in RESUMABLE_STATES
            and name not in busy_names):
        out["resume_step"] = last_checkpoint_step(rec, paths)
    return out
