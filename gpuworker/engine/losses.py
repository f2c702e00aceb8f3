"""Losses: `loss_fn(model, batch)` -> the sum of next-token losses over the batch's label tokens.
`fp32_logits` builds the full logits and takes cross-entropy in fp32; `fused` computes the output
layer and the loss together, a chunk of label positions at a time (levers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gpuworker.engine import attention
from gpuworker.engine.batching import CU_SEQ_LENS, Batch
from gpuworker.engine.data import IGNORE_INDEX
from gpuworker.errors import LeverSkipped

Autocast = Callable[[], Any]
# Config keys (and their plain values) of models whose logits are more than the output layer's
# product; the dispatcher's estimate keeps the same list (a test compares them).
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}



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
        if CU_SEQ_LENS in t:  # packed rows for the variable-length attention (attention.py)
            kw.update({attention.CU_SEQ_LENS: t[CU_SEQ_LENS], attention.MAX_LEN: batch.segment_max})
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

    def parts(self, model: Any, batch: Batch, k: int) -> torch.Tensor:
        """(k,) loss sums of `batch`'s k equal slices of rows (a pack's trials), one forward."""
        with self.autocast():
            logits = self.forward(model, batch)
        return torch.stack([token_loss_sum(lg, lb) for lg, lb in
                            zip(logits.chunk(k), batch.tensors["labels"].chunk(k), strict=True)])


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
    for attr, plain in LOGIT_TRANSFORMS.items():
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
        return self._sum(self._hidden(model, batch), batch.tensors["labels"])

    def parts(self, model: Any, batch: Batch, k: int) -> torch.Tensor:
        """(k,) loss sums of `batch`'s k equal slices of rows (a pack's trials), one forward."""
        hidden = self._hidden(model, batch)
        return torch.stack([self._sum(h, lb) for h, lb in
                            zip(hidden.chunk(k), batch.tensors["labels"].chunk(k), strict=True)])

    def _hidden(self, model: Any, batch: Batch) -> torch.Tensor:
        if self.split is None:
            self.bind(model)
        with self.autocast():
            return self.forward(self.split[0], batch)  # (B, T, H)

    def _sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = self.split[1]
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
        with torch.no_grad(), autocast(), torch.compiler.set_stance("force_eager"):
            logits = model(input_ids=ids).logits.float()
            product = head(decoder(input_ids=ids).last_hidden_state).float()
    finally:
        model.train(was_training)
    scale = logits.abs().max().clamp(min=1e-6)
    if not torch.allclose(logits, product, rtol=0, atol=float(scale) * 1e-3):
        raise LeverSkipped(f"{type(model).__name__}'s logits are not its decoder's hidden "
                           "states times its output layer")
