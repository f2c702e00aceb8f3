"""Resuming a run from one of its checkpoints: which one, whether it fits, and its state.

A checkpoint is `loras/<lora_name>/checkpoint-<step>/` (written by save.py): the adapter, the
logs, `training_state.pt` (optimizer, scheduler, GradScaler, RNG, counters) and
`training_state.json` (its readable summary, with the settings and data fingerprint of the run).

Resuming continues that very run: the same data in the same order, the same schedule, so a run
stopped at step k and resumed gives the losses and weights of an uninterrupted one. A setting
that changes what the run is (rank, data, batch sizes, seed, schedule...) is therefore refused;
settings that only change what happens around the steps or how they are computed (save_steps,
evaluation, stop_at_loss, precision, the speed settings) may differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dispatcher.access.links import inside
from gpuworker.checkpoints import CHECKPOINT_RE, list_checkpoints
from gpuworker.engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from gpuworker.errors import EngineError

LATEST = "latest"
# What the worker resumes a re-queued job from (not a user's setting): the latest checkpoint
# that this job's own earlier attempts wrote. A checkpoint of an earlier job of the same LoRA
# is not it (the job continues that LoRA as its first attempt would), whatever the attempt
# count says: an attempt can be counted without the job ever having trained.
OWN_LATEST = "own-latest"
# What a checkpoint folder holds when it can be resumed from (save.py writes exactly these).
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "training_state.pt", "training_state.json")

# Settings that make a run what it is: resuming with any of them changed is refused.
# (The data settings are checked twice: by name here, and by the samples' fingerprint.)
RUN_SETTINGS = ("base_model", "lora_rank", "lora_alpha", "target_modules", "micro_batch_size",
                "batch_size", "epochs", "dataset", "format", "raw_text_file", "cutoff_len",
                "overlap_len", "newline_favor_len", "hard_cut_string", "min_chars",
                "add_eos_token", "train_only_after", "seed", "optimizer", "learning_rate",
                "lr_scheduler_type", "warmup_steps")


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in CHECKPOINT_FILES)


def latest_checkpoint(lora_dir: Path) -> Path | None:
    """The highest-numbered complete `checkpoint-<step>/` in `lora_dir`, or None."""
    complete = [p for p in list_checkpoints(lora_dir) if is_complete(p)]
    return complete[-1] if complete else None


def own_latest_checkpoint(lora_dir: Path, job_id: str) -> Path | None:
    """The highest-numbered complete checkpoint that job `job_id` wrote (its
    training_state.json says `job`), or None. Checkpoints written before they named their job
    count as the job's own, as every checkpoint did then, but only in a folder where none
    names a job: next to named ones they are another job's."""
    named: list[tuple[Path, Any]] = []
    for folder in (p for p in list_checkpoints(lora_dir) if is_complete(p)):
        try:
            wrote = json.loads((folder / "training_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: not resumed automatically (a user may name it)
        if isinstance(wrote, dict):
            named.append((folder, wrote.get("job")))
    if any(job is not None for _, job in named):
        mine = [folder for folder, job in named if job == job_id]
    else:
        mine = [folder for folder, _ in named]
    return mine[-1] if mine else None


def find_checkpoint(lora_dir: Path, resume_from: str) -> Path | None:
    """The folder `resume_from` ("latest" or "checkpoint-<step>") names.

    "latest" with no checkpoint gives None (the caller starts from scratch); a named checkpoint
    that is missing or incomplete is an EngineError naming it.
    """
    if resume_from == LATEST:
        found = latest_checkpoint(lora_dir)
        return _inside(found, lora_dir) if found is not None else None
    if not CHECKPOINT_RE.match(resume_from):
        raise EngineError(f"resume_from '{resume_from}' must be 'latest' or a checkpoint folder "
                          "name like 'checkpoint-200'")
    folder = lora_dir / resume_from
    if not folder.is_dir():
        have = [p.name for p in list_checkpoints(lora_dir) if is_complete(p)]
        raise EngineError(f"checkpoint '{resume_from}' was not found in loras/{lora_dir.name}/ "
                          f"(it has {', '.join(have) if have else 'no checkpoints'})")
    if not is_complete(folder):
        missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
        raise EngineError(f"checkpoint '{resume_from}' of loras/{lora_dir.name}/ is incomplete "
                          f"(no {', '.join(missing)}); resume from another one")
    return _inside(folder, lora_dir)


def _inside(folder: Path, lora_dir: Path) -> Path:
    """A checkpoint folder (and its state files) must not be a link leading out of the LoRA."""
    for p in (folder, *(folder / n for n in CHECKPOINT_FILES)):
        if not inside(p, lora_dir):
            raise EngineError(f"loras/{lora_dir.name}/{p.relative_to(lora_dir)} is a link that "
                              "leads outside the LoRA's folder: it is not resumed from")
    return folder


def move_checkpoints(lora_dir: Path, dest: Path) -> list[str]:
    """Move every `checkpoint-<step>/` of `lora_dir` into `dest` (a backup folder).

    A new run numbers its checkpoints from 1 again: an earlier run's checkpoints left in place
    would be mixed with its own, and "latest" could pick one of the earlier run.
    """
    moved = []
    for folder in list_checkpoints(lora_dir):
        shutil.move(str(folder), str(dest / folder.name))
        moved.append(folder.name)
    return moved


# --------------------------------------------------------------------------- does it fit?


def run_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """The RUN_SETTINGS of a spec's fields, normalised so equal meanings compare equal."""
    out = {k: spec[k] for k in RUN_SETTINGS}
    out["target_modules"] = sorted(set(out["target_modules"]))
    try:
        out["learning_rate"] = float(out["learning_rate"])
    except ValueError:
        pass
    return out


def samples_fingerprint(samples: list[dict[str, Any]]) -> str:
    """sha256 over every sample's token ids and labels, in order: the exact training data."""
    h = hashlib.sha256()
    for s in samples:
        # The length first, so two samples never hash like one.
        h.update(array("q", [len(s["input_ids"]), *s["input_ids"], *s["labels"]]).tobytes())
    return h.hexdigest()


def read_summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "training_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"could not read {folder.name}/training_state.json: {e}") from None


def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'name saved -> now' for each run setting (`now`: run_settings' output) that differs
    from the checkpoint's."""
    return [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RUN_SETTINGS if saved.get(k) != now[k]]


def check_settings(folder: Path, summary: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a checkpoint whose run settings differ from `now`'s, naming each one."""
    saved = summary.get("settings")
    if not isinstance(saved, dict):
        raise EngineError(f"{folder.name} does not record the settings of its run (it was "
                          "written by an older lorafleet), so it cannot be resumed; train "
                          "without resume_from to continue the LoRA instead")
    diff = settings_differences(saved, now)
    if diff:
        raise EngineError(
            f"cannot resume from {folder.name}: these settings differ from the checkpoint's "
            f"run: {'; '.join(diff)}. Set them back, or train without resume_from")


def check_data(folder: Path, summary: dict[str, Any], n_samples: int, fingerprint: str) -> None:
    """Refuse a checkpoint whose run trained on other samples than these."""
    saved_n = summary.get("samples")
    if summary.get("settings", {}).get("data_sha256") != fingerprint:
        raise EngineError(
            f"cannot resume from {folder.name}: the training data changed since it was saved "
            f"({saved_n} samples then, {n_samples} now, different contents). Restore the "
            "dataset file, or train without resume_from")


# --------------------------------------------------------------------------- restoring state


def load_state(folder: Path) -> dict[str, Any]:
    """training_state.pt, on the CPU (the loop moves what it needs to the device)."""
    try:
        return torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: the user's to fix; say which one
        raise EngineError(f"could not read {folder.name}/training_state.pt: {e}") from None


def load_optimizer_state_by_name(optimizer: Any, names: list[str], sd: dict[str, Any],
                                 saved_names: list[str]) -> None:
    """Load `sd` (an optimizer.state_dict() whose parameters, in param-group order, were named
    `saved_names`) into `optimizer`, whose parameters are named `names`.

    torch numbers parameters by their position in the param groups; matching them by name
    makes the state fit a model built again, whatever order its parameters come in.
    """
    if sorted(saved_names) != sorted(names):
        extra = sorted(set(saved_names) - set(names))
        lacking = sorted(set(names) - set(saved_names))
        raise EngineError("the checkpoint's optimizer state is for other LoRA parameters "
                          f"(only in the checkpoint: {extra[:2]}, only now: {lacking[:2]})")
    # torch pairs saved and live parameters by their position in the param groups, so the
    # saved entries are renumbered to the live positions of the parameters of the same name.
    index_now = {name: i for i, name in enumerate(names)}
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise EngineError("the checkpoint's optimizer state has another number of param groups")
    groups, start = [], 0
    for saved_group, live_group in zip(sd["param_groups"], optimizer.param_groups, strict=True):
        end = start + len(live_group["params"])
        groups.append({**saved_group, "params": list(range(start, end))})
        start = end
    remapped = {
        "state": {index_now[saved_names[int(i)]]: s for i, s in sd["state"].items()},
        "param_groups": groups,
    }
    optimizer.load_state_dict(remapped)


@dataclass
class ResumePoint:
    """What the loop starts from when it resumes: the checkpoint's step and state (and, for
    the checks before it, the folder and its training_state.json)."""

    name: str
    state: dict[str, Any]
    loss_history: list[dict[str, float]]
    folder: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])
