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
    """model(...) -> logits, with position ids from the mask for models whose forward accepts
    them (remembered after the first refusal)."""

    def __init__(self) -> None:
        self.with_positions = True

    def __call__(self, model: Any, batch: Batch) -> torch.Tensor:
        t = batch.tensors
        kw = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        if "position_ids" in t:
            return model(**kw, position_ids=t["position_ids"]).logits
        # No padding in the batch: the model's own positions are right.
        if self.with_positions and batch.padded:
            try:
                return model(**kw, position_ids=position_ids(t["attention_mask"])).logits
            except TypeError as e:
                if "position_ids" not in str(e):
                    raise
                self.with_positions = False
        return model(**kw).logits


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


LossFn = Callable[[Any, Batch], torch.Tensor]
PrepareHook = Callable[[Any, EngineConfig], Any]

# name -> factory. A loss gets the run's autocast; a batcher the pad id and cutoff_len.
LOSSES: dict[str, Callable[[Autocast], LossFn]] = {"fp32_logits": Fp32LogitsLoss}
BATCHERS: dict[str, Callable[[int, int], Batcher]] = {
    "pad": lambda pad_id, cutoff_len: PadBatcher(pad_id)}
PREPARE_HOOKS: dict[str, PrepareHook] = {}


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


def make_loss(levers: Levers, autocast: Autocast) -> LossFn:
    return _pick(LOSSES, levers.loss, "loss")(autocast)


def make_batcher(levers: Levers, pad_id: int, cutoff_len: int) -> Batcher:
    return _pick(BATCHERS, levers.batching, "batching")(pad_id, cutoff_len)


def prepare_model(model: Any, config: EngineConfig, log: Callable[[str], None]) -> Any:
    """Run the config's preparation hooks on the LoRA-wrapped model, in order."""
    for name in config.levers.prepare:
        log(f"Preparing the model: {name}")
        model = _pick(PREPARE_HOOKS, name, "preparation hook")(model, config)
    return model
