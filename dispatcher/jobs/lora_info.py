"""What is already under a LoRA name, said before a job is queued (issue 11, point 2).

A training job whose lora_name is an existing LoRA continues it (text-generation-webui's rule:
the rank must match, the old files go to a backup folder) unless always_override is set. The
New job form and `lorafleet submit` say so before anything is queued; "Copy parameters"
proposes a free name instead. Reads loras/<name>/ (adapter_config.json, training_log.json) and
the name's owner (dispatcher/access/owners.py); writes nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dispatcher.access.links import inside
from dispatcher.access.owners import LORA_VERB, Actor, Owners, folder_exists, lora_rel, refusal
from dispatcher.jobs.specs import LORA_NAME_RE

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA name: whether a trained LoRA is there, its rank and steps, and who owns it."""

    name: str
    exists: bool  # an adapter a new job would continue
    folder: bool  # a folder (or a link) under the name, adapter or not
    rank: int | None
    steps: int | None
    owner: str | None  # None: no one (put there by hand), or a free name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    if not inside(path, root) or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def lora_info(loras: Path, name: str, owners: Owners) -> LoraInfo:
    """What is under loras/`name` (the name must match LORA_NAME_RE; ValueError if not)."""
    if not LORA_NAME_RE.match(name):
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise ValueError(f"'{shown}' is not a LoRA name: letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    folder = loras / name
    exists = inside(folder, loras) and any((folder / f).is_file() for f in ADAPTER_FILES)
    config = _read_json(folder / "adapter_config.json", loras) if exists else {}
    log = _read_json(folder / "training_log.json", loras) if exists else {}
    return LoraInfo(name=name, exists=exists, folder=folder_exists(folder),
                    rank=_int(config.get("r")), steps=_int(log.get("current_steps")),
                    owner=owners.get(lora_rel(name)))


def _size(info: LoraInfo) -> str:
    parts = [f"rank {info.rank}" if info.rank is not None else "",
             f"{info.steps} steps" if info.steps is not None else ""]
    return ", ".join(p for p in parts if p) or "rank and steps unknown"


def refused(info: LoraInfo, actor: Actor) -> str | None:
    """Why the dashboard would refuse `actor` a job that writes this name (as
    owners.admit_lora_write decides it), or None."""
    if not info.folder and info.owner is None:
        return None  # a free name: the first job claims it
    return refusal(lora_rel(info.name), info.owner, actor, LORA_VERB)


def notice(info: LoraInfo, actor: Actor, always_override: bool,
           how: str = "tick always_override") -> str:
    """The line a user reads before queueing a job that writes loras/<name> ("" for a free
    name of theirs). `how` names the switch as the user sets it (form or spec file)."""
    why = refused(info, actor)
    if why is not None:
        return f"{why} (choose another lora_name)"
    if not info.exists:
        return ""
    whose = f" (it belongs to {info.owner})" if info.owner not in (None, actor.name) else ""
    if always_override:
        return (f"a LoRA of this name exists ({_size(info)}){whose}: always_override is set, "
                "so its files move to a backup folder and training starts over")
    return (f"a LoRA of this name exists ({_size(info)}){whose}: it will be continued — "
            f"rename it, or {how} to start over")


_NUMBERED = re.compile(r"^(.*?)-(\d+)$")


def free_name(loras: Path, name: str, owners: Owners, limit: int = 1000) -> str:
    """The first of `name-2`, `name-3`, … (counting on from a `-N` the name already ends in)
    that is neither a folder under loras/ nor claimed by anyone."""
    m = _NUMBERED.match(name)
    stem, n = (m.group(1), int(m.group(2)) + 1) if m and m.group(1) else (name, 2)
    for k in range(n, n + limit):
        candidate = f"{stem}-{k}"
        if not LORA_NAME_RE.match(candidate):
            break
        if not folder_exists(loras / candidate) and owners.get(lora_rel(candidate)) is None:
            return candidate
    return name
