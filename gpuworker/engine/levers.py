"""The engine's levers: the parts of a run that can be swapped without touching the loop, by name.

    batcher   turns one optimizer step's micro-batches (lists of samples) into `Batch`es
              (batching.py): "pad" (each micro-batch padded to its longest sample, the
              default) or "pack" (a micro-batch's samples end to end in a row). A batcher may
              regroup a step's samples into other batches, never change which make up the step.
    loss_fn   `loss_fn(model, batch)` -> the SUM of next-token losses over the batch's label
              tokens (losses.py; the loop divides by the step's label-token count):
              "fp32_logits" (full logits, cross-entropy in fp32; the default) or "fused" (the
              output layer and the loss a chunk of label positions at a time).
    prepare   hooks `hook(model, config) -> model`, run in order after the model is loaded,
              LoRA-wrapped and its earlier weights loaded (kernels.py): "liger_kernels",
              "compile", "lean_dropout", "nf4_op" (nf4.py). How many layers are checkpointed is
              set after them (kernels.py).

A lever that does not apply to a run raises LeverSkipped: the run goes on without it, and the
reason is logged and recorded in training_log.json ("speed"). The dispatcher's memory estimate
knows the same loss and batcher names (its LOSS_LOGIT_BYTES and BATCH_TOKENS), and a test keeps
the lists equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpuworker.engine import attention
from gpuworker.engine.batching import (  # noqa: F401  (the levers' parts, by one name)
    PACK_ROW_TOKENS,
    Batch,
    Batcher,
    PackBatcher,
    PadBatcher,
    check_packing,
    label_tokens,
)
from gpuworker.engine.config import EngineConfig, Levers
from gpuworker.engine.kernels import (  # noqa: F401
    CheckpointBudget,
    checkpoint_budget,
    checkpointed_blocks,
    compile_layers,
    compile_record,
    layers_to_checkpoint,
    lean_lora_dropout,
    liger_kernels,
    limit_checkpointing,
    require_gpu,
)
from gpuworker.engine.losses import (  # noqa: F401
    Autocast,
    Forward,
    Fp32LogitsLoss,
    FusedLinearLoss,
    autocast_dtype,
    check_logits_are_a_product,
    chunked_linear_loss_sum,
    position_ids,
    split_causal_lm,
    token_loss_sum,
)
from gpuworker.engine.nf4 import nf4_layers
from gpuworker.errors import EngineError, LeverSkipped  # noqa: F401

LossFn = Callable[[Any, Batch], Any]
PrepareHook = Callable[[Any, EngineConfig], Any]


# name -> factory. A loss gets the run's autocast; a batcher the pad id and cutoff_len.
LOSSES: dict[str, Callable[[Autocast], LossFn]] = {"fp32_logits": Fp32LogitsLoss,
                                                    "fused": FusedLinearLoss}
BATCHERS: dict[str, Callable[[int, int], Batcher]] = {
    "pad": lambda pad_id, cutoff_len: PadBatcher(pad_id),
    "pack": lambda pad_id, cutoff_len: PackBatcher(max(PACK_ROW_TOKENS, cutoff_len), pad_id)}
PREPARE_HOOKS: dict[str, PrepareHook] = {"liger_kernels": liger_kernels, "compile": compile_layers,
                                         "lean_dropout": lean_lora_dropout, "nf4_op": nf4_layers}


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
            require_gpu(model, levers, "on the CPU, attention over a packed row's mask costs "
                        "more than the padding it saves")
            check_packing(model)
        except LeverSkipped as e:
            log(f"batching pack does not apply: {e}; padding instead")
            padded = PadBatcher(pad_id)
            padded.name = f"pad (pack skipped: {e})"  # as the run records it
            return padded
        # Each sample's own attention through the variable-length kernel, not a row's mask.
        attention.install()
        batcher.varlen = cutoff_len
    return batcher


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
