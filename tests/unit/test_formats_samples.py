"""Batching, the trainer's entry point ``build_samples`` from real files, and the preview."""

from __future__ import annotations

import json

import pytest
import torch

from formats import (
    SHIPPED_DIR,
    FormatError,
    NoMatchingTemplateError,
    RawTextOptions,
    build_samples,
    format_table,
    pad_batch,
    padding_fraction,
    preview,
)
from tests.unit.test_formats_tokenizers import char_tokenizer

M = -100


def ids_of(text: str) -> list[int]:
    return char_tokenizer().encode(text, add_special_tokens=False)


# -- collate ----------------------------------------------------------------------------------


def test_pad_batch_pads_to_the_longest_on_the_right() -> None:
    samples = [
        {"input_ids": [1, 5, 6], "labels": [M, 5, 6]},
        {"input_ids": [1, 7, 8, 9, 10], "labels": [1, 7, 8, 9, 10]},
        {"input_ids": [1], "labels": [1], "text": "ignored"},
    ]
    batch = pad_batch(samples, pad_token_id=0)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 10], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[M, 5, 6, M, M], [1, 7, 8, 9, 10], [1, M, M, M, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_pad_batch_lists_and_defaults() -> None:
    batch = pad_batch([{"input_ids": [3]}, {"input_ids": [4, 4]}], 9, return_tensors=None)
    assert batch == {
        "input_ids": [[3, 9], [4, 4]],
        "labels": [[3, M], [4, 4]],
        "attention_mask": [[1, 0], [1, 1]],
    }


def test_pad_batch_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="differ in length"):
        pad_batch([{"input_ids": [1, 2], "labels": [1]}], 0)


def test_padding_fraction() -> None:
    samples = [{"input_ids": [0] * n} for n in (4, 2, 3, 3, 1)]
    # Batches of 2: (4, 2) -> 8 slots, 2 pad; (3, 3) -> 6, 0; (1) -> 1, 0.
    assert padding_fraction(samples, 2) == pytest.approx(2 / 15)
    assert padding_fraction([4, 2, 3, 3, 1], 5) == pytest.approx((0 + 2 + 1 + 1 + 3) / 20)
    assert padding_fraction([5, 5], 1) == 0.0
    assert padding_fraction([], 4) == 0.0
    with pytest.raises(ValueError):
        padding_fraction([1], 0)


# -- build_samples ----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    dataset = tmp_path / "qa.json"
    dataset.write_text(
        json.dumps(
            [
                {"instruction": "hi", "input": "", "output": "yo"},
                {"instruction": "add", "input": "1 2", "output": "3"},
            ]
        ),
        encoding="utf-8",
    )
    return tmp_path, dataset, SHIPPED_DIR / "alpaca-chatbot-format.json"


def test_build_samples_from_a_dataset(files) -> None:
    _, dataset, fmt = files
    samples = build_samples(
        tokenizer=char_tokenizer(),
        cutoff_len=64,
        dataset_path=dataset,
        format_path=fmt,
        add_eos_token=True,
        train_only_after="Assistant:",
    )
    assert samples == [
        {
            "text": "User: hi\nAssistant: yo",
            "input_ids": [1, *ids_of("User: hi\nAssistant: yo"), 2],
            "labels": [M] * 20 + ids_of(" yo") + [2],
        },
        {
            "text": "User: add: 1 2\nAssistant: 3",
            "input_ids": [1, *ids_of("User: add: 1 2\nAssistant: 3"), 2],
            "labels": [M] * 26 + ids_of(" 3") + [2],
        },
    ]


