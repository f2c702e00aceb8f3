"""Upper bounds of every number and text of a spec, and of a whole spec as JSON.

A spec is stored in full in its job record (and in every trial of a sweep), and a request must
not ask a worker for what no machine can do: these checks run before anything reads the disk.
"""

from __future__ import annotations

import json
from typing import Any

from dispatcher.jobs.problems import Problems, SpecError
from dispatcher.jobs.specs.fields import PROJECTIONS

MAX_GPU_MEMORY_MB = 16 * 1024 * 1024  # 16 TB: anything more is a typo
# The most tokens in one sample or window: 128k, the longest context of common open models (a
# longer window needs attention memory beyond any single card lorafleet places jobs on).
MAX_TOKENS = 131072
# Optimizer steps: a million steps is weeks on any card; more is a typo.
MAX_STEPS = 10**6
# Seeds: transformers.set_seed also seeds numpy, whose seeds end at 2**32 - 1.
MAX_SEED = 2**32 - 1
# A perplexity window slides by at least max_length / this many tokens, so each token is
# scored at most this many times (stride 1 on a 1024-token window is still allowed).
MAX_WINDOW_OVERLAP = 1024

# The upper bound of every number in a spec, per job kind. Each is generous for any real job
# and keeps one request from asking a worker for what no machine can do (a 1e9-sample batch,
# a 1e9-token window) or from overflowing what the engine hands to torch and numpy. Lower
# bounds are checked with each field (their messages say what 0 means); a field that a
# field-specific check already refused is not named twice.
UPPER_BOUNDS: dict[str, dict[str, float]] = {
    "train": {
        "micro_batch_size": 4096,  # samples per forward pass: more fits no card, even at 8 tokens
        "batch_size": 65536,  # samples per optimizer step (accumulated): large-batch runs use ~4k
        "epochs": 1000,  # tiny datasets are run for hundreds of epochs; fair share bounds the rest
        "cutoff_len": MAX_TOKENS,
        "overlap_len": MAX_TOKENS,
        "newline_favor_len": MAX_TOKENS,  # characters, used near chunk edges of MAX_TOKENS
        "lora_rank": 2048,  # higher_rank_limit's ceiling (the check names 1024 without it)
        "lora_alpha": 4096,
        "lora_dropout": 1.0,  # a probability (the check refuses 1 itself)
        "save_steps": MAX_STEPS,
        "eval_steps": MAX_STEPS,
        "warmup_steps": MAX_STEPS,
        "stop_at_loss": 100.0,  # cross-entropy of a uniform guess over 256k tokens is 12.5
        "min_chars": 10**7,  # characters: a 10 MB block is longer than any dataset's paragraph
        "seed": MAX_SEED,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
    "evaluate": {
        "stride": MAX_TOKENS,
        "max_length": MAX_TOKENS,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
    "generate": {
        "max_new_tokens": 4096,
        "temperature": 5.0,
        "top_p": 1.0,
        "seed": MAX_SEED,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
}


def upper_bound(kind: str, name: str) -> float | None:
    """The largest value `name` may have in a spec of `kind` (None: not a bounded number)."""
    return UPPER_BOUNDS.get(kind, {}).get(name)


def check_bounds(kind: str, spec: Any, problems: Problems) -> None:
    """Refuse every number of `spec` above its bound: "at most 4096 (got 1000000000)"."""
    named = problems.fields()
    for name, most in UPPER_BOUNDS[kind].items():
        value = getattr(spec, name)
        if name not in named and isinstance(value, (int, float)) and value > most:
            shown = int(most) if float(most).is_integer() else most
            problems.add(name, f"at most {shown} (got {value})")


def check_min_memory(value: int, problems: Problems) -> None:
    if not 0 <= value <= MAX_GPU_MEMORY_MB:
        problems.add("min_gpu_memory_mb",
                     f"must be between 0 (use the estimate) and {MAX_GPU_MEMORY_MB}")


# The longest value of every text field of a spec, per job kind: characters for text, entries
# for a list (each entry at most MAX_LIST_ENTRY characters). A spec is stored in full in its job
# record (and in every trial of a sweep), and its owner may keep max_queued_jobs of them in
# Redis: nothing in one may be unbounded. Names in the data folder also have their own checks.
NAME_CHARS = 4096  # a relative path in the data folder (links.too_long's bound)
MAX_LIST_ENTRY = 100  # an entry of a list: a LoRA name (LORA_NAME_RE) or a projection
TEXT_BOUNDS: dict[str, dict[str, int]] = {
    "train": {
        "lora_name": 100,
        "base_model": NAME_CHARS,
        "dataset": NAME_CHARS,
        "eval_dataset": NAME_CHARS,
        "format": NAME_CHARS,
        "raw_text_file": NAME_CHARS,
        "learning_rate": 32,  # a number written as text: "3e-4"
        "lr_scheduler_type": 32,
        "optimizer": 32,
        "precision": 32,
        "hard_cut_string": 1000,  # a separator, like "\\n\\n\\n" or "### End"
        "train_only_after": 1000,  # a marker, like "### Response:" or "Assistant:"
        "resume_from_checkpoint": 32,  # latest or checkpoint-<step>
        "gradient_checkpointing": 32,  # all or auto
        "target_modules": len(PROJECTIONS) + 1,  # entries: the 7 projections and "all"
    },
    "evaluate": {
        "base_model": NAME_CHARS,
        "loras": 16,  # entries: LoRAs applied together; more is no real experiment
        "text_file": NAME_CHARS,
        "precision": 32,
        "comment": 500,
    },
    "generate": {
        "base_model": NAME_CHARS,
        "lora": 100,
        "prompt": 32000,  # a real prompt: a long document with its instruction
        "format": NAME_CHARS,
        "precision": 32,
    },
}
# The most characters a spec may take as JSON: a backstop for what the fields do not bound
# (unknown keys) and a cap on the record. A 32,000-character prompt in a script of 3-byte
# characters is 96 KB; every training spec the bounds allow is far smaller.
MAX_SPEC_CHARS = 128 * 1024


def check_size(data: Any, field: str = "spec", most: int = MAX_SPEC_CHARS) -> None:
    """Refuse (SpecError, alone) input whose JSON text is over `most` characters, before
    anything else looks at it."""
    size = len(json.dumps(data, ensure_ascii=False, default=str))
    if size > most:
        raise SpecError([{"field": field, "message": f"is {size} characters as JSON; at "
                                                     f"most {most}"}])


def check_lengths(kind: str, spec: Any, problems: Problems) -> None:
    """Refuse every text over its bound ("at most 1000 characters (got 20000000)"), every list
    with too many entries, and then raise: nothing else is checked on oversized input (the
    checks that follow read lists entry by entry and names on disk)."""
    named, before = problems.fields(), len(problems)
    for name, most in TEXT_BOUNDS[kind].items():
        value = getattr(spec, name)
        if name in named:  # of the wrong type: already refused
            continue
        if isinstance(value, str) and len(value) > most:
            problems.add(name, f"at most {most} characters (got {len(value)})")
        elif isinstance(value, list) and len(value) > most:
            problems.add(name, f"at most {most} entries (got {len(value)})")
        elif isinstance(value, list) and any(len(v) > MAX_LIST_ENTRY for v in value):
            problems.add(name, f"each entry is at most {MAX_LIST_ENTRY} characters")
    if len(problems) > before:
        problems.raise_if_any()
