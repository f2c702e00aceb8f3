"""A look at the training data before spending GPU time on it (``lorafleet data preview``).

It runs exactly the code the trainer runs (:func:`formats.build.collect_samples`), so what
the preview shows is what will be trained, and adds the numbers a user checks first: how many
samples, how many tokens, how many of them are trained (not masked by ``train_only_after``),
how many samples were cut at ``cutoff_len``, and how many train nothing at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from formats.build import collect_samples
from formats.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class PreviewStats:
    """Totals over all samples."""

    samples: int
    """Number of samples."""
    tokens: int
    """All input ids of all samples (no padding)."""
    trained_tokens: int
    """Labels that are not -100."""
    truncated: int
    """Samples whose tokens were cut at ``cutoff_len``."""
    untrained: int
    """Samples with no trained label at all (e.g. ``train_only_after`` beyond ``cutoff_len``)."""
    longest: int
    """The longest sample, in tokens."""


@dataclass(frozen=True)
class Preview:
    """The samples (as :func:`formats.build_samples` returns them, plus ``truncated``) and stats."""

    samples: list[dict[str, Any]]
    stats: PreviewStats


def preview(*, tokenizer: Any, cutoff_len: int, **options: Any) -> Preview:
    """Build the samples as :func:`formats.build_samples` does (same keywords) and count what
    matters. Each returned sample is ``{"text", "input_ids", "labels", "truncated"}``.
    """
    collected = collect_samples(tokenizer=tokenizer, cutoff_len=cutoff_len, **options)
    samples = [dict(s.as_dict(), truncated=s.tokens.truncated) for s in collected]
    trained = [s.tokens.trained_tokens for s in collected]
    stats = PreviewStats(
        samples=len(collected),
        tokens=sum(len(s.tokens.input_ids) for s in collected),
        trained_tokens=sum(trained),
        truncated=sum(1 for s in collected if s.tokens.truncated),
        untrained=sum(1 for count in trained if count == 0),
        longest=max((len(s.tokens.input_ids) for s in collected), default=0),
    )
    return Preview(samples=samples, stats=stats)


def format_table(samples: Sequence[Mapping[str, Any]], text_width: int = 60) -> str:
    """A plain-text table, one line per sample: index, tokens, trained tokens, cut, text start.

    The text is shown on one line (newlines as ``⏎``) and shortened to ``text_width``
    characters with ``…``, so a terminal shows one sample per row.
    """
    header = ("#", "tokens", "trained", "cut", "text")
    rows = []
    for index, sample in enumerate(samples):
        labels = sample.get("labels", sample["input_ids"])
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        cut = "yes" if sample.get("truncated") else ""
        rows.append(
            (
                str(index),
                str(len(sample["input_ids"])),
                str(trained),
                cut,
                _one_line(sample.get("text", ""), text_width),
            )
        )
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(4)]
    lines = []
    for row in [header, *rows]:
        cells = [
            row[0].rjust(widths[0]),
            row[1].rjust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].ljust(widths[3]),
            row[4],
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _one_line(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, ``…`` marking a cut."""
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"
