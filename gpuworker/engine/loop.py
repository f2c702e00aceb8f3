"""Phase 3b: the training loop, in plain PyTorch.

One optimizer step = `accumulation` micro-batches (see data.py). The loss of a step is the mean
over every label token of all its micro-batches: each micro-batch contributes its token-loss
sum divided by the step's token count, so short and long micro-batches weigh by their tokens,
not by their number.

What a micro-batch becomes (the batcher) and how its loss is computed (`loss_fn`) are the
run's levers (levers.py); the loop only sums, divides and steps.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpuworker.engine.config import EngineConfig
from gpuworker.engine.data import StepPlan, optimizer_steps
from gpuworker.engine.kernels import checkpointed_blocks, graphs_refusal, replay_graphs
from gpuworker.engine.levers import (
    Batch,
    Batcher,
    LossFn,
    checkpoint_budget,
    make_batcher,
    make_loss,
)
from gpuworker.engine.loading import compute_dtype
from gpuworker.engine.lora import SOLO_ADAPTER
from gpuworker.engine.optim import MAX_GRAD_NORM, make_optimizer, make_scheduler
from gpuworker.engine.pack import LaneRng, Routing
from gpuworker.engine.report import Report
from gpuworker.engine.resume import ResumePoint, load_optimizer_state_by_name
from gpuworker.errors import EngineError

# Below this, text-generation-webui warns that the model may start to forget what it knew.
FORGET_LOSS = 1.0

# checkpoint(outcome so far, training_state.pt's dict, training_state.json's dict)
CheckpointFn = Callable[["LoopOutcome", dict[str, Any], dict[str, Any]], None]


@dataclass
class LoopOutcome:
    """The run so far. steps, micro_done, runtime_s, tokens and loss_history count the whole
    run, resumed parts included; the part_* fields count only this process's part, which is
    what speed and ETA are measured on: over its last RATE_WINDOW steps, leaving out the
    part's first step (the kernels' warm-up, and compilation where the layers are compiled)
    once a second one is done."""

    RATE_WINDOW = 20

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
    part_steps: int = 0
    # (seconds, tokens) of the part's recent steps, its first step left out.
    recent: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=LoopOutcome.RATE_WINDOW), repr=False)
    # The loss and batching this run used, in words (training_log.json's "speed").
    speed: dict[str, str] = field(default_factory=dict)

    def note_step(self, elapsed: float, tokens: int) -> None:
        self.runtime_s += elapsed
        self.part_runtime_s += elapsed
        self.part_steps += 1
        if self.part_steps > 1:
            self.recent.append((elapsed, tokens))

    @property
    def tokens_per_s(self) -> float:
        if self.recent:
            seconds = sum(e for e, _ in self.recent)
            return sum(t for _, t in self.recent) / seconds if seconds > 0 else 0.0
        return self.part_tokens / self.part_runtime_s if self.part_runtime_s > 0 else 0.0

    def eta_s(self, total_steps: int) -> float:
        if self.recent:
            per_step = sum(e for e, _ in self.recent) / len(self.recent)
            return per_step * (total_steps - self.steps)
        done = self.steps - self.part_start_step
        return self.part_runtime_s / done * (total_steps - self.steps) if done > 0 else 0.0


@dataclass
class LoopData:
    """What the loop trains on: the samples, the step plan, and what builds batches of them."""

    samples: list[dict[str, Any]]
    eval_samples: list[dict[str, Any]] | None
    plan: StepPlan
    precision: str  # resolved (never "auto")
    pad_id: int


def _gpu_mem_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class Stepper:
    """The optimizer, its schedule and the fp16 loss scaler over one LoRA's trainable
    parameters (`named`: (name, parameter) pairs): backward and optimizer step, and their
    state for a checkpoint."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], cfg: EngineConfig,
                 plan: StepPlan, precision: str, device: torch.device):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer(cfg.optimizer, self.params, float(cfg.learning_rate))
        self.scheduler = make_scheduler(cfg.lr_scheduler_type, self.optimizer, cfg.warmup_steps,
                                        plan.total_steps)
        self.amp_dtype = compute_dtype(precision, device)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.device = device
        self.keep_grads = False

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def step(self) -> float:
        """Clip, step, advance the schedule, clear the gradients; the rate this step used."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        # With CUDA graphs the gradients stay allocated: a gradient left to the backward graph's
        # own output would be overwritten by the next micro-batch's replay, not added to.
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        return lr

    def release(self) -> None:
        """Drop the optimizer's state (a pack's trial that ended: its moments are memory the
        trials still training can use) and stop its parameters from learning."""
        self.optimizer.state.clear()
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)


def trainable(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def evaluate(model: Any, loss_fn: LossFn, batches: Any, device: torch.device,
             lanes: int = 0) -> Any:
    """Mean next-token loss over every label token of `batches` (no gradients, no dropout);
    with `lanes` (a pack), each batch is repeated once per lane and the result is a list of
    each lane's mean."""
    model.eval()
    totals, count = torch.zeros(max(lanes, 1), dtype=torch.float64), 0
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for cpu_batch in batches:
                batch = cpu_batch.to(device)
                if lanes:
                    totals += loss_fn.parts(model, batch.repeat(lanes), lanes).double().cpu()
                else:
                    totals[0] += float(loss_fn(model, batch))
                count += cpu_batch.targets
    finally:
        model.train()
    means = [float(t) / max(count, 1) for t in totals]
    return means if lanes else means[0]


