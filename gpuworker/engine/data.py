"""Phase 2: turn the run's dataset or raw text into tokenized samples, and plan the batches.

Rendering, chunking and label masking are `formats`' pure functions; this module checks the
files the config names, calls them, turns their errors into EngineError, and decides which
samples form which micro-batch and which micro-batches form which optimizer step. (How a
micro-batch's samples become tensors is the batcher's: levers.py.)

Step arithmetic (all counts the engine reports use optimizer steps):

    micro-batches per epoch  = ceil(samples / micro_batch_size)
    accumulation             = batch_size // micro_batch_size
    total micro-batches      = ceil(epochs * micro-batches per epoch)   (fractional epochs allowed)
    total optimizer steps    = ceil(total micro-batches / accumulation)

Micro-batches run as one stream across epochs (each epoch a fresh permutation), and every
`accumulation` consecutive ones make an optimizer step; only the very last step may be short.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dispatcher.access.links import inside
from gpuworker.engine.config import EngineConfig
from gpuworker.errors import EngineError

IGNORE_INDEX = -100


@dataclass
class DataFiles:
    """The files a config names, checked to exist inside the data folder."""

    dataset: Path | None
    format: Path | None
    raw_text: Path | None
    eval_dataset: Path | None


def resolve_data_files(cfg: EngineConfig) -> DataFiles:
    """Check the config's files; a missing one is an EngineError naming it."""
    def need(rel: str, what: str, allow_dir: bool = False) -> Path:
        p = cfg.datasets_dir / rel
        if not inside(p, cfg.datasets_dir):
            raise EngineError(f"{what} datasets/{rel} is a link that leads outside datasets/: "
                              "it is not read")
        if not (p.is_file() or (allow_dir and p.is_dir())):
            raise EngineError(f"{what} '{rel}' was not found in datasets/")
        return p

    if cfg.raw_text_file.strip():
        raw = need(cfg.raw_text_file, "raw_text_file", allow_dir=True)
        return DataFiles(dataset=None, format=None, raw_text=raw, eval_dataset=None)
    if not cfg.dataset.strip():
        raise EngineError("choose a dataset (with a format) or a raw_text_file")
    dataset = need(cfg.dataset, "dataset")
    if not cfg.format.strip():
        raise EngineError("a dataset needs a format file; set format")
    if cfg.format_file is None:
        raise EngineError(f"format '{cfg.format}' was not found in formats/")
    eval_ds = need(cfg.eval_dataset, "eval_dataset") if cfg.eval_dataset.strip() else None
    return DataFiles(dataset=dataset, format=cfg.format_file, raw_text=None, eval_dataset=eval_ds)


def _format_errors() -> tuple[type[BaseException], ...]:
    """What `formats` raises for bad data: its own error class if it has one, and the usual
    suspects of reading and parsing user files."""
    import formats

    own = getattr(formats, "FormatError", None)
    base: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, OSError,
                                             UnicodeDecodeError)
    return ((own,) if isinstance(own, type) else ()) + base


