"""Tokens and labels: BOS, cutoff, EOS, the ``train_only_after`` mask, and what the loss sees."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from formats import IGNORE_INDEX, pad_batch, tokenize_sample
from formats.tokenize import tokenize_text
from tests.unit.test_formats_tokenizers import bpe_tokenizer, char_tokenizer

M = IGNORE_INDEX


def ids_of(text: str) -> list[int]:
    """Character tokenizer ids of ``text`` without specials (one id per character)."""
    return char_tokenizer().encode(text, add_special_tokens=False)


def test_plain_sample_has_bos_and_is_fully_trained() -> None:
    sample = tokenize_sample("abc", char_tokenizer(), cutoff_len=10)
    assert sample == {
        "input_ids": [1, *ids_of("abc")],
        "labels": [1, *ids_of("abc")],
        "attention_mask": [1, 1, 1, 1],
    }


def test_text_starting_with_bos_gets_one_bos() -> None:
    sample = tokenize_sample("<s>abc", char_tokenizer(), cutoff_len=10)
    assert sample["input_ids"] == [1, *ids_of("abc")]
    sample = tokenize_sample("<s><s>abc", char_tokenizer(), cutoff_len=10)
    assert sample["input_ids"] == [1, *ids_of("abc")]


def test_bos_collapse_happens_before_the_cut() -> None:
    # The webui cuts [1, 1, a, b, c] to 4 and then drops a BOS, leaving 3 ids; we keep 4.
    sample = tokenize_text("<s>abc", char_tokenizer(), cutoff_len=4)
    assert sample.input_ids == [1, *ids_of("abc")]
    assert not sample.truncated


def test_cutoff_truncates() -> None:
    sample = tokenize_text("abcdef", char_tokenizer(), cutoff_len=4)
    assert sample.input_ids == [1, *ids_of("abc")]
    assert sample.labels == sample.input_ids
    assert sample.truncated


def test_tokenizer_without_bos_adds_none() -> None:
    sample = tokenize_sample("abc", char_tokenizer(add_bos=False), cutoff_len=10)
    assert sample["input_ids"] == ids_of("abc")


def test_eos_appended_when_missing_and_room() -> None:
    tok = char_tokenizer()
    assert tokenize_sample("abc", tok, 10, add_eos_token=True)["input_ids"] == [
        1,
        *ids_of("abc"),
        2,
    ]
    # Already ends with EOS: not doubled.
    assert tokenize_sample("abc</s>", tok, 10, add_eos_token=True)["input_ids"] == [
        1,
        *ids_of("abc"),
        2,
    ]
    # Exactly full: no room.
    assert tokenize_sample("abc", tok, 4, add_eos_token=True)["input_ids"] == [1, *ids_of("abc")]
    # Truncated: no EOS either.
    assert tokenize_sample("abcdef", tok, 4, add_eos_token=True)["input_ids"] == [
        1,
        *ids_of("abc"),
    ]
    # One short of full: EOS fits.
    assert tokenize_sample("ab", tok, 4, add_eos_token=True)["input_ids"] == [1, *ids_of("ab"), 2]


def test_train_only_after_masks_up_to_and_including_the_marker() -> None:
    tok = char_tokenizer()
    sample = tokenize_sample("Q: hi\nA: yo", tok, 32, train_only_after="A:")
    assert sample["input_ids"] == [1, *ids_of("Q: hi\nA: yo")]
    assert sample["labels"] == [M] * 9 + ids_of(" yo")


def test_train_only_after_uses_the_first_occurrence_and_eos_is_trained() -> None:
    tok = char_tokenizer()
    sample = tokenize_sample("A:x A:y", tok, 32, add_eos_token=True, train_only_after="A:")
    assert sample["input_ids"] == [1, *ids_of("A:x A:y"), 2]
    assert sample["labels"] == [M, M, M, *ids_of("x A:y"), 2]


def test_marker_absent_trains_everything() -> None:
    sample = tokenize_sample("no marker", char_tokenizer(), 32, train_only_after="A:")
    assert M not in sample["labels"]


def test_marker_at_end_trains_only_eos() -> None:
    sample = tokenize_sample(
        "Q A:", char_tokenizer(), 32, add_eos_token=True, train_only_after="A:"
    )
    assert sample["labels"] == [M] * 5 + [2]


def test_marker_beyond_cutoff_masks_everything() -> None:
    sample = tokenize_text("abcdefgh A: x", char_tokenizer(), 5, train_only_after="A:")
    assert sample.input_ids == [1, *ids_of("abcd")]
    assert sample.labels == [M] * 5
    assert sample.trained_tokens == 0
    assert sample.truncated


def test_mask_boundary_is_exact_even_where_merges_would_cross_it() -> None:
    tok = bpe_tokenizer()
    text = "### Response:\nhello there"
    whole = tok.encode(text)
    sample = tokenize_sample(text, tok, 64, train_only_after="Resp")
    masked = [
        i for i, label in zip(sample["input_ids"], sample["labels"], strict=True) if label == M
    ]
    trained = [label for label in sample["labels"] if label != M]
    # The tokenizer merges across "Resp|onse" when it sees the whole text ...
    assert tok.decode(whole[1:]) == text
    assert "Resp" not in [tok.decode([i]) for i in whole]
    # ... but the mask splits exactly there: masked ids are the prefix, trained ids the rest.
    assert tok.decode(masked) == "<s>### Resp"
    assert tok.decode(trained) == "onse:\nhello there"
    assert sample["input_ids"] == masked + trained


# -- what the loss sees -----------------------------------------------------------------------


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def hand_loss(logits: torch.Tensor, input_ids: list[int], trained_positions: list[int]) -> float:
    """Mean cross-entropy of predicting ``input_ids[p]`` from position ``p - 1``."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # (T, V)
    losses = [-log_probs[p - 1, input_ids[p]].item() for p in trained_positions]
    return sum(losses) / len(losses)


