"""Model preparation: kernel patches, compilation and how much gradient checkpointing a model
does. The preparation hooks (`hook(model, config) -> model`) run after the LoRA layers are on
the model; the checkpointing limits are applied after them (levers.py, loop.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpuworker.engine.config import EngineConfig, Levers
from gpuworker.errors import LeverSkipped


def liger_kernels(model: Any, config: EngineConfig) -> Any:
    """Liger's Triton kernels for the decoder's small operations: RMSNorm, SwiGLU and RoPE
    (patched into this model's modules; the loss is the loss lever's business)."""
    if next(model.parameters()).device.type != "cuda":
        raise LeverSkipped("Liger's kernels need a CUDA GPU")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise LeverSkipped("liger-kernel is not installed on this worker") from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", "")
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise LeverSkipped(f"Liger has no kernels for model type '{model_type}'")
    import inspect

    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False}
    params = inspect.signature(apply).parameters
    apply(model=base, **{k: v for k, v in wanted.items() if k in params})
    return model


def require_gpu(model: Any, levers: Levers, why: str) -> None:
    """A lever that pays on a GPU only is skipped, for `why`, on the CPU (unless the levers
    ask for it there: the exactness tests)."""
    if next(model.parameters()).device.type == "cpu" and not levers.gpu_levers_on_cpu:
        raise LeverSkipped(why)


def compile_record(outcome: str) -> str:
    """The compile hook's outcome as the run's record gives it: how many graphs torch compiled
    by now (a layer it could not compile ran uncompiled, with torch's reason in the log)."""
    if outcome != "on":
        return outcome
    graphs = compiled_graphs()
    return (f"on ({graphs} compiled graphs)" if graphs
            else "on, but nothing compiled (the job's log says why)")


# The inductor cache folders compile_layers chose in this process.
_CACHES_SET: set[str] = set()


def compile_layers(model: Any, config: EngineConfig) -> Any:
    """torch.compile each decoder layer (regional compilation: the layers are alike, so one
    compiled graph serves them all, and compiling takes seconds, not minutes), fusing the
    layer's small operations and cutting Python's share of the step. The compiled code is
    cached in the data folder (cache/torch-compile/), so the next job's process on the same
    model reuses it instead of compiling from nothing."""
    import os

    require_gpu(model, config.levers,
                "compiling pays on a GPU; on the CPU it takes longer than it saves")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_8bit", False):
        raise LeverSkipped("compiling 8-bit (bitsandbytes int8) layers is not supported")
    blocks = checkpointed_blocks(model)
    if not blocks:
        raise LeverSkipped("transformers does not expose this model's decoder layers")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = Path(config.home) / "cache" / "torch-compile"
    cache.mkdir(parents=True, exist_ok=True)
    # torch fills the variable in with its default (under /tmp) once it is first asked; a
    # folder the worker was started with on purpose stays. One this function set for an
    # earlier run in the same process (of another data folder: tests) gives way.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) in (os.path.abspath(default_cache_dir()),
                                                       *_CACHES_SET):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        _CACHES_SET.add(os.path.abspath(cache))
    import torch._dynamo
    import torch._inductor.config

    # A layer torch cannot compile runs as it is (torch logs why) instead of failing the job.
    torch._dynamo.config.suppress_errors = True
    # A layer is compiled again for each variant it meets (input with or without gradient,
    # checkpointed or not, padded or packed, training or evaluation); torch's default of 8
    # variants would leave the rest uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Dropout draws from torch's own generator, as uncompiled: the same masks, so the same
    # numbers, and a resumed run's generator state means what it meant.
    torch._inductor.config.fallback_random = True
    # Inside a compiled layer the recomputed dropout costs nothing extra: keep its memory.
    with contextlib.suppress(LeverSkipped):
        lean_lora_dropout(model, config)
    for block in blocks:
        block.compile(mode=config.levers.compile_mode)
    return model


