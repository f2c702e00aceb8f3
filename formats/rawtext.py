"""Raw text training: one long text -> overlapping chunks of at most ``cutoff_len`` tokens.

The steps, with text-generation-webui's semantics (the raw-text branch of its ``do_train``):

1. :func:`read_raw_text` reads a ``.txt`` file, or every ``.txt`` file of a folder in natural
   name order, and removes carriage returns.
2. :func:`split_parts` splits the text at the hard-cut string (by default three newlines; in a
   form it is typed with backslash-n, see :func:`unescape_cut_string`) and drops parts that are
   blank or shorter than ``min_chars`` after trimming. Parts are never joined again, so no chunk
   contains the hard-cut string (unless the hard-cut string is part of the BOS/EOS text, such
   as ``s>``, which step 5 puts into chunk texts).
3. :func:`tokenize_part`: each part is tokenized with the tokenizer's special tokens (so a part
   starts with BOS when the tokenizer adds one, as in the webui), and EOS is appended to the
   part when ``add_eos_token`` is set: the EOS marks the hard cut, not every chunk.
4. :func:`chunk_tokens` cuts the part's ids into consecutive pieces of ``cutoff_len -
   overlap_len`` ids and prefixes every piece after the first with the last ``overlap_len`` ids
   of the chunk before it, so every chunk has at most ``cutoff_len`` ids.
5. Each chunk is decoded with the tokenizer's default ``decode`` (special tokens stay as text,
   e.g. ``<s>``, as in the webui), then :func:`cut_for_newline` moves its edges to newlines
   when ``newline_favor_len > 0``.
6. Each chunk text becomes a sample through :func:`formats.tokenize.tokenize_text`, with
   ``train_only_after`` applied but *without* appending EOS again (the webui does the same:
   EOS was added to the part in step 3; adding it to every chunk would teach the model to stop
   in the middle of a text). A chunk that starts with the BOS text gets a single BOS.

Where the issue and the webui differ, the issue was followed:

* ``min_chars``: the webui drops parts whose trimmed length is ``<= min_chars``; the issue says
  parts *shorter than* ``min_chars`` are dropped, so a part of exactly ``min_chars`` is kept.
* Chunking: the issue's rule (pieces of ``cutoff_len - overlap_len`` ids, each prefixed with the
  previous chunk's tail) is the webui's original ``split_chunks``. Later webui versions take
  windows of ``cutoff_len`` ids every ``cutoff_len - overlap_len`` ids instead (the first chunk
  is a full ``cutoff_len`` and the last windows may lie inside the one before); this module
  does not do that.
* ``overlap_len = 0`` gives chunks with no overlap. The webui's original ``split_chunks``
  prefixes with ``previous[-0:]``, which in Python is the *whole* previous chunk, so its
  chunks grow past ``cutoff_len``; the issue's rule (the last 0 ids) is followed.
* Carriage returns are all removed, as the issue says. The webui means to do the same but
  reads in Python's universal-newline mode first, which turns a lone CR (old Mac line ends)
  into a newline; here a lone CR is dropped. CR LF line ends give the same text in both.

Where the issue is silent, this module chose what a user would expect:

* Folders: the webui joins the files with nothing between them, so the last line of one file
  and the first of the next can become one line of one chunk. Here files are joined with the
  hard-cut string (a newline when the hard-cut string is empty), so each file starts a part of
  its own; for a single file nothing changes. Files are taken in natural name order
  (``part2.txt`` before ``part10.txt``), as in the webui.
* An empty hard-cut string means "do not cut" (the webui fails on it).
* A chunk whose text is blank after the newline cut is dropped: it would be a sample holding
  only BOS, which trains nothing (the webui keeps it).
* A byte order mark at the start of a file is removed (the webui would train on it).

Known webui behaviour that is kept, because the issue asks for the same chunks and tokenizes
each chunk text like any sample: a chunk other than the first of its part has no BOS in its
ids, so its re-tokenized text gains one, and when that chunk had exactly ``cutoff_len`` ids its
last id falls to the cut. Inside a part that id is still trained at the start of the next
chunk (when ``overlap_len > 0``); at the end of a part it is lost, and with ``add_eos_token``
that id is the EOS. :func:`formats.preview.preview` counts such samples as truncated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from formats.errors import FormatError
from formats.jsontext import not_utf8, strip_bom
from formats.paths import inside
from formats.tokenize import TokenizedSample, encode, tokenize_text

DEFAULT_HARD_CUT = "\\n\\n\\n"
"""The hard-cut string as typed in the form: backslash-n three times (three newlines)."""


@dataclass(frozen=True)
class RawTextOptions:
    """How a raw text is cut into chunks, with text-generation-webui's names: one value passed
    from the spec to the chunker instead of four loose keyword arguments. `hard_cut_string` is as
    typed (a backslash-n means a newline); :attr:`hard_cut` is the real string."""

    overlap_len: int = 128
    newline_favor_len: int = 128
    hard_cut_string: str = DEFAULT_HARD_CUT
    min_chars: int = 0

    @classmethod
    def of(cls, source: Any) -> RawTextOptions:
        """The options of anything that has them as attributes (a training spec) or keys."""
        if isinstance(source, dict):
            return cls(**{f.name: source[f.name] for f in fields(cls) if f.name in source})
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})

    @property
    def hard_cut(self) -> str:
        """The real hard-cut string (each typed backslash-n a newline)."""
        return unescape_cut_string(self.hard_cut_string)


DEFAULT_OPTIONS = RawTextOptions()
"""The job spec's defaults (and text-generation-webui's)."""


def unescape_cut_string(typed: str) -> str:
    """The hard-cut string a user typed, with each two-character ``\\n`` turned into a newline.

    Only ``\\n`` is special, as in the webui; every other character, backslashes included, is
    taken literally.
    """
    return typed.replace("\\n", "\n")


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``part2.txt`` before ``part10.txt`` (digit runs compare as numbers)."""
    return [int(piece) if piece.isdigit() else piece.lower() for piece in re.split(r"(\d+)", name)]


