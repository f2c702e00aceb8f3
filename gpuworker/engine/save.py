"""Phase 4: writing the LoRA folder and checkpoints, atomically.

Every file is written under a temporary name in the same folder and then renamed over the
final one (formats.files.atomic_write_json; a rename within a file system is atomic), and a
checkpoint folder is assembled under a hidden name and renamed into place whole. A crash therefore leaves either the old
file or the new one, never half of one.

The final LoRA's files (adapter, config, training_log.json) are all written into one hidden
folder before any of them is renamed into place, so a write that fails (a full disk above all:
renames need no space) leaves the LoRA folder exactly as it was. Such a failure is raised as
DiskFull, naming the folder (gpuworker.diskspace). Once complete, that folder is renamed to
`.complete-save` and its files into place; a process killed between those renames leaves the
set for the next holder of the folder's lock to finish (see save_adapter).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from formats.files import atomic_write_json, umask_mode
from gpuworker.checkpoints import COMPLETE_SAVE, finish_save
from gpuworker.diskspace import disk_full, is_disk_full, space_of
from gpuworker.engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SOLO_ADAPTER

TRAINING_PARAMETERS = "training_parameters.json"
TRAINING_PROMPT = "training_prompt.json"
TRAINING_LOG = "training_log.json"
# Checkpoints only: what a later resume needs besides the adapter.
TRAINING_STATE = "training_state.pt"
TRAINING_STATE_JSON = "training_state.json"


def share(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode an ordinary write would have.

    mkstemp/mkdtemp (and safetensors) create private files (0600/0700); a LoRA folder is read by
    the team's other processes (the dashboard's zip download, text-generation-webui), so it
    gets 0666/0777 less the umask like any other file.
    """
    file_mode, folder_mode = umask_mode(0o666), umask_mode(0o777)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        os.chmod(p, folder_mode if p.is_dir() else file_mode)


def _save_adapter_into(peft_model: Any, folder: Path, base_model_name: str,
                       adapter: str) -> None:
    """peft's save_pretrained of `adapter` into `folder`, keeping only the adapter's two
    files (a pack's adapter as a model with that adapter alone would write them)."""
    config = peft_model.peft_config[adapter]
    # Record the data-folder name of the base model, not this machine's path to it, so the
    # folder means the same on another host (and in text-generation-webui).
    saved_name = config.base_model_name_or_path
    config.base_model_name_or_path = base_model_name
    try:
        peft_model.save_pretrained(str(folder), safe_serialization=True,
                                   save_embedding_layers=False, selected_adapters=[adapter])
    finally:
        config.base_model_name_or_path = saved_name
    if adapter != SOLO_ADAPTER:  # peft writes any other adapter into a folder of its name
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(folder / adapter / name, folder / name)
        shutil.rmtree(folder / adapter)
    (folder / "README.md").unlink(missing_ok=True)


def lora_shown(lora_dir: Path) -> str:
    """`lora_dir` as the data folder names it: loras/<lora_name>/."""
    return f"{lora_dir.parent.name}/{lora_dir.name}/"


@contextmanager
def staging(lora_dir: Path, prefix: str, doing: str) -> Iterator[Path]:
    """A hidden folder in `lora_dir` to assemble files in, removed whatever happens. A write
    that fails for want of space is raised as DiskFull ("... while <doing> in loras/x/"):
    whether the disk is full is asked before the partial files are removed, since they are
    what fills it."""
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=lora_dir, prefix=prefix))
        yield tmp
    except Exception as e:
        full = is_disk_full(e, lora_dir)
        space = space_of(lora_dir)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(lora_shown(lora_dir), doing, space) from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(peft_model: Any, lora_dir: Path, base_model_name: str,
                 adapter: str = SOLO_ADAPTER,
                 training_log: dict[str, Any] | None = None) -> None:
    """Write adapter_model.safetensors, adapter_config.json and (given) training_log.json
    into `lora_dir`: all of them first into a hidden folder, which is renamed to
    COMPLETE_SAVE once they are complete; then its files are renamed into place one by one,
    training_log.json last (gpuworker.checkpoints.finish_save). Killed between those renames,
    the process leaves the complete set to whoever next holds the folder's lock, which
    finishes it: the folder never stays with the new adapter beside the old config or log.
    (A reader at that moment can see such a mix: the LoRA's files are in the folder itself,
    where text-generation-webui and peft read them, and several renames are not one.) Call
    it while holding the folder's lock (gpuworker.folderlock)."""
    lora_dir.mkdir(parents=True, exist_ok=True)
    with staging(lora_dir, ".saving-", "saving the LoRA") as tmp:
        _save_adapter_into(peft_model, tmp, base_model_name, adapter)
        if training_log is not None:
            atomic_write_json(tmp / TRAINING_LOG, training_log)
        share(tmp)
        done = lora_dir / COMPLETE_SAVE
        shutil.rmtree(done, ignore_errors=True)  # (none: opening the folder finished any)
        tmp.rename(done)
    finish_save(lora_dir)


def save_checkpoint(peft_model: Any, lora_dir: Path, step: int, base_model_name: str, *,
                    training_log: dict[str, Any], training_prompt: dict[str, Any],
                    state: dict[str, Any], state_summary: dict[str, Any],
                    adapter: str = SOLO_ADAPTER) -> Path:
    """Write checkpoint-<step>/ (adapter, logs, resumable state) and rename it into place."""
    final = lora_dir / f"checkpoint-{step}"
    with staging(lora_dir, f".checkpoint-{step}-", f"saving {final.name}") as tmp:
        _save_adapter_into(peft_model, tmp, base_model_name, adapter)
        atomic_write_json(tmp / TRAINING_LOG, training_log)
        atomic_write_json(tmp / TRAINING_PROMPT, training_prompt)
        atomic_write_json(tmp / TRAINING_STATE_JSON, state_summary)
        torch.save(state, tmp / TRAINING_STATE)
        share(tmp)
        if final.exists():
            # A checkpoint of the same step from an earlier run of this LoRA: replace it, but
            # only after the new one is complete.
            old = lora_dir / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    return final