def lean_lora_dropout(model: Any, config: EngineConfig) -> Any:
    """LoRA dropout without its saved copies. peft's LoRA path, `lora_B(lora_A(dropout(x)))`,
    keeps for backward the dropped input of every adapted layer and its mask: three bytes per
    input feature per token, for each of a decoder layer's seven projections (q, k and v each
    keep their own). Here `lora_A(dropout(x))` runs under torch's non-reentrant checkpoint,
    which keeps only its input and the random generator's state, and in backward draws the
    same mask again and redoes the small r-wide product. The values are identical. That input
    is `x` itself, one tensor shared by the projections that read it, on quantised models
    (under autocast peft does not cast it) and inside compiled layers (the cast is recomputed);
    there the layers that keep their activations cost about a third less memory, so more of
    them fit a budget. On a bf16 model uncompiled, peft casts `x` to the adapters' fp32 for
    each projection and the checkpoint keeps each cast: no saving, which is one reason the job
    setting ties this to `compile`."""
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in model.modules():
        drops, downs = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, torch.nn.ModuleDict) or not isinstance(downs, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            down = downs[name] if name in downs else None
            p = getattr(drop, "p", 0.0)
            if not isinstance(drop, torch.nn.Dropout) or p <= 0 or not isinstance(
                    down, torch.nn.Linear):
                continue
            drops[name] = torch.nn.Identity()
            down.forward = _recomputed_dropout_forward(down, p, checkpoint)
            wrapped += 1
    if not wrapped:
        raise LeverSkipped("the model has no LoRA layer with dropout")
    return model


def _recomputed_dropout_forward(down: torch.nn.Linear, p: float, checkpoint: Callable) -> Callable:
    def dropped(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.nn.functional.dropout(x, p, True), down.weight,
                                          down.bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not down.training:
            return torch.nn.functional.linear(x, down.weight, down.bias)
        if not torch.is_grad_enabled():
            return dropped(x)
        return checkpoint(dropped, x, use_reentrant=False, preserve_rng_state=True)

    return forward


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (0: none, or not imported)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def limit_checkpointing(model: Any, layers: int | None) -> str | None:
    """Keep gradient checkpointing on the first `layers` decoder layers only (None: leave it
    as it is); says what the model now does, or None when it checkpoints nothing."""
    blocks = checkpointed_blocks(model)
    if not blocks or not any(b.gradient_checkpointing for b in blocks):
        return None
    if layers is not None:
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i < layers
    on = sum(b.gradient_checkpointing for b in blocks)
    return f"{on} of {len(blocks)} layers"


def checkpointed_blocks(model: Any) -> list[Any]:
    """The decoder's layers that transformers can checkpoint one by one (not, say, a vision
    tower's: on a multimodal model only the text decoder's layers count)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    within = decoder if isinstance(decoder, torch.nn.Module) else model
    return [m for m in within.modules() if isinstance(m, GradientCheckpointingLayer)]


def layers_to_checkpoint(layers: int, peak_all: int, per_layer: int, budget: int,
                         margin: float = 0.05) -> int:
    """How many of `layers` decoder layers must keep gradient checkpointing for a step to fit
    `budget` bytes, given the peak with all of them checkpointed and what one layer that keeps
    its activations adds to it; `margin` of the budget stays free (fragmentation, longer
    batches than the ones measured). All of them when even that does not fit."""
    room = int(budget * (1 - margin)) - peak_all
    if per_layer <= 0 or room <= 0:
        return layers
    return max(0, layers - room // per_layer)


class CheckpointBudget:
    """Memory-budgeted checkpointing, measured on the run itself. After step 1 (the optimizer
    state now exists) the memory held between steps is the fixed part; step 2 runs with every
    layer checkpointed and step 3 with the last two keeping their activations, each peak
    measured on its own. (One layer is not enough: a step's peak with every layer checkpointed
    already holds one layer's recomputed activations in backward, so the first layer that keeps
    its own adds little to the peak; each further one adds a layer's worth.) Both peaks are
    taken per token of the step's largest micro-batch and scaled to the largest micro-batch the
    run can have (`max_tokens`); their difference counts as one layer's worth, which is exact
    when backward's recomputation makes the peak and twice too much otherwise (the safe side).
    From step 4 on as many layers keep their activations as fit the budget at that size.
    Checkpointing recomputes exactly what it dropped, so the losses do not depend on the
    choice; only speed and memory do."""

    MEASURED_LAYERS = 2

    def __init__(self, blocks: list[Any], device: torch.device, budget: int | None,
                 max_tokens: int, log: Callable[[str], None]):
        self.blocks, self.device, self.log = blocks, device, log
        # The job's limit (None: none); what the card can give is read when the run starts.
        self.limit, self.budget, self.max_tokens = budget, budget or 0, max(1, max_tokens)
        self.measured = 0  # steps seen
        self.fixed = 0
        self.all_per_token = 0.0
        self.done = False
        self.summary = ""
        self.expected = 0

    # CUDA graphs keep their own static buffers beside the step's allocations: only with this
    # share of the budget left over does the run switch to them.
    GRAPHS_ROOM = 0.25

    def tight(self) -> bool:
        """Too little of the budget left beside the expected peak for CUDA graphs."""
        return self.expected > (1 - self.GRAPHS_ROOM) * self.budget

    def after_step(self, step: int, step_tokens: int) -> None:
        """`step_tokens`: the largest micro-batch of the step just done, in tokens (B x T)."""
        if self.done:
            return
        dev = self.device
        peak = torch.cuda.max_memory_allocated(dev)
        self.measured += 1
        if self.measured == 1:
            self.fixed = torch.cuda.memory_allocated(dev)
            # What this process may still get: the card's free memory and what it holds; a
            # limit larger than that (another process took the rest) does not count.
            free, _ = torch.cuda.mem_get_info(dev)
            available = free + torch.cuda.memory_reserved(dev)
            self.budget = available if self.limit is None else min(self.limit, available)
        elif self.measured == 2:
            self.all_per_token = (peak - self.fixed) / max(1, step_tokens)
            for block in self.blocks[-self.MEASURED_LAYERS:]:
                block.gradient_checkpointing = False
        else:
            one_per_token = (peak - self.fixed) / max(1, step_tokens)
            peak_all = int(self.fixed + self.all_per_token * self.max_tokens)
            per_layer = int(max(0.0, one_per_token - self.all_per_token) * self.max_tokens)
            keep = layers_to_checkpoint(len(self.blocks), peak_all, per_layer, self.budget)
            # The peak expected from now on (what the budget allowed for).
            self.expected = peak_all + (len(self.blocks) - keep) * per_layer
            for i, block in enumerate(self.blocks):
                block.gradient_checkpointing = i < keep
            self.done = True
            gib = 2**30
            self.summary = (f"{keep} of {len(self.blocks)} layers (memory budget "
                            f"{self.budget / gib:.1f} GiB; at {self.max_tokens} tokens a "
                            f"micro-batch {peak_all / gib:.1f} GiB with every layer "
                            f"checkpointed, {per_layer / gib:.2f} GiB per layer that is not)")
            self.log(f"Gradient checkpointing from step {step + 1}: {self.summary}")
        # Each measurement sees only its own step's peak.
        torch.cuda.reset_peak_memory_stats(dev)


def checkpoint_budget(model: Any, cfg: EngineConfig, device: torch.device,
                       log: Callable[[str], None], lanes: int = 1) -> CheckpointBudget | None:
    """The run's memory-budgeted checkpointing, when it asked for it and it applies (`lanes`:
    a pack's trials, each with its own copy of the micro-batch in every forward pass)."""
    if not cfg.levers.checkpoint_budget:
        return None
    blocks = checkpointed_blocks(model)
    if device.type != "cuda" or not any(b.gradient_checkpointing for b in blocks):
        log("memory-budgeted checkpointing does not apply: "
            + ("it measures CUDA memory" if device.type != "cuda"
               else "this model checkpoints no layers"))
        return None
    # The largest forward pass the run can have: micro_batch_size samples of cutoff_len tokens
    # (a packed row holds no more; a packing run keeps a micro-batch of one length as its
    # rows, which can be that large, whatever the row cap).
    largest = cfg.micro_batch_size * cfg.cutoff_len * max(1, lanes)
    return CheckpointBudget(blocks, device, cfg.levers.memory_budget_bytes, largest, log)


def graphs_refusal(levers: Any, device: torch.device, blocks: list[Any], lanes: int,
                   sample_lengths: int) -> str | None:
    """Why the compiled layers may not replay CUDA graphs in this run, None when they may.
    A CUDA graph replays the kernels it recorded for one shape of input, so it pays when every
    micro-batch has one shape; it cannot recompute a layer's activations from inside itself
    (gradient checkpointing), nor switch a pack's trials' random generators."""
    if not levers.cuda_graphs:
        return "off"
    if not blocks or not all(getattr(b, "_compiled_call_impl", None) for b in blocks):
        return "the layers are not compiled"
    if device.type != "cuda":
        return "they need a CUDA GPU"
    if lanes > 1:
        return "a pack's trials each draw from their own random generators"
    if sample_lengths > 1:
        return (f"the samples have {sample_lengths} different lengths (a graph would be "
                "recorded for every shape)")
    checkpointed = sum(1 for b in blocks if b.gradient_checkpointing)
    if checkpointed:
        return f"{checkpointed} of {len(blocks)} layers recompute their activations"
    return None


def replay_graphs(blocks: list[Any]) -> None:
    """Compile the layers again, to replay CUDA graphs (torch.compile's reduce-overhead)."""
    for block in blocks:
        block.compile(mode="reduce-overhead")
