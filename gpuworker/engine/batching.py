"""Batchers: what one optimizer step's micro-batches (lists of samples) become as the model's
input. `pad` pads each micro-batch to its longest sample; `pack` puts a micro-batch's samples
end to end in one row. Neither changes which samples make up a step (levers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from gpuworker.engine.data import IGNORE_INDEX
from gpuworker.errors import LeverSkipped


@dataclass(frozen=True)
class Batch:
    """One forward pass's input: (B, T) tensors (input_ids, labels, attention_mask; a packing
    batcher adds position_ids) and counts taken on the CPU when it was built."""

    tensors: dict[str, torch.Tensor]
    tokens: int     # real (not padding) tokens: what tokens/s counts
    targets: int    # label tokens: positions whose next token is learned
    padded: bool    # some row holds padding: positions must come from the mask
    # Packed rows for the variable-length attention (attention.py): `cu_seq_lens` among the
    # tensors marks where each sample starts in every row, and no sample is longer than this.
    segment_max: int = 0

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return replace(self, tensors=moved)

    def repeat(self, k: int) -> Batch:
        """The rows k times over, one copy after another (a pack: one copy per trial); the
        counts stay one copy's, and the rows keep one layout of samples."""
        if k == 1:
            return self
        return replace(self, tensors={n: v if n == CU_SEQ_LENS else torch.cat([v] * k)
                                      for n, v in self.tensors.items()})


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


# Where a packed row's samples start (0, l1, l1 + l2, ..., T), for the variable-length attention.
CU_SEQ_LENS = "cu_seq_lens"

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
    so the last token of one sample does not learn to predict the next sample.

    A micro-batch whose samples are all of one length (raw text's chunks, mostly) has no
    padding to save: it keeps the padded layout, rows of their own with the plain causal
    attention, which is faster than one long row with a mask.

    With `varlen` (the longest a sample can be: the run's cutoff_len) a row carries where its
    samples start instead of the (T, T) mask, for the variable-length attention kernel
    (attention.py), which computes no attention between samples at all."""

    name = "pack"

    def __init__(self, row_tokens: int = PACK_ROW_TOKENS, pad_id: int = 0, varlen: int = 0):
        self.row_tokens = row_tokens
        self.unpadded = PadBatcher(pad_id)
        self.varlen = varlen

    def batches(self, samples: list[dict[str, Any]]) -> list[Batch]:
        if len({len(s["input_ids"]) for s in samples}) <= 1:
            return [self.unpadded.collate(samples)]
        return [self.collate(row) for row in self.rows(samples)]

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
        t = {"input_ids": torch.tensor([ids], dtype=torch.long),
             "labels": torch.tensor([labels], dtype=torch.long),
             "position_ids": torch.tensor([positions])}
        if self.varlen:
            starts = [0]
            for sample in samples:
                starts.append(starts[-1] + len(sample["input_ids"]))
            t["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
            t[CU_SEQ_LENS] = torch.tensor(starts, dtype=torch.int32)
            longest = max(len(sample["input_ids"]) for sample in samples)
            return Batch(tensors=t, tokens=len(ids), targets=label_tokens(t["labels"]),
                         padded=False, segment_max=max(self.varlen, longest))
        seg = torch.tensor(segment)
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        t["attention_mask"] = ((seg[:, None] == seg[None, :]) & causal)[None, None]  # (T, T)
        return Batch(tensors=t, tokens=len(ids), targets=label_tokens(t["labels"]), padded=False)

    def step(self, micro_batches: list[list[dict[str, Any]]]) -> list[Batch]:
        return [batch for samples in micro_batches for batch in self.batches(samples)]

    def evaluation(self, samples: list[dict[str, Any]], micro_batch_size: int
                   ) -> Iterator[Batch]:
        for start in range(0, len(samples), micro_batch_size):
            yield from self.batches(samples[start:start + micro_batch_size])


def check_packing(model: Any) -> None:
    """Packed rows need an attention that takes a boolean (T, T) mask as it is: PyTorch's
    scaled-dot-product attention, transformers' default for the architectures it knows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise LeverSkipped(f"the model uses '{impl}' attention; packing needs 'sdpa'")
