"""Batching samples of different lengths: pad each batch to its own longest sample.

Samples are not padded to ``cutoff_len`` (the webui does, on the left, to every sample): a
batch of short rows would otherwise spend most of its compute on padding. Padding goes on the
right, which is what causal-LM training with an attention mask expects (position ids stay those
of an unpadded sample). Padded positions get ``attention_mask`` 0 and label -100, so they
change neither the attention over real tokens nor the loss.

torch is imported only inside :func:`pad_batch` when tensors are asked for, so importing
``formats`` stays light for processes that never train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from formats.tokenize import IGNORE_INDEX


def pad_batch(
    samples: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    *,
    return_tensors: str | None = "pt",
) -> dict[str, Any]:
    """Pad a batch to its longest sample.

    Each sample needs ``input_ids``; ``labels`` default to the input ids and ``attention_mask``
    to all ones. Returns ``input_ids`` (padded with ``pad_token_id``), ``labels`` (padded with
    -100) and ``attention_mask`` (padded with 0), each of shape (B, T) with T the longest sample:
    ``torch.long`` tensors, or lists of lists with ``return_tensors=None``.
    """
    if not samples:
        raise ValueError("cannot pad an empty batch")
    width = max(len(sample["input_ids"]) for sample in samples)
    input_ids, labels, attention = [], [], []
    for sample in samples:
        ids = list(sample["input_ids"])
        sample_labels = list(sample.get("labels", ids))
        mask = list(sample.get("attention_mask", [1] * len(ids)))
        if not (len(sample_labels) == len(mask) == len(ids)):
            raise ValueError("a sample's input_ids, labels and attention_mask differ in length")
        pad = width - len(ids)
        input_ids.append(ids + [pad_token_id] * pad)
        labels.append(sample_labels + [IGNORE_INDEX] * pad)
        attention.append(mask + [0] * pad)
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if return_tensors is None:
        return batch
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    import torch

    return {name: torch.tensor(rows, dtype=torch.long) for name, rows in batch.items()}


def padding_fraction(
    samples: Sequence[Mapping[str, Sequence[int]]] | Sequence[int], micro_batch_size: int
) -> float:
    """The share of padding in the batches ``pad_batch`` would build from ``samples``.

    Batches are consecutive runs of ``micro_batch_size`` samples in the order given (the last
    may be shorter); pass samples in the order the trainer will batch them. ``samples`` may also
    be a list of lengths. Returns pad positions / all positions, 0.0 for no samples.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    lengths = [s if isinstance(s, int) else len(s["input_ids"]) for s in samples]
    total = padded = 0
    for start in range(0, len(lengths), micro_batch_size):
        batch = lengths[start : start + micro_batch_size]
        width = max(batch)
        total += width * len(batch)
        padded += sum(width - length for length in batch)
    return padded / total if total else 0.0
