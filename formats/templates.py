"""Format files: how an Alpaca-style dataset row becomes the one text a model is trained on.

A format file is a JSON object whose keys are comma-separated lists of dataset keys and whose
values are templates naming those keys between percent signs::

    {"instruction,output": "User: %instruction%\\nAssistant: %output%",
     "instruction,input,output": "User: %instruction%: %input%\\nAssistant: %output%"}

A row is rendered with the *first* entry, in file order, whose key set equals exactly the set of
the row's keys that have a non-empty value (after trimming whitespace). This is the rule of
text-generation-webui's "Train LoRA" tab, kept so its format files work here unchanged; it lets
one file cover rows with and without an optional ``input``.

Value types (the issue left the choice to us):

* a string is used as it is (not trimmed: only the emptiness test trims);
* an integer or a float is accepted and written with Python's ``str()`` (``3`` -> ``"3"``,
  ``2.5`` -> ``"2.5"``), because exported spreadsheets often hold numeric answers;
* ``null`` is treated as an empty value: the key is not part of the row's key set and a
  ``%key%`` naming it becomes the empty string;
* booleans, lists and objects are errors naming the row and the key: there is no single
  obvious text for them, and guessing would silently train on something like ``"['a', 'b']"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import FormatError, NoMatchingTemplateError, ValueTypeError
from formats.jsontext import parse_json, read_text


@dataclass(frozen=True)
class FormatEntry:
    """One entry of a format file: the exact key set it applies to and its template."""

    keys: frozenset[str]
    """The dataset keys that must be non-empty (and the only ones that are) for this entry."""
    spec: str
    """The key list exactly as written in the file, for messages."""
    template: str
    """The text with ``%key%`` placeholders."""


@dataclass(frozen=True)
class Format:
    """A parsed format file: its entries in file order (first match wins)."""

    source: str
    """The file name used in error messages."""
    entries: tuple[FormatEntry, ...]

    def key_sets(self) -> str:
        """The entries' key sets as a user reads them, in file order: ``{a, b}; {a, b, c}``."""
        return "; ".join(_show_keys(entry.keys) for entry in self.entries)

    def templates(self) -> dict[str, str]:
        """``{"template_0": ..., "template_1": ...}`` as text-generation-webui stores the prompt
        in ``training_prompt.json`` (next to ``"template_type": "dataset"``)."""
        return {f"template_{i}": entry.template for i, entry in enumerate(self.entries)}


def load_format(path: str | Path) -> Format:
    """Read and check a format file (UTF-8, a byte order mark is tolerated)."""
    return parse_format(read_text(path), source=str(path))


def parse_format(data: str | Mapping[str, Any], source: str = "<format>") -> Format:
    """Check a format given as JSON text or as an already parsed mapping.

    Key names are trimmed (``"instruction, output"`` means ``{instruction, output}``), which the
    webui does not do; a file written for the webui never has spaces there, so nothing changes
    for it. Two entries with the same key set are allowed (the first wins, as in the webui).
    """
    raw = parse_json(data, source) if isinstance(data, str) else data
    if not isinstance(raw, Mapping):
        raise FormatError(
            f"a format file must be a JSON object mapping key lists to templates, "
            f"got {_json_type(raw)}",
            source=source,
        )
    if not raw:
        raise FormatError("the format file has no entries", source=source)
    entries = []
    for spec, template in raw.items():
        keys = frozenset(part.strip() for part in str(spec).split(","))
        if "" in keys:
            raise FormatError(
                f"entry {spec!r}: an empty key name (check the commas)", source=source, key=spec
            )
        if not isinstance(template, str):
            raise FormatError(
                f"entry {spec!r}: the template is {_json_type(template)}, expected text",
                source=source,
                key=spec,
            )
        entries.append(FormatEntry(keys=keys, spec=str(spec), template=template))
    return Format(source=source, entries=tuple(entries))


def value_text(value: Any, *, source: str | None, row: int | None, key: str) -> str:
    """The text a dataset value stands for (see the module docstring for the accepted types)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # bool is an int in Python, so it must be refused before the number case.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueTypeError(
            f"key {key!r} is {_json_type(value)}, expected text",
            source=source,
            row=row,
            key=key,
        )
    return str(value)


def row_texts(
    row: Any, *, source: str | None = None, row_index: int | None = None, line: int | None = None
) -> dict[str, str]:
    """Check one dataset row and turn its values into text (``null`` -> ``""``)."""
    if not isinstance(row, Mapping):
        raise FormatError(
            f"is {_json_type(row)}, expected an object of key/text pairs",
            source=source,
            row=row_index,
            line=line,
        )
    texts = {}
    for key, value in row.items():
        try:
            texts[str(key)] = value_text(value, source=source, row=row_index, key=str(key))
        except ValueTypeError as err:
            raise ValueTypeError(
                err.reason, source=source, row=row_index, key=str(key), line=line
            ) from None
    return texts


def filled_keys(texts: Mapping[str, str]) -> frozenset[str]:
    """The keys whose text is not empty after trimming whitespace: what selects the entry."""
    return frozenset(key for key, text in texts.items() if text.strip())


def render_row(
    fmt: Format,
    row: Mapping[str, Any],
    *,
    row_index: int | None = None,
    source: str | None = None,
    line: int | None = None,
) -> str:
    """Render one dataset row with the first format entry whose key set matches exactly.

    Every ``%key%`` naming a key of the row is replaced by that key's text, including keys whose
    text is empty or only whitespace (so an empty ``input`` leaves nothing behind). Placeholders
    naming keys the row does not have are left as written. Replacement is a single pass over
    the template, so a value that itself contains ``%other%`` is inserted literally; the webui
    replaces key after key, which would substitute inside such a value. No real dataset relies
    on that, and the single pass is the behaviour a user expects.

    ``row_index``, ``source`` and ``line`` only go into error messages.
    """
    texts = row_texts(row, source=source, row_index=row_index, line=line)
    keys = filled_keys(texts)
    for entry in fmt.entries:
        if entry.keys == keys:
            return substitute(entry.template, texts)
    raise NoMatchingTemplateError(
        f"keys {_show_keys(keys)} match no entry of format {fmt.source} "
        f"(its key sets: {fmt.key_sets()})",
        source=source,
        row=row_index,
        line=line,
    )


def substitute(template: str, texts: Mapping[str, str]) -> str:
    """Replace each ``%key%`` of ``template`` whose key is in ``texts``, in one pass."""
    if not texts:
        return template
    # Longest first so that, should one key's placeholder start another's, the longer wins.
    names = sorted(texts, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(f"%{name}%") for name in names))
    return pattern.sub(lambda match: texts[match.group(0)[1:-1]], template)


def _show_keys(keys: frozenset[str]) -> str:
    """A key set as ``{a, b}`` in sorted order, so messages are stable."""
    return "{" + ", ".join(sorted(keys)) + "}"


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, with an article, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"