def test_masked_tokens_change_nothing_in_the_loss() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    sample = tokenize_sample("Q: hi\nA: yo!", tok, 64, add_eos_token=True, train_only_after="A:")
    ids, labels = sample["input_ids"], sample["labels"]
    trained_positions = [p for p, label in enumerate(labels) if label != M and p > 0]
    assert trained_positions == list(range(9, len(ids)))

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    # The model's loss is the mean over exactly the unmasked positions ...
    assert abs(out.loss.item() - hand_loss(out.logits[0], ids, trained_positions)) < 1e-5
    # ... which is not the loss over the whole text, so the mask did something.
    full = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert abs(full - out.loss.item()) > 1e-3

    # The loss does not depend at all on what the model predicts for a masked token: its
    # gradient with respect to those predictions is exactly zero, and non-zero elsewhere.
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad[0]  # (T, V); row p - 1 predicts token p
    for p in range(1, len(ids)):
        if p in trained_positions:
            assert grad[p - 1].abs().sum().item() > 0
        else:
            assert torch.count_nonzero(grad[p - 1]).item() == 0

    # So changing the masked tokens' label values (here: to another token) changes nothing
    # once they are masked, while the same change unmasked does change the loss.
    swapped = [7 if p < 9 else ids[p] for p in range(len(ids))]
    with torch.no_grad():
        unmasked_swapped = model(
            input_ids=torch.tensor([ids]), labels=torch.tensor([swapped])
        ).loss.item()
        masked_swapped = model(
            input_ids=torch.tensor([ids]),
            labels=torch.tensor([[M if p < 9 else t for p, t in enumerate(swapped)]]),
        ).loss.item()
    assert abs(unmasked_swapped - full) > 1e-3
    assert masked_swapped == out.loss.item()


def test_padding_changes_nothing_in_the_loss() -> None:
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    long = tokenize_sample("A: a longer answer", tok, 64, train_only_after="A:")
    short = tokenize_sample("A: ok", tok, 64, train_only_after="A:")
    batch = pad_batch([long, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))

    with torch.no_grad():
        out = model(**batch)
        alone = model(input_ids=torch.tensor([short["input_ids"]])).logits[0]
    n = len(short["input_ids"])
    # Right padding with attention_mask 0 leaves the real positions' logits as they were.
    assert torch.allclose(out.logits[1, :n], alone, atol=1e-5)
    # The batch loss is the mean over the trained positions of both samples, padding excluded.
    positions = {
        0: [p for p, label in enumerate(long["labels"]) if label != M and p > 0],
        1: [p for p, label in enumerate(short["labels"]) if label != M and p > 0],
    }
    log_probs = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [
        -log_probs[b, p - 1, batch["input_ids"][b, p]].item()
        for b, trained in positions.items()
        for p in trained
    ]
    assert abs(out.loss.item() - sum(terms) / len(terms)) < 1e-5
