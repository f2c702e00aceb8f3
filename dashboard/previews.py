"""Sample previews for the Datasets and New job pages: the query checked and its names resolved
inside the data folder, then formats.previewer run in a fresh Python.

The preview runs as ``python -m formats.previewer`` (a JSON request on stdin, one JSON answer on
stdout) so the dashboard process never imports torch or transformers; at most
``PREVIEW_SLOTS`` run at a time (dashboard/datasets.py). Nothing here knows Flask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboard.data_files import TRUE_WORDS
from dashboard.errors import BadRequest, Failed, TimedOut
from dispatcher.jobs.problems import Problems
from dispatcher.jobs.specs import (
    DATASET_EXTS,
    FORMAT_EXTS,
    RAW_TEXT_EXTS,
    default_spec,
    find_format,
    resolve_data_name,
)
from dispatcher.settings import DataPaths, child_env
from formats.previewer import EXIT_USER_ERROR, PreviewRequest
from formats.rawtext import RawTextOptions

DEFAULT_PREVIEW_TIMEOUT_S = 60.0
PREVIEW_SLOTS = 2
# The project root, put on the preview subprocess's path so `-m formats.previewer` resolves to
# this checkout whatever the dashboard's working directory is.
ROOT = Path(__file__).resolve().parent.parent
INT_PARAMS = {  # name: (minimum, maximum or None)
    "cutoff_len": (1, None), "overlap_len": (0, None), "newline_favor_len": (0, None),
    "min_chars": (0, None), "limit": (1, 200),
}


@dataclass(frozen=True)
class Query:
    """The request's query parameters, trimmed."""

    args: Mapping[str, Any]

    def get(self, name: str) -> str:
        return str(self.args.get(name, "") or "").strip()


@dataclass
class DataFiles:
    """What a preview reads: a dataset with its format file, or a raw text."""

    dataset: Path | None = None
    format_file: Path | None = None
    raw_text: Path | None = None


# checks: each reads the query and adds what is wrong to `problems` --------------------------
def check_numbers(q: Query, problems: Problems) -> dict[str, int]:
    """The whole-number parameters (the job defaults when left out; limit 10)."""
    defaults = default_spec()
    numbers: dict[str, int] = {}
    for name, (low, high) in INT_PARAMS.items():
        raw = q.get(name)
        try:
            value = int(raw) if raw else (10 if name == "limit" else int(defaults[name]))
        except ValueError:
            problems.add(name, f"must be a whole number, got '{raw}'")
            continue
        if value < low or (high is not None and value > high):
            problems.add(name, f"must be at least {low}" + (f" and at most {high}" if high else ""))
        numbers[name] = value
    return numbers


def check_model(q: Query, paths: DataPaths, problems: Problems) -> Path | None:
    """The model folder under models/ whose tokenizer is used."""
    model = q.get("model") or q.get("base_model")
    if not model:
        problems.add("model", "is required: pick a model folder under models/ (its tokenizer is "
                              "used)")
        return None
    rel, err = resolve_data_name(model, paths.models, (), allow_dir=True)
    if err or rel is None or not (paths.models / rel).is_dir():
        problems.add("model", err or f"'{model}' is not a folder in models/")
        return None
    return paths.models / rel


def check_dataset(q: Query, paths: DataPaths, problems: Problems) -> DataFiles:
    """A dataset under datasets/ and its format file (the user's, else a shipped one)."""
    files = DataFiles()
    name, fmt = q.get("dataset"), q.get("format")
    rel, err = resolve_data_name(name, paths.datasets, DATASET_EXTS, allow_dir=False)
    if err or rel is None:
        problems.add("dataset", err or f"'{name}' was not found in datasets/")
    else:
        files.dataset = paths.datasets / rel
    if not fmt:
        problems.add("format", "is required with a dataset")
        return files
    files.format_file = find_format(fmt, paths)
    if files.format_file is None:
        _, err = resolve_data_name(fmt, paths.formats, FORMAT_EXTS, allow_dir=False)
        problems.add("format", err or f"'{fmt}' was not found in formats/")
    return files


def check_raw_text(q: Query, paths: DataPaths, numbers: dict[str, int],
                   problems: Problems) -> DataFiles:
    """A raw text (a .txt file or a folder of them) under datasets/; its overlap must be below
    the cutoff (a dataset has no overlap)."""
    files = DataFiles()
    name = q.get("raw_text_file")
    rel, err = resolve_data_name(name, paths.datasets, RAW_TEXT_EXTS, allow_dir=True)
    if err or rel is None:
        problems.add("raw_text_file", err or f"'{name}' was not found in datasets/")
    else:
        files.raw_text = paths.datasets / rel
    if ("overlap_len" in numbers and "cutoff_len" in numbers
            and numbers["overlap_len"] >= numbers["cutoff_len"]):
        problems.add("overlap_len", f"({numbers['overlap_len']}) must be less than cutoff_len "
                                    f"({numbers['cutoff_len']})")
    return files


