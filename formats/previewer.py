"""The sample preview as one request -> one answer, for the CLI (in-process) and the dashboard
(in a subprocess, so its process never imports the tokenizer library).

    python -m formats.previewer < request.json

reads one :class:`PreviewRequest` as a JSON object on stdin and writes one JSON object on
stdout: ``{"samples": [...], "stats": {...}}`` (exit 0), or ``{"error": "..."}`` (exit 2) for a
problem the user can fix (a bad data file, a folder that holds no tokenizer). Anything else is
a bug: a traceback on stderr and exit 1. File paths in the request are used as given; the
caller decides which paths a user may name.

Each sample is :func:`sample_row`: the text, ids and labels, token counts, and the text decoded
back from the ids split where training starts (``prompt_text`` is masked by
``train_only_after``, ``trained_text`` is what the loss sees; special tokens such as BOS and EOS
stay in both, as trained), so a page can highlight the trained part.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from formats.errors import FormatError
from formats.preview import PreviewStats, preview
from formats.rawtext import RawTextOptions
from formats.tokenize import IGNORE_INDEX

EXIT_USER_ERROR = 2


class PreviewFailed(Exception):
    """A preview that cannot run for a reason the user can fix (the message says which)."""


@dataclass(frozen=True)
class PreviewRequest:
    """What to preview: a dataset with its format file, or a raw text (a .txt file or a folder
    of them), tokenized with the tokenizer (or model) folder `tokenizer`."""

    tokenizer: str
    dataset: str | None = None
    format: str | None = None
    raw_text: str | None = None
    cutoff_len: int = 256
    raw_text_options: RawTextOptions = field(default_factory=RawTextOptions)
    add_eos_token: bool = False
    train_only_after: str = ""
    limit: int = 20
    """Samples to return (0 = all); the stats always count every sample."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PreviewRequest:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in obj.items() if k in known}
        values["raw_text_options"] = RawTextOptions.of(dict(obj.get("raw_text_options") or {}))
        return cls(**values)


@dataclass(frozen=True)
class PreviewResult:
    """The samples shown (:func:`sample_row` dicts) and the totals over all samples."""

    samples: list[dict[str, Any]]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "stats": self.stats}


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a model or tokenizer folder (PreviewFailed if it has none)."""
    from transformers import AutoTokenizer  # only here: the rest of formats needs no torch

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds for a folder without a tokenizer
        raise PreviewFailed(f"{path}: cannot load a tokenizer: {e}") from None


def sample_row(sample: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """One preview sample as the CLI's --json line and the dashboard's answer show it."""
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    # The mask is a prefix (formats.tokenize): ids before the first trained label are the
    # prompt, the rest is trained.
    masked = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    return {
        "text": sample["text"], "input_ids": ids, "labels": labels,
        "truncated": bool(sample["truncated"]), "tokens": len(ids),
        "trained_tokens": len(ids) - masked,
        "prompt_text": tokenizer.decode(ids[:masked]),
        "trained_text": tokenizer.decode(ids[masked:]),
    }


def stats_dict(stats: PreviewStats, shown: int, cutoff_len: int) -> dict[str, Any]:
    return {**dataclasses.asdict(stats), "shown": shown, "cutoff_len": cutoff_len}


def run(req: PreviewRequest, tokenizer: Any = None) -> PreviewResult:
    """The preview `req` asks for; `tokenizer` when the caller has loaded it already. Raises
    FormatError or PreviewFailed (the user's to fix), ValueError for impossible numbers."""
    tok = load_tokenizer(req.tokenizer) if tokenizer is None else tokenizer
    result = preview(
        tokenizer=tok, cutoff_len=req.cutoff_len, dataset_path=req.dataset,
        format_path=req.format, raw_text_path=req.raw_text,
        raw_text_options=req.raw_text_options, add_eos_token=req.add_eos_token,
        train_only_after=req.train_only_after)
    shown = result.samples if req.limit == 0 else result.samples[: req.limit]
    return PreviewResult([sample_row(s, tok) for s in shown],
                         stats_dict(result.stats, len(shown), req.cutoff_len))


def main(stdin: Any = None, stdout: Any = None) -> int:
    """The subprocess entry point: a request on stdin, the answer on stdout."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    req = PreviewRequest.from_json(json.load(stdin))
    try:
        answer = run(req).to_json()
        code = 0
    except (FormatError, PreviewFailed) as e:
        answer, code = {"error": str(e)}, EXIT_USER_ERROR
    # ASCII on the pipe: one line whatever the text holds (no U+2028 or U+0085 that a reader
    # could take for a line's end) and whatever the child's locale encodes.
    json.dump(answer, stdout)
    stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
