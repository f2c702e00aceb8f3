"""The values a sweep varies: one `Domain` per parameter, parsed from its definition, expanded
into the trials' values (grid or random), and the short trial names those values give.

    parse_domain   one entry of `parameters`: a list, {values}, {min, max, step} or
                   {min, max, log: true} (with `count` for a grid)
    expand         grid (every combination) or random (N samples with a seed)
    trial_name     `mylora-r16-lr1e-4`: the base LoRA name plus the values that vary
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, fields
from typing import Any

from dispatcher.jobs.problems import Problems
from dispatcher.jobs.specs import TrainSpec

MAX_TRIALS = 1000
# Parameters a sweep may not vary: the trials' names, and a checkpoint that belongs to one run.
NOT_VARIED = ("lora_name", "resume_from_checkpoint")
# Short forms used in trial names; other parameters use their own name.
ABBREV = {"lora_rank": "r", "learning_rate": "lr", "lora_alpha": "a", "lora_dropout": "do",
          "micro_batch_size": "mbs", "batch_size": "bs", "epochs": "ep", "cutoff_len": "cl",
          "warmup_steps": "wu", "lr_scheduler_type": "sched", "optimizer": "opt",
          "target_modules": "tm", "weight_decay": "wd", "precision": "prec"}
RANGE_KEYS = {"min", "max", "step", "log", "count"}

FIELD_TYPES = {f.name: str(f.type) for f in fields(TrainSpec)}
# Fields whose values can form a numeric range (learning_rate is text holding a number).
NUMERIC = {n for n, t in FIELD_TYPES.items() if t in ("int", "float")} | {"learning_rate"}


# ---------------------------------------------------------------------------------------------
# values and names


def fmt_number(x: float) -> str:
    """A short, exact-enough text for a number: 16, 0.05, 1e-4, 2.5e-5."""
    if isinstance(x, bool):
        return "1" if x else "0"
    if float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e6):
        mant, exp = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{round_sig(x, 4):g}"


def round_sig(x: float, digits: int = 3) -> float:
    """`x` rounded to `digits` significant digits (sampled values stay readable in names)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _token(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return fmt_number(value)
    if isinstance(value, list):
        return ".".join(_token(v) for v in value)
    text = str(value)
    try:  # learning_rate and friends given as text: "0.0001" names like 1e-4
        return fmt_number(float(text))
    except ValueError:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def trial_name(prefix: str, params: dict[str, Any]) -> str:
    """The base LoRA name plus each varied value: `mylora-r16-lr1e-4`. Text values get a `_`
    between the short name and the value (`mylora-opt_sgd`). Names longer than a LoRA name may
    be are cut, with a hash of the values so they stay distinct."""
    parts = [prefix]
    for name, value in params.items():
        short = ABBREV.get(name, name)
        tok = _token(value)
        numeric = isinstance(value, (int, float)) or re.fullmatch(r"[0-9.e+-]+", tok)
        parts.append(f"{short}{tok}" if numeric else f"{short}_{tok}")
    out = "-".join(parts)
    if len(out) > 100:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        out = f"{out[:91]}-{digest}"
    return out


# ---------------------------------------------------------------------------------------------
# parameter domains


@dataclass(frozen=True)
class Domain:
    """The values one parameter takes: a finite list, or a log-uniform range (sampled)."""

    name: str
    kind: str  # list | range | log
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    count: int = 0  # log: points of a grid (log-spaced, both ends included); 0 = random only

    def grid(self) -> list[Any]:
        if self.kind == "log":
            n = self.count
            lo, hi = math.log(self.low), math.log(self.high)
            return [self._cast(round_sig(math.exp(lo + (hi - lo) * i / (n - 1)), 3))
                    for i in range(n)]
        return list(self.values)

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "log":
            return self._cast(round_sig(math.exp(rng.uniform(math.log(self.low),
                                                             math.log(self.high))), 3))
        return self.values[rng.randrange(len(self.values))]

    def _cast(self, x: float) -> Any:
        typ = FIELD_TYPES[self.name]
        if typ == "int":
            return int(round(x))
        if typ == "str":  # learning_rate
            return fmt_number(x)
        return x

    def describe(self) -> dict[str, Any]:
        if self.kind == "log":
            return {"min": self.low, "max": self.high, "log": True,
                    **({"count": self.count} if self.count else {})}
        return {"values": list(self.values)}


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def parse_domain(name: str, spec: Any, method: str, problems: Problems) -> Domain | None:
    """One entry of `parameters`: a list, {values}, {min, max, step} or {min, max, log: true}
    (with `count` for a grid). Each problem goes to `problems`; None when there was one."""
    where = f"parameters.{name}"
    if not _may_vary(name, where, problems):
        return None
    if isinstance(spec, dict) and set(spec) == {"values"}:
        spec = spec["values"]
    if isinstance(spec, list):
        return _list_domain(name, spec, where, problems)
    if not isinstance(spec, dict):
        problems.add(where, "must be a list of values, {min, max, step} or {min, max, log: true}")
        return None
    bounds = _range_bounds(name, spec, where, problems)
    if bounds is None:
        return None
    if spec.get("log") not in (None, False):
        return _log_domain(name, spec, bounds, method, where, problems)
    return _step_domain(name, spec, bounds, where, problems)


def _may_vary(name: str, where: str, problems: Problems) -> bool:
    if name not in FIELD_TYPES:
        problems.add(where, "is not a training parameter")
        return False
    if name in NOT_VARIED:
        problems.add(where, "cannot be varied (trial names come from the base lora_name)"
                     if name == "lora_name" else "cannot be varied")
        return False
    return True


def _list_domain(name: str, values: list[Any], where: str, problems: Problems) -> Domain | None:
    if not values:
        problems.add(where, "lists no values")
        return None
    if len(values) > MAX_TRIALS:
        problems.add(where, f"lists {len(values)} values; at most {MAX_TRIALS}")
        return None
    for v in values:
        if isinstance(v, dict) or (isinstance(v, list) and name != "target_modules"):
            problems.add(where, f"value {v!r} must be a single value")
            return None
    if name == "learning_rate":  # text in the spec: 0.0003 and "3e-4" name alike
        values = [fmt_number(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                  else v for v in values]
    return Domain(name, "list", tuple(values))


def _range_bounds(name: str, spec: dict[str, Any], where: str, problems: Problems
                  ) -> tuple[float, float] | None:
    """(min, max) of a range, checked: known keys, a numeric parameter, min <= max."""
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        problems.add(where, f"unknown key(s) {', '.join(unknown)}; use min, max and step, or "
                            "min, max and log (count for a grid)")
        return None
    if name not in NUMERIC:
        problems.add(where, "is not a number: give a list of values")
        return None
    lo, hi = _num(spec.get("min")), _num(spec.get("max"))
    for key, x in (("min", lo), ("max", hi)):
        if x is None:
            problems.add(f"{where}.{key}", f"must be a number, got {spec.get(key)!r}")
    if lo is None or hi is None:
        return None
    if hi < lo:
        problems.add(where, f"max ({spec['max']}) is less than min ({spec['min']})")
        return None
    return lo, hi


def _log_domain(name: str, spec: dict[str, Any], bounds: tuple[float, float], method: str,
                where: str, problems: Problems) -> Domain | None:
    lo, hi = bounds
    if spec.get("log") is not True:
        problems.add(f"{where}.log", "must be true or false")
        return None
    if "step" in spec:
        problems.add(where, "give either step (a range) or log: true (log-uniform), not both")
        return None
    if lo <= 0:
        problems.add(f"{where}.min", "must be more than 0 for a log-uniform range")
        return None
    count = spec.get("count", 0)
    if (isinstance(count, bool) or not isinstance(count, int) or count < 0 or count == 1
            or count > MAX_TRIALS):
        problems.add(f"{where}.count",
                     f"must be a whole number from 2 to {MAX_TRIALS} (log-spaced points)")
        return None
    if method == "grid" and not count:
        problems.add(where, "a log-uniform range is sampled: a grid needs count (how many "
                            "log-spaced points), or use method random")
        return None
    return Domain(name, "log", low=lo, high=hi, count=count)


def _step_domain(name: str, spec: dict[str, Any], bounds: tuple[float, float], where: str,
                 problems: Problems) -> Domain | None:
    lo, hi = bounds
    step = _num(spec.get("step"))
    if step is None or step <= 0:
        problems.add(f"{where}.step", f"must be a number more than 0, got {spec.get('step')!r} "
                                      "(or use log: true for a log-uniform range)")
        return None
    typ = FIELD_TYPES[name]
    if typ == "int" and not all(float(x).is_integer() for x in (lo, hi, step)):
        problems.add(where, f"{name} is a whole number: min, max and step must be whole numbers")
        return None
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > MAX_TRIALS:
        problems.add(where, f"the range gives {n} values; at most {MAX_TRIALS}")
        return None
    values = [lo + i * step for i in range(n)]
    if typ == "int":
        vals: list[Any] = [int(round(v)) for v in values]
    elif typ == "str":
        vals = [fmt_number(float(f"{v:.12g}")) for v in values]
    else:
        vals = [float(f"{v:.12g}") for v in values]
    return Domain(name, "range", tuple(vals))


def expand(domains: list[Domain], method: str, trials: int = 0, seed: int = 0
           ) -> list[dict[str, Any]]:
    """The varied values of each trial, in order: for a grid, every combination with the first
    parameter changing slowest; for random, `trials` draws from random.Random(seed), each
    parameter in the order given (duplicates included: parse_sweep skips them)."""
    if method == "grid":
        names = [d.name for d in domains]
        return [dict(zip(names, combo, strict=True))
                for combo in itertools.product(*(d.grid() for d in domains))]
    rng = random.Random(seed)
    return [{d.name: d.sample(rng) for d in domains} for _ in range(trials)]
