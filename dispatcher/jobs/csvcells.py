"""CSV cells a spreadsheet will not run: every CSV lorafleet writes goes through `cell`.

Text that starts like a formula (=, +, -, @, tab, CR) gets one leading apostrophe, so
`=HYPERLINK(...)` opens as plain text. Numbers stay numbers (a negative number is not a
formula). `restore` undoes exactly what `cell` added, so a file that is read back and written
again (evaluations.csv, at each comment edit) never piles up apostrophes.
"""

from __future__ import annotations

from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _needs_guard(text: str) -> bool:
    # Leading apostrophes are looked through, so that a text that itself starts with an
    # apostrophe before a formula also gets one more: `restore` can then always strip one.
    bare = text.lstrip("'")
    return bare[:1] in FORMULA_START and not _is_number(bare)


def cell(value: Any) -> str:
    """A CSV cell for `value`: "" for None, numbers as they are, lists joined by spaces, text
    guarded against formulas."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = " ".join(str(x) for x in value) if isinstance(value, list) else str(value)
    return "'" + text if _needs_guard(text) else text


def restore(text: str) -> str:
    """The text `cell` was given, from the cell it wrote."""
    if text.startswith("'") and _needs_guard(text[1:]):
        return text[1:]
    return text
