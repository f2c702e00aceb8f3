"""Which trials of a sweep can train together over one shared base model (a pack).

A pack runs the base model once on a batch made of every trial's micro-batch, each LoRA on its
own slice. That is only the same as each trial's own run when the trials agree on everything
that shapes the base model and the stream of micro-batches: the model and how it is loaded,
the data and how it is cut, batched, ordered and masked, the evaluation, the speed settings
(they prepare the one shared model) and the memory limit (it plans the one card's memory).

They may differ in what belongs to one LoRA alone: `PER_TRIAL`. Everything else must be equal,
so a field added to the training spec later keeps trials apart until someone decides it may
differ: the safe side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# A LoRA's own settings, its own optimizer and schedule, and when it alone stops or saves.
PER_TRIAL = frozenset({
    "lora_name", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "optimizer",
    "stop_at_loss", "save_steps",
    # Checks or acts on the trial's own folder only.
    "higher_rank_limit", "always_override", "resume_from_checkpoint",
})
# The most trials one pack trains together (the card's memory may allow fewer).
MAX_PACK = 8


def share_key(spec: dict[str, Any]) -> str:
    """What a trial must have in common with the others of its pack, as one comparable string:
    every field of its training spec but `PER_TRIAL`'s."""
    shared = {k: v for k, v in spec.items() if k not in PER_TRIAL}
    return json.dumps(shared, sort_keys=True, default=str)


def can_share(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return share_key(a) == share_key(b)


def group(trials: Iterable[tuple[str, dict[str, Any]]], size: int = MAX_PACK
          ) -> list[list[str]]:
    """Trials (id, spec) in packs of at most `size` that can share, in the order given: each
    trial joins the first open pack it can share with; a trial that shares with none is a pack
    of one (it runs as today)."""
    size = max(1, min(size, MAX_PACK))
    packs: list[tuple[str, list[str]]] = []
    for tid, spec in trials:
        key = share_key(spec)
        for pkey, members in packs:
            if pkey == key and len(members) < size:
                members.append(tid)
                break
        else:
            packs.append((key, [tid]))
    return [members for _, members in packs]
