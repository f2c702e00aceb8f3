"""`run_training(config, ...)`: one LoRA training job, in named phases.

    check     everything that can be refused without the LoRA folder or a model (files,
              precision, optimizer, levers)
    folder    the LoRA folder's lock taken, and what a process that died left half-saved
              tidied (folder.py), before anything in it is read; then what the run builds on,
              read from it: the adapter it continues (a rank change is refused) or the
              checkpoint it resumes from (one that does not fit is refused). The lock is held
              until the final save is done.
    data      tokenizer + samples (before the model: bad data fails in seconds)
    model     base model on the device, LoRA layers on it, earlier weights loaded (the
              LoRA's own, or a checkpoint's when resuming), then the preparation hooks
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

The app's entry, `train(spec, paths, ...)`, is boundary.py's: it builds the config. The
phases (`check_phase`, `take_folder`, `earlier_work`, `load_data`, `load_earlier_weights`,
`Run`, `run_result`) are also train_pack.py's, which runs them per trial or once for a pack of
trials.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from formats.files import atomic_write_json
from gpuworker.diskspace import disk_full, says_full, space_of
from gpuworker.engine import data as data_phase
from gpuworker.engine.cleanup import run_releasing
from gpuworker.engine.config import QUANTISED, EngineConfig
from gpuworker.engine.folder import HeldFolder, check_not_link, take_folder
from gpuworker.engine.levers import (
    check_levers,
    compile_record,
    limit_checkpointing,
    prepare_model,
)
from gpuworker.engine.loading import (
    check_model_folder,
    load_base_model,
    load_tokenizer,
    pad_token_id,
    pick_device,
    resolve_precision,
)
from gpuworker.engine.loop import LoopData, LoopOutcome, run_loop
from gpuworker.engine.lora import (
    ADAPTER_WEIGHTS,
    SOLO_ADAPTER,
    Existing,
    attach_lora,
    backup_folder,
    check_continue,
    count_params,
    existing_adapter,
    load_existing_weights,
)
from gpuworker.engine.optim import check_optimizer
from gpuworker.engine.report import Report
from gpuworker.engine.resume import (
    LATEST,
    OWN_LATEST,
    ResumePoint,
    check_data,
    check_settings,
    find_checkpoint,
    latest_checkpoint,
    load_state,
    move_checkpoints,
    own_latest_checkpoint,
    read_summary,
    samples_fingerprint,
)
from gpuworker.engine.save import (
    TRAINING_PARAMETERS,
    TRAINING_PROMPT,
    lora_shown,
    save_adapter,
    save_checkpoint,
)
from gpuworker.engine.targets import projections_label, resolve_target_modules
from gpuworker.errors import DiskFull, EngineError

STOPPED_WAITING = "stopped while waiting for the LoRA folder"


def oom_advice(cfg: EngineConfig) -> str:
    return (f"lower micro_batch_size (now {cfg.micro_batch_size}), cutoff_len (now "
            f"{cfg.cutoff_len}) or lora_rank (now {cfg.lora_rank})"
            + ("" if cfg.precision == "4bit" else ", or use precision 4bit"))


def run_training(cfg: EngineConfig, report: Report, device: str | None = None,
                 resume_from: str | None = None) -> dict[str, Any]:
    """Train the LoRA `cfg` describes into its folder and return the run's result (see
    boundary.train for `resume_from`). Raises EngineError for anything the user can fix,
    out of GPU memory included (naming the settings that lower it)."""
    dev = pick_device(device)
    return run_releasing(dev, lambda: _train(cfg, report, dev, resume_from or None),
                         oom_advice(cfg))


@dataclass
class Checked:
    """What the check phase found: the files, the settings it resolved; and the earlier work
    (earlier_work's, read from the LoRA folder once it is the run's)."""

    files: data_phase.DataFiles
    precision: str
    lr: float
    resume: ResumePoint | None
    existing: Existing | None
    prompt_info: dict[str, Any]


@dataclass
class Data:
    samples: list[dict[str, Any]]
    eval_samples: list[dict[str, Any]] | None
    fingerprint: str
    plan: data_phase.StepPlan
    pad_id: int


def _train(cfg: EngineConfig, report: Report, device: torch.device,
           resume_from: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    checked = check_phase(cfg, report, device)
    folder = take_folder(cfg, report)
    if folder is None:  # asked to stop while it waited: nothing of the folder was touched
        report.log(f"Stopped while waiting for loras/{cfg.lora_name}; nothing was saved")
        return unstarted_result(cfg, STOPPED_WAITING, started)
    try:
        checked = earlier_work(cfg, checked, report, resume_from)
        data = load_data(cfg, checked, report)
        model, info = _load_model(cfg, checked, device, report)
        # Loading a big model takes minutes: a stop asked for meanwhile ends here, before the
        # LoRA folder is written.
        if report.should_stop():
            report.log("Stopped before training started; nothing was saved")
            return run_result(cfg, data.plan, LoopOutcome(
                stopped=True, reason="stopped before the first step"), info, saved=False,
                started=started)
        run = Run(cfg, checked, data, info, model, report, folder)
        run.open_folder()
        resume = checked.resume
        if resume is not None:
            report.log(f"Resuming training on {device} at step {resume.step + 1} of "
                       f"{data.plan.total_steps}...")
        else:
            report.log(f"Starting training on {device}...")
        loop_data = LoopData(samples=data.samples, eval_samples=data.eval_samples,
                             plan=data.plan, precision=checked.precision, pad_id=data.pad_id)
        out = run_loop(model, loop_data, cfg, device, report, run.checkpoint, resume)
        run.save(out)
    finally:
        folder.release()
    return run_result(cfg, data.plan, out, info, saved=True, started=started)


# --------------------------------------------------------------------------- check


def check_phase(cfg: EngineConfig, report: Report, device: torch.device) -> Checked:
    """Everything that can be refused before the LoRA folder is taken (the earlier work it
    holds is `earlier_work`'s, read once it is)."""
    check_model_folder(cfg.model_dir, cfg.base_model)
    files = data_phase.resolve_data_files(cfg)
    precision = resolve_precision(cfg.precision, device, report.warn)
    check_optimizer(cfg.optimizer, device)
    check_levers(cfg.levers)
    try:
        lr = float(cfg.learning_rate)
    except ValueError:
        raise EngineError(f"learning_rate '{cfg.learning_rate}' is not a number; write it "
                          "like 3e-4") from None
    if cfg.micro_batch_size < 1 or cfg.batch_size < cfg.micro_batch_size:
        raise EngineError("batch_size must be at least micro_batch_size, and both at least 1")
    check_not_link(cfg)
    return Checked(files=files, precision=precision, lr=lr, resume=None, existing=None,
                   prompt_info=data_phase.training_prompt(cfg, files))


def earlier_work(cfg: EngineConfig, checked: Checked, report: Report,
                 resume_from: str | None) -> Checked:
    """`checked` with what the run builds on: the checkpoint it resumes from, or the adapter
    it continues. Read holding the folder (take_folder), once what a process that died left
    half-saved is tidied: a final save it had made is in place, a checkpoint it was replacing
    is back."""
    resume = _resume_point(cfg, checked.precision, report, resume_from)
    existing = None
    if resume is None:
        existing = None if cfg.always_override else existing_adapter(cfg.lora_dir)
        check_continue(cfg.lora_name, existing, cfg.lora_rank)
    return replace(checked, resume=resume, existing=existing)


def _resume_point(cfg: EngineConfig, precision: str, report: Report,
                  resume_from: str | None) -> ResumePoint | None:
    """The checkpoint `resume_from` names, checked against this run's settings (None: no
    resume, or "latest" with no checkpoint, which starts from scratch and says so)."""
    if resume_from == OWN_LATEST:
        found = own_latest_checkpoint(cfg.lora_dir, cfg.job_id)
        folder = find_checkpoint(cfg.lora_dir, found.name) if found is not None else None
        if folder is None:
            report.log(f"No checkpoint of this job's earlier attempts in loras/{cfg.lora_name}/:"
                       " starting as its first attempt would")
    else:
        folder = find_checkpoint(cfg.lora_dir, resume_from) if resume_from else None
    if resume_from == LATEST and folder is None:
        report.log(f"No checkpoint to resume from in loras/{cfg.lora_name}/: starting from "
                   "scratch")
    if folder is None:
        return None
    summary = read_summary(folder)
    check_settings(folder, summary, cfg.run_settings)
    resume = ResumePoint(name=folder.name, state=load_state(folder),
                         loss_history=summary.get("loss_history", []), folder=folder,
                         summary=summary)
    if summary.get("settings", {}).get("precision") not in (None, precision):
        report.warn(f"{folder.name} was trained in {summary['settings']['precision']} and "
                    f"this run uses {precision}: the losses will not match an uninterrupted "
                    "run exactly")
    return resume


# --------------------------------------------------------------------------- data


def load_data(cfg: EngineConfig, checked: Checked, report: Report) -> Data:
    log, files = report.log, checked.files
    log(f"Loading tokenizer of {cfg.base_model}...")
    tokenizer = load_tokenizer(cfg.model_dir, cfg.base_model)
    pad_id = pad_token_id(tokenizer)
    source = (f"raw text {cfg.raw_text_file}" if files.raw_text else
              f"dataset {cfg.dataset} with format {cfg.format}")
    log(f"Building samples from {source} (cutoff_len {cfg.cutoff_len})...")
    samples = data_phase.build_samples(cfg, files, tokenizer, home=cfg.home)
    fingerprint = samples_fingerprint(samples)
    resume = checked.resume
    if resume is not None and resume.folder is not None:
        check_data(resume.folder, resume.summary, len(samples), fingerprint)
    eval_samples = None
    if files.eval_dataset is not None:
        eval_samples = data_phase.build_samples(cfg, files, tokenizer,
                                                dataset_path=files.eval_dataset, home=cfg.home)
    plan = data_phase.StepPlan.make(len(samples), cfg.micro_batch_size, cfg.batch_size,
                                    cfg.epochs)
    log(f"{len(samples)} samples"
        + (f", {len(eval_samples)} evaluation samples" if eval_samples else "")
        + f"; {plan.micro_per_epoch} micro-batches of {cfg.micro_batch_size} per epoch, "
          f"{plan.accumulation} per optimizer step: {plan.total_steps} optimizer steps "
          f"over {cfg.epochs:g} epochs")
    if cfg.warmup_steps >= plan.total_steps and cfg.lr_scheduler_type != "constant":
        report.warn(f"warmup_steps ({cfg.warmup_steps}) is not less than the run's "
                    f"{plan.total_steps} optimizer steps: the learning rate never reaches "
                    f"{cfg.learning_rate}; lower warmup_steps")
    return Data(samples=samples, eval_samples=eval_samples, fingerprint=fingerprint,
                 plan=plan, pad_id=pad_id)


# --------------------------------------------------------------------------- model


def _load_model(cfg: EngineConfig, checked: Checked, device: torch.device,
                report: Report) -> tuple[Any, dict[str, Any]]:
    """The LoRA-wrapped, prepared model, and what training_log.json says about it."""
    log, precision = report.log, checked.precision
    loaded = load_base_model(cfg.model_dir, cfg.base_model, precision, device, log,
                             upcast=cfg.levers.upcast)
    modules = resolve_target_modules(loaded.model, cfg.target_modules)
    projections = projections_label(modules)
    log(f"Training {loaded.model_type} ({loaded.model_class}) with LoRA rank {cfg.lora_rank}, "
        f"alpha {cfg.lora_alpha} on {projections}")
    model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                        modules, cfg.seed)
    del loaded.model
    load_earlier_weights(model, cfg, checked, report)
    applied: dict[str, str] = {}
    model = prepare_model(model, cfg, log, applied)
    checkpointing = limit_checkpointing(model, cfg.levers.checkpoint_layers)
    if checkpointing:
        log(f"Gradient checkpointing: {checkpointing}")
    elif cfg.levers.checkpoint_layers is not None:
        log("checkpoint_layers does not apply: this model checkpoints no layers")
    trainable, total = count_params(model)
    log(f"Trainable params: {trainable:,} ({100 * trainable / max(total, 1):.4f} %), "
        f"all params: {total:,} (model: {loaded.total_params:,})")
    existing = checked.existing
    info = {
        "base_model_name": cfg.base_model,
        "base_model_class": loaded.model_class,
        "base_loaded_in_4bit": precision == "4bit",
        "base_loaded_in_8bit": precision == "8bit",
        "precision": precision,
        "projections": projections,
        "target_modules": modules,
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device),
        # The speed settings that shape the model (the loop adds its loss and batching).
        "speed": {"upcast": loaded.upcast if precision in QUANTISED else None,
                  "prepare": applied, "checkpointing": checkpointing},
        # The LoRA this run continues and its steps (None: a new LoRA, or a resumed run).
        "continues": ({"lora": cfg.lora_name, "step": existing.steps}
                      if existing is not None else None),
    }
    return model, info


