"""The one exception family of the ``formats`` package.

Every problem with a user's files (a dataset, a format file, a raw text file) is raised as a
:class:`FormatError`, a ``ValueError``, so the trainer, the dashboard and the CLI can catch one
type and show its message as it is: the message always starts with the file's name and, where
there is one, the row index and the key, because that is what a user needs to fix the file.
"""

from __future__ import annotations


class FormatError(ValueError):
    """A user's data file cannot be used; the message says which file, row and key, and why.

    ``source`` is the file name as the user knows it, ``row`` the 0-based index of the row in the
    dataset (``None`` when the problem is not about one row; the message counts rows from 1,
    as it counts JSON Lines lines), ``key`` the dataset key or format
    entry concerned (``None`` when not about one key) and ``line`` the 1-based file line of the
    row when the dataset is JSON Lines. They are kept as attributes so a caller can highlight
    the place without parsing the message.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.key = key
        self.line = line
        self.reason = message
        super().__init__(_place(source, row, line) + message)


class InvalidJSONError(FormatError):
    """The file is not valid JSON (or JSON Lines); the message gives the line and column."""


class ValueTypeError(FormatError):
    """A dataset value is not text (a list, an object, a boolean)."""


class NoMatchingTemplateError(FormatError):
    """A row's set of non-empty keys equals none of the format file's key sets."""


def _place(source: str | None, row: int | None, line: int | None) -> str:
    """The "file row N (line L): " prefix of a message (N and L from 1); parts that are unknown
    are left out."""
    parts = []
    if source:
        parts.append(source)
    if row is not None:
        parts.append(f"row {row + 1}")  # counted from 1, like the lines
    if line is not None:
        parts.append(f"(line {line})")
    return (" ".join(parts) + ": ") if parts else ""
