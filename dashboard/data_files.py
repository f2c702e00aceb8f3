"""The data folder's user files as the Datasets page sees them: checked uploads and listings.
Format files are viewed and copied by dashboard/format_files.py, samples previewed by
dashboard/previews.py.

Nothing here knows Flask. Problems are raised as the dashboard's error types
(dashboard/errors.py) naming the request field, which the app answers in one place.

Choices (the issue left them open):

* Kinds: ``dataset`` (``.json`` / ``.jsonl`` -> ``datasets/``), ``raw_text`` (``.txt`` ->
  ``datasets/``) and ``format`` (``.json`` -> ``formats/``). Without a kind, ``.jsonl`` is a
  dataset, ``.txt`` raw text, and ``.json`` a dataset unless its name ends in ``-format.json``
  or ``_format.json`` (the shipped format files' naming), which makes it a format file: a format
  file is one JSON object and would also parse as a one-row dataset, so the name decides.
* A file is checked in full from memory before anything touches the disk; a dataset with no
  rows and a raw text of only whitespace are refused as well, since training on them fails.
* File names are refused, not rewritten, when they hold anything but letters, digits, ``.``,
  ``_`` and ``-`` or start with a dot: a silently changed name would not be the one the user
  then looks for in the dropdowns. Extensions are lower case, as the job form lists them.
* Links: the listing leaves out entries whose real path is outside their folder (a link to
  /etc/passwd is neither read nor shown); a link that stays inside is listed like its target.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import formats
from dashboard.errors import BadRequest, Conflict
from dispatcher.access.links import inside
from dispatcher.jobs.specs import DATASET_EXTS, FORMAT_EXTS, RAW_TEXT_EXTS
from dispatcher.settings import DataPaths
from formats.files import atomic_write

KINDS = ("dataset", "format", "raw_text")
KIND_EXTS = {"dataset": DATASET_EXTS, "format": FORMAT_EXTS, "raw_text": RAW_TEXT_EXTS}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
TRUE_WORDS = ("1", "true", "on", "yes")


def human_size(n: int) -> str:
    """Bytes as a person reads them: 512 B, 3.4 KB, 50 MB (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 10 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# uploads --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    """A checked upload: where it goes and what it holds."""

    name: str
    kind: str
    folder: Path
    rows: int | None = None
    key_sets: list[str] | None = None


def folder_for(kind: str, paths: DataPaths) -> Path:
    return paths.formats if kind == "format" else paths.datasets


def infer_kind(name: str, kind: str = "") -> str:
    """The kind of an upload named `name`: the one asked for, checked against the extension."""
    ext = Path(name).suffix
    kind = (kind or "").strip().lower()
    if kind in ("", "auto"):
        if ext == ".jsonl":
            return "dataset"
        if ext == ".txt":
            return "raw_text"
        if ext == ".json":
            return "format" if Path(name).stem.endswith(("-format", "_format")) else "dataset"
        raise BadRequest.on("file", f"{name}: unknown file type '{ext or '(none)'}': upload a "
                                    ".json or .jsonl dataset, a .txt raw text or a .json format "
                                    "file")
    if kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}",
                         [{"field": "kind", "message": f"must be one of {', '.join(KINDS)}"}])
    if ext not in KIND_EXTS[kind]:
        wanted = " or ".join(KIND_EXTS[kind])
        raise BadRequest.on("file", f"{name}: a {kind.replace('_', ' ')} file must end in "
                                    f"{wanted}")
    return kind


def check_name(name: str, field: str = "file") -> str:
    """`name` if it is a plain file name for the data folder; otherwise a 400 naming the rule
    (and the request's `field` that held it)."""
    if not name:
        raise BadRequest.on(field, "no file was sent (use the form field 'file')")
    if not NAME_RE.match(name):
        raise BadRequest.on(field, f"'{name}' is not a usable file name: use only letters, "
                                   "digits, '.', '_' and '-', starting with a letter or digit "
                                   "(no folders)")
    return name


