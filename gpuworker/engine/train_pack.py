"""`run_pack(members, ...)`: several trials' LoRAs trained together over one base model.

The phases are train.py's, shared where the trials agree and per trial where they do not:

    check     each trial's own (files, settings); a trial refused here gets its error and
              the others go on
    folder    each trial's LoRA folder taken in turn, then read (what it continues or resumes
              from), as a run alone does; while the pack waits for one, every trial's stop is
              answered: a trial that asks to stop leaves the pack without touching its folder
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

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpuworker.engine.cleanup import run_releasing
from gpuworker.engine.config import QUANTISED, EngineConfig
from gpuworker.engine.folder import HeldFolder, take_folder
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
    STOPPED_WAITING,
    Checked,
    Run,
    check_phase,
    earlier_work,
    load_data,
    load_earlier_weights,
    oom_advice,
    run_result,
    unstarted_result,
)
from gpuworker.errors import EngineError


@dataclass(eq=False)  # (a trial is itself: two with equal settings are two trials)
class PackMember:
    """One trial of a pack: its settings, its job's report, where to resume it from, and
    where its result goes (a result dict as `run_training` returns, or an EngineError)."""

    cfg: EngineConfig
    report: Report
    on_result: Callable[[Any], None]
    resume_from: str | None = None


def run_pack(members: list[PackMember], device: str | None = None) -> None:
    dev = pick_device(device)
    run_releasing(dev, lambda: _train_pack(members, dev), oom_advice(members[0].cfg))


def _fan_out(members: list[PackMember]) -> Report:
    """The pack's shared phases as every trial's log shows them (`members` is read at each
    call: a trial refused meanwhile hears no more of the pack)."""
    def log(line: str) -> None:
        for m in members:
            m.report.log(line)

    def progress(event: dict[str, Any]) -> None:
        for m in members:
            m.report.progress(event)

    return Report(progress=progress, log=log,
                  should_stop=lambda: all(_asks_stop(m) for m in members))


def _asks_stop(m: PackMember) -> bool:
    """Whether the trial asks to stop; a trial whose report refuses (its job is no longer
    this process's) counts as stopping."""
    try:
        return m.report.should_stop()
    except EngineError:
        return True


def _refuse(m: PackMember, error: EngineError, alive: list[PackMember]) -> None:
    """This trial alone ends with `error`; the pack goes on without it."""
    if m in alive:
        alive.remove(m)
    _give(m, error)


def _give(m: PackMember, result: Any) -> None:
    """Hand a trial its result; a receiver that fails is logged, never the others' end."""
    try:
        m.on_result(result)
    except Exception as e:  # noqa: BLE001 - one trial's bookkeeping must not end the pack
        with contextlib.suppress(Exception):
            m.report.log(f"Could not record this trial's result: {e}")


def _train_pack(members: list[PackMember], device: torch.device) -> None:
    started = time.perf_counter()
    checked: list[tuple[PackMember, Checked]] = []
    names: set[str] = set()
    for m in members:
        try:
            if m.cfg.lora_name in names:
                raise EngineError(f"another trial of this pack trains loras/{m.cfg.lora_name}: "
                                  "each trial needs its own lora_name")
            names.add(m.cfg.lora_name)
            checked.append((m, check_phase(m.cfg, m.report, device)))
        except EngineError as e:
            _give(m, e)
    folders: dict[PackMember, HeldFolder] = {}
    try:
        checked = _take_folders(checked, folders, started)
        if checked:
            _train_taken(checked, folders, device, started)
    finally:  # the pack ended or failed (out of memory, say): its trials' folders are free
        for folder in folders.values():
            folder.release()


def _take_folders(checked: list[tuple[PackMember, Checked]],
                  folders: dict[PackMember, HeldFolder], started: float
                  ) -> list[tuple[PackMember, Checked]]:
    """Each trial's LoRA folder, taken in turn (into `folders`) and then read: the trials
    that hold theirs, with what they build on. While the pack waits for one folder, every
    other trial's stop is answered too (one not asked would have its worker's watchdog kill
    the whole pack): a trial that asks to stop leaves the pack, its folder given up untouched;
    one refused (its folder stays held, or its earlier work does not fit) leaves with its
    error. The others go on."""
    left = list(checked)

    def leave(m: PackMember, result: Any) -> None:
        left[:] = [(x, c) for x, c in left if x is not m]
        held = folders.pop(m, None)
        if held is not None:
            held.release()
        _give(m, result)

    def stopped_waiting(m: PackMember) -> None:
        m.report.log(f"Stopped while waiting for loras/{m.cfg.lora_name}; nothing was saved")
        leave(m, unstarted_result(m.cfg, STOPPED_WAITING, started))

    def answer_stops_but(waiting: PackMember) -> None:
        for m, _ in list(left):
            if m is waiting:
                continue
            try:
                if m.report.should_stop():
                    stopped_waiting(m)
            except EngineError as e:  # its job is no longer this process's
                leave(m, e)

    for m, _ in list(left):
        if not any(x is m for x, _ in left):
            continue  # it left while the pack waited for another trial's folder
        try:
            held = take_folder(m.cfg, m.report,
                               while_waiting=lambda m=m: answer_stops_but(m))
        except EngineError as e:  # names the folder (held too long, a link)
            leave(m, e)
            continue
        except OSError as e:
            leave(m, EngineError(f"could not open loras/{m.cfg.lora_name}/: {e}"))
            continue
        if held is None:
            stopped_waiting(m)
            continue
        folders[m] = held
    read = []
    for m, c in list(left):
        try:
            read.append((m, earlier_work(m.cfg, c, m.report, m.resume_from)))
        except EngineError as e:
            leave(m, e)
    return read


def _train_taken(checked: list[tuple[PackMember, Checked]],
                 folders: dict[PackMember, HeldFolder], device: torch.device,
                 started: float) -> None:
    """The pack's data, model and loop, for the trials that hold their folders."""
    alive = [m for m, _ in checked]

    def free_refused() -> None:  # a trial refused on the way gives its folder up at once
        for m in [m for m in folders if m not in alive]:
            folders.pop(m).release()

    shared = _fan_out(alive)
    first_cfg, first_checked = checked[0][0].cfg, checked[0][1]
    data = load_data(first_cfg, first_checked, shared)
    for m, c in list(checked[1:]):  # each trial's own resume point must fit these samples
        if c.resume is not None and c.resume.folder is not None:
            try:
                check_data(c.resume.folder, c.resume.summary, len(data.samples),
                           data.fingerprint)
            except EngineError as e:
                checked.remove((m, c))
                _refuse(m, e, alive)
    free_refused()
    loaded = _load_pack_model(checked, device, alive)
    free_refused()
    if loaded is None:
        return
    model, routing, trials = loaded
    lanes, runs = [], {}
    precision = first_checked.precision
    for m, c, name, info in trials:
        # A trial stopped while the model loaded ends here, its folder untouched, as alone.
        try:
            stop = m.report.should_stop()
        except EngineError as e:  # its job is no longer this process's: it ends untouched
            folders.pop(m).release()
            _refuse(m, e, alive)
            continue
        if stop:
            m.report.log("Stopped before training started; nothing was saved")
            alive.remove(m)
            folders.pop(m).release()
            _give(m, run_result(m.cfg, data.plan, LoopOutcome(
                stopped=True, reason="stopped before the first step"), info, saved=False,
                started=started))
            continue
        run = Run(m.cfg, c, data, info, model, m.report, folders[m], adapter=name)
        try:
            run.open_folder()  # (gives the folder up if it fails)
        except EngineError as e:  # names the folder already (a link, a full disk)
            _refuse(m, e, alive)
            continue
        except OSError as e:
            _refuse(m, EngineError(f"could not write loras/{m.cfg.lora_name}/: {e}"), alive)
            continue
        runs[name] = (m, run, info)
        m.report.log(f"Resuming training on {device} at step {c.resume.step + 1} of "
                     f"{data.plan.total_steps} (in a pack of {len(trials)})..."
                     if c.resume is not None else
                     f"Starting training on {device}, in a pack of {len(trials)} trials...")
        stepper = Stepper(lane_parameters(model, name), m.cfg, data.plan, precision, device)
        lanes.append(Lane(m.cfg, m.report, run.checkpoint, stepper, c.resume, name=name,
                          rng=routing.rngs[name]))
    if not lanes:
        return

    def on_end(lane: Lane) -> None:
        member, run, info = runs[lane.name]
        if member in alive:
            alive.remove(member)
        if lane.error is not None:
            run.release_folder()  # the trial ends unsaved: its folder is free at once
            _give(member, lane.error)
            return
        try:
            run.save(lane.out)
        except (EngineError, OSError) as e:
            # (the engine's own errors name the folder already; a bare OSError does not)
            _give(member, e if isinstance(e, EngineError) else EngineError(
                f"could not save loras/{member.cfg.lora_name}/: {e}"))
            return
        _give(member, run_result(member.cfg, data.plan, lane.out, info, saved=True,
                              started=started))

    loop_data = LoopData(samples=data.samples, eval_samples=data.eval_samples, plan=data.plan,
                         precision=precision, pad_id=data.pad_id)
    run_pack_loop(model, loop_data, lanes, routing, device, shared.log, on_end)


def lane_name(i: int) -> str:
    return f"trial{i}"


def _load_pack_model(checked: list[tuple[PackMember, Checked]], device: torch.device,
                     alive: list[PackMember]
                     ) -> tuple[Any, Routing, list[tuple[PackMember, Checked, str, dict]]] | None:
    """The base model once, one adapter per trial, each trial's earlier weights, the shared
    preparation; and each trial (member, checks, adapter name, its training_log.json facts
    about the model). A trial whose settings or earlier weights do not fit the model gets its
    error and is left out (None: no trial is left)."""
    log = _fan_out(alive).log
    cfg = checked[0][0].cfg
    precision = checked[0][1].precision
    loaded = load_base_model(cfg.model_dir, cfg.base_model, precision, device, log,
                             upcast=cfg.levers.upcast)
    modules = []
    for m, c in list(checked):
        try:
            modules.append(resolve_target_modules(loaded.model, m.cfg.target_modules))
        except EngineError as e:  # this trial's settings: it alone is refused
            checked.remove((m, c))
            _refuse(m, e, alive)
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
    fits = []
    for i, (m, c) in enumerate(checked):
        try:
            load_earlier_weights(model, m.cfg, c, m.report, adapter=lane_name(i))
            fits.append(i)
        except EngineError as e:  # its adapter stays in the model, untrained and unsaved
            _refuse(m, e, alive)
    if not fits:
        return None
    applied: dict[str, str] = {}
    model = prepare_model(model, cfg, log, applied)
    _checkpoint_with_lanes(model, routing)
    checkpointing = limit_checkpointing(model, cfg.levers.checkpoint_layers)
    if checkpointing:
        log(f"Gradient checkpointing: {checkpointing}")
    # Counted as a trial alone counts them: the base and its own adapter.
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    trials = []
    for i, ((m, c), mods) in enumerate(zip(checked, modules, strict=True)):
        if i not in fits:
            continue
        trainable = sum(p.numel() for _, p in lane_parameters(model, lane_name(i)))
        trials.append((m, c, lane_name(i), {
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
            "pack": [checked[j][0].cfg.lora_name for j in fits],
        }))
    return model, routing, trials


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

