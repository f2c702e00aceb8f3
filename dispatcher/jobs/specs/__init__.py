"""Job specs: one typed object per job kind, built and validated in one place.

Import from here, not from the modules (their split may change):
  fields.py        choices, name patterns, and the builder from untrusted data
  bounds.py        upper bounds of numbers and texts, and of a whole spec
  names.py         THE data-name resolver (resolve_data_name, find_format, list_choices)
  train.py         TrainSpec and its training_parameters.json, both ways
  train_checks.py  parse_train_spec: small checks adding to one Problems collector
  evaluate.py      EvalSpec and GenerateSpec with their parsers
  webui.py         text-generation-webui's keys
  kinds.py         the spec class and parser of each job kind
"""

from __future__ import annotations

from dispatcher.jobs.problems import Problems, SpecError
from dispatcher.jobs.specs.bounds import (
    MAX_GPU_MEMORY_MB,
    MAX_SEED,
    MAX_SPEC_CHARS,
    MAX_TOKENS,
    TEXT_BOUNDS,
    UPPER_BOUNDS,
    check_size,
    upper_bound,
)
from dispatcher.jobs.specs.evaluate import (
    EvalSpec,
    GenerateSpec,
    parse_eval_spec,
    parse_generate_spec,
)
from dispatcher.jobs.specs.fields import (
    DATASET_EXTS,
    FORMAT_EXTS,
    LORA_NAME_RE,
    OPTIMIZERS,
    PRECISIONS,
    PROJECTIONS,
    QUANTISED,
    RAW_TEXT_EXTS,
    SCHEDULERS,
)
from dispatcher.jobs.specs.kinds import SPEC_CLASSES, SPEC_PARSERS, parse_spec, spec_from_dict
from dispatcher.jobs.specs.names import (
    SHIPPED_FORMATS,
    find_format,
    list_choices,
    lora_folder_problem,
    resolve_data_name,
)
from dispatcher.jobs.specs.train import (
    FIELD_DOCS,
    TrainSpec,
    default_spec,
    from_webui_keys,
    lora_parameters,
    spec_from_training_parameters,
)
from dispatcher.jobs.specs.train_checks import parse_train_spec
from dispatcher.jobs.specs.webui import LORAFLEET_FILES, WEBUI_PARAMETERS

__all__ = [
    "DATASET_EXTS", "FIELD_DOCS", "FORMAT_EXTS", "LORAFLEET_FILES", "LORA_NAME_RE",
    "MAX_GPU_MEMORY_MB", "MAX_SEED", "MAX_SPEC_CHARS", "MAX_TOKENS", "OPTIMIZERS", "PRECISIONS",
    "PROJECTIONS", "QUANTISED", "RAW_TEXT_EXTS", "SCHEDULERS", "SHIPPED_FORMATS", "SPEC_CLASSES",
    "SPEC_PARSERS", "TEXT_BOUNDS", "UPPER_BOUNDS", "WEBUI_PARAMETERS", "EvalSpec",
    "GenerateSpec", "Problems", "SpecError", "TrainSpec", "check_size", "default_spec",
    "find_format", "from_webui_keys", "list_choices", "lora_folder_problem", "lora_parameters",
    "parse_eval_spec", "parse_generate_spec", "parse_spec", "parse_train_spec",
    "resolve_data_name", "spec_from_dict", "spec_from_training_parameters", "upper_bound",
]