def decode(name: str, data: bytes) -> str:
    """An uploaded file's text (a leading byte order mark dropped); 400 if it is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest.on("file", f"{name}: {formats.not_utf8(e)}") from None
    return text[1:] if text.startswith("\ufeff") else text


def check_upload(name: str, kind: str, data: bytes, paths: DataPaths) -> Upload:
    """Check an upload completely, in memory; a FormatError's message names the row and key."""
    check_name(name)
    kind = infer_kind(name, kind)
    text = decode(name, data)
    folder = folder_for(kind, paths)
    try:
        if kind == "dataset":
            rows = formats.parse_rows(text, source=name)
            if not rows:
                raise BadRequest.on("file", f"{name}: the dataset has no rows")
            return Upload(name, kind, folder, rows=len(rows))
        if kind == "format":
            fmt = formats.parse_format(text, source=name)
            return Upload(name, kind, folder, key_sets=[e.spec for e in fmt.entries])
    except formats.FormatError as e:
        raise BadRequest.on("file", str(e)) from None
    if not text.strip():
        raise BadRequest.on("file", f"{name}: the file is empty (raw text needs some text)")
    return Upload(name, kind, folder)


def save_upload(upload: Upload, data: bytes, overwrite: bool,
                replace_hint: str = "tick 'overwrite' to replace it") -> Path:
    """Write `data` to its folder atomically (formats.files.atomic_write, mode 0644).

    Without `overwrite` the final step is a hard link, which fails if the name appeared in the
    meantime, so two uploads of one name cannot silently replace each other. `replace_hint`
    ends the message of that refusal: how the caller's user asks for a replacement.
    """
    folder = upload.folder
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / upload.name
    place = f"{folder.name}/{upload.name}"
    if target.is_dir() or target.is_symlink():
        raise Conflict.on("file", f"{place} is a folder or a link; upload under another name")
    exists = Conflict.on("file", f"{place} already exists; {replace_hint}")
    if target.exists() and not overwrite:
        raise exists
    if not atomic_write(target, data, mode=0o644, replace=overwrite):
        raise exists
    return target


# listing --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _dataset_rows(path: str, mtime_ns: int, size: int) -> tuple[int | None, str | None]:
    """Row count of a dataset file, cached per version of the file (mtime and size)."""
    try:
        return len(formats.load_rows(path)), None
    except (formats.FormatError, OSError) as e:
        return None, str(e).replace(str(Path(path).parent) + os.sep, "")


@functools.lru_cache(maxsize=256)
def _format_keys(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], str | None]:
    try:
        return tuple(e.spec for e in formats.load_format(path).entries), None
    except (formats.FormatError, OSError) as e:
        return (), str(e).replace(str(Path(path).parent) + os.sep, "")


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` a user sees: not hidden, and not leading out of the folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and inside(p, folder))


def _entry(path: Path, kind: str) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "kind": kind, "size": st.st_size, "modified": st.st_mtime}


def format_entry(path: Path, source: str, hidden_by_user_file: bool) -> dict[str, Any]:
    """A format file as the listing shows it."""
    st = path.stat()
    keys, error = _format_keys(str(path), st.st_mtime_ns, st.st_size)
    return {**_entry(path, "format"), "name": path.stem, "file": path.name, "source": source,
            "key_sets": list(keys), "error": error, "hidden_by_user_file": hidden_by_user_file}


def list_data(paths: DataPaths) -> dict[str, list[dict[str, Any]]]:
    """Datasets, raw texts (files, or folders of .txt) and format files (the user's, then the
    shipped ones, which a user file of the same name hides)."""
    datasets, raw_texts, fmts = [], [], []
    for p in _visible(paths.datasets):
        if p.is_file() and p.suffix in DATASET_EXTS:
            e = _entry(p, "dataset")
            st = p.stat()
            e["rows"], e["error"] = _dataset_rows(str(p), st.st_mtime_ns, st.st_size)
            datasets.append(e)
        elif p.is_file() and p.suffix in RAW_TEXT_EXTS:
            raw_texts.append({**_entry(p, "raw_text"), "files": 1})
        elif p.is_dir():
            txts = sorted(t for t in p.glob("*.txt") if inside(t, paths.datasets))
            if txts:
                e = _entry(p, "raw_text")
                e["size"] = sum(t.stat().st_size for t in txts)
                e["files"] = len(txts)
                raw_texts.append(e)
    user_stems = set()
    for source, folder in (("user", paths.formats), ("shipped", formats.SHIPPED_DIR)):
        for p in _visible(folder):
            if not (p.is_file() and p.suffix in FORMAT_EXTS):
                continue
            fmts.append(format_entry(p, source, source == "shipped" and p.stem in user_stems))
            if source == "user":
                user_stems.add(p.stem)
    return {"datasets": datasets, "formats": fmts, "raw_texts": raw_texts}
