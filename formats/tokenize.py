"""One training text -> token ids and labels, with the "Train LoRA" tab's rules.

Rules (from the project's issue, which follows text-generation-webui):

* The text is tokenized with the model's tokenizer and its special tokens, so a tokenizer that
  adds a BOS token adds it. If the result starts with two BOS tokens (the text itself began
  with the BOS text, as raw-text chunks decoded from tokens do), one is dropped; in general
  leading BOS tokens are collapsed to one.
* The ids are cut to ``cutoff_len``. The BOS collapse happens *before* the cut; the webui cuts
  first, which loses one extra token at the end of a text that starts with BOS and is longer
  than ``cutoff_len``. We keep that token: the issue asks only that there never be two BOS.
* ``add_eos_token``: EOS is appended when the ids do not already end with it and there is room
  (fewer than ``cutoff_len`` ids). A text cut at ``cutoff_len`` gets no EOS.
* ``train_only_after``: when the string occurs in the text, the text is split just after its
  first occurrence. The prefix (up to and including the string) is tokenized with special
  tokens (so it starts with BOS) and the rest on its own without special tokens; the sample is
  the prefix's ids followed by the rest's ids. Every id of the prefix gets the label -100 and
  every id of the rest is trained. The boundary is therefore exact by construction: the masked
  ids decode to exactly the prefix and the trained ids to exactly the rest, whatever merges
  the tokenizer would have made across the boundary. This is the webui's method too (it
  tokenizes prefix and rest separately), so a marker-separated prompt gives the same ids.
  The token offset mapping was not used because slow tokenizers have none and a token that
  straddles the boundary would have had to be either trained or masked, neither exactly right.
  When the string does not occur, or is empty, every id is trained.

Labels are the input ids themselves (the model shifts them), with -100 where masked. The webui
builds these labels but then hands them to ``DataCollatorForLanguageModeling``, which replaces
them with the input ids, so in the webui ``train_only_after`` has no effect on the loss; here
the mask is what the loss sees (see :func:`formats.collate.pad_batch`).

It is assumed that the tokenizer adds at most a BOS at the start as its special tokens (true of
Llama, Mistral, Qwen, Gemma, GPT-2 and their kin); one that appends an EOS by itself would
append it to the prefix when ``train_only_after`` is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""The label value PyTorch's cross-entropy (and Hugging Face models) ignore."""


@dataclass(frozen=True)
class TokenizedSample:
    """A tokenized training text and what happened to it."""

    input_ids: list[int]
    labels: list[int]
    """Same length as ``input_ids``; -100 where the loss must not look."""
    truncated: bool
    """True when ids were cut off at ``cutoff_len``."""

    @property
    def trained_tokens(self) -> int:
        """How many labels the loss sees (an upper bound: the first label never is a target)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def as_dict(self) -> dict[str, list[int]]:
        """``{"input_ids", "labels", "attention_mask"}`` as the trainer and collate use them."""
        return {
            "input_ids": list(self.input_ids),
            "labels": list(self.labels),
            "attention_mask": [1] * len(self.input_ids),
        }


def encode(tokenizer: Any, text: str, *, special_tokens: bool) -> list[int]:
    """The tokenizer's ids for ``text`` with or without its special tokens.

    ``verbose=False`` because raw-text parts are tokenized whole before being cut and may be far
    longer than the model's context, which is expected here and not worth a warning.
    """
    return list(tokenizer.encode(text, add_special_tokens=special_tokens, verbose=False))


def collapse_leading_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    """``ids`` with a run of leading BOS tokens reduced to one."""
    if bos_token_id is None:
        return ids
    start = 0
    while start + 1 < len(ids) and ids[start] == bos_token_id and ids[start + 1] == bos_token_id:
        start += 1
    return ids[start:]


def tokenize_text(
    text: str,
    tokenizer: Any,
    cutoff_len: int,
    add_eos_token: bool = False,
    train_only_after: str = "",
) -> TokenizedSample:
    """Tokenize one training text with the rules of the module docstring."""
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if train_only_after and train_only_after in text:
        split_at = text.index(train_only_after) + len(train_only_after)
        prefix = collapse_leading_bos(encode(tokenizer, text[:split_at], special_tokens=True), bos)
        rest = encode(tokenizer, text[split_at:], special_tokens=False)
    else:
        prefix = []
        rest = collapse_leading_bos(encode(tokenizer, text, special_tokens=True), bos)
    ids = (prefix + rest)[:cutoff_len]
    truncated = len(prefix) + len(rest) > cutoff_len
    if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    masked = min(len(prefix), len(ids))
    labels = [IGNORE_INDEX] * masked + ids[masked:]
    return TokenizedSample(input_ids=ids, labels=labels, truncated=truncated)


def tokenize_sample(
    text: str,
    tokenizer: Any,
    cutoff_len: int,
    add_eos_token: bool = False,
    train_only_after: str = "",
) -> dict[str, list[int]]:
    """``{"input_ids", "labels", "attention_mask"}`` for one training text (plain lists).

    Nothing is padded: padding is per batch, in :func:`formats.collate.pad_batch`.
    """
    return tokenize_text(text, tokenizer, cutoff_len, add_eos_token, train_only_after).as_dict()
