"""The one entry point the trainer uses: the job's data settings -> tokenized samples.

Parameter names and defaults are the "Train LoRA" tab's, so a job spec (or a webui
``training_parameters.json``) maps onto it one to one; the four raw-text settings travel as one
:class:`formats.rawtext.RawTextOptions` (``RawTextOptions.of(spec)``), whose
``hard_cut_string`` is as typed in the form (``\\n`` meaning newline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.datasets import load_rows, render_rows
from formats.errors import FormatError
from formats.rawtext import DEFAULT_OPTIONS, RawTextOptions, raw_text_samples, read_raw_text
from formats.templates import load_format
from formats.tokenize import TokenizedSample, tokenize_text


@dataclass(frozen=True)
class Sample:
    """A training text and its tokens; what :func:`build_samples` returns, as a dict."""

    text: str
    tokens: TokenizedSample

    def as_dict(self) -> dict[str, Any]:
        """``{"text", "input_ids", "labels"}``: what the trainer and :func:`pad_batch` take."""
        return {
            "text": self.text,
            "input_ids": list(self.tokens.input_ids),
            "labels": list(self.tokens.labels),
        }


def collect_samples(
    *,
    tokenizer: Any,
    cutoff_len: int,
    dataset_path: str | Path | None = None,
    format_path: str | Path | None = None,
    raw_text_path: str | Path | None = None,
    raw_text_options: RawTextOptions = DEFAULT_OPTIONS,
    add_eos_token: bool = False,
    train_only_after: str = "",
) -> list[Sample]:
    """:func:`build_samples` keeping each sample's :class:`TokenizedSample` (for previews)."""
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
    if raw_text_path is not None:
        text = read_raw_text(raw_text_path, separator=raw_text_options.hard_cut or "\n")
        pairs = raw_text_samples(
            text,
            tokenizer,
            cutoff_len=cutoff_len,
            options=raw_text_options,
            add_eos_token=add_eos_token,
            train_only_after=train_only_after,
        )
        samples = [Sample(text=chunk, tokens=tokens) for chunk, tokens in pairs]
        if not samples:
            raise FormatError(
                "no text left to train on after hard cuts and min_chars", source=str(raw_text_path)
            )
        return samples
    if dataset_path is None:
        raise ValueError("give dataset_path (with format_path) or raw_text_path")
    if format_path is None:
        raise ValueError("a dataset needs a format file: format_path is missing")
    fmt = load_format(format_path)
    rows = load_rows(dataset_path)
    if not rows:
        raise FormatError("the dataset has no rows", source=str(dataset_path))
    texts = render_rows(fmt, rows, source=str(dataset_path))
    return [
        Sample(
            text=text,
            tokens=tokenize_text(text, tokenizer, cutoff_len, add_eos_token, train_only_after),
        )
        for text in texts
    ]


def build_samples(*, tokenizer: Any, cutoff_len: int, **options: Any) -> list[dict[str, Any]]:
    """Training samples ``{"text", "input_ids", "labels"}`` from a dataset or raw text.

    ``options`` are :func:`collect_samples`' keywords: ``raw_text_path`` (a ``.txt`` file or a
    folder of them), or ``dataset_path`` with ``format_path``. When both a raw text and a dataset
    are given, the raw text is used, as in the webui (whose saved parameters always carry both
    fields). ``raw_text_options`` (a :class:`formats.rawtext.RawTextOptions`) only applies to
    raw text; ``cutoff_len``, ``add_eos_token`` and ``train_only_after`` to both (for
    raw text, EOS is added at each hard cut, see :mod:`formats.rawtext`).

    Samples are not padded; batch them with :func:`formats.pad_batch`. Bad files raise
    :class:`formats.FormatError` naming the file, row and key; bad numbers raise ``ValueError``.
    An input that yields no sample at all is an error too, since training on nothing is never
    what the user meant.
    """
    samples = collect_samples(tokenizer=tokenizer, cutoff_len=cutoff_len, **options)
    return [sample.as_dict() for sample in samples]
