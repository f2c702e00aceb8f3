"""The New job form, generated from TrainSpec's fields (names, types, defaults, help, choices).

Fields are grouped into sections for reading; a field the spec gains later and no section
names still appears, under "Other".
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from dispatcher.jobs.specs import PROJECTIONS, SPEC_CLASSES, TrainSpec, upper_bound

SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Model and data", ("lora_name", "base_model", "precision", "dataset", "format",
                        "eval_dataset", "raw_text_file")),
    ("Training", ("epochs", "learning_rate", "lr_scheduler_type", "optimizer", "micro_batch_size",
                  "batch_size", "cutoff_len", "warmup_steps", "save_steps", "eval_steps",
                  "stop_at_loss", "seed")),
    ("LoRA", ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "higher_rank_limit",
              "always_override")),
    ("Text processing", ("train_only_after", "add_eos_token", "overlap_len", "newline_favor_len",
                         "hard_cut_string", "min_chars")),
    ("Speed", ("fused_loss", "packing", "fused_kernels", "compile", "fp32_norms", "gradient_checkpointing")),
]
TARGET_MODULE_CHOICES = (*PROJECTIONS, "all")
# Marked with an asterisk in the form (the spec's validation is what enforces it).
REQUIRED = ("lora_name", "base_model")


@dataclass
class FormField:
    name: str
    type: str  # int | float | bool | str | list[str]
    widget: str  # text | number | select | checkbox | checkboxes
    default: Any
    value: Any
    help: str
    choices: list[str]
    step: str = ""
    required: bool = False
    # Data-folder dropdowns start with an empty entry ("— choose —" or "(none)").
    empty_option: bool = False
    # A number's upper bound (dispatcher.jobs.specs.UPPER_BOUNDS): the input's max attribute.
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def form_fields(data_choices: dict[str, list[str]],
                values: dict[str, Any] | None = None, spec_cls: type = TrainSpec,
                required: tuple[str, ...] = REQUIRED) -> list[FormField]:
    """Every field of a spec class as a form field, with `values` (e.g. a copied job) over
    the defaults."""
    values = {**{f.name: _default(f) for f in fields(spec_cls)}, **(values or {})}
    kind = next((k for k, c in SPEC_CLASSES.items() if c is spec_cls), "")
    out = []
    for f in fields(spec_cls):
        typ = str(f.type)
        meta = f.metadata
        choices: list[str] = []
        step = ""
        if f.name == "target_modules":
            widget, choices = "checkboxes", list(TARGET_MODULE_CHOICES)
        elif typ == "list[str]" and meta.get("choice"):
            widget, choices = "checkboxes", list(data_choices.get(meta["choice"], []))
        elif typ == "bool":
            widget = "checkbox"
        elif meta.get("choices"):
            widget, choices = "select", list(meta["choices"])
        elif meta.get("choice"):
            widget = "select"
            choices = list(data_choices.get(meta["choice"], []))
            current = str(values.get(f.name) or "")
            if current and current not in choices:
                choices.insert(0, current)  # a copied job's value that is gone from disk
            elif not current and f.name in required and len(choices) == 1:
                values[f.name] = choices[0]  # the only model: nothing to choose
        elif typ in ("int", "float"):
            widget, step = "number", ("1" if typ == "int" else "any")
        else:
            widget = "text"
        out.append(FormField(
            name=f.name, type=typ, widget=widget, default=_default(f),
            value=values.get(f.name, _default(f)), help=meta.get("help", ""), choices=choices,
            step=step, required=f.name in required,
            empty_option=bool(meta.get("choice")),
            max=upper_bound(kind, f.name) if widget == "number" else None))
    return out


def form_sections(data_choices: dict[str, list[str]],
                  values: dict[str, Any] | None = None) -> list[tuple[str, list[FormField]]]:
    by_name = {ff.name: ff for ff in form_fields(data_choices, values)}
    sections = []
    for title, names in SECTIONS:
        group = [by_name.pop(n) for n in names if n in by_name]
        if group:
            sections.append((title, group))
    if by_name:
        sections.append(("Other", list(by_name.values())))
    return sections