def build_samples(spec: EngineConfig, files: DataFiles, tokenizer: Any, *,
                  dataset_path: Path | None = None, home: Path | None = None
                  ) -> list[dict[str, Any]]:
    """Tokenized samples ({"text", "input_ids", "labels"}) for training (or, with
    `dataset_path`, for an evaluation dataset rendered with the same format).

    `home` (the data folder) is cut from error messages, so users read datasets/x.json rather
    than the worker's absolute path. (`spec` is the run's EngineConfig.)"""
    import formats

    raw = None if dataset_path else files.raw_text
    ds = dataset_path or files.dataset
    what = ("raw_text_file " + spec.raw_text_file if raw else
            f"dataset {ds.name if ds else ''}")
    try:
        samples = formats.build_samples(
            tokenizer=tokenizer, cutoff_len=spec.cutoff_len,
            dataset_path=None if raw else ds, format_path=None if raw else files.format,
            raw_text_path=raw, raw_text_options=formats.RawTextOptions.of(spec),
            add_eos_token=spec.add_eos_token,
            train_only_after=spec.train_only_after)
    except _format_errors() as e:
        message = str(e)
        if files.format is not None:  # shipped formats live beside the code: name only
            message = message.replace(str(files.format), files.format.name)
        if home is not None:
            message = message.replace(f"{home}{os.sep}", "")
        named = (raw or ds) is not None and (raw or ds).name in message  # type: ignore[union-attr]
        raise EngineError(message if named else f"{what}: {message}") from None
    # A sample whose labels are all masked teaches nothing and would make a step's token
    # count zero; drop it here rather than divide by zero later.
    kept = [s for s in samples if any(t != IGNORE_INDEX for t in s["labels"])]
    if not kept:
        raise EngineError(f"{what} gave no samples with text to train on"
                          + (f" (is train_only_after '{spec.train_only_after}' in the samples?)"
                             if spec.train_only_after else ""))
    return kept


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches and optimizer steps the run has (see the module docstring)."""

    n_samples: int
    micro_batch_size: int
    accumulation: int
    micro_per_epoch: int
    total_micro: int
    total_steps: int

    @classmethod
    def make(cls, n_samples: int, micro_batch_size: int, batch_size: int,
             epochs: float) -> StepPlan:
        accumulation = max(1, batch_size // micro_batch_size)
        micro_per_epoch = math.ceil(n_samples / micro_batch_size)
        # The tiny epsilon keeps 3 epochs of 10 from becoming 31 through float rounding.
        total_micro = max(1, math.ceil(epochs * micro_per_epoch - 1e-9))
        return cls(n_samples=n_samples, micro_batch_size=micro_batch_size,
                   accumulation=accumulation, micro_per_epoch=micro_per_epoch,
                   total_micro=total_micro,
                   total_steps=math.ceil(total_micro / accumulation))

    def epoch_of(self, micro_done: int) -> float:
        """Epochs completed after `micro_done` micro-batches (fractional)."""
        return micro_done / self.micro_per_epoch


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    can rebuild exactly the order it was in."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_samples, generator=g).tolist()


def micro_batches(plan: StepPlan, seed: int, start_micro: int = 0) -> Iterator[list[int]]:
    """Sample indices of each micro-batch, from micro-batch `start_micro` to the end of the run."""
    m = plan.micro_batch_size
    for index in range(start_micro, plan.total_micro):
        epoch, within = divmod(index, plan.micro_per_epoch)
        order = epoch_order(plan.n_samples, seed, epoch)
        yield order[within * m:(within + 1) * m]


def optimizer_steps(plan: StepPlan, seed: int, start_step: int = 0) -> Iterator[list[list[int]]]:
    """Micro-batches grouped into optimizer steps, from step `start_step` (0-based) on."""
    group: list[list[int]] = []
    for idx in micro_batches(plan, seed, start_step * plan.accumulation):
        group.append(idx)
        if len(group) == plan.accumulation:
            yield group
            group = []
    if group:
        yield group


def read_format_file(path: Path) -> dict[str, str]:
    """The format file's mapping (key list as written -> template, in file order), as
    text-generation-webui reads it; checked by formats.load_format, whose message it gives."""
    import formats

    try:
        fmt = formats.load_format(path)
    except formats.FormatError as e:
        raise EngineError(str(e).replace(str(path), path.name)) from None
    except OSError as e:
        raise EngineError(f"format file {path.name} cannot be read: {e.strerror or e}") from None
    return {entry.spec: entry.template for entry in fmt.entries}


def training_prompt(spec: EngineConfig, files: DataFiles) -> dict[str, Any]:
    """training_prompt.json: text-generation-webui's keys (template_type, then template_1..n
    with the format's templates), plus the format's name and its full mapping, so the key lists
    are not lost."""
    if files.raw_text is not None:
        return {"template_type": "raw_text", "raw_text_file": spec.raw_text_file,
                "hard_cut_string": spec.hard_cut_string, "overlap_len": spec.overlap_len,
                "newline_favor_len": spec.newline_favor_len}
    assert files.format is not None
    mapping = read_format_file(files.format)
    out: dict[str, Any] = {"template_type": "dataset"}
    for value in mapping.values():
        out[f"template_{len(out)}"] = value
    out["format"] = spec.format
    out["format_data"] = mapping
    return out

