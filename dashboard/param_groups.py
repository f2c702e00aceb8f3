"""The job page's parameter table (issue 11, point 10): a training spec's parameters in groups,
each value marked when it differs from the default, so the few choices that matter stand out
among some 30 rows. Evaluation and generation specs are one group."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from dispatcher.jobs.specs import SPEC_CLASSES

TRAIN_GROUPS = (
    ("Model and data", ("base_model", "dataset", "format", "eval_dataset", "eval_steps",
                        "cutoff_len", "add_eos_token", "train_only_after", "precision")),
    ("LoRA", ("lora_name", "always_override", "lora_rank", "lora_alpha", "lora_dropout",
              "target_modules", "higher_rank_limit")),
    ("Optimisation", ("epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "optimizer",
                      "micro_batch_size", "batch_size", "stop_at_loss", "seed")),
    ("Raw text", ("raw_text_file", "overlap_len", "newline_favor_len", "hard_cut_string",
                  "min_chars")),
    ("Checkpoints", ("save_steps", "resume_from_checkpoint")),
    ("Speed", ("fused_loss", "packing", "fused_kernels", "compile", "fp32_norms", "gradient_checkpointing")),
)


@dataclass
class Param:
    name: str
    value: str
    changed: bool  # differs from the default
    default: str


def shown(v: Any) -> str:
    if v is True or v is False:
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def param_groups(kind: str, spec: dict[str, Any]) -> list[tuple[str, list[Param]]]:
    """[(group title, [Param, ...]), ...] in the page's order; keys of no group go last
    under "Other"; a field without a default (lora_name, base_model) is never marked."""
    cls = SPEC_CLASSES.get(kind)
    defaults = {f.name: (f.default_factory() if f.default is MISSING else f.default)  # type: ignore[misc]
                for f in fields(cls)} if cls else {}
    required = {"lora_name", "base_model", "dataset", "format", "text_file", "prompt"}

    def row(name: str) -> Param:
        v, d = spec[name], defaults.get(name, MISSING)
        changed = d is not MISSING and name not in required and not _same(v, d)
        return Param(name, shown(v), changed, "" if d is MISSING else shown(d))

    groups = TRAIN_GROUPS if kind == "train" else ()
    out = [(title, [row(n) for n in names if n in spec]) for title, names in groups]
    placed = {n for _, names in groups for n in names}
    rest = [row(n) for n in spec if n not in placed]
    if rest:
        out.append(("Other" if groups else "Parameters", rest))
    return [(title, rows) for title, rows in out if rows]
