"""The vocabulary every job spec shares: the choices a field may take, the name patterns, and
the one way an untrusted mapping becomes a spec object (unknown keys and wrong types are
problems, never exceptions, so a request is refused once with all of them)."""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, field, fields
from typing import Any

from dispatcher.jobs.precisions import QUANTISED
from dispatcher.jobs.problems import Problems

SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
              "polynomial", "inverse_sqrt")
# How a quantised model checkpoints its layers: every one, or as many as memory needs.
CHECKPOINTING = ("all", "auto")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit",
              "paged_adamw_8bit", "sgd", "adagrad")
PRECISIONS = ("auto", *QUANTISED, "bf16", "fp16", "fp32")
# Short projection names; the engine maps them onto each architecture's module names.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RESUME_RE = re.compile(r"^(latest|checkpoint-[0-9]{1,18})$")
DATASET_EXTS = (".json", ".jsonl")
RAW_TEXT_EXTS = (".txt",)
FORMAT_EXTS = (".json",)


def spec_field(default: Any, help: str, **kw: Any) -> Any:
    """A spec field with its one-line help (shown by the form, the API and the CLI)."""
    return field(default=default, metadata={"help": help, **kw})


def defaults(cls: type) -> dict[str, Any]:
    """Every field of the spec class `cls` with its default value."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            for f in fields(cls)}


def check_precision(precision: str, problems: Problems) -> None:
    if precision not in PRECISIONS:
        problems.add("precision", f"must be one of {', '.join(PRECISIONS)}")


_WANT = {"int": "a whole number", "float": "a number", "bool": "true or false",
         "str": "text", "list[str]": "a list of names"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off", ""):
        return False
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(str(value).strip()) if isinstance(value, str) else int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    v = float(value)
    if not math.isfinite(v):
        raise ValueError
    return v


def _to_str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError
    return str(value)


def _to_names(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError
    return value


_CONVERT = {"bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str,
            "list[str]": _to_names}


def coerce(value: Any, typ: str, name: str, problems: Problems) -> Any:
    """Turn form/CLI text into the field's type; add a problem (and return None) instead of
    raising."""
    try:
        return _CONVERT[typ](value)
    except (TypeError, ValueError):
        problems.add(name, f"must be {_WANT[typ]}, got {value!r}")
        return None


def build(cls: type, data: dict[str, Any], problems: Problems, what: str) -> Any:
    """An instance of the spec class `cls` from untrusted `data`: unknown keys and values of the
    wrong type are added to `problems`; the defaults stand in for them."""
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            problems.add(str(key), f"is not a known {what}")
    values = defaults(cls)
    for name, f in known.items():
        if name in data:
            v = coerce(data[name], str(f.type), name, problems)
            if v is not None:
                values[name] = v
    return cls(**values)