def test_build_samples_from_a_raw_text_folder(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("ghij", encoding="utf-8")
    (tmp_path / "a.txt").write_text("abc\r\ndef", encoding="utf-8")
    samples = build_samples(
        tokenizer=char_tokenizer(),
        cutoff_len=7,
        raw_text_path=tmp_path,
        raw_text_options=RawTextOptions(overlap_len=2, newline_favor_len=0),
    )
    # Files are joined with the hard cut, so "abc\ndef" and "ghij" are separate parts.
    # Part 1 is [BOS a b c \n d e f]: pieces of 5 ids, the second prefixed with "c\n".
    assert [s["text"] for s in samples] == ["<s>abc\n", "c\ndef", "<s>ghij"]
    assert samples[1]["input_ids"] == [1, *ids_of("c\ndef")]
    assert samples[1]["labels"] == samples[1]["input_ids"]


def test_build_samples_unescapes_the_typed_hard_cut(tmp_path) -> None:
    raw = tmp_path / "t.txt"
    raw.write_text("ab\n\ncd||ef", encoding="utf-8")
    common = {
        "tokenizer": char_tokenizer(),
        "cutoff_len": 32,
        "raw_text_path": raw,
    }

    def cut_at(typed: str) -> RawTextOptions:
        return RawTextOptions(overlap_len=0, newline_favor_len=0, hard_cut_string=typed)

    assert [s["text"] for s in build_samples(**common, raw_text_options=cut_at("\\n\\n"))] == [
        "<s>ab",
        "<s>cd||ef",
    ]
    assert [s["text"] for s in build_samples(**common, raw_text_options=cut_at("||"))] == [
        "<s>ab\n\ncd",
        "<s>ef",
    ]


def test_build_samples_errors(files, tmp_path) -> None:
    _, dataset, fmt = files
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="format_path is missing"):
        build_samples(tokenizer=tok, cutoff_len=8, dataset_path=dataset)
    with pytest.raises(ValueError, match="dataset_path"):
        build_samples(tokenizer=tok, cutoff_len=8)
    with pytest.raises(ValueError, match="cutoff_len"):
        build_samples(tokenizer=tok, cutoff_len=0, dataset_path=dataset, format_path=fmt)
    other = tmp_path / "other.json"
    other.write_text('[{"question": "q", "answer": "a"}]', encoding="utf-8")
    with pytest.raises(NoMatchingTemplateError) as caught:
        build_samples(tokenizer=tok, cutoff_len=8, dataset_path=other, format_path=fmt)
    assert str(caught.value).startswith(f"{other} row 1: keys {{answer, question}} match no")
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(FormatError, match="no rows"):
        build_samples(tokenizer=tok, cutoff_len=8, dataset_path=empty, format_path=fmt)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\n\n ", encoding="utf-8")
    with pytest.raises(FormatError, match="no text left"):
        build_samples(tokenizer=tok, cutoff_len=8, raw_text_path=blank,
                      raw_text_options=RawTextOptions(overlap_len=0))
    with pytest.raises(ValueError, match=r"overlap_len \(128\) cannot be greater"):
        build_samples(tokenizer=tok, cutoff_len=8, raw_text_path=blank)


# -- preview ----------------------------------------------------------------------------------


def test_preview_stats_and_table(files) -> None:
    _, dataset, fmt = files
    result = preview(
        tokenizer=char_tokenizer(),
        cutoff_len=24,
        dataset_path=dataset,
        format_path=fmt,
        add_eos_token=True,
        train_only_after="Assistant:",
    )
    stats = result.stats
    # Sample 0: 1 + 22 chars + EOS = 24 ids, 20 masked. Sample 1: 1 + 27 chars, cut to 24,
    # "Assistant:" ends at id 26, so all 24 are masked.
    assert (stats.samples, stats.tokens, stats.trained_tokens) == (2, 48, 4)
    assert (stats.truncated, stats.untrained, stats.longest) == (1, 1, 24)
    assert [s["truncated"] for s in result.samples] == [False, True]
    assert format_table(result.samples, text_width=12) == "\n".join(
        [
            "#  tokens  trained  cut  text",
            "0      24        4       User: hi⏎As…",
            "1      24        0  yes  User: add: …",
        ]
    )
