"""Names of a run's `checkpoint-<step>/` folders, without torch: the engine resumes from them,
and the worker's main process (which must not import torch) names the last one when it kills
a job that did not answer a stop request, and clears what a killed process left half-saved."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
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


# The hidden names staging() and formats.files.atomic_write give work in progress, and the
# name save_checkpoint gives a checkpoint it is replacing (removed once the new one is in).
STAGING_PREFIXES = (".checkpoint-", ".saving-", ".old-checkpoint-")
OLD_CHECKPOINT_RE = re.compile(r"^\.old-checkpoint-(\d+)$")
# The final save's files, complete, on their way into the LoRA folder (gpuworker.engine.save):
# once this folder exists the save counts as made, and whoever holds the folder's lock next
# finishes moving its files into place should the saving process die halfway.
COMPLETE_SAVE = ".complete-save"
# The file whose arrival says the save is done goes in last.
_LAST = "training_log.json"


@dataclass
class Tidied:
    """What `clear_staging` did to a LoRA folder."""

    removed: list[str] = field(default_factory=list)  # half-written entries, deleted
    restored: list[str] = field(default_factory=list)  # checkpoint-N/ put back from its old copy
    finished: list[str] = field(default_factory=list)  # a final save's files moved into place

    def __bool__(self) -> bool:
        return bool(self.removed or self.restored or self.finished)

    def lines(self) -> list[str]:
        out = []
        if self.finished:
            out.append("Finished the final save an interrupted process had made: moved "
                       + ", ".join(self.finished) + " into place")
        if self.restored:
            out.append("Put back what a checkpoint's interrupted replacement had set aside: "
                       + ", ".join(self.restored))
        if self.removed:
            out.append("Removed what an interrupted save left half-written: "
                       + ", ".join(self.removed))
        return out


def clear_staging(lora_dir: Path) -> Tidied:
    """Tidy what an earlier process of this LoRA left when it died in the middle of a save:
    a complete final save (COMPLETE_SAVE) is finished; hidden staging folders and temporary
    files are removed; a `checkpoint-<step>/` that was being replaced (renamed to
    `.old-checkpoint-<step>/`, its successor not yet in place) is put back. Run it only while holding the folder's lock (gpuworker.folderlock): a live
    process's staging looks the same as a dead one's."""
    tidied = Tidied()
    if not lora_dir.is_dir():
        return tidied
    tidied.finished = finish_save(lora_dir)
    for entry in sorted(lora_dir.iterdir()):
        m = OLD_CHECKPOINT_RE.match(entry.name)
        final = lora_dir / f"checkpoint-{m.group(1)}" if m else None
        if (final is not None and entry.is_dir() and not entry.is_symlink()
                and not final.exists() and not final.is_symlink()):
            # Killed between the renames: the old one is the complete checkpoint of that step.
            entry.rename(final)
            tidied.restored.append(final.name)
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
        tidied.removed.append(entry.name)
    tidied.removed.sort()
    return tidied


def finish_save(lora_dir: Path) -> list[str]:
    """Move the files of the complete final save in `lora_dir` (its COMPLETE_SAVE folder, if
    there is one) over the LoRA's own, training_log.json last, and remove the emptied folder.
    Returns the names moved. Run it only while holding the folder's lock."""
    done = lora_dir / COMPLETE_SAVE
    if done.is_symlink() or not done.is_dir():
        return []
    names = sorted(p.name for p in done.iterdir() if p.is_file() and not p.is_symlink())
    names.sort(key=lambda n: n == _LAST)
    for name in names:
        os.replace(done / name, lora_dir / name)
    shutil.rmtree(done, ignore_errors=True)
    return names
