"""Pure data code for LoRA training: format files, raw-text chunking, labels, batching.

Nothing here touches a GPU, Redis or the network, and nothing reads a file other than the one
it is given, so every function can be tested exactly. The trainer needs two names:
:func:`build_samples` (job settings -> tokenized samples) and :func:`pad_batch` (samples ->
one padded batch). The shipped format files are in ``formats/shipped/`` (:data:`SHIPPED_DIR`).
"""

from __future__ import annotations

from pathlib import Path

from formats.build import build_samples
from formats.collate import pad_batch, padding_fraction
from formats.datasets import Row, load_rows, parse_rows
from formats.errors import FormatError, InvalidJSONError, NoMatchingTemplateError, ValueTypeError
from formats.jsontext import not_utf8
from formats.preview import Preview, PreviewStats, format_table, preview
from formats.rawtext import (
    RawTextOptions,
    chunk_tokens,
    cut_for_newline,
    raw_text_chunks,
    raw_text_samples,
    read_raw_text,
    split_parts,
    unescape_cut_string,
)
from formats.templates import Format, load_format, parse_format, render_row
from formats.tokenize import IGNORE_INDEX, tokenize_sample

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
"""The format files that come with lorafleet (``alpaca-format.json`` and friends)."""


def shipped_formats() -> dict[str, Path]:
    """Name (file name without ``.json``) -> path of every shipped format file."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.json"))}


__all__ = [
    "IGNORE_INDEX",
    "SHIPPED_DIR",
    "Format",
    "FormatError",
    "InvalidJSONError",
    "NoMatchingTemplateError",
    "Preview",
    "PreviewStats",
    "RawTextOptions",
    "Row",
    "ValueTypeError",
    "build_samples",
    "chunk_tokens",
    "cut_for_newline",
    "format_table",
    "load_format",
    "load_rows",
    "not_utf8",
    "pad_batch",
    "padding_fraction",
    "parse_format",
    "parse_rows",
    "preview",
    "raw_text_chunks",
    "raw_text_samples",
    "read_raw_text",
    "render_row",
    "shipped_formats",
    "split_parts",
    "tokenize_sample",
    "unescape_cut_string",
]