# The job log gets a line per step for a run this short, else about this many lines in all.
STEP_LINES = 40


def step_log_interval(total_steps: int) -> int:
    """Log every this many steps: every step up to 50 steps, else 20-40 lines for the run."""
    return 1 if total_steps <= 50 else -(-total_steps // STEP_LINES)


@dataclass
class Lane:
    """One LoRA the loop trains: its settings, where its progress goes, its optimizer, its
    outcome. A run alone has one lane, over the model's only adapter and the process's random
    generators; a pack has one per trial, each with its own adapter and generators (pack.py)."""

    cfg: EngineConfig
    report: Report
    checkpoint: CheckpointFn
    stepper: Stepper
    resume: ResumePoint | None = None
    name: str = SOLO_ADAPTER
    rng: LaneRng | None = None
    out: LoopOutcome = field(default_factory=LoopOutcome)
    warned_forget: bool = False
    ended: bool = False
    error: EngineError | None = None  # a pack's lane that broke (its loss became NaN, ...)


def run_loop(model: Any, data: LoopData, cfg: EngineConfig, device: torch.device,
             report: Report, checkpoint: CheckpointFn,
             resume: ResumePoint | None = None) -> LoopOutcome:
    """Train `model` (already on `device`, LoRA attached) for `data.plan.total_steps` steps, or
    the steps after `resume.step` with the state `resume` holds."""
    lane = Lane(cfg, report, checkpoint, Stepper(trainable(model), cfg, data.plan,
                                                 data.precision, device), resume)
    _Loop(model, data, [lane], device, report.log).run()
    return lane.out


def run_pack_loop(model: Any, data: LoopData, lanes: list[Lane], routing: Routing,
                  device: torch.device, log: Callable[[str], None],
                  on_end: Callable[[Lane], None]) -> None:
    """Train a pack's lanes together (pack.py), each from its own resume point; a lane that
    ends (its last step, stop_at_loss, a stop request, a broken loss) leaves at that step
    and `on_end(lane)` is called right away, while the others go on."""
    _Loop(model, data, lanes, device, log, routing, on_end).run()


class _Loop:
    """One run of the loop over its lanes; its methods are the parts of an optimizer step."""

    def __init__(self, model: Any, data: LoopData, lanes: list[Lane], device: torch.device,
                 log: Callable[[str], None], routing: Routing | None = None,
                 on_end: Callable[[Lane], None] | None = None):
        self.model, self.data, self.lanes, self.device = model, data, lanes, device
        self.cfg = lanes[0].cfg  # what shapes the model and the data: the same in every lane
        self.plan = data.plan
        self.routing, self.on_end = routing, on_end
        self.loss_fn, loss_used = make_loss(self.cfg.levers, lanes[0].stepper.autocast, model,
                                            log)
        self.batcher: Batcher = make_batcher(self.cfg.levers, data.pad_id, self.cfg.cutoff_len,
                                             model, log)
        self.log_every = step_log_interval(data.plan.total_steps)
        self.speed = {"loss": loss_used, "batching": self.batcher.name}
        self.budget = checkpoint_budget(model, self.cfg, device, log, len(lanes))
        # CUDA graphs: replayed from the start when asked for by name (the benchmarks' mode),
        # or once the run allows them (decided when the memory budget has settled).
        self.log = log
        self.graphs = "reduce-overhead" in self.cfg.levers.compile_mode
        self.graphs_decided = self.graphs or not self.cfg.levers.cuda_graphs

    def run(self) -> None:
        for lane in self.lanes:
            if lane.resume is not None:
                try:
                    lane.out = _restore(lane.resume, lane.stepper, self.plan, self.device,
                                        lane.report.log, lane.rng)
                except EngineError as e:  # in a pack, this trial alone cannot go on
                    if self.routing is None:
                        raise
                    lane.error = e
                    self._end(lane)
                    continue
            lane.out.speed = self.speed
            lane.warned_forget = any(h["loss"] < FORGET_LOSS for h in lane.out.loss_history)
        if self.routing is not None:  # the lanes' weights as restored, into the stacks
            self.routing.refresh()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        samples = self.data.samples
        going = [lane for lane in self.lanes if not lane.ended]
        if not going:
            return
        first = min(lane.out.steps for lane in going)
        for step_index, group in enumerate(optimizer_steps(self.plan, self.cfg.seed, first),
                                           start=first):
            # A lane resumed from a later checkpoint joins when the pack reaches its step; one
            # asked to stop meanwhile ends where it is (its checkpoint is its state).
            for lane in self.lanes:
                if not lane.ended and lane.out.steps > step_index:
                    self._stop_waiting(lane)
            active = [lane for lane in self.lanes
                      if not lane.ended and lane.out.steps == step_index]
            if not active:
                if all(lane.ended for lane in self.lanes):
                    break
                continue
            step = step_index + 1
            if self.routing is not None:
                self.routing.set_active(tuple(lane.name for lane in active))
            t0 = time.perf_counter()
            batches = self.batcher.step([[samples[i] for i in idx] for idx in group])
            losses_t = self._accumulate(batches, active)
            rates = [lane.stepper.step() for lane in active]
            if self.routing is not None:  # the stepped weights, for the next forward pass
                self.routing.refresh([lane.name for lane in active])
            losses = losses_t.tolist()  # the step's one wait for the GPU
            elapsed, tokens = time.perf_counter() - t0, sum(b.tokens for b in batches)
            for lane, loss, lr in zip(active, losses, rates, strict=True):
                lane.out.micro_done += len(group)
                lane.out.tokens += tokens
                lane.out.part_tokens += tokens
                lane.out.note_step(elapsed, tokens)
                try:
                    self._record(lane, step, loss, lr)
                except EngineError as e:
                    if self.routing is None:
                        raise
                    lane.error = e
                    self._end(lane)
            if self.budget is not None:
                self.budget.after_step(step, len(active) * max(
                    b.tensors["input_ids"].numel() for b in batches))
                if self.budget.summary:
                    self.speed["checkpointing"] = f"budget: {self.budget.summary}"
            if not self.graphs_decided and (self.budget is None or self.budget.done):
                self._decide_graphs(step)
            self._maybe_evaluate(step, [lane for lane in active if not lane.ended])
            for lane, loss in zip(active, losses, strict=True):
                if lane.ended:
                    continue
                try:
                    ends = self._ends_after(lane, step, loss)
                except EngineError as e:  # a pack's trial whose job is no longer its own
                    if self.routing is None:
                        raise
                    lane.error, ends = e, True
                if ends:
                    self._end(lane)
            if all(lane.ended for lane in self.lanes):
                break
        for lane in self.lanes:
            if not lane.ended:
                self._end(lane)

    def _stop_waiting(self, lane: Lane) -> None:
        """A lane waiting to rejoin the pack at a later step, asked to stop: it ends at the
        step of its checkpoint, its weights those of the checkpoint."""
        try:
            stop = lane.report.should_stop()
        except EngineError as e:
            lane.error, stop = e, True
        if stop:
            if lane.error is None:
                lane.out.stopped = True
                lane.out.reason = (f"stopped by request while waiting to rejoin the pack at "
                                   f"step {lane.out.steps + 1}")
                lane.report.log(lane.out.reason)
            self._end(lane)

    def _decide_graphs(self, step: int) -> None:
        """From the next step on, replay CUDA graphs where the run allows them."""
        self.graphs_decided = True
        blocks = checkpointed_blocks(self.model)
        lengths = len({len(s["input_ids"]) for s in self.data.samples})
        refusal = graphs_refusal(self.cfg.levers, self.device, blocks, len(self.lanes), lengths)
        if refusal is None and self.routing is not None:
            refusal = "a pack's trials each draw from their own random generators"
        if refusal is None and self.budget is not None and self.budget.tight():
            refusal = ("the memory budget leaves too little room beside the step for the "
                       "graphs' own buffers")
        if refusal is None:
            for lane in self.lanes:
                lane.stepper.keep_grads = True
                for p in lane.stepper.params:  # allocated now, before the first replay
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            replay_graphs(blocks)
            self.graphs = True
            self.speed["cuda_graphs"] = f"on from step {step + 1}"
            self.log(f"CUDA graphs: the compiled layers replay them from step {step + 1}")
        else:
            self.speed["cuda_graphs"] = f"off: {refusal}"
            if refusal != "off" and "not compiled" not in refusal:
                self.log(f"CUDA graphs: off, {refusal}")

    def _end(self, lane: Lane) -> None:
        lane.ended = True
        if self.on_end is not None:
            self.on_end(lane)
        if self.routing is not None:  # saved: the pack's other trials get its memory
            lane.stepper.release()

    def _accumulate(self, batches: list[Batch], active: list[Lane]) -> torch.Tensor:
        """Forward and backward over one step's batches; each active lane's loss of the step,
        on the device."""
        n_targets = max(1, sum(b.targets for b in batches))
        k = len(active)
        # The step's losses stay on the device until the optimizer step is queued: reading
        # them after each micro-batch would make the CPU wait for the GPU there, and the GPU
        # then idle while the CPU queues the next kernels.
        step_loss_t = torch.zeros(k, device=self.device)
        for cpu_batch in batches:
            batch = cpu_batch.to(self.device, non_blocking=True)
            if self.graphs:  # a new step of the graphs: the last one's outputs were used
                torch.compiler.cudagraph_mark_step_begin()
            # Divide by the whole step's token count so the accumulated gradient is the
            # gradient of the step's mean token loss.
            if self.routing is None:
                loss = self.loss_fn(self.model, batch) / n_targets
                active[0].stepper.backward(loss)
                step_loss_t += loss.detach()
                del loss
            else:
                # One copy of the micro-batch per lane; each lane's loss is its rows' alone, so
                # the sum's gradient in a lane's parameters is that lane's own.
                parts = self.loss_fn.parts(self.model, batch.repeat(k), k) / n_targets
                sum(lane.stepper.scaled(parts[i]) for i, lane in enumerate(active)).backward()
                step_loss_t += parts.detach()
                del parts
        if self.routing is not None:
            self.routing.share_grads(self.routing.active)
        return step_loss_t

    def _record(self, lane: Lane, step: int, step_loss: float, lr: float) -> None:
        """Check the step's loss, add it to the lane's outcome, report it (event, log,
        warning)."""
        out, plan, cfg, report = lane.out, self.plan, lane.cfg, lane.report
        if math.isnan(step_loss) or math.isinf(step_loss) or step_loss == 0.0:
            raise EngineError(
                f"the loss became {step_loss} at step {step}: the run is probably broken "
                f"(diverged or overflowed). Try a lower learning_rate (now {cfg.learning_rate})"
                + (" or precision bf16/fp32" if self.data.precision == "fp16" else ""))
        out.steps, out.final_loss = step, step_loss
        out.loss_history.append({"step": step, "loss": round(step_loss, 6), "learning_rate": lr})
        # The run's peak (the memory budget resets the device's peak counter while it measures).
        now = _gpu_mem_mb(self.device)
        out.peak_gpu_mem_mb = (now if out.peak_gpu_mem_mb is None or now is None
                               else max(out.peak_gpu_mem_mb, now))
        eta = out.eta_s(plan.total_steps)
        report.progress({
            "type": "train", "step": step, "total_steps": plan.total_steps,
            "epoch": round(plan.epoch_of(out.micro_done), 4), "loss": round(step_loss, 6),
            "learning_rate": lr, "tokens_per_s": round(out.tokens_per_s, 2),
            "tokens": out.tokens,
            "eta_s": round(eta, 2), "gpu_mem_mb": out.peak_gpu_mem_mb})
        if step % self.log_every == 0 or step == plan.total_steps:
            report.log(f"Step {step}/{plan.total_steps}: loss {step_loss:.4f}, learning "
                       f"rate {lr:.3g}, {out.tokens_per_s:.0f} tokens/s")
        if step_loss < FORGET_LOSS and not lane.warned_forget:
            lane.warned_forget = True
            report.warn(
                f"loss fell below {FORGET_LOSS} (step {step}, loss {step_loss:.4f}): the model "
                "may start to forget what it knew and only repeat the training data; "
                "consider stopping, fewer epochs or a lower learning_rate")

    def _maybe_evaluate(self, step: int, lanes: list[Lane]) -> None:
        eval_samples = self.data.eval_samples
        if not lanes or not eval_samples or not (step % self.cfg.eval_steps == 0
                                                 or step == self.plan.total_steps):
            return
        batches = self.batcher.evaluation(eval_samples, self.cfg.micro_batch_size)
        if self.routing is None:
            losses = [evaluate(self.model, self.loss_fn, batches, self.device)]
        else:
            self.routing.set_active(tuple(lane.name for lane in lanes))
            losses = evaluate(self.model, self.loss_fn, batches, self.device, len(lanes))
        for lane, loss in zip(lanes, losses, strict=True):
            lane.out.eval_loss = loss
            lane.report.log(f"Step {step}: eval loss {loss:.4f}")
            try:
                lane.report.progress({"type": "eval", "step": step, "eval_loss": round(loss, 6)})
            except EngineError as e:  # a pack's trial whose job is no longer its own
                if self.routing is None:
                    raise
                lane.error = e
                self._end(lane)

    def _ends_after(self, lane: Lane, step: int, step_loss: float) -> bool:
        """Whether the lane ends after `step` (stop_at_loss or a stop request), writing the
        checkpoint that is due (always one for a stop request, so it can be resumed)."""
        cfg, out, plan = lane.cfg, lane.out, self.plan
        reached = cfg.stop_at_loss > 0 and step_loss <= cfg.stop_at_loss
        stop = not reached and step < plan.total_steps and lane.report.should_stop()
        if reached:
            out.reason = (f"stopped at step {step}: loss {step_loss:.4f} reached stop_at_loss "
                          f"{cfg.stop_at_loss}")
        if stop:
            out.stopped = True
            out.reason = f"stopped by request after step {step} of {plan.total_steps}"
        due = cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < plan.total_steps
        if stop or (due and not reached):
            # (A run that ends here is saved as the final adapter instead; a stopped one is
            # saved as both, so it can be resumed.)
            lane.checkpoint(out, _resume_state(lane.stepper, step, out, lane.rng),
                            _state_summary(plan, cfg, step, out))
        if reached or stop:
            lane.report.log(out.reason)
        return reached or stop


def _resume_state(stepper: Stepper, step: int, out: LoopOutcome,
                  rng: LaneRng | None = None) -> dict[str, Any]:
    """Everything beyond the adapter that continuing this exact run later needs.

    Taken after everything step `step` does (evaluation included), so the RNG states are the
    ones step+1 starts from."""
    device = stepper.device
    return {
        "step": step,
        "micro_batches_done": out.micro_done,
        "optimizer": stepper.optimizer.state_dict(),
        # The names of the parameters the optimizer state numbers 0, 1, ...: a resume matches
        # them by name, not by position.
        "optimizer_param_names": stepper.names,
        "scheduler": stepper.scheduler.state_dict(),
        "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
        "rng_cpu": torch.get_rng_state(),
        # Only the training device's generator: a resume may run on a host with other GPUs.
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # A pack's lane: its own generators' states (pack.py), where a run alone keeps the
        # process's.
        **(rng.state() if rng is not None else {}),
        "tokens": out.tokens,
        "runtime_s": out.runtime_s,
        "eval_loss": out.eval_loss,
    }


def _restore(resume: ResumePoint, stepper: Stepper, plan: StepPlan, device: torch.device,
             log: Callable[[str], None], rng: LaneRng | None = None) -> LoopOutcome:
    """Load `resume`'s state into the fresh optimizer, scheduler, scaler and RNGs; return the
    run's outcome so far."""
    state = resume.state
    optimizer, scheduler, scaler = stepper.optimizer, stepper.scheduler, stepper.scaler
    if state["micro_batches_done"] != resume.step * plan.accumulation \
            or not 0 < resume.step < plan.total_steps:
        raise EngineError(f"{resume.name} is at step {resume.step}, micro-batch "
                          f"{state['micro_batches_done']}: that is not a step of this run "
                          f"({plan.total_steps} steps of {plan.accumulation} micro-batches)")
    load_optimizer_state_by_name(optimizer, stepper.names, state["optimizer"],
                                 state["optimizer_param_names"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    elif scaler is not None or state.get("scaler"):
        log(f"{resume.name} was saved with{'out' if scaler else ''} fp16 loss scaling and this "
            "run uses the other: the losses will not match an uninterrupted run exactly")
    if rng is not None:
        rng.load(state["rng_cpu"], state.get("rng_cuda"))
    else:
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    return LoopOutcome(steps=resume.step, micro_done=state["micro_batches_done"],
                       final_loss=resume.loss_history[-1]["loss"] if resume.loss_history else None,
                       runtime_s=state["runtime_s"], tokens=state["tokens"],
                       eval_loss=state.get("eval_loss"), loss_history=list(resume.loss_history),
                       resumed_from=resume.name, part_start_step=resume.step)


def _state_summary(plan: StepPlan, spec: EngineConfig, step: int, out: LoopOutcome
                   ) -> dict[str, Any]:
    """The human-readable side of training_state.pt."""
    return {"step": step, "total_steps": plan.total_steps,
            "micro_batches_done": out.micro_done, "total_micro_batches": plan.total_micro,
            "epoch": round(plan.epoch_of(out.micro_done), 4), "seed": spec.seed,
            "samples": plan.n_samples, "micro_batch_size": plan.micro_batch_size,
            "accumulation": plan.accumulation, "loss": out.final_loss,
            "loss_history": out.loss_history}
