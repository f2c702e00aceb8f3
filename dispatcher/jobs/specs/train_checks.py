"""`parse_train_spec`: the one validation of a training spec, as small checks that each add
what they find to one Problems collector. The request is refused once, naming every problem
(in the order below), or accepted with its data-folder names resolved."""

from __future__ import annotations

import math
from typing import Any

from dispatcher.jobs.problems import Problems, SpecError
from dispatcher.jobs.specs.bounds import check_bounds, check_lengths, check_min_memory, check_size
from dispatcher.jobs.specs.fields import (
    CHECKPOINTING,
    DATASET_EXTS,
    FORMAT_EXTS,
    LORA_NAME_RE,
    OPTIMIZERS,
    PROJECTIONS,
    RAW_TEXT_EXTS,
    RESUME_RE,
    SCHEDULERS,
    build,
    check_precision,
)
from dispatcher.jobs.specs.names import (
    check_model,
    find_format,
    format_file_problem,
    lora_folder_problem,
    resolve_data_name,
)
from dispatcher.jobs.specs.train import TrainSpec, from_webui_keys
from dispatcher.settings import DataPaths


def parse_train_spec(data: Any, paths: DataPaths) -> TrainSpec:
    """Build a TrainSpec from untrusted input (form, JSON, YAML) or raise SpecError."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": "must be a JSON object of training parameters"}])
    check_size(data)
    data = from_webui_keys(data)
    problems = Problems()
    s = build(TrainSpec, data, problems, "training parameter")
    check_lengths("train", s, problems)
    s.target_modules = list(dict.fromkeys(s.target_modules))  # ["q", "q"] is ["q"]
    for check in (_check_lora_name, _check_adapter, _check_batches, _check_optimizer,
                  _check_windows, _check_steps, _check_targets):
        check(s, problems)
    check_min_memory(s.min_gpu_memory_mb, problems)
    check_bounds("train", s, problems)
    # Names in the data folder.
    s.base_model = check_model(s.base_model, paths, problems)
    _check_data(s, paths, problems)
    _check_lora_folder(s, paths, problems)
    problems.raise_if_any()
    return s


def _check_lora_name(s: TrainSpec, problems: Problems) -> None:
    if not s.lora_name.strip():
        problems.add("lora_name", "is required")
    elif not LORA_NAME_RE.match(s.lora_name):
        problems.add("lora_name", f"'{s.lora_name[:40]}' may use only letters, digits, '.', '_' "
                                  "and '-', start with a letter or digit, and be at most 100 "
                                  "characters")


def _check_adapter(s: TrainSpec, problems: Problems) -> None:
    """The LoRA layers' shape: rank, alpha, dropout."""
    max_rank = 2048 if s.higher_rank_limit else 1024
    if not 1 <= s.lora_rank <= max_rank:
        problems.add("lora_rank", f"must be between 1 and {max_rank}"
                                  + ("" if s.higher_rank_limit else " (2048 with higher_rank_limit)"))
    if not 1 <= s.lora_alpha <= 4096:
        problems.add("lora_alpha", "must be between 1 and 4096")
    if not 0.0 <= s.lora_dropout < 1.0:
        problems.add("lora_dropout", "must be at least 0 and less than 1")


def _check_batches(s: TrainSpec, problems: Problems) -> None:
    if s.micro_batch_size < 1:
        problems.add("micro_batch_size", "must be at least 1")
    if s.batch_size < 1:
        problems.add("batch_size", "must be at least 1")
    elif s.micro_batch_size >= 1 and s.batch_size < s.micro_batch_size:
        problems.add("batch_size", "must be at least micro_batch_size")
    if not 0 < s.epochs <= 1000:
        problems.add("epochs", "must be more than 0 and at most 1000")


