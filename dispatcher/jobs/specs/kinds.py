"""Every job kind's spec class and parser, by kind name (train, evaluate, generate)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dispatcher.jobs.problems import SpecError
from dispatcher.jobs.specs.evaluate import (
    EvalSpec,
    GenerateSpec,
    parse_eval_spec,
    parse_generate_spec,
)
from dispatcher.jobs.specs.train import TrainSpec
from dispatcher.jobs.specs.train_checks import parse_train_spec
from dispatcher.settings import DataPaths

SPEC_PARSERS = {"train": parse_train_spec, "evaluate": parse_eval_spec,
                "generate": parse_generate_spec}
SPEC_CLASSES = {"train": TrainSpec, "evaluate": EvalSpec, "generate": GenerateSpec}


def parse_spec(kind: str, data: Any, paths: DataPaths) -> TrainSpec | EvalSpec | GenerateSpec:
    """Validate a spec of any job kind (train, evaluate, generate)."""
    if kind not in SPEC_PARSERS:
        raise SpecError([{"field": "kind", "message": f"must be one of {', '.join(SPEC_PARSERS)}"}])
    return SPEC_PARSERS[kind](data, paths)


def spec_from_dict(data: dict[str, Any], kind: str = "train") -> Any:
    """Rebuild an already-validated spec (from a job record); no checks against the disk."""
    cls = SPEC_CLASSES[kind]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})
