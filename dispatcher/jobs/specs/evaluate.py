"""The specs of the two jobs that train nothing: a perplexity evaluation (`evaluate`) and a
side-by-side answer of a base model and a LoRA (`generate`), with their validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from dispatcher.jobs.problems import Problems, SpecError
from dispatcher.jobs.specs.bounds import (
    MAX_WINDOW_OVERLAP,
    check_bounds,
    check_lengths,
    check_min_memory,
    check_size,
)
from dispatcher.jobs.specs.fields import PRECISIONS, RAW_TEXT_EXTS, build, check_precision
from dispatcher.jobs.specs.fields import spec_field as _f
from dispatcher.jobs.specs.names import check_lora, check_model, find_format, resolve_data_name
from dispatcher.schedule.estimate import read_model_shape
from dispatcher.settings import DataPaths

T = TypeVar("T", "EvalSpec", "GenerateSpec")


@dataclass
class EvalSpec:
    """A perplexity evaluation: a base model with none, one or several LoRAs, on a text file."""

    base_model: str = _f("", "Base model: a folder under models/.", choice="models")
    loras: list[str] = field(default_factory=list, metadata={
        "help": "LoRAs under loras/ applied together (none = the base model alone).",
        "choice": "loras"})
    text_file: str = _f("", "Text to score: a .txt file (or folder of them) under datasets/.", choice="raw_texts")
    stride: int = _f(512, "Tokens the sliding window moves by; smaller is slower and more exact.")
    max_length: int = _f(0, "Window length in tokens (0 = the model's context length).")
    precision: str = _f("auto", "How the base model is loaded (as for training).", choices=PRECISIONS)
    comment: str = _f("", "A note kept beside the result in the evaluations table.")
    force: bool = _f(False, "Evaluate again even if this combination was evaluated before.")
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed; 0 = the dispatcher's estimate.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateSpec:
    """A prompt answered by the base model and by base + LoRA, side by side."""

    base_model: str = _f("", "Base model: a folder under models/.", choice="models")
    lora: str = _f("", "LoRA under loras/ to compare with the base model (empty = base only).", choice="loras")
    prompt: str = _f("", "The prompt (the instruction, when a format file is chosen).")
    format: str = _f("", "Optional format file: the prompt becomes its instruction.", choice="formats")
    max_new_tokens: int = _f(128, "Longest answer, in tokens.")
    temperature: float = _f(0.7, "Sampling temperature (0 = greedy).")
    top_p: float = _f(0.9, "Nucleus sampling: keep the most likely tokens up to this probability.")
    seed: int = _f(0, "Random seed; the same for both answers, so the difference is the LoRA's.")
    precision: str = _f("auto", "How the base model is loaded (as for training).", choices=PRECISIONS)
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed; 0 = the dispatcher's estimate.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window_problem(s: EvalSpec, paths: DataPaths) -> str | None:
    """Stride against the window: each token is scored about window / stride times."""
    window = s.max_length
    if not window:
        shape = read_model_shape(paths.models / s.base_model)
        window = shape.max_positions if shape else 0
    least = math.ceil(window / MAX_WINDOW_OVERLAP) if window else 1
    if 1 <= s.stride < least:
        return (f"at least {least} with a {window}-token window (got {s.stride}): each token "
                f"would be scored {window // s.stride} times, at most {MAX_WINDOW_OVERLAP}")
    return None


def _opening(cls: type[T], kind: str, what: str, data: Any, paths: DataPaths
             ) -> tuple[T, Problems]:
    """What every job spec's parse starts with: a JSON object of `what`s, its size, the typed
    fields, their lengths and the base model."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": f"must be a JSON object of {what}s"}])
    check_size(data)
    problems = Problems()
    s = build(cls, data, problems, what)
    check_lengths(kind, s, problems)
    s.base_model = check_model(s.base_model, paths, problems)
    return s, problems


def parse_eval_spec(data: Any, paths: DataPaths) -> EvalSpec:
    s, problems = _opening(EvalSpec, "evaluate", "evaluation setting", data, paths)
    for name in s.loras:
        check_lora(name, paths, "loras", problems)
    if len(set(s.loras)) != len(s.loras):
        problems.add("loras", "names a LoRA twice")
    _check_text_file(s, paths, problems)
    if s.stride < 1:
        problems.add("stride", "must be at least 1")
    if s.max_length < 0:
        problems.add("max_length", "must be 0 (the model's context) or more")
    elif s.max_length and s.stride > s.max_length:
        problems.add("stride", f"must not be more than max_length ({s.max_length})")
    check_precision(s.precision, problems)
    check_min_memory(s.min_gpu_memory_mb, problems)
    check_bounds("evaluate", s, problems)
    if not problems.fields() & {"stride", "max_length", "base_model"}:
        problem = _window_problem(s, paths)
        if problem:
            problems.add("stride", problem)
    problems.raise_if_any()
    return s


def _check_text_file(s: EvalSpec, paths: DataPaths, problems: Problems) -> None:
    if not s.text_file.strip():
        problems.add("text_file", "is required: a .txt file under datasets/")
        return
    rel, err = resolve_data_name(s.text_file, paths.datasets, RAW_TEXT_EXTS, allow_dir=True)
    if err:
        problems.add("text_file", err)
    else:
        s.text_file = rel


def parse_generate_spec(data: Any, paths: DataPaths) -> GenerateSpec:
    s, problems = _opening(GenerateSpec, "generate", "generation setting", data, paths)
    if s.lora:
        check_lora(s.lora, paths, "lora", problems)
    if not s.prompt.strip():
        problems.add("prompt", "is required")
    if s.format.strip():
        fmt = find_format(s.format, paths)
        if fmt is None:
            problems.add("format", f"'{s.format}' was not found")
        else:
            s.format = fmt.stem
    _check_sampling(s, problems)
    check_precision(s.precision, problems)
    check_min_memory(s.min_gpu_memory_mb, problems)
    check_bounds("generate", s, problems)
    problems.raise_if_any()
    return s


def _check_sampling(s: GenerateSpec, problems: Problems) -> None:
    if not 1 <= s.max_new_tokens <= 4096:
        problems.add("max_new_tokens", "must be between 1 and 4096")
    if not 0 <= s.temperature <= 5:
        problems.add("temperature", "must be between 0 and 5")
    if not 0 < s.top_p <= 1:
        problems.add("top_p", "must be more than 0 and at most 1")
    if s.seed < 0:
        problems.add("seed", "must be 0 or more")