def raw_text_files(path: str | Path) -> list[Path]:
    """The ``.txt`` files that make up a raw-text dataset: the file itself, or a folder's
    ``*.txt`` files (not its subfolders) in natural name order."""
    path = Path(path)
    if path.is_dir():
        # A link that leads out of the folder is not part of the text (it is not the user's).
        files = sorted(
            (child for child in path.glob("*.txt") if child.is_file() and inside(child, path)),
            key=lambda child: natural_key(child.name),
        )
        if not files:
            raise FormatError("the folder holds no .txt file", source=str(path))
        return files
    if not path.is_file():
        raise FormatError("no such file or folder", source=str(path))
    return [path]


def read_raw_text(path: str | Path, separator: str = "\n\n\n") -> str:
    """The text of a raw-text dataset (file or folder), carriage returns removed.

    Files of a folder are joined with ``separator``; :func:`formats.build_samples` passes the
    hard-cut string, so each file starts a part of its own. A byte order mark at the start of a
    file is dropped.
    """
    texts = []
    for file in raw_text_files(path):
        try:
            # newline="" so that Python does not turn a lone CR into a newline first.
            with open(file, encoding="utf-8", newline="") as handle:
                texts.append(strip_bom(handle.read()).replace("\r", ""))
        except UnicodeDecodeError as err:
            raise FormatError(not_utf8(err), source=str(file)) from None
    return separator.join(texts)


def split_parts(text: str, hard_cut: str, min_chars: int = 0) -> list[str]:
    """The parts of ``text`` between hard cuts that are worth training on.

    ``hard_cut`` is the real string (already unescaped). Parts are returned untrimmed; a part
    is dropped when it is blank or shorter than ``min_chars`` after trimming.
    """
    pieces = text.split(hard_cut) if hard_cut else [text]
    kept = []
    for piece in pieces:
        trimmed = piece.strip()
        if trimmed and len(trimmed) >= min_chars:
            kept.append(piece)
    return kept


