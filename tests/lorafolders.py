"""What a LoRA folder holds when nothing was left half-written: shared by the disk-fault tests
(tests/integration/test_disk_memory_faults.py) and the chaos run's `folders` invariant
(tests/chaos/harness.py)."""

from __future__ import annotations

import json
from pathlib import Path

from gpuworker.checkpoints import CHECKPOINT_RE, COMPLETE_SAVE, STAGING_PREFIXES

# Every file a complete checkpoint-<step>/ holds (gpuworker/engine/save.py save_checkpoint).
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_log.json",
                    "training_prompt.json", "training_state.json", "training_state.pt")
# Every file a finished LoRA folder holds (gpuworker/engine/train.py): training_parameters.json
# and training_prompt.json, written when the run opens the folder, then the final save's
# adapter, its config and training_log.json (gpuworker/engine/save.py save_adapter). A pack's
# trials write the same.
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_log.json",
              "training_parameters.json", "training_prompt.json")
# A checkpoint of the same step being replaced (save_checkpoint renames the old one to this,
# then the new one into place): left behind by a kill between the two renames.
OLD_CHECKPOINT_PREFIX = ".old-checkpoint-"


def incomplete_checkpoint(folder: Path) -> str | None:
    """Why `folder` (a checkpoint-<step>/) is not a complete checkpoint, or None."""
    names = sorted(p.name for p in folder.iterdir())
    if names == list(CHECKPOINT_FILES):
        return None
    missing = sorted(set(CHECKPOINT_FILES) - set(names))
    extra = sorted(set(names) - set(CHECKPOINT_FILES))
    return f"missing {missing}, extra {extra}"


def incomplete_lora(folder: Path) -> str | None:
    """Why `folder` is not a finished LoRA, or None: a file of LORA_FILES missing, or one of
    its JSON files not a JSON object. Other entries (checkpoints, backups, the lock file) may
    be there; whether the adapter loads is the caller's to check."""
    missing = [n for n in LORA_FILES if not (folder / n).is_file()]
    if missing:
        return f"not a finished LoRA: missing {missing}"
    for name in LORA_FILES:
        if name.endswith(".json"):
            try:
                ok = isinstance(json.loads((folder / name).read_text()), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                return f"not a finished LoRA: {name} is not a JSON object"
    return None


def leftovers(lora_dir: Path) -> list[str]:
    """What a killed save left in one LoRA folder, one line each: a hidden staging folder or
    file (STAGING_PREFIXES, `.old-checkpoint-*`, a final save's `.complete-save` not moved
    into place), a temporary file (`*.tmp`, at any depth) and
    a checkpoint-<step>/ that is not complete. Other hidden entries (a lock file, say) are
    not leftovers."""
    found = []
    for entry in sorted(lora_dir.iterdir()):
        name = entry.name
        if name.startswith((*STAGING_PREFIXES, OLD_CHECKPOINT_PREFIX, COMPLETE_SAVE)):
            found.append(f"{name}: staging left")
        elif CHECKPOINT_RE.match(name) and entry.is_dir() and not entry.is_symlink():
            why = incomplete_checkpoint(entry)
            if why:
                found.append(f"{name}: incomplete checkpoint ({why})")
    tmp = sorted(str(p.relative_to(lora_dir)) for p in lora_dir.rglob("*.tmp"))
    found += [f"{t}: temporary file left" for t in tmp]
    return found


def assert_no_half_written(lora_dir: Path) -> None:
    """No hidden entry at all (no staging folder, no temporary file) and every checkpoint
    complete: what the disk-fault tests require after a failed save."""
    hidden = [p.name for p in lora_dir.iterdir() if p.name.startswith(".")]
    assert hidden == [], hidden
    for ck in lora_dir.glob("checkpoint-*"):
        assert incomplete_checkpoint(ck) is None, (ck, incomplete_checkpoint(ck))
