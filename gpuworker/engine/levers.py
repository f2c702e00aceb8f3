"""The engine's levers: the parts of a run that can be swapped without touching the loop.

    batcher   turns one optimizer step's micro-batches (lists of samples) into `Batch`es.
              Today: "pad" (each micro-batch padded to its longest sample). A packing batcher
              may regroup the step's samples into other batches (position_ids in the tensors,
              fewer pad tokens), but never changes which samples make up the step.
    loss_fn   `loss_fn(model, batch)` -> the SUM of next-token losses over the batch's label
              tokens (the loop divides by the step's label-token count). Today: "fp32_logits",
              the model's full logits then cross-entropy in fp32 outside the model. A fused
              loss may compute it inside the model instead (pass labels, multiply its mean by
              `batch.targets`), never materialising the logits.
    prepare   hooks `hook(model, config) -> model`, run in order after the model is loaded,
              LoRA-wrapped and its earlier weights loaded (kernel patches, compilation).
              Today: none (the quantised models' gradient checkpointing is part of loading,
              because peft needs it before the LoRA layers go on).

A run picks them by name (config.Levers); the registries below say what each name is. The
dispatcher's memory estimate knows the same names (its LOSS_LOGIT_BYTES and BATCH_TOKENS), and
a test keeps the two lists equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from gpuworker.engine.config import EngineConfig, Levers
from gpuworker.engine.data import IGNORE_INDEX
from gpuworker.errors import EngineError

Autocast = Callable[[], Any]


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """One forward pass's input: (B, T) tensors (input_ids, labels, attention_mask; a packing
    batcher adds position_ids) and counts taken on the CPU when it was built."""

    tensors: dict[str, torch.Tensor]
    tokens: int     # real (not padding) tokens: what tokens/s counts
    targets: int    # label tokens: positions whose next token is learned
    padded: bool    # some row holds padding: positions must come from the mask

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return Batch(tensors=moved, tokens=self.tokens, targets=self.targets, padded=self.padded)


class Batcher(Protocol):
    name: str

    def step(self, micro_batches: list[list[dict[str, Any]]]) -> list[Batch]:
        """The batches of one optimizer step, given its micro-batches' samples."""

    def evaluation(self, samples: list[dict[str, Any]], micro_batch_size: int
                   ) -> Iterator[Batch]:
        """Batches covering every sample once, in order (for the evaluation loss)."""


def label_tokens(labels: torch.Tensor) -> int:
    """Positions with a learned next token. The first position is never a target: nothing
    before it predicts it."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class PadBatcher:
    """Each micro-batch as it is, padded to its longest sample (formats.pad_batch)."""

    name = "pad"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, samples: list[dict[str, Any]]) -> Batch:
        import formats

        raw = formats.pad_batch(samples, self.pad_id)
        t = {k: torch.as_tensor(raw[k], dtype=torch.long)
             for k in ("input_ids", "labels", "attention_mask")}
        mask = t["attention_mask"]
        return Batch(tensors=t, tokens=int(mask.sum()), targets=label_tokens(t["labels"]),
                     padded=not bool(mask.all()))

    def step(self, micro_batches: list[list[dict[str, Any]]]) -> list[Batch]:
        return [self.collate(samples) for samples in micro_batches]

    def evaluation(self, samples: list[dict[str, Any]], micro_batch_size: int
                   ) -> Iterator[Batch]:
        for start in range(0, len(samples), micro_batch_size):
            yield self.collate(samples[start:start + micro_batch_size])


# Tokens in one packed row at the most (unless a single sample is longer): the row's attention
# mask is rows x rows booleans (16 MB at 4096), so a micro-batch larger than this is split
# into several rows, each its own forward pass.
PACK_ROW_TOKENS = 4096


class PackBatcher:
    """Padding-free: each micro-batch's samples end to end in one row (several rows when they
    exceed PACK_ROW_TOKENS), positions restarting at every sample and a block-diagonal causal
    attention mask, so no sample sees another and no token is padding. The step's samples,
    their order and the step's label tokens are the padded batcher's; only the tensors'
    shapes differ. The first token of each sample is never a target (as in a padded row),
    so the last token of one sample does not learn to predict the next sample."""

    name = "pack"

    def __init__(self, row_tokens: int = PACK_ROW_TOKENS):
        self.row_tokens = row_tokens

    def rows(self, samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        out: list[list[dict[str, Any]]] = [[]]
        used = 0
        for sample in samples:
            n = len(sample["input_ids"])
            if out[-1] and used + n > self.row_tokens:
                out.append([])
                used = 0
            out[-1].append(sample)
            used += n
        return out

    def collate(self, samples: list[dict[str, Any]]) -> Batch:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        segment: list[int] = []
        for k, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids += list(sample["input_ids"])
            labels += [IGNORE_INDEX] + list(sample.get("labels", sample["input_ids"]))[1:]
            positions += range(n)
            segment += [k] * n
        seg = torch.tensor(segment)
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        mask = (seg[:, None] == seg[None, :]) & causal  # (T, T): True where a token may look
        t = {"input_ids": torch.tensor([ids], dtype=torch.long),
             "labels": torch.tensor([labels], dtype=torch.long),
             "attention_mask": mask[None, None], "position_ids": torch.tensor([positions])}
        return Batch(tensors=t, tokens=len(ids), targets=label_tokens(t["labels"]), padded=False)

    def step(self, micro_batches: list[list[dict[str, Any]]]) -> list[Batch]:
        return [self.collate(row) for samples in micro_batches for row in self.rows(samples)]

    def evaluation(self, samples: list[dict[str, Any]], micro_batch_size: int
                   ) -> Iterator[Batch]:
        for start in range(0, len(samples), micro_batch_size):
            for row in self.rows(samples[start:start + micro_batch_size]):
                yield self.collate(row)


def check_packing(model: Any) -> None:
    """Packed rows need an attention that takes a boolean (T, T) mask as it is: PyTorch's
    scaled-dot-product attention, transformers' default for the architectures it knows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise LeverSkipped(f"the model uses '{impl}' attention; packing needs 'sdpa'")


