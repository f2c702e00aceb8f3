"""Format files on the Datasets page: view one (its templates) and copy one under a new name.

A format is named as a job names it (``alpaca-format``, ``.json`` optional) under the upload
file-name rules. Viewing and copying take the user's file first, as a job does (through the one
resolver, dispatcher.jobs.specs.find_format), unless the request asks for ``source`` ``user`` or
``shipped`` (so a shipped format hidden by a user file of the same name can still be seen and
copied). A copy is checked like an uploaded format file and written by a `save` function (the
dashboard's owner checks, dashboard/ownership.py: only an admin may give a file a shipped
format's name, which then changes it for every user).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashboard.data_files import Upload, check_name, check_upload, decode, format_entry
from dashboard.errors import BadRequest, DashboardError, NotFound
from dispatcher.jobs.specs import find_format
from dispatcher.settings import DataPaths

FORMAT_SOURCES = ("user", "shipped")
COPY_REPLACE_HINT = "choose another name, or copy with overwrite to replace it"


def format_file_name(name: object, field: str) -> str:
    """The file name (`NAME.json`) of a format named with or without `.json`, under the upload
    file-name rules; a 400 naming the request's `field` otherwise."""
    if not isinstance(name, str) or not name:
        raise BadRequest.on(field, f"{field} is required: the name of a format file, like "
                                   "alpaca-format")
    check_name(name, field)  # so the message quotes the name as it was given
    return check_name(name if name.endswith(".json") else f"{name}.json", field)


def find_format_file(name: object, paths: DataPaths, source: object = "",
                     field: str = "name") -> tuple[Path, str]:
    """The format file `name` names and its source: the user's formats/ first, as a job
    resolves a format, unless `source` ("user" or "shipped") asks for one; 404 if absent."""
    file_name = format_file_name(name, field)
    source = source or ""
    if source not in ("", *FORMAT_SOURCES):
        raise BadRequest.on("source", f"source must be one of {', '.join(FORMAT_SOURCES)} (or "
                                      "left out: the user's file first)")
    found = find_format(file_name, paths, only=source)  # as a job finds its format
    if found is not None:
        return found, "user" if found.parent == paths.formats else "shipped"
    where = {"": "in formats/ or among the shipped formats", "user": "in formats/",
             "shipped": "among the shipped formats"}[source]
    raise NotFound.on(field, f"format '{name}' was not found {where}")


def _check_format_file(path: Path, source: str, data: bytes, paths: DataPaths,
                       field: str) -> Upload:
    """The checks an uploaded format file gets, applied to a file already in place."""
    try:
        return check_upload(path.name, "format", data, paths)
    except DashboardError as e:
        raise type(e).on(field, f"the {source} format {path.stem} cannot be used: "
                                f"{e.message}") from None


def read_format(name: object, paths: DataPaths, source: object = "") -> dict[str, Any]:
    """A format file for viewing: its listing entry plus `templates`, the file's JSON object
    (key set -> template). The entry's `key_sets` keep the file's order, which decides the
    template a row gets; the API's JSON answer sorts object keys."""
    path, src = find_format_file(name, paths, source)
    data = path.read_bytes()
    _check_format_file(path, src, data, paths, "name")
    hidden = src == "shipped" and (paths.formats / path.name).is_file()
    return {**format_entry(path, src, hidden), "templates": json.loads(decode(path.name, data))}


def copy_format(from_name: object, new_name: object, overwrite: bool, paths: DataPaths,
                source: object, save: Callable[..., Path]) -> tuple[dict[str, Any], bool]:
    """Copy a format file (the user's or a shipped one) to formats/NEW.json, checked and
    written as an upload is (by `save`: the dashboard's checks who may write it). Returns the
    new file's listing entry and whether it replaced one.
    """
    file_name = format_file_name(new_name, "name")
    path, src = find_format_file(from_name, paths, source, field="from")
    data = path.read_bytes()
    checked = _check_format_file(path, src, data, paths, "from")
    copy = dataclasses.replace(checked, name=file_name)
    target = copy.folder / copy.name
    existed = target.exists()
    try:
        target = save(copy, data, overwrite, replace_hint=COPY_REPLACE_HINT)
    except DashboardError as e:
        raise e.on_field("name") from None
    return format_entry(target, "user", False), existed
