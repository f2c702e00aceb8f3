"""Names of a run's `checkpoint-<step>/` folders, without torch: the engine resumes from them,
and the worker's main process (which must not import torch) names the last one when it kills
a job that did not answer a stop request, and clears what a killed process left half-saved."""

from __future__ import annotations

import re
import shutil
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


# The hidden names staging() and formats.files.atomic_write give work in progress.
STAGING_PREFIXES = (".checkpoint-", ".saving-")


def clear_staging(lora_dir: Path) -> list[str]:
    """Remove what an earlier process of this LoRA left half-written when it died (killed in
    the middle of a save): hidden staging folders and temporary files. Called when a run opens
    the folder, before it writes anything; returns the names removed."""
    removed = []
    if not lora_dir.is_dir():
        return removed
    for entry in lora_dir.iterdir():
        stale = ((entry.is_dir() and not entry.is_symlink()
                  and entry.name.startswith(STAGING_PREFIXES))
                 or (entry.name.startswith(".") and entry.name.endswith(".tmp")))
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