# --------------------------------------------------------------------------- losses


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over label tokens.

    logits (B, T, V) predict the token after each position; labels (B, T) hold the token ids
    (IGNORE_INDEX where nothing is learned), aligned with the inputs as Hugging Face does.
    """
    # Shift the labels, not the logits: slicing the logits would make backward allocate a
    # second full (B, T, V) gradient buffer (the slice's), about 2 bytes x vocab per token.
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()  # (B*T,)
    pred = logits.float().flatten(0, 1)  # (B*T, V)
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")


class Forward:
    """model(...) -> its output (logits, or a decoder's hidden states), with position ids from
    the mask for models whose forward accepts them (remembered after the first refusal)."""

    def __init__(self, read: str = "logits") -> None:
        self.read = read
        self.with_positions = True

    def __call__(self, model: Any, batch: Batch) -> torch.Tensor:
        t = batch.tensors
        kw = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        if "position_ids" in t:
            return getattr(model(**kw, position_ids=t["position_ids"]), self.read)
        # No padding in the batch: the model's own positions are right.
        if self.with_positions and batch.padded:
            try:
                out = model(**kw, position_ids=position_ids(t["attention_mask"]))
                return getattr(out, self.read)
            except TypeError as e:
                if "position_ids" not in str(e):
                    raise
                self.with_positions = False
        return getattr(model(**kw), self.read)


class Fp32LogitsLoss:
    """The model's full (B, T, V) logits under autocast, then the loss in fp32 outside it."""

    name = "fp32_logits"

    def __init__(self, autocast: Autocast):
        self.autocast = autocast
        self.forward = Forward()

    def __call__(self, model: Any, batch: Batch) -> torch.Tensor:
        with self.autocast():
            logits = self.forward(model, batch)  # (B, T, V)
        # The logits go when this returns, before backward: nothing in the graph needs them,
        # and holding them costs 2 bytes x vocabulary per token at the peak.
        return token_loss_sum(logits, batch.tensors["labels"])


class LeverSkipped(Exception):
    """A lever that does not apply to this run (no CUDA, an architecture it does not know, a
    library missing): the run goes on without it, and the reason is logged and recorded."""


def split_causal_lm(model: Any) -> tuple[Any, torch.nn.Linear]:
    """The model's decoder (hidden states out) and its output layer, for a loss that does the
    output layer's product itself; refuses (LeverSkipped) a model whose logits are more than
    `hidden @ weight.T`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    head = base.get_output_embeddings()
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if decoder is None or type(head) is not torch.nn.Linear or head.bias is not None:
        raise LeverSkipped(f"{type(base).__name__}'s output layer is not a plain linear layer "
                           "(a LoRA or quantised output layer, or a bias)")
    for attr, plain in (("final_logit_softcapping", None), ("logit_scale", 1.0),
                        ("logits_scaling", 1.0)):
        if getattr(cfg, attr, plain) not in (plain, None):
            raise LeverSkipped(f"{type(base).__name__} transforms its logits ({attr})")
    return decoder, head


def chunked_linear_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                            chunk: int = 1024) -> torch.Tensor:
    """Sum of cross-entropy of `hidden @ weight.T` against `target`, `chunk` rows at a time;
    each chunk's logits are recomputed in backward instead of kept (plain PyTorch, any
    device)."""
    from torch.utils.checkpoint import checkpoint

    # At least fp32 for the softmax, as the plain loss computes it.
    dtype = torch.promote_types(hidden.dtype, torch.float32)

    def part(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ w.t()).to(dtype), t, reduction="sum")

    # Attached to the graph even when there is no row: a micro-batch without label tokens
    # contributes 0 and still has a backward, as with the plain loss.
    total = (hidden.sum() * 0).to(dtype)
    for start in range(0, hidden.shape[0], chunk):
        end = start + chunk
        total = total + checkpoint(part, hidden[start:end], weight, target[start:end],
                                   use_reentrant=False)
    return total


class FusedLinearLoss:
    """The loss without the full logits: the decoder's hidden states at the label positions
    only, then the output layer and cross-entropy together, a chunk of positions at a time.
    On CUDA with liger-kernel installed, Liger's fused linear cross-entropy (its kernel
    computes the gradient in the forward pass); elsewhere `chunked_linear_loss_sum`. The sum
    is the plain loss's, over the same label tokens."""

    name = "fused"

    def __init__(self, autocast: Autocast):
        self.autocast = autocast
        self.forward = Forward(read="last_hidden_state")
        self.split: tuple[Any, torch.nn.Linear] | None = None
        self.liger: Any = None
        self.weight: torch.Tensor | None = None  # the output layer as Liger gets it

    def bind(self, model: Any) -> str:
        """Find the model's decoder and output layer, check once that its logits are the
        decoder's hidden states times the output layer (LeverSkipped if not), and pick the
        kernel; says which kernel runs."""
        self.split = split_causal_lm(model)
        decoder, head = self.split
        check_logits_are_a_product(model, decoder, head, self.autocast)
        if head.weight.device.type == "cuda":
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                self.liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            except ImportError:
                self.liger = None
        return "fused (Liger kernel)" if self.liger is not None else "fused (chunked)"

    def __call__(self, model: Any, batch: Batch) -> torch.Tensor:
        if self.split is None:
            self.bind(model)
        decoder, head = self.split
        labels = batch.tensors["labels"]
        with self.autocast():
            hidden = self.forward(decoder, batch)  # (B, T, H)
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
        keep = target != IGNORE_INDEX
        h = hidden.flatten(0, 1)[keep]  # only the positions whose next token is learned
        y = target[keep]
        if self.liger is None or h.shape[0] == 0:
            with self.autocast():
                return chunked_linear_loss_sum(h, head.weight, y)
        # Liger's kernel runs outside autocast: give it the compute dtype, as autocast would
        # (the frozen output layer is cast once, not at every micro-batch).
        dtype = autocast_dtype(self.autocast, h.device) or h.dtype
        if self.weight is None or self.weight.dtype != dtype:
            self.weight = head.weight.detach().to(dtype)
        return self.liger(self.weight, h.to(dtype), y).float()


