"""`run_pack(members, ...)`: several trials' LoRAs trained together over one base model.

The phases are train.py's, shared where the trials agree and per trial where they do not:

    check     each trial's own (files, its LoRA folder, a checkpoint to resume from); a
              trial refused here gets its error and the others go on
    data      once: the trials agree on everything that shapes the samples and their order
              (dispatcher/schedule/sweeps/packs.py decides who may share)
    model     the base once, one adapter per trial (pack.py), each trial's earlier weights
    train     one loop over every trial's lane (loop.py); each lane leaves at its own end
    save      each trial's LoRA folder as a run alone writes it, the moment that trial ends

Each trial's result (or its EngineError) goes to its `on_result` as soon as it has one, so
the trial's job can end while the others still train. A failure of the pack itself (out of
memory, a model that does not load) is raised, as from `run_training`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpuworker.engine.cleanup import run_releasing
from gpuworker.engine.config import QUANTISED, EngineConfig
from gpuworker.engine.kernels import checkpointed_blocks
from gpuworker.engine.levers import limit_checkpointing, prepare_model
from gpuworker.engine.loading import load_base_model, pick_device
from gpuworker.engine.loop import Lane, LoopData, LoopOutcome, Stepper, run_pack_loop
from gpuworker.engine.lora import lora_config
from gpuworker.engine.pack import Routing, attach_lanes, lane_parameters
from gpuworker.engine.report import Report
from gpuworker.engine.resume import check_data
from gpuworker.engine.targets import projections_label, resolve_target_modules
from gpuworker.engine.train import (
    _check,
    _Checked,
    _load_data,
    _load_earlier_weights,
    _oom_advice,
    _result,
    _Run,
)
from gpuworker.errors import EngineError


@dataclass
class PackMember:
    """One trial of a pack: its settings, its job's report, where to resume it from, and
    where its result goes (a result dict as `run_training` returns, or an EngineError)."""

    cfg: EngineConfig
    report: Report
    on_result: Callable[[Any], None]
    resume_from: str | None = None


def run_pack(members: list[PackMember], device: str | None = None) -> None:
    dev = pick_device(device)
    run_releasing(dev, lambda: _train_pack(members, dev), _oom_advice(members[0].cfg))


def _fan_out(members: list[PackMember]) -> Report:
    """The pack's shared phases as every trial's log shows them."""
    def log(line: str) -> None:
        for m in members:
            m.report.log(line)

    def progress(event: dict[str, Any]) -> None:
        for m in members:
            m.report.progress(event)

    return Report(progress=progress, log=log,
                  should_stop=lambda: all(m.report.should_stop() for m in members))


def _train_pack(members: list[PackMember], device: torch.device) -> None:
    started = time.perf_counter()
    checked: list[tuple[PackMember, _Checked]] = []
    for m in members:
        try:
            checked.append((m, _check(m.cfg, m.report, device, m.resume_from)))
        except EngineError as e:
            m.on_result(e)
    if not checked:
        return
    alive = [m for m, _ in checked]
    shared = _fan_out(alive)
    first_cfg, first_checked = checked[0][0].cfg, checked[0][1]
    data = _load_data(first_cfg, first_checked, shared)
    for _m, c in checked[1:]:  # each trial's own resume point must fit these samples
        if c.resume is not None and c.resume.folder is not None:
            check_data(c.resume.folder, c.resume.summary, len(data.samples), data.fingerprint)
    loaded = _load_pack_model(checked, device, shared)
    if loaded is None:
        return
    model, routing, infos = loaded
    if shared.should_stop():
        shared.log("Stopped before training started; nothing was saved")
        for (m, _), info in zip(checked, infos, strict=True):
            m.on_result(_result(m.cfg, data.plan, LoopOutcome(
                stopped=True, reason="stopped before the first step"),
                info, saved=False, started=started))
        return
    lanes, runs = [], {}
    precision = first_checked.precision
    for i, (m, c) in enumerate(checked):
        name = lane_name(i)
        run = _Run(m.cfg, c, data, infos[i], model, m.report, adapter=name)
        run.open_folder()
        runs[name] = (m, run, infos[i])
        m.report.log(f"Resuming training on {device} at step {c.resume.step + 1} of "
                     f"{data.plan.total_steps} (in a pack of {len(checked)})..."
                     if c.resume is not None else
                     f"Starting training on {device}, in a pack of {len(checked)} trials...")
        stepper = Stepper(lane_parameters(model, name), m.cfg, data.plan, precision, device)
        lanes.append(Lane(m.cfg, m.report, run.checkpoint, stepper, c.resume, name=name,
                          rng=routing.rngs[name]))

    def on_end(lane: Lane) -> None:
        member, run, info = runs[lane.name]
        if lane.error is not None:
            member.on_result(lane.error)
            return
        run.save(lane.out)
        member.on_result(_result(member.cfg, data.plan, lane.out, info, saved=True,
                                 started=started))

    loop_data = LoopData(samples=data.samples, eval_samples=data.eval_samples, plan=data.plan,
                         precision=precision, pad_id=data.pad_id)
    run_pack_loop(model, loop_data, lanes, routing, device, shared.log, on_end)


def lane_name(i: int) -> str:
    return f"trial{i}"


def _load_pack_model(checked: list[tuple[PackMember, _Checked]], device: torch.device,
                     shared: Report) -> tuple[Any, Routing, list[dict[str, Any]]] | None:
    """The base model once, one adapter per trial, each trial's earlier weights, the shared
    preparation; and each trial's training_log.json facts about it. A trial whose settings do
    not fit the model gets its error and leaves `checked` (None: no trial is left)."""
    log = shared.log
    cfg = checked[0][0].cfg
    precision = checked[0][1].precision
    loaded = load_base_model(cfg.model_dir, cfg.base_model, precision, device, log,
                             upcast=cfg.levers.upcast)
    modules = []
    for m, c in list(checked):
        try:
            modules.append(resolve_target_modules(loaded.model, m.cfg.target_modules))
        except EngineError as e:  # this trial's settings: it alone is refused
            m.on_result(e)
            checked.remove((m, c))
    if not checked:
        return None
    configs = []
    for i, ((m, _), mods) in enumerate(zip(checked, modules, strict=True)):
        m.report.log(f"Training {loaded.model_type} ({loaded.model_class}) with LoRA rank "
                     f"{m.cfg.lora_rank}, alpha {m.cfg.lora_alpha} on {projections_label(mods)}")
        configs.append((lane_name(i), lora_config(m.cfg.lora_rank, m.cfg.lora_alpha,
                                                  m.cfg.lora_dropout, mods)))
    model, routing = attach_lanes(loaded.model, configs, cfg.seed, device)
    del loaded.model
    for i, (m, c) in enumerate(checked):
        _load_earlier_weights(model, m.cfg, c, m.report, adapter=lane_name(i))
    applied: dict[str, str] = {}
    model = prepare_model(model, cfg, log, applied)
    _checkpoint_with_lanes(model, routing)
    checkpointing = limit_checkpointing(model, cfg.levers.checkpoint_layers)
    if checkpointing:
        log(f"Gradient checkpointing: {checkpointing}")
    # Counted as a trial alone counts them: the base and its own adapter.
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    infos = []
    for i, ((m, c), mods) in enumerate(zip(checked, modules, strict=True)):
        trainable = sum(p.numel() for _, p in lane_parameters(model, lane_name(i)))
        infos.append({
            "base_model_name": m.cfg.base_model,
            "base_model_class": loaded.model_class,
            "base_loaded_in_4bit": precision == "4bit",
            "base_loaded_in_8bit": precision == "8bit",
            "precision": precision,
            "projections": projections_label(mods),
            "target_modules": mods,
            "trainable_params": trainable,
            "total_params": base + trainable,
            "device": str(device),
            "speed": {"upcast": loaded.upcast if precision in QUANTISED else None,
                      "prepare": applied, "checkpointing": checkpointing},
            "continues": ({"lora": m.cfg.lora_name, "step": c.existing.steps}
                          if c.existing is not None else None),
            "pack": [other.cfg.lora_name for other, _ in checked],
        })
    return model, routing, infos


def _checkpoint_with_lanes(model: Any, routing: Routing) -> None:
    """Where the model checkpoints its layers, let the recomputation in backward draw each
    lane's dropout masks again from where that lane's generator was (pack.py)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    blocks = checkpointed_blocks(model)
    if not any(b.gradient_checkpointing for b in blocks):
        return
    func = partial(checkpoint, use_reentrant=False, context_fn=routing.checkpoint_contexts)
    for block in blocks:
        block._gradient_checkpointing_func = func

