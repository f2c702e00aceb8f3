"""`train(spec, ...)`: one LoRA training job, in named phases.

    check     everything that can be refused without loading a model (files, precision,
              optimizer, a rank change when continuing, a checkpoint that does not fit)
    data      tokenizer + samples (before the model: bad data fails in seconds)
    model     base model on the device, LoRA layers on it, earlier weights loaded (the
              LoRA's own, or a checkpoint's when resuming)
    train     the loop (loop.py), with progress events and checkpoints
    save      adapter + training_parameters / training_prompt / training_log, atomically
    clean up  drop the model and free GPU memory, whatever happened

Two ways to build on earlier work:

    continue  (the default when loras/<lora_name>/ has an adapter) a new run that starts from
              the saved weights: fresh optimizer, step 1, its files copied to a backup folder
              and its checkpoints moved there (they belong to the earlier run).
    resume    (`resume_from`) the same run, carried on from one of its checkpoints: weights,
              optimizer, scheduler, RNG and data position restored, steps go on from k+1.
              Nothing is backed up: the folder is this run's. See resume.py.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from dispatcher.access.links import inside
from dispatcher.jobs.specs import TrainSpec
from dispatcher.settings import DataPaths
from gpuworker.engine import data as data_phase
from gpuworker.engine.errors import EngineError
from gpuworker.engine.loading import (
    check_model_folder,
    load_base_model,
    load_tokenizer,
    pad_token_id,
    pick_device,
    resolve_precision,
)
from gpuworker.engine.loop import LoopOutcome, run_loop
from gpuworker.engine.lora import (
    ADAPTER_WEIGHTS,
    Existing,
    attach_lora,
    backup_folder,
    check_continue,
    count_params,
    existing_adapter,
    load_existing_weights,
)
from gpuworker.engine.optim import check_optimizer
from gpuworker.engine.resume import (
    LATEST,
    ResumePoint,
    check_data,
    check_settings,
    find_checkpoint,
    load_state,
    move_checkpoints,
    read_summary,
    run_settings,
    samples_fingerprint,
)
from gpuworker.engine.save import (
    TRAINING_LOG,
    TRAINING_PARAMETERS,
    TRAINING_PROMPT,
    atomic_write_json,
    save_adapter,
    save_checkpoint,
)
from gpuworker.engine.targets import projections_label, resolve_target_modules

Progress = Callable[[dict[str, Any]], None]


def _oom_message(spec: TrainSpec) -> str:
    return (f"out of GPU memory: lower micro_batch_size (now {spec.micro_batch_size}), "
            f"cutoff_len (now {spec.cutoff_len}) or lora_rank (now {spec.lora_rank})"
            + ("" if spec.precision == "4bit" else ", or use precision 4bit"))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train(spec: TrainSpec, paths: DataPaths, progress: Progress, should_stop: Callable[[], bool],
          log: Callable[[str], None], device: str | None = None,
          resume_from: str | None = None) -> dict[str, Any]:
    """Train the LoRA `spec` describes into loras/<lora_name>/ and return the run's result.

    `resume_from` carries on an interrupted run from one of its checkpoints: "latest" (the
    highest-numbered complete checkpoint-<step>/; with none, the run starts from scratch and
    says so) or a folder name "checkpoint-<step>" (missing: EngineError). None or "" trains
    as usual. Raises EngineError (with a message for the user) for anything the user can fix.
    """
    dev = pick_device(device)
    # On failure keep only the message: the exception's traceback holds the frames that hold
    # the model and optimizer, and those must go before the GPU memory can be freed.
    failure = ""
    try:
        return _train(spec, paths, progress, should_stop, log, dev, resume_from or None)
    except EngineError as e:
        failure = str(e)
    except Exception as e:
        if not _is_oom(e):
            raise
        failure = _oom_message(spec)
    finally:
        _release(dev)
    raise EngineError(failure)


def _train(spec: TrainSpec, paths: DataPaths, progress: Progress,
           should_stop: Callable[[], bool], log: Callable[[str], None],
           device: torch.device, resume_from: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    # -- check ---------------------------------------------------------------------------------
    model_dir = paths.models / spec.base_model
    check_model_folder(model_dir, spec.base_model)
    files = data_phase.resolve_data_files(spec, paths)
    def warn(message: str) -> None:
        log(message)
        progress({"type": "warning", "message": message})

    precision = resolve_precision(spec.precision, device, warn)
    check_optimizer(spec.optimizer, device)
    try:
        lr = float(spec.learning_rate)
    except ValueError:
        raise EngineError(f"learning_rate '{spec.learning_rate}' is not a number; write it like 3e-4") from None
    if spec.micro_batch_size < 1 or spec.batch_size < spec.micro_batch_size:
        raise EngineError("batch_size must be at least micro_batch_size, and both at least 1")
    lora_dir = paths.loras / spec.lora_name
    if lora_dir.is_symlink() or not inside(lora_dir, paths.loras):
        # Writing through a link would write (and move files aside) wherever it leads.
        raise EngineError(f"loras/{spec.lora_name} is a link, not a folder: the job does not "
                          "write through it (choose another lora_name, or replace the link)")
    resume_dir = find_checkpoint(lora_dir, resume_from) if resume_from else None
    if resume_from == LATEST and resume_dir is None:
        log(f"No checkpoint to resume from in loras/{spec.lora_name}/: starting from scratch")
    existing = None
    if resume_dir is not None:
        resume_summary = read_summary(resume_dir)
        check_settings(resume_dir, resume_summary, spec)
        resume = ResumePoint(name=resume_dir.name, state=load_state(resume_dir),
                             loss_history=resume_summary.get("loss_history", []))
        if resume_summary.get("settings", {}).get("precision") not in (None, precision):
            warn(f"{resume_dir.name} was trained in {resume_summary['settings']['precision']} "
                 f"and this run uses {precision}: the losses will not match an uninterrupted "
                 "run exactly")
    else:
        resume = None
        existing = None if spec.always_override else existing_adapter(lora_dir)
        check_continue(spec.lora_name, existing, spec.lora_rank)
    prompt_info = data_phase.training_prompt(spec, files)

    # -- data ----------------------------------------------------------------------------------
    log(f"Loading tokenizer of {spec.base_model}...")
    tokenizer = load_tokenizer(model_dir, spec.base_model)
    pad_id = pad_token_id(tokenizer)
    source = (f"raw text {spec.raw_text_file}" if files.raw_text else
              f"dataset {spec.dataset} with format {spec.format}")
    log(f"Building samples from {source} (cutoff_len {spec.cutoff_len})...")
    samples = data_phase.build_samples(spec, files, tokenizer, home=paths.home)
    fingerprint = samples_fingerprint(samples)
    if resume_dir is not None:
        check_data(resume_dir, resume_summary, len(samples), fingerprint)
    eval_samples = None
    if files.eval_dataset is not None:
        eval_samples = data_phase.build_samples(spec, files, tokenizer,
                                                dataset_path=files.eval_dataset,
                                                home=paths.home)
    plan = data_phase.StepPlan.make(len(samples), spec.micro_batch_size, spec.batch_size,
                                    spec.epochs)
    log(f"{len(samples)} samples"
        + (f", {len(eval_samples)} evaluation samples" if eval_samples else "")
        + f"; {plan.micro_per_epoch} micro-batches of {spec.micro_batch_size} per epoch, "
          f"{plan.accumulation} per optimizer step: {plan.total_steps} optimizer steps "
          f"over {spec.epochs:g} epochs")
    if spec.warmup_steps >= plan.total_steps and spec.lr_scheduler_type != "constant":
        warn(f"warmup_steps ({spec.warmup_steps}) is not less than the run's "
             f"{plan.total_steps} optimizer steps: the learning rate never reaches "
             f"{spec.learning_rate}; lower warmup_steps")

    # -- model ---------------------------------------------------------------------------------
    loaded = load_base_model(model_dir, spec.base_model, precision, device, log)
    modules = resolve_target_modules(loaded.model, spec.target_modules)
    projections = projections_label(modules)
    log(f"Training {loaded.model_type} ({loaded.model_class}) with LoRA rank {spec.lora_rank}, "
        f"alpha {spec.lora_alpha} on {projections}")
    model = attach_lora(loaded.model, spec.lora_rank, spec.lora_alpha, spec.lora_dropout,
                        modules, spec.seed)
    del loaded.model
    if resume is not None:
        log(f"Resuming {spec.lora_name} from {resume.name}: loading its weights")
        load_existing_weights(model, Existing(weights=resume_dir / ADAPTER_WEIGHTS, rank=None),
                              f"{spec.lora_name}/{resume.name}")
    elif existing is not None:
        log(f"Continuing LoRA {spec.lora_name} from its saved weights "
            "(set always_override to start over)")
        # Said on the job page as well as in the log: the job does not start from scratch.
        progress({"type": "continues", "lora": spec.lora_name, "step": existing.steps})
        load_existing_weights(model, existing, spec.lora_name)
    trainable, total = count_params(model)
    log(f"Trainable params: {trainable:,} ({100 * trainable / max(total, 1):.4f} %), "
        f"all params: {total:,} (model: {loaded.total_params:,})")

    info = {
        "base_model_name": spec.base_model,
        "base_model_class": loaded.model_class,
        "base_loaded_in_4bit": precision == "4bit",
        "base_loaded_in_8bit": precision == "8bit",
        "precision": precision,
        "projections": projections,
        "target_modules": modules,
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device),
        # The LoRA this run continues and its steps (None: a new LoRA, or a resumed run).
        "continues": ({"lora": spec.lora_name, "step": existing.steps}
                      if existing is not None else None),
    }
    # Loading a big model takes minutes: a stop asked for meanwhile ends here, before the
    # LoRA folder is touched.
    if should_stop():
        log("Stopped before training started; nothing was saved")
        return _result(spec, plan, LoopOutcome(stopped=True, reason="stopped before the first step"),
                       info, saved=False, started=started)

    # The LoRA folder is touched only now that everything loaded: a refused job changes nothing.
    # A resumed run carries on in its own folder: nothing of it is earlier work to keep.
    kept = None if resume is not None else backup_folder(lora_dir, move=spec.always_override)
    if kept is not None:
        log(f"{'Moved' if spec.always_override else 'Copied'} the earlier files of "
            f"{spec.lora_name} to {kept.name}/")
        # (With always_override the checkpoints moved with everything else.) A folder with
        # checkpoints but no files at all was not written by this engine and is left alone.
        moved = move_checkpoints(lora_dir, kept)
        if moved:
            log(f"Moved the earlier run's {', '.join(moved)} to {kept.name}/")
    lora_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(lora_dir / TRAINING_PARAMETERS, spec.training_parameters())
    atomic_write_json(lora_dir / TRAINING_PROMPT, prompt_info)

    def training_log(out: LoopOutcome) -> dict[str, Any]:
        return {"loss": out.final_loss, "current_steps": out.steps, "total_steps": plan.total_steps,
                "epoch": round(plan.epoch_of(out.micro_done), 4), **info,
                "train_runtime_s": round(out.runtime_s, 3),
                "tokens_per_s": round(out.tokens_per_s, 2), "tokens": out.tokens,
                "peak_gpu_memory_mb": out.peak_gpu_mem_mb, "eval_loss": out.eval_loss,
                "stopped": out.stopped, "reason": out.reason, "learning_rate": lr,
                "resumed_from": out.resumed_from, "loss_history": out.loss_history}

    # What a resume checks against: the run's settings, the exact samples, the precision.
    settings = {**run_settings(spec), "data_sha256": fingerprint, "precision": precision}

    def checkpoint(out: LoopOutcome, state: dict[str, Any], summary: dict[str, Any]) -> None:
        if not out.stopped:
            out = replace(out, reason=f"checkpoint at step {out.steps}")
        folder = save_checkpoint(model, lora_dir, out.steps, spec.base_model,
                                 training_log=training_log(out), training_prompt=prompt_info,
                                 state=state, state_summary={**summary, "settings": settings})
        log(f"Saved {folder.name}/")

    # -- train ---------------------------------------------------------------------------------
    if resume is not None:
        log(f"Resuming training on {device} at step {resume.step + 1} of {plan.total_steps}...")
    else:
        log(f"Starting training on {device}...")
    out = run_loop(model, samples, eval_samples, spec, plan, device, precision, pad_id,
                   progress, should_stop, log, checkpoint, resume)

    # -- save ----------------------------------------------------------------------------------
    log(f"Saving LoRA to loras/{spec.lora_name}/...")
    save_adapter(model, lora_dir, spec.base_model)
    atomic_write_json(lora_dir / TRAINING_LOG, training_log(out))
    if out.stopped:
        log(f"Interrupted. Incomplete LoRA saved to loras/{spec.lora_name}/")
    else:
        log(f"Done! LoRA saved to loras/{spec.lora_name}/")
    return _result(spec, plan, out, info, saved=True, started=started)


def _result(spec: TrainSpec, plan: data_phase.StepPlan, out: LoopOutcome, info: dict[str, Any],
            *, saved: bool, started: float) -> dict[str, Any]:
    result: dict[str, Any] = {
        "lora_dir": f"loras/{spec.lora_name}",
        "saved": saved,
        "steps": out.steps,
        "total_steps": plan.total_steps,
        "final_loss": out.final_loss,
        "eval_loss": out.eval_loss,
        "stopped": out.stopped,
        "reason": out.reason,
        "train_runtime_s": round(out.runtime_s, 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "tokens_per_s": round(out.tokens_per_s, 2),
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "peak_gpu_memory_mb": out.peak_gpu_mem_mb,
        "precision": info["precision"],
        "resumed_from": out.resumed_from,
        "continues": info.get("continues"),
    }
    return result