def check_data(q: Query, paths: DataPaths, numbers: dict[str, int],
               problems: Problems) -> DataFiles:
    """Exactly one of a dataset (with a format) and a raw text."""
    dataset, raw = q.get("dataset"), q.get("raw_text_file")
    if bool(dataset) == bool(raw):
        problems.add("dataset", "choose a dataset (with a format) or a raw_text_file"
                     if not dataset else "choose either a dataset or a raw_text_file, not both")
        return DataFiles()
    if dataset:
        return check_dataset(q, paths, problems)
    return check_raw_text(q, paths, numbers, problems)


def parse_preview_request(args: Mapping[str, Any], paths: DataPaths) -> PreviewRequest:
    """Check the query parameters and resolve the names; every problem is listed at once."""
    q = Query(args)
    problems = Problems()
    numbers = check_numbers(q, problems)
    model_dir = check_model(q, paths, problems)
    files = check_data(q, paths, numbers, problems)
    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems.errors)
        raise BadRequest(f"cannot preview: {summary}", problems.errors)
    assert model_dir is not None
    # Absent means the default; present and empty means no hard cut, as in a job.
    hard_cut = args.get("hard_cut_string")
    options = RawTextOptions(
        overlap_len=numbers["overlap_len"], newline_favor_len=numbers["newline_favor_len"],
        hard_cut_string=default_spec()["hard_cut_string"] if hard_cut is None else str(hard_cut),
        min_chars=numbers["min_chars"])
    return PreviewRequest(
        tokenizer=str(model_dir), dataset=_str(files.dataset), format=_str(files.format_file),
        raw_text=_str(files.raw_text), cutoff_len=numbers["cutoff_len"],
        raw_text_options=options, add_eos_token=q.get("add_eos_token").lower() in TRUE_WORDS,
        train_only_after=str(args.get("train_only_after", "") or ""), limit=numbers["limit"])


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def describe(req: PreviewRequest, paths: DataPaths) -> dict[str, Any]:
    """The request as the answer repeats it: names relative to their folders."""
    def rel(path: str | None) -> str:
        return Path(path).relative_to(paths.datasets).as_posix() if path else ""

    opts = req.raw_text_options
    return {"model": Path(req.tokenizer).name, "dataset": rel(req.dataset),
            "format": Path(req.format).stem if req.format else "",
            "raw_text_file": rel(req.raw_text), "cutoff_len": req.cutoff_len,
            "overlap_len": opts.overlap_len, "newline_favor_len": opts.newline_favor_len,
            "min_chars": opts.min_chars, "limit": req.limit,
            "hard_cut_string": opts.hard_cut_string, "add_eos_token": req.add_eos_token,
            "train_only_after": req.train_only_after}


def _public(text: str, paths: DataPaths) -> str:
    """A message with the data folder's absolute path taken out (`datasets/x.json row 3: …`)."""
    return text.replace(str(paths.home) + os.sep, "")


def run_preview(req: PreviewRequest, paths: DataPaths,
                timeout: float = DEFAULT_PREVIEW_TIMEOUT_S) -> dict[str, Any]:
    """Run formats.previewer in a fresh Python; `{"samples": [...], "stats": {...}}`."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    try:
        done = subprocess.run([sys.executable, "-m", "formats.previewer"], cwd=ROOT, env=env,
                              input=json.dumps(req.to_json()), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimedOut(f"the preview took longer than {timeout:g} s and was stopped; try a "
                       "smaller limit or a smaller file") from None
    # (split on newlines only: str.splitlines() also cuts at U+2028, U+0085 and the like)
    lines = [ln for ln in done.stdout.split("\n") if ln.startswith("{")]
    if done.returncode == EXIT_USER_ERROR and lines:
        raise BadRequest.on("preview", _public(json.loads(lines[-1])["error"], paths))
    if done.returncode != 0 or not lines:
        tail = _public(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", paths)
        raise Failed(f"the preview failed (exit {done.returncode}): {tail}")
    answer = json.loads(lines[-1])
    return {"samples": answer["samples"], "stats": answer["stats"]}