def load_earlier_weights(model: Any, cfg: EngineConfig, checked: Checked,
                          report: Report, adapter: str = SOLO_ADAPTER) -> None:
    resume, existing = checked.resume, checked.existing
    if resume is not None and resume.folder is not None:
        report.log(f"Resuming {cfg.lora_name} from {resume.name}: loading its weights")
        load_existing_weights(model, Existing(weights=resume.folder / ADAPTER_WEIGHTS, rank=None),
                              f"{cfg.lora_name}/{resume.name}", adapter)
    elif existing is not None:
        report.log(f"Continuing LoRA {cfg.lora_name} from its saved weights "
                   "(set always_override to start over)")
        # Said on the job page as well as in the log: the job does not start from scratch.
        report.progress({"type": "continues", "lora": cfg.lora_name, "step": existing.steps})
        load_existing_weights(model, existing, cfg.lora_name, adapter)


# --------------------------------------------------------------------------- the LoRA folder


class Run:
    """Writing the run into its LoRA folder: the files before the loop, checkpoints during it,
    the adapter and training_log.json after it, all while holding the folder (`folder`, taken
    by take_folder before the run read it) until the save is done (`release_folder`)."""

    def __init__(self, cfg: EngineConfig, checked: Checked, data: Data,
                 info: dict[str, Any], model: Any, report: Report, folder: HeldFolder,
                 adapter: str = SOLO_ADAPTER):
        self.cfg, self.checked, self.plan, self.info = cfg, checked, data.plan, info
        self.model, self.log, self.adapter = model, report.log, adapter
        self.report = report
        self.folder = folder
        # What a resume checks against: the run's settings, the exact samples, the precision.
        self.settings = {**cfg.run_settings, "data_sha256": data.fingerprint,
                         "precision": checked.precision}

    def open_folder(self) -> None:
        """Set earlier work aside and write the files known before training.

        The LoRA folder is written only now that everything loaded: a refused job changes
        nothing. A resumed run carries on in its own folder: nothing of it is earlier work.
        Fails: the folder is given up."""
        cfg, log, lora_dir = self.cfg, self.log, self.cfg.lora_dir
        doing = "copying the earlier files to a backup folder"
        try:
            # (Held for minutes by now: a link put in the folder's place meanwhile is refused
            # rather than written through.)
            check_not_link(cfg)
            kept = (None if self.checked.resume is not None
                    else backup_folder(lora_dir, move=cfg.always_override))
            if kept is not None:
                log(f"{'Moved' if cfg.always_override else 'Copied'} the earlier files of "
                    f"{cfg.lora_name} to {kept.name}/")
                # (With always_override the checkpoints moved with everything else.) A folder
                # with checkpoints but no files at all was not written by this engine and is
                # left alone.
                moved = move_checkpoints(lora_dir, kept)
                if moved:
                    log(f"Moved the earlier run's {', '.join(moved)} to {kept.name}/")
            for name, obj in ((TRAINING_PARAMETERS, cfg.training_parameters),
                              (TRAINING_PROMPT, self.checked.prompt_info)):
                doing = f"writing {name}"
                atomic_write_json(lora_dir / name, obj)
        except OSError as e:
            self.release_folder()
            if not says_full(e):
                raise
            raise self._full(disk_full(lora_shown(lora_dir), doing, space_of(lora_dir))) from e
        except BaseException:
            self.release_folder()
            raise

    def release_folder(self) -> None:
        """Give up the folder: this run writes nothing more into it."""
        self.folder.release()

    def training_log(self, out: LoopOutcome) -> dict[str, Any]:
        plan = self.plan
        return {"loss": out.final_loss, "current_steps": out.steps,
                "total_steps": plan.total_steps,
                "epoch": round(plan.epoch_of(out.micro_done), 4), **self.info,
                "train_runtime_s": round(out.runtime_s, 3),
                "tokens_per_s": round(out.tokens_per_s, 2), "tokens": out.tokens,
                "speed": speed_used(self.info, out),
                "peak_gpu_memory_mb": out.peak_gpu_mem_mb, "eval_loss": out.eval_loss,
                "stopped": out.stopped, "reason": out.reason, "learning_rate": self.checked.lr,
                "resumed_from": out.resumed_from, "loss_history": out.loss_history}

    def checkpoint(self, out: LoopOutcome, state: dict[str, Any],
                   summary: dict[str, Any]) -> None:
        if not out.stopped:
            out = replace(out, reason=f"checkpoint at step {out.steps}")
        check_not_link(self.cfg)  # (swapped for a link while training: not written through)
        try:
            folder = save_checkpoint(self.model, self.cfg.lora_dir, out.steps,
                                     self.cfg.base_model, training_log=self.training_log(out),
                                     training_prompt=self.checked.prompt_info, state=state,
                                     state_summary={**summary, "settings": self.settings,
                                                    "job": self.cfg.job_id},
                                     adapter=self.adapter)
        except DiskFull as e:
            raise self._full(e) from e
        self.log(f"Saved {folder.name}/")

    def save(self, out: LoopOutcome) -> None:
        """The final save; the folder's lock is dropped after it, whatever happens (a pack's
        trial saves when its lane ends, while the others train on)."""
        cfg, log = self.cfg, self.log
        log(f"Saving LoRA to loras/{cfg.lora_name}/...")
        try:
            check_not_link(cfg)
            save_adapter(self.model, cfg.lora_dir, cfg.base_model, self.adapter,
                         training_log=self.training_log(out))
        except DiskFull as e:
            raise self._full(e, "the LoRA's files are as they were before this save") from e
        finally:
            self.release_folder()
        if out.stopped:
            log(f"Interrupted. Incomplete LoRA saved to loras/{cfg.lora_name}/")
        else:
            log(f"Done! LoRA saved to loras/{cfg.lora_name}/")

    def _full(self, e: DiskFull, kept: str = "") -> DiskFull:
        """`e` with what stays of the run and how to carry on once space is freed."""
        last = latest_checkpoint(self.cfg.lora_dir)
        then = (f"{last.name} stays as it was: free some space, then resume from it (Resume "
                "on the job's page, or resume_from_checkpoint: latest)" if last is not None
                else "free some space, then run the job again")
        return DiskFull(f"{e}; {kept + '; ' if kept else ''}{then}")


