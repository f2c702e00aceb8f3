"""Phase 3b: the training loop, in plain PyTorch.

One optimizer step = `accumulation` micro-batches (see data.py). The loss of a step is the mean
over every label token of all its micro-batches: each micro-batch contributes its token-loss
sum divided by the step's token count, so short and long micro-batches weigh by their tokens,
not by their number.

After every optimizer step the loop reports progress, checks the loss (0 or NaN: broken run;
<= stop_at_loss: done), evaluates and checkpoints when due, and asks `should_stop()`.

A stop asked for by the user always writes a checkpoint at the step it stops after (whatever
save_steps is), so the run can be resumed exactly where it stopped; a LoRA's optimizer state is
small next to the base model. Reaching stop_at_loss or the last step is an end, not a pause:
the adapter itself is saved, no checkpoint.

Resuming (`resume`): the loop rebuilds the optimizer and scheduler, loads their saved state
(optimizer state matched to the LoRA parameters by name), the GradScaler's and the RNGs' (the
LoRA dropout draws from the CPU or CUDA generator), and goes on with step k+1 at the data
position the checkpoint recorded. The data order needs no saved state: each epoch's order is a
permutation seeded by (seed, epoch), and micro-batches run as one stream across epochs, so
micro-batch k * accumulation is found by arithmetic (data.optimizer_steps).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dispatcher.jobs.specs import TrainSpec
from gpuworker.engine.data import IGNORE_INDEX, StepPlan, collate, optimizer_steps
from gpuworker.engine.errors import EngineError
from gpuworker.engine.loading import compute_dtype
from gpuworker.engine.optim import MAX_GRAD_NORM, make_optimizer, make_scheduler
from gpuworker.engine.resume import ResumePoint, load_optimizer_state_by_name

# Below this, text-generation-webui warns that the model may start to forget what it knew.
FORGET_LOSS = 1.0

Event = dict[str, Any]
# checkpoint(outcome so far, training_state.pt's dict, training_state.json's dict)
CheckpointFn = Callable[["LoopOutcome", dict[str, Any], dict[str, Any]], None]


@dataclass
class LoopOutcome:
    """The run so far. steps, micro_done, runtime_s, tokens and loss_history count the whole
    run, resumed parts included; the part_* fields count only this process's part, which is
    what speed and ETA are measured on."""

    steps: int = 0
    micro_done: int = 0
    final_loss: float | None = None
    stopped: bool = False
    reason: str = "finished"
    runtime_s: float = 0.0
    tokens: int = 0
    eval_loss: float | None = None
    peak_gpu_mem_mb: float | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    part_start_step: int = 0
    part_runtime_s: float = 0.0
    part_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.part_tokens / self.part_runtime_s if self.part_runtime_s > 0 else 0.0

    def eta_s(self, total_steps: int) -> float:
        done = self.steps - self.part_start_step
        return self.part_runtime_s / done * (total_steps - self.steps) if done > 0 else 0.0


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label tokens.

    logits (B, T, V) predict the token after each position; labels (B, T) hold the token ids
    (IGNORE_INDEX where nothing is learned), aligned with the inputs as Hugging Face does.
    """
    # Shift the labels, not the logits: slicing the logits would make backward allocate a
    # second full (B, T, V) gradient buffer (the slice's), about 2 bytes x vocab per token.
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,)
    pred = logits.float().flatten(0, 1)  # (B*T, V)
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")


def _label_tokens(batch: dict[str, torch.Tensor]) -> int:
    # The first position is never a target: nothing before it predicts it.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _gpu_mem_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class _Forward:
    """model(...) with position ids from the mask, for models whose forward accepts them."""

    def __init__(self, model: Any):
        self.model = model
        self.with_positions = True

    def __call__(self, batch: dict[str, torch.Tensor], padded: bool = True) -> torch.Tensor:
        """`padded` False: no padding in the batch, so the model's own positions are right."""
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.with_positions and padded:
            try:
                return self.model(**kw, position_ids=_position_ids(batch["attention_mask"])).logits
            except TypeError as e:
                if "position_ids" not in str(e):
                    raise
                self.with_positions = False
        return self.model(**kw).logits


def evaluate(forward: _Forward, model: Any, samples: list[dict[str, Any]], micro_batch_size: int,
             pad_id: int, device: torch.device, autocast: Any) -> float:
    """Mean next-token loss over every label token of `samples` (no gradients, no dropout)."""
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(samples), micro_batch_size):
                batch = {k: v.to(device) for k, v in
                         collate(samples[start:start + micro_batch_size], pad_id).items()}
                with autocast():
                    logits = forward(batch)  # (B, T, V)
                total += float(_token_loss_sum(logits, batch["labels"]))
                count += _label_tokens(batch)
    finally:
        model.train()
    return total / max(count, 1)