def _check_optimizer(s: TrainSpec, problems: Problems) -> None:
    """Learning rate, its schedule, the optimizer and the weights' precision."""
    try:
        lr = float(s.learning_rate)
        if not (math.isfinite(lr) and 0 < lr < 1):
            problems.add("learning_rate",
                         f"'{s.learning_rate}' must be a number between 0 and 1, like 3e-4")
    except ValueError:
        problems.add("learning_rate", f"'{s.learning_rate}' is not a number; write it like 3e-4")
    if s.lr_scheduler_type not in SCHEDULERS:
        problems.add("lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
    if s.optimizer not in OPTIMIZERS:
        problems.add("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    check_precision(s.precision, problems)
    if s.gradient_checkpointing not in CHECKPOINTING:
        problems.add("gradient_checkpointing", f"must be one of {', '.join(CHECKPOINTING)}")


def _check_windows(s: TrainSpec, problems: Problems) -> None:
    """The sample length and how raw text is cut into samples."""
    if not 8 <= s.cutoff_len <= 131072:
        problems.add("cutoff_len", "must be between 8 and 131072 tokens")
    if s.overlap_len < 0:
        problems.add("overlap_len", "must be 0 or more")
    elif s.overlap_len >= s.cutoff_len and s.raw_text_file.strip():
        # Only raw text is cut with the overlap; a dataset job ignores it, as in the webui.
        problems.add("overlap_len", f"must be less than cutoff_len ({s.cutoff_len})")
    if s.newline_favor_len < 0:
        problems.add("newline_favor_len", "must be 0 or more")


def _check_steps(s: TrainSpec, problems: Problems) -> None:
    for name in ("save_steps", "warmup_steps", "min_chars"):
        if getattr(s, name) < 0:
            problems.add(name, "must be 0 or more")
    if s.eval_steps < 1:
        problems.add("eval_steps", "must be at least 1")
    if s.stop_at_loss < 0:
        problems.add("stop_at_loss", "must be 0 (off) or more")
    if s.seed < 0:
        problems.add("seed", "must be 0 or more")
    if s.resume_from_checkpoint and not RESUME_RE.match(s.resume_from_checkpoint):
        problems.add("resume_from_checkpoint", "must be empty, latest, or checkpoint-<step>")


def _check_targets(s: TrainSpec, problems: Problems) -> None:
    if not s.target_modules:
        problems.add("target_modules", "name at least one projection")
        return
    unknown = [m for m in s.target_modules if m not in PROJECTIONS and m != "all"]
    if unknown:
        problems.add("target_modules",
                     f"unknown {', '.join(unknown)}; use {', '.join(PROJECTIONS)} or all")


def _check_data(s: TrainSpec, paths: DataPaths, problems: Problems) -> None:
    """The dataset and its format, or the raw text, and the evaluation dataset: each resolved to
    its name in the data folder."""
    has_dataset, has_raw = bool(s.dataset.strip()), bool(s.raw_text_file.strip())
    if not has_dataset and not has_raw:
        problems.add("dataset", "choose a dataset (with a format) or a raw_text_file")
    elif has_dataset and has_raw:
        problems.add("raw_text_file", "choose either a dataset or a raw_text_file, not both")
    if has_dataset:
        s.dataset = _resolved(s.dataset, "dataset", paths, DATASET_EXTS, False, problems)
        if not s.format.strip():
            problems.add("format", "is required with a dataset")
    if s.format.strip():
        _check_format(s, paths, problems)
    if s.eval_dataset.strip() and has_raw and not has_dataset:
        # It would be formatted with the training set's format file, and raw text has none.
        problems.add("eval_dataset", "works with a dataset and its format, not with raw text; "
                                     "to score a held-out text, queue a perplexity job")
    elif s.eval_dataset.strip():
        s.eval_dataset = _resolved(s.eval_dataset, "eval_dataset", paths, DATASET_EXTS, False,
                                   problems)
    if has_raw:
        s.raw_text_file = _resolved(s.raw_text_file, "raw_text_file", paths, RAW_TEXT_EXTS, True,
                                    problems)


def _resolved(name: str, field: str, paths: DataPaths, exts: tuple[str, ...], allow_dir: bool,
              problems: Problems) -> str:
    """`name` as found under datasets/ (the name itself, with a problem, when it is not)."""
    rel, err = resolve_data_name(name, paths.datasets, exts, allow_dir=allow_dir)
    if err:
        problems.add(field, err)
        return name
    return rel or name


def _check_format(s: TrainSpec, paths: DataPaths, problems: Problems) -> None:
    fmt = find_format(s.format, paths)
    if fmt is None:
        _, err = resolve_data_name(s.format, paths.formats, FORMAT_EXTS, allow_dir=False)
        problems.add("format", err or f"'{s.format}' was not found")
        return
    problem = format_file_problem(fmt)
    if problem:
        problems.add("format", problem)
    else:
        s.format = fmt.stem


def _check_lora_folder(s: TrainSpec, paths: DataPaths, problems: Problems) -> None:
    """The LoRA folder the job writes, and the checkpoint it resumes from."""
    if not LORA_NAME_RE.match(s.lora_name):
        return
    link = lora_folder_problem(s.lora_name, paths)
    if link:
        problems.add("lora_name", link)
    elif (s.resume_from_checkpoint.startswith("checkpoint-")
            and RESUME_RE.match(s.resume_from_checkpoint)
            and not (paths.loras / s.lora_name / s.resume_from_checkpoint).is_dir()):
        problems.add("resume_from_checkpoint",
                     f"loras/{s.lora_name}/{s.resume_from_checkpoint} does not exist")