def autocast_dtype(autocast: Autocast, device: torch.device) -> torch.dtype | None:
    """The dtype `autocast()` computes matrix products in on `device`, or None without one."""
    with autocast():
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    return None


def check_logits_are_a_product(model: Any, decoder: Any, head: torch.nn.Linear,
                               autocast: Autocast) -> None:
    """A model may do more to its logits than the output layer's product (a scale, a soft cap,
    a multiplier) in ways no config key names: compare, once, on a few tokens, the model's own
    logits with the product (evaluation mode, so no dropout randomness is drawn)."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(8, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]
        with torch.no_grad(), autocast():
            logits = model(input_ids=ids).logits.float()
            product = head(decoder(input_ids=ids).last_hidden_state).float()
    finally:
        model.train(was_training)
    scale = logits.abs().max().clamp(min=1e-6)
    if not torch.allclose(logits, product, rtol=0, atol=float(scale) * 1e-3):
        raise LeverSkipped(f"{type(model).__name__}'s logits are not its decoder's hidden "
                           "states times its output layer")


LossFn = Callable[[Any, Batch], torch.Tensor]
PrepareHook = Callable[[Any, EngineConfig], Any]


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


def compile_layers(model: Any, config: EngineConfig) -> Any:
    """torch.compile each decoder layer (regional compilation: the layers are alike, so one
    compiled graph serves them all, and compiling takes seconds, not minutes), fusing the
    layer's small operations and cutting Python's share of the step. The compiled code is
    cached in the data folder (cache/torch-compile/), so the next job's process on the same
    model reuses it instead of compiling from nothing."""
    import os

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
    # folder the worker was started with on purpose stays.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    for block in blocks:
        block.compile()
    return model


# name -> factory. A loss gets the run's autocast; a batcher the pad id and cutoff_len.
LOSSES: dict[str, Callable[[Autocast], LossFn]] = {"fp32_logits": Fp32LogitsLoss,
                                                    "fused": FusedLinearLoss}
BATCHERS: dict[str, Callable[[int, int], Batcher]] = {
    "pad": lambda pad_id, cutoff_len: PadBatcher(pad_id),
    "pack": lambda pad_id, cutoff_len: PackBatcher(max(PACK_ROW_TOKENS, cutoff_len))}
PREPARE_HOOKS: dict[str, PrepareHook] = {"liger_kernels": liger_kernels, "compile": compile_layers}


def _pick(registry: dict[str, Any], name: str, what: str) -> Any:
    if name not in registry:
        raise EngineError(f"unknown {what} '{name}' (known: {', '.join(sorted(registry))})")
    return registry[name]


def check_levers(levers: Levers) -> None:
    """Refuse, before any loading, a lever name the engine does not know."""
    _pick(LOSSES, levers.loss, "loss")
    _pick(BATCHERS, levers.batching, "batching")
    for name in levers.prepare:
        _pick(PREPARE_HOOKS, name, "preparation hook")


def make_loss(levers: Levers, autocast: Autocast, model: Any = None,
              log: Callable[[str], None] = lambda line: None) -> tuple[LossFn, str]:
    """The run's loss, and what it is in words (for the log and training_log.json). A loss
    that does not apply to `model` falls back to the plain fp32_logits, with the reason."""
    loss = _pick(LOSSES, levers.loss, "loss")(autocast)
    bind = getattr(loss, "bind", None)
    if bind is None or model is None:
        return loss, levers.loss
    try:
        return loss, bind(model)
    except LeverSkipped as e:
        log(f"loss {levers.loss} does not apply: {e}; using fp32_logits")
        return Fp32LogitsLoss(autocast), f"fp32_logits ({levers.loss} skipped: {e})"


def make_batcher(levers: Levers, pad_id: int, cutoff_len: int, model: Any = None,
                 log: Callable[[str], None] = lambda line: None) -> Batcher:
    """The run's batcher; packing falls back to padding, with the reason, on a model whose
    attention cannot take the packed rows' mask."""
    batcher = _pick(BATCHERS, levers.batching, "batching")(pad_id, cutoff_len)
    if isinstance(batcher, PackBatcher) and model is not None:
        try:
            check_packing(model)
        except LeverSkipped as e:
            log(f"batching pack does not apply: {e}; padding instead")
            return PadBatcher(pad_id)
    return batcher


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
    """The model's decoder layers that transformers can checkpoint one by one."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


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
    """Memory-budgeted checkpointing, measured on the run itself: step 1 runs with every layer
    checkpointed (its peak memory: everything but the saved activations), step 2 with the last
    layer keeping its activations (the difference: one layer's cost), and from step 3 on as
    many layers keep theirs as fit the budget. Checkpointing recomputes exactly what it
    dropped, so the losses do not depend on the choice; only speed and memory do."""

    def __init__(self, blocks: list[Any], device: torch.device, budget: int | None,
                 log: Callable[[str], None]):
        self.blocks, self.device, self.log = blocks, device, log
        if budget is None:
            free, _ = torch.cuda.mem_get_info(device)
            budget = free + torch.cuda.memory_allocated(device)
        self.budget = budget
        self.peak_all = 0
        self.done = False
        self.summary = ""

    def after_step(self) -> None:
        if self.done:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        if not self.peak_all:
            self.peak_all = peak
            self.blocks[-1].gradient_checkpointing = False
            return
        per_layer = peak - self.peak_all
        keep = layers_to_checkpoint(len(self.blocks), self.peak_all, per_layer, self.budget)
        for i, block in enumerate(self.blocks):
            block.gradient_checkpointing = i < keep
        self.done = True
        gib = 2**30
        self.summary = (f"{keep} of {len(self.blocks)} layers (memory budget "
                        f"{self.budget / gib:.1f} GiB; {self.peak_all / gib:.1f} GiB with every "
                        f"layer checkpointed, {per_layer / gib:.2f} GiB per layer that is not)")
        self.log(f"Gradient checkpointing from step 3: {self.summary}")


def prepare_model(model: Any, config: EngineConfig, log: Callable[[str], None],
                  applied: dict[str, str] | None = None) -> Any:
    """Run the config's preparation hooks on the LoRA-wrapped model, in order; `applied`
    gets each hook's outcome ("on", or "skipped: <reason>")."""
    for name in config.levers.prepare:
        log(f"Preparing the model: {name}")
        try:
            model = _pick(PREPARE_HOOKS, name, "preparation hook")(model, config)
            outcome = "on"
        except LeverSkipped as e:
            outcome = f"skipped: {e}"
            log(f"Preparing the model: {name} skipped: {e}")
        if applied is not None:
            applied[name] = outcome
    return model
