"""Names of a run's `checkpoint-<step>/` folders, without torch: the engine resumes from them,
and the worker's main process (which must not import torch) names the last one when it kills
a job that did not answer a stop request."""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder name, or None for any other name."""
    m = CHECKPOINT_RE.match(folder.name)
    return int(m.group(1)) if m else None


def list_checkpoints(lora_dir: Path) -> list[Path]:
    """The `checkpoint-<step>/` folders directly in `lora_dir`, complete or not, by step."""
    if not lora_dir.is_dir():
        return []
    found = [p for p in lora_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)
