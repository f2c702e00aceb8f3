"""The data folder's user files as the Datasets page sees them: checked uploads, listings, and
sample previews run in a subprocess.

Nothing here knows Flask. Problems are raised as :class:`DataFileError` carrying the HTTP status
and the `{"field", "message"}` list the API returns, so the blueprint only translates.

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
* The preview runs ``python -m dispatcher.cli data preview --json --stats`` so the dashboard
  process never imports torch or transformers; at most ``PREVIEW_SLOTS`` run at a time.
* A format is named as a job names it (``alpaca-format``, ``.json`` optional) under the upload
  file-name rules. Viewing and copying take the user's file first, as a job does, unless the
  request asks for ``source`` ``user`` or ``shipped`` (so a shipped format hidden by a user file
  of the same name can still be seen and copied). A copy is checked like an uploaded format
  file and written by :func:`save_upload` (through the dashboard's owner checks: only an
  admin may give a file a shipped format's name, which then changes it for every user).
* Links: the listing leaves out entries whose real path is outside their folder (a link to
  /etc/passwd is neither read nor shown); a link that stays inside is listed like its target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import formats
from dispatcher.access.links import inside
from dispatcher.jobs.specs import (
    DATASET_EXTS,
    FORMAT_EXTS,
    RAW_TEXT_EXTS,
    default_spec,
    find_format,
    resolve_data_name,
)
from dispatcher.settings import DataPaths

KINDS = ("dataset", "format", "raw_text")
KIND_EXTS = {"dataset": DATASET_EXTS, "format": FORMAT_EXTS, "raw_text": RAW_TEXT_EXTS}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
DEFAULT_PREVIEW_TIMEOUT_S = 60.0
PREVIEW_SLOTS = 2
# The project root, put on the preview subprocess's path so `-m dispatcher.cli` resolves to
# this checkout whatever the dashboard's working directory is.
ROOT = Path(__file__).resolve().parent.parent


@dataclass(eq=False)
class DataFileError(Exception):
    """A request about data files that cannot be done; `errors` name the form fields."""

    status: int
    message: str
    errors: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def _file_error(status: int, message: str, field: str = "file") -> DataFileError:
    return DataFileError(status, message, [{"field": field, "message": message}])


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
        raise _file_error(400, f"{name}: unknown file type '{ext or '(none)'}': upload a .json "
                               "or .jsonl dataset, a .txt raw text or a .json format file")
    if kind not in KINDS:
        raise DataFileError(400, f"kind must be one of {', '.join(KINDS)}",
                            [{"field": "kind", "message": f"must be one of {', '.join(KINDS)}"}])
    if ext not in KIND_EXTS[kind]:
        wanted = " or ".join(KIND_EXTS[kind])
        raise _file_error(400, f"{name}: a {kind.replace('_', ' ')} file must end in {wanted}")
    return kind


def check_name(name: str, field: str = "file") -> str:
    """`name` if it is a plain file name for the data folder; otherwise a 400 naming the rule
    (and the request's `field` that held it)."""
    if not name:
        raise _file_error(400, "no file was sent (use the form field 'file')", field)
    if not NAME_RE.match(name):
        raise _file_error(400, f"'{name}' is not a usable file name: use only letters, digits, "
                               "'.', '_' and '-', starting with a letter or digit (no folders)",
                          field)
    return name


def _decode(name: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _file_error(400, f"{name}: {formats.not_utf8(e)}") from None
    return text[1:] if text.startswith("\ufeff") else text


def check_upload(name: str, kind: str, data: bytes, paths: DataPaths) -> Upload:
    """Check an upload completely, in memory; a FormatError's message names the row and key."""
    check_name(name)
    kind = infer_kind(name, kind)
    text = _decode(name, data)
    folder = folder_for(kind, paths)
    try:
        if kind == "dataset":
            rows = formats.parse_rows(text, source=name)
            if not rows:
                raise _file_error(400, f"{name}: the dataset has no rows")
            return Upload(name, kind, folder, rows=len(rows))
        if kind == "format":
            fmt = formats.parse_format(text, source=name)
            return Upload(name, kind, folder, key_sets=[e.spec for e in fmt.entries])
    except formats.FormatError as e:
        raise _file_error(400, str(e)) from None
    if not text.strip():
        raise _file_error(400, f"{name}: the file is empty (raw text needs some text)")
    return Upload(name, kind, folder)


def save_upload(upload: Upload, data: bytes, overwrite: bool,
                replace_hint: str = "tick 'overwrite' to replace it") -> Path:
    """Write `data` to its folder atomically: a temporary file beside it, then a rename.

    Without `overwrite` the final step is a hard link, which fails if the name appeared in the
    meantime, so two uploads of one name cannot silently replace each other. `replace_hint`
    ends the message of that refusal: how the caller's user asks for a replacement.
    """
    folder = upload.folder
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / upload.name
    place = f"{folder.name}/{upload.name}"
    if target.is_dir() or target.is_symlink():
        raise _file_error(409, f"{place} is a folder or a link; upload under another name")
    if target.exists() and not overwrite:
        raise _file_error(409, f"{place} already exists; {replace_hint}")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise _file_error(409, f"{place} already exists; {replace_hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
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


def _format_entry(path: Path, source: str, hidden_by_user_file: bool) -> dict[str, Any]:
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
            fmts.append(_format_entry(p, source, source == "shipped" and p.stem in user_stems))
            if source == "user":
                user_stems.add(p.stem)
    return {"datasets": datasets, "formats": fmts, "raw_texts": raw_texts}


# format files: view and copy -----------------------------------------------------------------
FORMAT_SOURCES = ("user", "shipped")
COPY_REPLACE_HINT = "choose another name, or copy with overwrite to replace it"


def format_file_name(name: object, field: str) -> str:
    """The file name (`NAME.json`) of a format named with or without `.json`, under the upload
    file-name rules; a 400 naming the request's `field` otherwise."""
    if not isinstance(name, str) or not name:
        raise _file_error(400, f"{field} is required: the name of a format file, like "
                               "alpaca-format", field)
    check_name(name, field)  # so the message quotes the name as it was given
    return check_name(name if name.endswith(".json") else f"{name}.json", field)


def find_format_file(name: object, paths: DataPaths, source: object = "",
                     field: str = "name") -> tuple[Path, str]:
    """The format file `name` names and its source: the user's formats/ first, as a job
    resolves a format, unless `source` ("user" or "shipped") asks for one; 404 if absent."""
    file_name = format_file_name(name, field)
    source = source or ""
    if source not in ("", *FORMAT_SOURCES):
        raise _file_error(400, f"source must be one of {', '.join(FORMAT_SOURCES)} (or left "
                               "out: the user's file first)", "source")
    found = find_format(file_name, paths, only=source)  # as a job finds its format
    if found is not None:
        return found, "user" if found.parent == paths.formats else "shipped"
    where = {"": "in formats/ or among the shipped formats", "user": "in formats/",
             "shipped": "among the shipped formats"}[source]
    raise _file_error(404, f"format '{name}' was not found {where}", field)


def _check_format_file(path: Path, source: str, data: bytes, paths: DataPaths,
                       field: str) -> Upload:
    """The checks an uploaded format file gets, applied to a file already in place."""
    try:
        return check_upload(path.name, "format", data, paths)
    except DataFileError as e:
        raise _file_error(e.status, f"the {source} format {path.stem} cannot be used: "
                                    f"{e.message}", field) from None


def read_format(name: object, paths: DataPaths, source: object = "") -> dict[str, Any]:
    """A format file for viewing: its listing entry plus `templates`, the file's JSON object
    (key set -> template). The entry's `key_sets` keep the file's order, which decides the
    template a row gets; the API's JSON answer sorts object keys."""
    path, src = find_format_file(name, paths, source)
    data = path.read_bytes()
    _check_format_file(path, src, data, paths, "name")
    hidden = src == "shipped" and (paths.formats / path.name).is_file()
    return {**_format_entry(path, src, hidden),
            "templates": json.loads(_decode(path.name, data))}


def copy_format(from_name: object, new_name: object, overwrite: bool, paths: DataPaths,
                source: object = "", save: Callable[..., Path] = save_upload
                ) -> tuple[dict[str, Any], bool]:
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
    except DataFileError as e:
        raise _file_error(e.status, e.message, "name") from None
    return _format_entry(target, "user", False), existed


# preview --------------------------------------------------------------------------------------
INT_PARAMS = {  # name: (minimum, maximum or None)
    "cutoff_len": (1, None), "overlap_len": (0, None), "newline_favor_len": (0, None),
    "min_chars": (0, None), "limit": (1, 200),
}
TRUE_WORDS = ("1", "true", "on", "yes")


@dataclass(frozen=True)
class PreviewRequest:
    """What to preview, with names resolved to files inside the data folder."""

    model_dir: Path
    dataset: Path | None
    format_file: Path | None
    raw_text: Path | None
    numbers: dict[str, int]
    hard_cut_string: str
    add_eos_token: bool
    train_only_after: str

    def cli_args(self) -> list[str]:
        """Arguments for `lorafleet data preview` (as `--opt=value`, so a value may start
        with a dash)."""
        args = ["data", "preview", "--json", "--stats", f"--tokenizer={self.model_dir}"]
        if self.dataset is not None:
            args += [f"--dataset={self.dataset}", f"--format={self.format_file}"]
        else:
            args.append(f"--raw-text={self.raw_text}")
        for name in ("cutoff_len", "overlap_len", "newline_favor_len", "min_chars", "limit"):
            args.append(f"--{name.replace('_', '-')}={self.numbers[name]}")
        args += [f"--hard-cut-string={self.hard_cut_string}",
                 f"--train-only-after={self.train_only_after}"]
        if self.add_eos_token:
            args.append("--add-eos-token")
        return args


def parse_preview_request(args: Any, paths: DataPaths) -> PreviewRequest:
    """Check the query parameters and resolve the names; every problem is listed at once."""
    defaults = default_spec()
    problems: list[dict[str, str]] = []

    def bad(name: str, message: str) -> None:
        problems.append({"field": name, "message": message})

    def get(name: str) -> str:
        return str(args.get(name, "") or "").strip()

    numbers: dict[str, int] = {}
    for name, (low, high) in INT_PARAMS.items():
        raw = get(name)
        default = 10 if name == "limit" else int(defaults[name])
        try:
            value = int(raw) if raw else default
        except ValueError:
            bad(name, f"must be a whole number, got '{raw}'")
            continue
        if value < low or (high is not None and value > high):
            bad(name, f"must be at least {low}" + (f" and at most {high}" if high else ""))
        numbers[name] = value

    model_dir = None
    model = get("model") or get("base_model")
    if not model:
        bad("model", "is required: pick a model folder under models/ (its tokenizer is used)")
    else:
        rel, err = resolve_data_name(model, paths.models, (), allow_dir=True)
        if err or rel is None or not (paths.models / rel).is_dir():
            bad("model", err or f"'{model}' is not a folder in models/")
        else:
            model_dir = paths.models / rel

    dataset = format_file = raw_text = None
    ds_name, raw_name, fmt_name = get("dataset"), get("raw_text_file"), get("format")
    if bool(ds_name) == bool(raw_name):
        bad("dataset", "choose a dataset (with a format) or a raw_text_file"
            if not ds_name else "choose either a dataset or a raw_text_file, not both")
    elif ds_name:
        rel, err = resolve_data_name(ds_name, paths.datasets, DATASET_EXTS, allow_dir=False)
        if err or rel is None:
            bad("dataset", err or f"'{ds_name}' was not found in datasets/")
        else:
            dataset = paths.datasets / rel
        if not fmt_name:
            bad("format", "is required with a dataset")
        else:
            format_file = find_format(fmt_name, paths)
            if format_file is None:
                _, err = resolve_data_name(fmt_name, paths.formats, FORMAT_EXTS, allow_dir=False)
                bad("format", err or f"'{fmt_name}' was not found in formats/")
    else:
        rel, err = resolve_data_name(raw_name, paths.datasets, RAW_TEXT_EXTS, allow_dir=True)
        if err or rel is None:
            bad("raw_text_file", err or f"'{raw_name}' was not found in datasets/")
        else:
            raw_text = paths.datasets / rel
        if ("overlap_len" in numbers and "cutoff_len" in numbers
                and numbers["overlap_len"] >= numbers["cutoff_len"]):
            bad("overlap_len", f"({numbers['overlap_len']}) must be less than cutoff_len "
                               f"({numbers['cutoff_len']})")
    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise DataFileError(400, f"cannot preview: {summary}", problems)
    assert model_dir is not None
    # Absent means the default; present and empty means no hard cut, as in a job.
    hard_cut = args.get("hard_cut_string")
    return PreviewRequest(
        model_dir=model_dir, dataset=dataset, format_file=format_file, raw_text=raw_text,
        numbers=numbers,
        hard_cut_string=defaults["hard_cut_string"] if hard_cut is None else str(hard_cut),
        add_eos_token=get("add_eos_token").lower() in TRUE_WORDS,
        train_only_after=str(args.get("train_only_after", "") or ""))


def _public(text: str, paths: DataPaths) -> str:
    """A message with the data folder's absolute path taken out (`datasets/x.json row 3: …`)."""
    return text.replace(str(paths.home) + os.sep, "")


def run_preview(req: PreviewRequest, paths: DataPaths,
                timeout: float = DEFAULT_PREVIEW_TIMEOUT_S) -> dict[str, Any]:
    """Run the CLI's preview in a fresh Python and return `{"samples": [...], "stats": {...}}`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    cmd = [sys.executable, "-m", "dispatcher.cli", *req.cli_args()]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataFileError(504, f"the preview took longer than {timeout:g} s and was stopped; "
                                 "try a smaller limit or a smaller file") from None
    if done.returncode != 0:
        # click prints "Error: <message>" as the last line for the errors it knows about.
        errors = [ln[len("Error: "):] for ln in done.stderr.splitlines()
                  if ln.startswith("Error: ")]
        if errors:
            message = _public(errors[-1], paths)
            raise DataFileError(400, message, [{"field": "preview", "message": message}])
        tail = _public(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", paths)
        raise DataFileError(500, f"the preview failed (exit {done.returncode}): {tail}")
    samples: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if set(obj) == {"stats"}:
            stats = obj["stats"]
        else:
            samples.append(obj)
    return {"samples": samples, "stats": stats}