def tokenize_part(part: str, tokenizer: Any, add_eos_token: bool = False) -> list[int]:
    """The ids of one part: with the tokenizer's special tokens, plus EOS when asked."""
    ids = encode(tokenizer, part, special_tokens=True)
    if add_eos_token and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def check_lengths(cutoff_len: int, overlap_len: int) -> None:
    """Refuse lengths that cannot make chunks, with the message the form shows."""
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
    if overlap_len < 0:
        raise ValueError(f"overlap_len cannot be negative, got {overlap_len}")
    if overlap_len >= cutoff_len:
        raise ValueError(
            f"overlap_len ({overlap_len}) cannot be greater than or equal to "
            f"cutoff_len ({cutoff_len})"
        )


def chunk_tokens(ids: list[int], cutoff_len: int, overlap_len: int) -> list[list[int]]:
    """Cut one part's ids into chunks of at most ``cutoff_len`` ids that overlap.

    Pieces of ``step = cutoff_len - overlap_len`` ids are taken in order; every piece after the
    first is prefixed with the last ``overlap_len`` ids of the chunk before it (that chunk
    including its own prefix). So chunk ``i`` is ``ids[max(0, i*step - overlap_len):(i+1)*step]``.
    """
    check_lengths(cutoff_len, overlap_len)
    step = cutoff_len - overlap_len
    chunks: list[list[int]] = []
    for start in range(0, len(ids), step):
        piece = ids[start : start + step]
        if chunks and overlap_len > 0:
            piece = chunks[-1][-overlap_len:] + piece
        chunks.append(piece)
    return chunks


def cut_for_newline(chunk: str, newline_favor_len: int) -> str:
    """Move a chunk's edges to newlines when one is near, so chunks start and end on lines.

    If the first newline is at an index below ``newline_favor_len`` (fewer characters than
    that before it), everything up to and including it is dropped. Then, if the last newline is
    at a distance below ``newline_favor_len`` from the end (``len(chunk) - index``, counting
    the newline itself), everything from it on is dropped. ``newline_favor_len <= 0`` changes
    nothing. The distance "from its end" in the issue is read this way because it is the
    webui's ``cut_chunk_for_newline``, whose chunks the issue asks to reproduce.
    """
    if newline_favor_len <= 0 or "\n" not in chunk:
        return chunk
    first = chunk.index("\n")
    if first < newline_favor_len:
        chunk = chunk[first + 1 :]
    if "\n" not in chunk:
        return chunk
    last = chunk.rindex("\n")
    if len(chunk) - last < newline_favor_len:
        chunk = chunk[:last]
    return chunk


def iter_token_chunks(
    text: str,
    tokenizer: Any,
    *,
    cutoff_len: int,
    options: RawTextOptions = DEFAULT_OPTIONS,
    add_eos_token: bool = False,
) -> Iterator[list[int]]:
    """Steps 2-4 of the module docstring: the token chunks of every kept part, in order."""
    check_lengths(cutoff_len, options.overlap_len)
    for part in split_parts(text, options.hard_cut, options.min_chars):
        yield from chunk_tokens(
            tokenize_part(part, tokenizer, add_eos_token), cutoff_len, options.overlap_len
        )


def raw_text_chunks(
    text: str,
    tokenizer: Any,
    *,
    cutoff_len: int,
    options: RawTextOptions = DEFAULT_OPTIONS,
    add_eos_token: bool = False,
) -> list[str]:
    """Steps 2-5: the chunk texts of ``text``."""
    chunks = []
    for ids in iter_token_chunks(
        text, tokenizer, cutoff_len=cutoff_len, options=options, add_eos_token=add_eos_token
    ):
        chunk = cut_for_newline(tokenizer.decode(ids), options.newline_favor_len)
        if chunk.strip():
            chunks.append(chunk)
    return chunks


def raw_text_samples(
    text: str,
    tokenizer: Any,
    *,
    cutoff_len: int,
    options: RawTextOptions = DEFAULT_OPTIONS,
    add_eos_token: bool = False,
    train_only_after: str = "",
) -> list[tuple[str, TokenizedSample]]:
    """All six steps: ``(chunk text, tokenized sample)`` pairs for ``text``."""
    chunks = raw_text_chunks(
        text, tokenizer, cutoff_len=cutoff_len, options=options, add_eos_token=add_eos_token
    )
    return [
        (chunk, tokenize_text(chunk, tokenizer, cutoff_len, False, train_only_after))
        for chunk in chunks
    ]
