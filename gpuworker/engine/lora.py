"""Phase 3: the LoRA folder (continue, back up, override) and the LoRA layers themselves.

A LoRA of the same name is continued, as in text-generation-webui: its weights are loaded into
the new layers before training, and a copy of its files is kept in a dated backup folder.
With always_override the old files are moved into that backup folder instead, and training
starts from fresh weights. Nothing is deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dispatcher.access.links import LeadsOutside, check_inside
from gpuworker.errors import EngineError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_LEGACY = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
# peft's name for a model's one adapter; a pack names one per trial (pack.py).
SOLO_ADAPTER = "default"
BACKUP_PREFIX = "backup-"


@dataclass
class Existing:
    """What is already in loras/<name>/ that training continues from (or None)."""

    weights: Path
    rank: int | None
    steps: int | None = None  # the optimizer steps of the run that saved it (training_log.json)


def existing_adapter(lora_dir: Path) -> Existing | None:
    for name in (ADAPTER_WEIGHTS, ADAPTER_LEGACY):
        if (lora_dir / name).is_file():
            _refuse_outside(lora_dir / name, lora_dir)
            _refuse_outside(lora_dir / ADAPTER_CONFIG, lora_dir)
            rank = None
            cfg = lora_dir / ADAPTER_CONFIG
            if cfg.is_file():
                try:
                    rank = int(json.loads(cfg.read_text(encoding="utf-8")).get("r"))
                except (OSError, ValueError, TypeError, json.JSONDecodeError):
                    rank = None
            return Existing(weights=lora_dir / name, rank=rank, steps=_saved_steps(lora_dir))
    return None


def _saved_steps(lora_dir: Path) -> int | None:
    path = lora_dir / "training_log.json"
    try:
        check_inside(path, lora_dir, f"loras/{lora_dir.name}/{path.name}")
        return int(json.loads(path.read_text(encoding="utf-8")).get("current_steps"))
    except (LeadsOutside, OSError, ValueError, TypeError, AttributeError, json.JSONDecodeError):
        return None


def _refuse_outside(path: Path, lora_dir: Path) -> None:
    """A file of the LoRA that is a link leading out of its folder is not read."""
    try:
        check_inside(path, lora_dir, f"loras/{lora_dir.name}/{path.name}")
    except LeadsOutside as e:
        raise EngineError(str(e)) from None


def check_continue(lora_name: str, existing: Existing | None, rank: int) -> None:
    """Continuing keeps the rank: the saved matrices have its shape."""
    if existing is not None and existing.rank is not None and existing.rank != rank:
        raise EngineError(
            f"LoRA '{lora_name}' already exists with rank {existing.rank}, and lora_rank is "
            f"{rank}: the rank cannot change when continuing a LoRA. Set lora_rank to "
            f"{existing.rank}, pick another lora_name, or set always_override to start over")


def backup_folder(lora_dir: Path, *, move: bool) -> Path | None:
    """Copy (or move) the LoRA's top-level files and checkpoints into backup-<date-time>/.

    Returns the backup folder, or None when there was nothing to keep.
    """
    if not lora_dir.is_dir():
        return None
    items = [p for p in lora_dir.iterdir()
             if not p.name.startswith((BACKUP_PREFIX, ".")) and (p.is_file() or move)]
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = lora_dir / f"{BACKUP_PREFIX}{stamp}"
    n = 1
    while dest.exists():  # two runs within a second
        n += 1
        dest = lora_dir / f"{BACKUP_PREFIX}{stamp}-{n}"
    dest.mkdir()
    try:
        for p in items:
            if move:
                p.rename(dest / p.name)  # a link moves as the link, never its target
            else:
                # A link is copied as a link: copying must never turn a link (to /etc/passwd,
                # say) into a plain file of the LoRA that a download would then carry.
                shutil.copy2(p, dest / p.name, follow_symlinks=False)
    except OSError:
        if not move:  # a copy that failed (a full disk) leaves no half of a backup behind
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def lora_config(spec_rank: int, alpha: int, dropout: float, module_names: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec_rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=module_names, bias="none", task_type="CAUSAL_LM")


def attach_lora(model: Any, spec_rank: int, alpha: int, dropout: float,
                module_names: list[str], seed: int) -> Any:
    """Wrap `model` with fresh LoRA layers on `module_names`; only they are trainable."""
    from peft import get_peft_model

    config = lora_config(spec_rank, alpha, dropout, module_names)
    # The LoRA A matrices are initialised randomly: seed them, so a run is reproducible.
    torch.manual_seed(seed)
    # autocast_adapter_dtype keeps the LoRA weights in fp32 even on a bf16/fp16 base, so the
    # optimizer updates full-precision numbers.
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def load_existing_weights(peft_model: Any, existing: Existing, lora_name: str,
                          adapter: str = SOLO_ADAPTER) -> None:
    """Load a saved adapter into the new layers (of `adapter`); refuse one that does not fit
    them."""
    from peft import set_peft_model_state_dict

    try:
        if existing.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(existing.weights))
        else:
            state = torch.load(existing.weights, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file is the user's to fix; say which one
        raise EngineError(f"could not read the existing LoRA '{lora_name}' "
                          f"({existing.weights.name}): {e}") from None
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter)
    except RuntimeError as e:  # shape mismatch
        raise EngineError(f"the existing LoRA '{lora_name}' does not fit this model and "
                          f"these settings ({str(e).splitlines()[0]}); set always_override "
                          "to start over") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise EngineError(
            f"the existing LoRA '{lora_name}' has weights for modules this run does not train "
            f"({unexpected[0]}, ...): target_modules or the base model cannot change when "
            "continuing a LoRA; set always_override to start over")


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
