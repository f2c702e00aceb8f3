"""Raw text: reading, hard cuts, token chunks with overlap, newline favouring; exact outputs and
properties that must hold for any text and any settings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (
    FormatError,
    RawTextOptions,
    chunk_tokens,
    cut_for_newline,
    raw_text_chunks,
    read_raw_text,
    split_parts,
    unescape_cut_string,
)
from formats.rawtext import iter_token_chunks, raw_text_samples, tokenize_part
from tests.unit.test_formats_tokenizers import bpe_tokenizer, char_tokenizer


def ids_of(text: str) -> list[int]:
    return char_tokenizer().encode(text, add_special_tokens=False)


def opts(overlap: int = 128, favor: int = 128, cut: str = "\n\n\n", min_chars: int = 0
         ) -> RawTextOptions:
    """The options with the real hard-cut string `cut`, typed as a form would (newline as
    backslash-n)."""
    return RawTextOptions(overlap, favor, cut.replace("\n", "\\n"), min_chars)


def test_options_come_from_a_spec_or_a_dict() -> None:
    assert RawTextOptions.of({"overlap_len": 4, "hard_cut_string": "\\n", "lora_rank": 8}) == \
        RawTextOptions(overlap_len=4, hard_cut_string="\\n")
    assert opts(cut="a\n|").hard_cut == "a\n|"


# -- reading and cutting ----------------------------------------------------------------------


def test_unescape_turns_backslash_n_into_newline_only() -> None:
    assert unescape_cut_string("\\n\\n\\n") == "\n\n\n"
    assert unescape_cut_string("END\\nx\\t\\\\") == "END\nx\\t\\\\"
    assert unescape_cut_string("") == ""


def test_read_single_file_removes_carriage_returns_and_bom(tmp_path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_raw_text(path) == "one\ntwothree\n"


def test_read_folder_in_natural_order_joined_by_separator(tmp_path) -> None:
    (tmp_path / "part10.txt").write_text("ten", encoding="utf-8")
    (tmp_path / "part2.txt").write_text("two\r\n", encoding="utf-8")
    (tmp_path / "Part1.txt").write_text("one", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text", encoding="utf-8")
    (tmp_path / "sub.txt").mkdir()
    assert read_raw_text(tmp_path, separator="|") == "one|two\n|ten"


def test_read_errors(tmp_path) -> None:
    with pytest.raises(FormatError, match="no .txt file"):
        read_raw_text(tmp_path)
    with pytest.raises(FormatError, match="no such file"):
        read_raw_text(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(FormatError) as caught:
        read_raw_text(bad)
    assert str(caught.value).startswith(f"{bad}: not UTF-8 text (byte 3")


def test_split_parts_drops_blank_and_short_parts() -> None:
    text = "ab\n\n\n abc \n\n\nabcd\n\n\n   \n\n\n"
    assert split_parts(text, "\n\n\n") == ["ab", " abc ", "abcd"]
    # Exactly min_chars after trimming is kept ("shorter than" drops).
    assert split_parts(text, "\n\n\n", min_chars=3) == [" abc ", "abcd"]
    assert split_parts(text, "\n\n\n", min_chars=4) == ["abcd"]


def test_split_parts_leftmost_cuts_and_empty_cut_string() -> None:
    assert split_parts("a\n\n\n\nb", "\n\n\n") == ["a", "\nb"]
    assert split_parts("a\n\n\nb", "") == ["a\n\n\nb"]


# -- token chunks -----------------------------------------------------------------------------


def test_chunk_tokens_exact() -> None:
    ids = list(range(10))
    assert chunk_tokens(ids, cutoff_len=6, overlap_len=2) == [
        [0, 1, 2, 3],
        [2, 3, 4, 5, 6, 7],
        [6, 7, 8, 9],
    ]
    assert chunk_tokens(ids, cutoff_len=4, overlap_len=0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # overlap larger than the step: the prefix reaches back into earlier chunks' prefixes.
    assert chunk_tokens(ids, cutoff_len=5, overlap_len=3) == [
        [0, 1],
        [0, 1, 2, 3],
        [1, 2, 3, 4, 5],
        [3, 4, 5, 6, 7],
        [5, 6, 7, 8, 9],
    ]
    assert chunk_tokens([], cutoff_len=5, overlap_len=3) == []


@pytest.mark.parametrize(("cutoff", "overlap"), [(4, 4), (4, 5), (0, 0), (4, -1)])
def test_impossible_lengths_are_refused(cutoff, overlap) -> None:
    with pytest.raises(ValueError):
        chunk_tokens([1, 2, 3], cutoff, overlap)


def test_overlap_error_message() -> None:
    with pytest.raises(ValueError) as caught:
        raw_text_chunks("abc", char_tokenizer(), cutoff_len=128, options=opts(overlap=128))
    assert str(caught.value) == (
        "overlap_len (128) cannot be greater than or equal to cutoff_len (128)"
    )


# -- newline favouring ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "favor", "expected"),
    [
        ("ab\ncdefgh\nij", 3, "cdefgh\nij"),  # last newline 3 from the end: not < 3
        ("ab\ncdefgh\nij", 4, "cdefgh"),
        ("abc\nxyz", 3, "abc\nxyz"),  # first newline at index 3: not < 3
        ("abc\nxyz", 4, "xyz"),
        ("abc\n", 2, "abc"),
        ("\n", 1, ""),
        ("no newline", 50, "no newline"),
        ("ab\ncd", 0, "ab\ncd"),
    ],
)
def test_cut_for_newline(chunk, favor, expected) -> None:
    assert cut_for_newline(chunk, favor) == expected


# -- whole raw-text pipeline, exact -----------------------------------------------------------


def test_raw_text_chunks_without_newline_favor() -> None:
    tok = char_tokenizer()
    chunks = raw_text_chunks("abcdefghij", tok, cutoff_len=6, options=opts(2, 0))
    assert chunks == ["<s>abc", "bcdefg", "fghij"]


def test_raw_text_samples_keep_the_webui_bos_quirk() -> None:
    tok = char_tokenizer()
    pairs = raw_text_samples(
        "abcdefghij", tok, cutoff_len=6, options=opts(2, 0), add_eos_token=True
    )
    assert [text for text, _ in pairs] == ["<s>abc", "bcdefg", "fghij</s>"]
    # A chunk that began with BOS keeps one BOS; the others gain one, and full ones lose
    # their last id to the cut (here the EOS of the last chunk), exactly as in the webui.
    assert [sample.input_ids for _, sample in pairs] == [
        [1, *ids_of("abc")],
        [1, *ids_of("bcdef")],
        [1, *ids_of("fghij")],
    ]
    assert [sample.truncated for _, sample in pairs] == [False, True, True]


def test_raw_text_chunks_with_newline_favor() -> None:
    tok = char_tokenizer()
    chunks = raw_text_chunks("ab\ncd\nefgh", tok, cutoff_len=6, options=opts(2, 2))
    # Before the newline cut: "<s>ab\n", "b\ncd\ne", "\nefgh".
    assert chunks == ["<s>ab", "cd\ne", "efgh"]


def test_eos_goes_at_each_hard_cut_and_parts_never_share_a_chunk() -> None:
    tok = char_tokenizer()
    chunks = raw_text_chunks(
        "abc\n\n\nde\n\n\n \n\n\nfg",
        tok,
        cutoff_len=8,
        options=opts(2, 0),
        add_eos_token=True,
    )
    assert chunks == ["<s>abc</s>", "<s>de</s>", "<s>fg</s>"]


def test_blank_chunks_after_the_newline_cut_are_dropped() -> None:
    tok = char_tokenizer(add_bos=False)
    chunks = raw_text_chunks("a\nb\n", tok, cutoff_len=2, options=opts(0, 5))
    # Token chunks "a\n" and "b\n" both become "" after the cut.
    assert chunks == []


def test_train_only_after_applies_to_chunks() -> None:
    tok = char_tokenizer()
    pairs = raw_text_samples(
        "Q: x\nA: y",
        tok,
        cutoff_len=64,
        options=opts(0, 0),
        train_only_after="A:",
    )
    ((text, sample),) = pairs
    assert text == "<s>Q: x\nA: y"
    assert sample.labels == [-100] * 8 + ids_of(" y")


# -- properties -------------------------------------------------------------------------------

lengths = st.integers(min_value=1, max_value=24).flatmap(
    lambda cutoff: st.tuples(st.just(cutoff), st.integers(min_value=0, max_value=cutoff - 1))
)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 50), max_size=120), sizes=lengths)
def test_chunk_tokens_properties(ids, sizes) -> None:
    cutoff, overlap = sizes
    step = cutoff - overlap
    chunks = chunk_tokens(ids, cutoff, overlap)
    assert len(chunks) == -(-len(ids) // step)
    rebuilt = []
    for i, chunk in enumerate(chunks):
        assert 0 < len(chunk) <= cutoff
        assert chunk == ids[max(0, i * step - overlap) : (i + 1) * step]
        prefix = 0
        if i > 0 and overlap > 0:
            prefix = min(overlap, len(chunks[i - 1]))
            assert chunk[:prefix] == chunks[i - 1][-overlap:]
        rebuilt.extend(chunk[prefix:])
    # Every id appears, in order, once the overlaps are taken away.
    assert rebuilt == ids


texts = st.text(alphabet="ab \n|", max_size=120)
cuts = st.sampled_from(["\n\n\n", "||", "|", "\n\n", "a|b"])


@settings(max_examples=80, deadline=None)
@given(
    text=texts,
    cut=cuts,
    sizes=lengths,
    favor=st.integers(0, 12),
    min_chars=st.integers(0, 4),
    eos=st.booleans(),
)
def test_raw_text_properties(text, cut, sizes, favor, min_chars, eos) -> None:
    tok = bpe_tokenizer()
    cutoff, overlap = sizes
    pairs = raw_text_samples(
        text,
        tok,
        cutoff_len=cutoff,
        options=opts(overlap, favor, cut, min_chars),
        add_eos_token=eos,
    )
    for chunk, sample in pairs:
        assert cut not in chunk
        assert chunk.strip()
        assert 0 < len(sample.input_ids) <= cutoff
        assert sample.input_ids[:2] != [1, 1]


@settings(max_examples=80, deadline=None)
@given(text=texts, cut=cuts, sizes=lengths, min_chars=st.integers(0, 4), eos=st.booleans())
def test_without_newline_favor_every_token_of_every_kept_part_is_covered(
    text, cut, sizes, min_chars, eos
) -> None:
    tok = bpe_tokenizer()
    cutoff, overlap = sizes
    parts = split_parts(text, cut, min_chars)
    for part in parts:
        assert cut not in part and len(part.strip()) >= max(min_chars, 1)
    chunks = list(
        iter_token_chunks(
            text,
            tok,
            cutoff_len=cutoff,
            options=opts(overlap, cut=cut, min_chars=min_chars),
            add_eos_token=eos,
        )
    )
    # Walk the chunks part by part: removing the overlap prefixes gives back each part's ids.
    position = 0
    for part in parts:
        part_ids = tokenize_part(part, tok, eos)
        expected = chunk_tokens(part_ids, cutoff, overlap)
        assert chunks[position : position + len(expected)] == expected
        position += len(expected)
    assert position == len(chunks)
    texts_out = raw_text_chunks(
        text,
        tok,
        cutoff_len=cutoff,
        options=opts(overlap, 0, cut, min_chars),
        add_eos_token=eos,
    )
    assert texts_out == [tok.decode(ids) for ids in chunks if tok.decode(ids).strip()]


# -- the rules, restated ----------------------------------------------------------------


def reference_chunks(text, tok, cutoff, overlap, favor, cut, min_chars, eos) -> list[str]:
    """The raw-text steps as the issue words them, written out plainly and independently of
    formats/rawtext.py (no shared helper), so the two can be compared on any input."""
    text = text.replace("\r", "")
    out = []
    for part in text.split(cut) if cut else [text]:
        if part.strip() == "" or len(part.strip()) < min_chars:
            continue
        ids = tok(part)["input_ids"]
        if eos:
            ids = ids + [tok.eos_token_id]
        step = cutoff - overlap
        previous: list[int] = []
        for start in range(0, len(ids), step):
            piece = ids[start:start + step]
            chunk = (previous[max(0, len(previous) - overlap):] if overlap else []) + piece
            previous = chunk
            chunk_text = tok.decode(chunk)
            if favor > 0 and "\n" in chunk_text:
                first = chunk_text.find("\n")
                if first < favor:
                    chunk_text = chunk_text[first + 1:]
                last = chunk_text.rfind("\n")
                if last != -1 and len(chunk_text) - last < favor:
                    chunk_text = chunk_text[:last]
            if chunk_text.strip():
                out.append(chunk_text)
    return out


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab \n|\r", max_size=160),
    cut=cuts,
    sizes=lengths,
    favor=st.integers(0, 12),
    min_chars=st.integers(0, 4),
    eos=st.booleans(),
)
def test_chunks_equal_the_restated_rules(text, cut, sizes, favor, min_chars, eos) -> None:
    tok = bpe_tokenizer()
    cutoff, overlap = sizes
    ours = raw_text_chunks(text.replace("\r", ""), tok, cutoff_len=cutoff,
                           options=opts(overlap, favor, cut, min_chars), add_eos_token=eos)
    assert ours == reference_chunks(text, tok, cutoff, overlap, favor, cut, min_chars, eos)
