"""Reading JSON and JSON Lines text the way users write it, with errors that point at the spot.

Users edit datasets and format files by hand or export them from other tools, so a UTF-8 byte
order mark (Windows editors) and JSON Lines instead of one array (export tools) are accepted,
and a syntax error is reported with the line and column of the file, never a bare traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formats.errors import FormatError, InvalidJSONError

BOM = "\ufeff"


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file, dropping a leading byte order mark.

    Why not ``encoding="utf-8-sig"`` alone: the same helper is used for text that arrives
    already decoded (an upload), so the BOM is stripped from the string in :func:`strip_bom`.
    A file that is not UTF-8 (a Latin-1 export, a binary copied by mistake) is a
    :class:`FormatError` naming the file and the first bad byte, like any other bad data file.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return strip_bom(handle.read())
    except UnicodeDecodeError as err:
        raise FormatError(not_utf8(err), source=str(path)) from None


def not_utf8(err: UnicodeDecodeError) -> str:
    """The message for text that does not decode: where the first bad byte is, and why."""
    return f"not UTF-8 text (byte {err.start}: {err.reason})"


def strip_bom(text: str) -> str:
    """``text`` without a leading U+FEFF byte order mark."""
    return text[1:] if text.startswith(BOM) else text


def loads(text: str, source: str) -> Any:
    """``json.loads``, with what the parser cannot take but a syntax error (nesting deeper than
    Python's recursion limit, an integer of more than 4300 digits) raised as an
    :class:`InvalidJSONError`; a syntax error stays a ``json.JSONDecodeError`` (its line and
    column are the callers' to word)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InvalidJSONError("invalid JSON: nested too deeply", source=source) from None
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string ..."
        raise InvalidJSONError(f"invalid JSON: {err}", source=source) from None


def parse_json(text: str, source: str) -> Any:
    """Parse one JSON document; a syntax error becomes an :class:`InvalidJSONError`.

    The message names ``source`` and the 1-based line and column that ``json`` reports.
    """
    try:
        return loads(strip_bom(text), source)
    except json.JSONDecodeError as err:
        raise InvalidJSONError(
            f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}", source=source
        ) from None


def parse_json_or_lines(text: str, source: str) -> tuple[Any, list[int] | None]:
    """Parse a whole-file JSON document, or else JSON Lines (one JSON value per line).

    Returns ``(value, line_numbers)``: for a JSON document ``line_numbers`` is ``None``; for JSON
    Lines ``value`` is the list of parsed lines and ``line_numbers[i]`` the 1-based file line of
    item ``i`` (blank lines are skipped), so later row errors can name the line too.

    A file whose first non-blank character is ``[`` is always one JSON document, so a broken
    array is reported where it breaks rather than as "line 1 is not JSON Lines".
    """
    text = strip_bom(text)
    try:
        return loads(text, source), None
    except json.JSONDecodeError as whole_error:
        if text.lstrip().startswith("["):
            raise InvalidJSONError(
                f"invalid JSON at line {whole_error.lineno}, column {whole_error.colno}: "
                f"{whole_error.msg}",
                source=source,
            ) from None
    values: list[Any] = []
    line_numbers: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            values.append(loads(line, f"{source} line {number}"))
        except json.JSONDecodeError as err:
            raise InvalidJSONError(
                f"invalid JSON Lines at line {number}, column {err.colno}: {err.msg}",
                source=source,
            ) from None
        line_numbers.append(number)
    return values, line_numbers