# The job log gets a line per step for a run this short, else about this many lines in all.
STEP_LINES = 40


def step_log_interval(total_steps: int) -> int:
    """Log every this many steps: every step up to 50 steps, else 20-40 lines for the run."""
    return 1 if total_steps <= 50 else -(-total_steps // STEP_LINES)


def run_loop(model: Any, samples: list[dict[str, Any]], eval_samples: list[dict[str, Any]] | None,
             spec: TrainSpec, plan: StepPlan, device: torch.device, precision: str, pad_id: int,
             progress: Callable[[Event], None], should_stop: Callable[[], bool],
             log: Callable[[str], None], checkpoint: CheckpointFn,
             resume: ResumePoint | None = None) -> LoopOutcome:
    """Train `model` (already on `device`, LoRA attached) for `plan.total_steps` steps, or the
    steps after `resume.step` with the state `resume` holds."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    optimizer = make_optimizer(spec.optimizer, params, float(spec.learning_rate))
    scheduler = make_scheduler(spec.lr_scheduler_type, optimizer, spec.warmup_steps,
                               plan.total_steps)
    amp_dtype = compute_dtype(precision, device)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def autocast() -> Any:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    forward = _Forward(model)
    log_every = step_log_interval(plan.total_steps)
    out = LoopOutcome()
    if resume is not None:
        out = _restore(resume, optimizer, names, scheduler, scaler, plan, device, log)
    warned_forget = any(h["loss"] < FORGET_LOSS for h in out.loss_history)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()

    for step_index, group in enumerate(optimizer_steps(plan, spec.seed, out.steps),
                                       start=out.steps):
        step = step_index + 1
        t0 = time.perf_counter()
        batches = [collate([samples[i] for i in idx], pad_id) for idx in group]
        n_targets = max(1, sum(_label_tokens(b) for b in batches))
        # The step's loss stays on the device until the optimizer step is queued: reading it
        # after each micro-batch would make the CPU wait for the GPU there, and the GPU then
        # idle while the CPU queues the next kernels.
        step_loss_t = torch.zeros((), device=device)
        for cpu_batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            padded = not bool(cpu_batch["attention_mask"].all())
            with autocast():
                logits = forward(batch, padded)  # (B, T, V)
            # Divide by the whole step's token count so the accumulated gradient is the
            # gradient of the step's mean token loss.
            loss = _token_loss_sum(logits, batch["labels"]) / n_targets
            # Drop the logits before backward: nothing in the graph needs them, and holding
            # them costs 2 bytes x vocabulary per token at the peak (0.5 GiB for 2k tokens of
            # a 128k vocabulary).
            del logits
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss_t += loss.detach()
            n_tokens = int(cpu_batch["attention_mask"].sum())
            out.tokens += n_tokens
            out.part_tokens += n_tokens
            del loss
        out.micro_done += len(group)

        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = float(step_loss_t)  # the step's one wait for the GPU
        elapsed = time.perf_counter() - t0
        out.runtime_s += elapsed
        out.part_runtime_s += elapsed

        if math.isnan(step_loss) or math.isinf(step_loss) or step_loss == 0.0:
            raise EngineError(
                f"the loss became {step_loss} at step {step}: the run is probably broken "
                f"(diverged or overflowed). Try a lower learning_rate (now {spec.learning_rate})"
                + (" or precision bf16/fp32" if precision == "fp16" else ""))
        out.steps, out.final_loss = step, step_loss
        out.loss_history.append({"step": step, "loss": round(step_loss, 6),
                                 "learning_rate": lr})
        out.peak_gpu_mem_mb = _gpu_mem_mb(device)
        eta = out.eta_s(plan.total_steps)
        progress({"type": "train", "step": step, "total_steps": plan.total_steps,
                  "epoch": round(plan.epoch_of(out.micro_done), 4), "loss": round(step_loss, 6),
                  "learning_rate": lr, "tokens_per_s": round(out.tokens_per_s, 2),
                  "eta_s": round(eta, 2), "gpu_mem_mb": out.peak_gpu_mem_mb})

        if step % log_every == 0 or step == plan.total_steps:
            log(f"Step {step}/{plan.total_steps}: loss {step_loss:.4f}, learning rate {lr:.3g}, "
                f"{out.tokens_per_s:.0f} tokens/s")

        if step_loss < FORGET_LOSS and not warned_forget:
            warned_forget = True
            msg = (f"loss fell below {FORGET_LOSS} (step {step}, loss {step_loss:.4f}): the model "
                   "may start to forget what it knew and only repeat the training data; "
                   "consider stopping, fewer epochs or a lower learning_rate")
            log(msg)
            progress({"type": "warning", "message": msg})

        if eval_samples and (step % spec.eval_steps == 0 or step == plan.total_steps):
            out.eval_loss = evaluate(forward, model, eval_samples, spec.micro_batch_size, pad_id,
                                     device, autocast)
            log(f"Step {step}: eval loss {out.eval_loss:.4f}")
            progress({"type": "eval", "step": step, "eval_loss": round(out.eval_loss, 6)})

        reached = spec.stop_at_loss > 0 and step_loss <= spec.stop_at_loss
        stop = not reached and step < plan.total_steps and should_stop()
        if reached:
            out.reason = f"stopped at step {step}: loss {step_loss:.4f} reached stop_at_loss {spec.stop_at_loss}"
        if stop:
            out.stopped = True
            out.reason = f"stopped by request after step {step} of {plan.total_steps}"
        due = spec.save_steps > 0 and step % spec.save_steps == 0 and step < plan.total_steps
        if stop or (due and not reached):
            # (A run that ends here is saved as the final adapter instead; a stopped one is
            # saved as both, so it can be resumed.)
            checkpoint(out, _resume_state(optimizer, names, scheduler, scaler, step, out, device),
                       _state_summary(plan, spec, step, out))
        if reached or stop:
            log(out.reason)
            break
    return out


def _resume_state(optimizer: Any, names: list[str], scheduler: Any, scaler: Any, step: int,
                  out: LoopOutcome, device: torch.device) -> dict[str, Any]:
    """Everything beyond the adapter that continuing this exact run later needs.

    Taken after everything step `step` does (evaluation included), so the RNG states are the
    ones step+1 starts from."""
    return {
        "step": step,
        "micro_batches_done": out.micro_done,
        "optimizer": optimizer.state_dict(),
        # The names of the parameters the optimizer state numbers 0, 1, ...: a resume matches
        # them by name, not by position.
        "optimizer_param_names": names,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng_cpu": torch.get_rng_state(),
        # Only the training device's generator: a resume may run on a host with other GPUs.
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "tokens": out.tokens,
        "runtime_s": out.runtime_s,
        "eval_loss": out.eval_loss,
    }


def _restore(resume: ResumePoint, optimizer: Any, names: list[str], scheduler: Any, scaler: Any,
             plan: StepPlan, device: torch.device, log: Callable[[str], None]) -> LoopOutcome:
    """Load `resume`'s state into the fresh optimizer, scheduler, scaler and RNGs; return the
    run's outcome so far."""
    state = resume.state
    if state["micro_batches_done"] != resume.step * plan.accumulation \
            or not 0 < resume.step < plan.total_steps:
        raise EngineError(f"{resume.name} is at step {resume.step}, micro-batch "
                          f"{state['micro_batches_done']}: that is not a step of this run "
                          f"({plan.total_steps} steps of {plan.accumulation} micro-batches)")
    load_optimizer_state_by_name(optimizer, names, state["optimizer"],
                                 state["optimizer_param_names"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    elif scaler is not None or state.get("scaler"):
        log(f"{resume.name} was saved with{'out' if scaler else ''} fp16 loss scaling and this "
            "run uses the other: the losses will not match an uninterrupted run exactly")
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return LoopOutcome(steps=resume.step, micro_done=state["micro_batches_done"],
                       final_loss=resume.loss_history[-1]["loss"] if resume.loss_history else None,
                       runtime_s=state["runtime_s"], tokens=state["tokens"],
                       eval_loss=state.get("eval_loss"), loss_history=list(resume.loss_history),
                       resumed_from=resume.name, part_start_step=resume.step)


def _state_summary(plan: StepPlan, spec: TrainSpec, step: int, out: LoopOutcome) -> dict[str, Any]:
    """The human-readable side of training_state.pt."""
    return {"step": step, "total_steps": plan.total_steps,
            "micro_batches_done": out.micro_done, "total_micro_batches": plan.total_micro,
            "epoch": round(plan.epoch_of(out.micro_done), 4), "seed": spec.seed,
            "samples": plan.n_samples, "micro_batch_size": plan.micro_batch_size,
            "accumulation": plan.accumulation, "loss": out.final_loss,
            "loss_history": out.loss_history}