def speed_used(info: dict[str, Any], out: LoopOutcome) -> dict[str, Any]:
    """The run's speed settings as they went: the model's (info) and the loop's (out)."""
    speed = {**info["speed"], **out.speed}
    if "compile" in (speed.get("prepare") or {}):
        speed["prepare"] = {**speed["prepare"],
                            "compile": compile_record(speed["prepare"]["compile"])}
    return speed


def unstarted_result(cfg: EngineConfig, reason: str, started: float) -> dict[str, Any]:
    """The result of a run that ended before it built anything (stopped while it waited for
    its LoRA folder): the keys of run_result, nothing trained, nothing saved."""
    return {"lora_dir": f"loras/{cfg.lora_name}", "saved": False, "steps": 0,
            "total_steps": None, "final_loss": None, "eval_loss": None, "stopped": True,
            "reason": reason, "train_runtime_s": 0.0,
            "wall_time_s": round(time.perf_counter() - started, 3), "tokens_per_s": 0.0,
            "trainable_params": None, "total_params": None, "peak_gpu_memory_mb": None,
            "precision": None, "resumed_from": None, "continues": None, "speed": None}


def run_result(cfg: EngineConfig, plan: data_phase.StepPlan, out: LoopOutcome,
            info: dict[str, Any], *, saved: bool, started: float) -> dict[str, Any]:
    return {
        "lora_dir": f"loras/{cfg.lora_name}",
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
        # What the run's speed settings did (as training_log.json records them).
        "speed": speed_used(info, out),
    }
