"""Loading an Alpaca-style dataset file into checked rows.

A dataset is a JSON array of objects, or JSON Lines (one object per line), in UTF-8 with an
optional byte order mark: the same files text-generation-webui reads through ``datasets``'
JSON loader. Rows are numbered from 0 in messages (the index into the array, or the count of
non-blank lines before it in JSON Lines, whose file line is named as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from formats.errors import FormatError
from formats.jsontext import parse_json_or_lines, read_text
from formats.templates import Format, render_row, row_texts


@dataclass(frozen=True)
class Row:
    """One checked dataset row: its values as text, and where it came from for messages."""

    index: int
    """0-based position of the row in the dataset."""
    texts: dict[str, str]
    """Key -> text (numbers written out, ``null`` as ``""``)."""
    line: int | None = None
    """1-based file line for JSON Lines datasets, ``None`` for a JSON array."""


def load_rows(path: str | Path) -> list[Row]:
    """Read and check a dataset file; see :func:`parse_rows`."""
    return parse_rows(read_text(path), source=str(path))


def parse_rows(text: str, source: str = "<dataset>") -> list[Row]:
    """Parse dataset text (JSON array or JSON Lines) and check every row.

    A single top-level object is taken as a one-row dataset, which is what a one-line JSON
    Lines file is anyway. Anything else at the top level (a number, a string) is an error.
    """
    value, line_numbers = parse_json_or_lines(text, source)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FormatError("a dataset must be a JSON array of objects or JSON Lines", source=source)
    rows = []
    for index, item in enumerate(value):
        line = line_numbers[index] if line_numbers is not None else None
        texts = row_texts(item, source=source, row_index=index, line=line)
        rows.append(Row(index=index, texts=texts, line=line))
    return rows


def render_rows(fmt: Format, rows: list[Row], source: str | None = None) -> list[str]:
    """Render every row with ``fmt``; the first row that matches no entry stops with an error."""
    return [
        render_row(fmt, row.texts, row_index=row.index, source=source, line=row.line)
        for row in rows
    ]
