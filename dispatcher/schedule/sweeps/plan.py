"""Hyperparameter sweeps: a base training spec plus the parameters to vary; each trial is an
ordinary training job in the queue.

    parse_sweep    untrusted definition (form, JSON, YAML) -> SweepPlan, or SpecError naming
                   every bad field; every trial is validated with parse_train_spec first, so a
                   bad sweep queues nothing
    expand         grid (every combination) or random (N samples with a seed) over lists,
                   ranges with a step and log-uniform ranges
    trial_name     `mylora-r16-lr1e-4`: the base LoRA name plus the values that vary
    SweepStore     sweep records in Redis; trials are jobs with a `sweep` field
    tick           what the dispatcher does for sweeps each pass: early stopping decisions
                   (dispatcher.schedule.early_stop) and perplexity jobs for finished trials

Keys (prefix `lf` by default):
  {p}:sweep:{id}              hash: the record (definition, trials as JSON, owner, ...)
  {p}:sweeps                  sorted set of sweep ids by creation time
  {p}:sweeps:active           set of sweeps with trials or evaluations still to end
  {p}:sweep:{id}:decisions    hash "{job}:{rung}" -> early-stopping decision (JSON), set once
  {p}:sweep:{id}:rung:{step}  list of [job, value] in the order trials reached the rung
  {p}:sweep:{id}:scanned      set of ended trials whose rungs have all been read
  {p}:sweep:{id}:evals        hash job -> id of its perplexity job
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dispatcher.jobs.specs import (
    LORA_NAME_RE,
    EvalSpec,
    SpecError,
    TrainSpec,
    check_size,
    from_webui_keys,
    parse_eval_spec,
    parse_train_spec,
)
from dispatcher.jobs.states import TERMINAL, JobState
from dispatcher.jobs.store import PRIORITIES, JobStore
from dispatcher.schedule.early_stop import POLICIES, Decision, Policy, decide, rung_value
from dispatcher.schedule.estimate import job_memory_mb
from dispatcher.settings import DataPaths

log = logging.getLogger("lorafleet.sweeps")

METHODS = ("grid", "random")
MAX_TRIALS = 1000
MAX_RUNGS = 20
# The most characters a sweep definition may take as JSON (its base spec is one spec; its
# value lists are at most MAX_TRIALS short values each): it is stored with the sweep.
MAX_SWEEP_CHARS = 256 * 1024
TOP_KEYS = ("name", "base", "base_job", "parameters", "method", "trials", "seed",
            "max_concurrent", "early_stopping", "evaluate", "priority", "owner")
EARLY_KEYS = ("policy", "rungs", "reduction_factor", "min_trials")
EVAL_KEYS = ("text_file", "stride", "max_length", "precision")
# Parameters a sweep may not vary: the trials' names, and a checkpoint that belongs to one run.
NOT_VARIED = ("lora_name", "resume_from_checkpoint")
# Short forms used in trial names; other parameters use their own name.
ABBREV = {"lora_rank": "r", "learning_rate": "lr", "lora_alpha": "a", "lora_dropout": "do",
          "micro_batch_size": "mbs", "batch_size": "bs", "epochs": "ep", "cutoff_len": "cl",
          "warmup_steps": "wu", "lr_scheduler_type": "sched", "optimizer": "opt",
          "target_modules": "tm", "weight_decay": "wd", "precision": "prec"}
STOPPED_EARLY = "stopped early"

_FIELD_TYPES = {f.name: str(f.type) for f in fields(TrainSpec)}
# Fields whose values can form a numeric range (learning_rate is text holding a number).
_NUMERIC = {n for n, t in _FIELD_TYPES.items() if t in ("int", "float")} | {"learning_rate"}


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
        import hashlib

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
        typ = _FIELD_TYPES[self.name]
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


def parse_domain(name: str, spec: Any, method: str, bad: Callable[[str, str], None]
                 ) -> Domain | None:
    """One entry of `parameters`: a list, {values}, {min, max, step} or {min, max, log: true}
    (with `count` for a grid)."""
    where = f"parameters.{name}"
    if name not in _FIELD_TYPES:
        bad(where, "is not a training parameter")
        return None
    if name in NOT_VARIED:
        bad(where, "cannot be varied (trial names come from the base lora_name)"
            if name == "lora_name" else "cannot be varied")
        return None
    if isinstance(spec, dict) and set(spec) == {"values"}:
        spec = spec["values"]
    if isinstance(spec, list):
        if not spec:
            bad(where, "lists no values")
            return None
        if len(spec) > MAX_TRIALS:
            bad(where, f"lists {len(spec)} values; at most {MAX_TRIALS}")
            return None
        for v in spec:
            if isinstance(v, dict) or (isinstance(v, list) and name != "target_modules"):
                bad(where, f"value {v!r} must be a single value")
                return None
        if name == "learning_rate":  # text in the spec: 0.0003 and "3e-4" name alike
            spec = [fmt_number(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v for v in spec]
        return Domain(name, "list", tuple(spec))
    if not isinstance(spec, dict):
        bad(where, "must be a list of values, {min, max, step} or {min, max, log: true}")
        return None
    unknown = sorted(set(spec) - {"min", "max", "step", "log", "count"})
    if unknown:
        bad(where, f"unknown key(s) {', '.join(unknown)}; use min, max and step, or min, "
                   "max and log (count for a grid)")
        return None
    if name not in _NUMERIC:
        bad(where, "is not a number: give a list of values")
        return None
    lo, hi = _num(spec.get("min")), _num(spec.get("max"))
    ok = True
    for key, x in (("min", lo), ("max", hi)):
        if x is None:
            bad(f"{where}.{key}", f"must be a number, got {spec.get(key)!r}")
            ok = False
    if not ok:
        return None
    if hi < lo:
        bad(where, f"max ({spec['max']}) is less than min ({spec['min']})")
        return None
    is_int = _FIELD_TYPES[name] == "int"
    if spec.get("log") not in (None, False):
        if spec.get("log") is not True:
            bad(f"{where}.log", "must be true or false")
            return None
        if "step" in spec:
            bad(where, "give either step (a range) or log: true (log-uniform), not both")
            return None
        if lo <= 0:
            bad(f"{where}.min", "must be more than 0 for a log-uniform range")
            return None
        count = spec.get("count", 0)
        if (isinstance(count, bool) or not isinstance(count, int) or count < 0 or count == 1
                or count > MAX_TRIALS):
            bad(f"{where}.count", "must be a whole number from 2 to "
                                  f"{MAX_TRIALS} (log-spaced points)")
            return None
        if method == "grid" and not count:
            bad(where, "a log-uniform range is sampled: a grid needs count (how many "
                       "log-spaced points), or use method random")
            return None
        return Domain(name, "log", low=lo, high=hi, count=count)
    step = _num(spec.get("step"))
    if step is None or step <= 0:
        bad(f"{where}.step", f"must be a number more than 0, got {spec.get('step')!r} "
                             "(or use log: true for a log-uniform range)")
        return None
    if is_int and not all(float(x).is_integer() for x in (lo, hi, step)):
        bad(where, f"{name} is a whole number: min, max and step must be whole numbers")
        return None
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > MAX_TRIALS:
        bad(where, f"the range gives {n} values; at most {MAX_TRIALS}")
        return None
    values = [lo + i * step for i in range(n)]
    if is_int:
        vals: list[Any] = [int(round(v)) for v in values]
    elif _FIELD_TYPES[name] == "str":
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


# ---------------------------------------------------------------------------------------------
# the whole definition


@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    spec: dict[str, Any]
    gpu_memory_mb: int = 0
    job: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "job": self.job,
                "gpu_memory_mb": self.gpu_memory_mb}


@dataclass
class SweepPlan:
    """A validated sweep: its settings and every trial it will queue."""

    name: str
    method: str
    seed: int
    samples: int
    max_concurrent: int
    policy: Policy
    metric: str  # eval_loss | loss
    parameters: dict[str, dict[str, Any]]
    base: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    evaluate: dict[str, Any] | None = None  # perplexity job settings (base_model, loras per trial)
    eval_memory_mb: dict[str, int] = field(default_factory=dict)  # per base model

    def preview(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "count": len(self.trials),
                "trials": [t.to_dict() for t in self.trials], "skipped": self.skipped,
                "varied": list(self.parameters), "max_concurrent": self.max_concurrent,
                "early_stopping": self.policy.to_dict(), "metric": self.metric,
                "evaluate": self.evaluate}


def _dedupe_key(spec: dict[str, Any]) -> str:
    s = {k: v for k, v in spec.items() if k != "lora_name"}
    try:
        s["learning_rate"] = float(s["learning_rate"])
    except (KeyError, ValueError):
        pass
    return json.dumps(s, sort_keys=True)


def _shown(value: Any) -> str:
    """A value as a message names it: its first 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_setting(data: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str,
                 bad: Callable[[str, str], None]) -> int:
    v = data.get(key, default)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        bad(where, f"must be a whole number from {lo} to {hi}, got {data.get(key)!r}")
        return default
    return v


def parse_sweep(data: Any, paths: DataPaths,
                job_spec: Callable[[str], dict[str, Any]] | None = None) -> SweepPlan:
    """Validate a sweep definition and every trial it creates; SpecError lists every problem.

    `job_spec(id)` returns a training job's spec, for `base_job` (KeyError if there is none)."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "sweep", "message": "must be an object with base, parameters "
                                                       "and method"}])
    check_size(data, "sweep", MAX_SWEEP_CHARS)
    errors: list[dict[str, str]] = []

    def bad(name: str, message: str) -> None:
        if {"field": name, "message": message} not in errors:
            errors.append({"field": name, "message": message})

    for key in data:
        if key not in TOP_KEYS:
            bad(str(key), f"is not a sweep setting (use {', '.join(TOP_KEYS)})")
    base: dict[str, Any] = {}
    if data.get("base_job"):
        if job_spec is None:
            bad("base_job", "cannot be looked up here")
        else:
            try:
                base = dict(job_spec(str(data["base_job"])))
            except KeyError:
                bad("base_job", f"no training job {data['base_job']}")
    given = data.get("base", {})
    if not isinstance(given, dict):
        bad("base", "must be an object of training parameters")
        given = {}
    base.update(from_webui_keys(given))
    if data.get("base_job"):  # a copied job's checkpoint belongs to that job's run
        base.pop("resume_from_checkpoint", None)

    method = data.get("method", "grid")
    if method not in METHODS:
        bad("method", f"must be one of {', '.join(METHODS)}")
        method = "grid"
    samples, seed = 0, 0
    if method == "random":
        samples = _int_setting(data, "trials", 0, 1, MAX_TRIALS, "trials", bad)
        seed = _int_setting(data, "seed", 0, 0, 2**31 - 1, "seed", bad)
    else:
        for key in ("trials", "seed"):
            if key in data:
                bad(key, "applies to method random only")
    max_concurrent = _int_setting(data, "max_concurrent", 0, 0, 1000, "max_concurrent", bad)

    params_in = data.get("parameters")
    domains: list[Domain] = []
    if not isinstance(params_in, dict) or not params_in:
        bad("parameters", "name at least one parameter to vary, with its values")
    else:
        for name, spec in params_in.items():
            d = parse_domain(str(name), spec, method, bad)
            if d is not None:
                domains.append(d)

    policy, evaluate = _parse_early_stopping(data.get("early_stopping"), bad), None
    if data.get("evaluate") not in (None, {}, ""):
        evaluate = data["evaluate"]
        if not isinstance(evaluate, dict):
            bad("evaluate", "must be an object: {text_file, stride, max_length}")
            evaluate = None
        else:
            for key in evaluate:
                if key not in EVAL_KEYS:
                    bad(f"evaluate.{key}", f"is not an evaluation setting (use "
                                           f"{', '.join(EVAL_KEYS)})")

    prefix = str(base.get("lora_name") or data.get("name") or "").strip()
    name = str(data.get("name") or prefix).strip()
    if not prefix:
        bad("base.lora_name", "is required: the trials are named after it")
    elif not LORA_NAME_RE.match(prefix):
        bad("base.lora_name", f"'{prefix}' may use only letters, digits, '.', '_' and '-'")
    if len(name) > 100:
        bad("name", "must be at most 100 characters")

    combos: list[dict[str, Any]] = []
    if domains and len(domains) == len(params_in or {}) and not any(
            e["field"] in ("method", "trials", "seed") for e in errors):
        total = math.prod(len(d.grid()) for d in domains) if method == "grid" else samples
        if total > MAX_TRIALS:
            bad("parameters", f"the grid has {total} combinations; at most {MAX_TRIALS}")
        else:
            combos = expand(domains, method, samples, seed)

    trials: list[Trial] = []
    skipped: list[dict[str, Any]] = []
    if combos and prefix and LORA_NAME_RE.match(prefix):
        # Problems of the base spec on its own, to tell them from those a trial's values cause
        # with it (cutoff_len 64 against the base's overlap_len 128).
        try:
            parse_train_spec({**base, "lora_name": prefix}, paths)
            base_problems: set[tuple[str, str]] = set()
        except SpecError as e:
            base_problems = {(err["field"], err["message"]) for err in e.errors}
        seen: dict[str, str] = {}
        names: set[str] = set()
        for combo in combos:
            tname = trial_name(prefix, combo)
            spec_in = {**base, **combo, "lora_name": tname}
            try:
                spec = parse_train_spec(spec_in, paths).to_dict()
            except SpecError as e:
                for err in e.errors:
                    f = err["field"]
                    if f in combo:
                        bad(f"parameters.{f}", f"value {_shown(combo[f])}: {err['message']}")
                    elif (f, err["message"]) in base_problems:
                        bad(f"base.{f}", err["message"])
                    else:
                        varied = ", ".join(f"{k}={v!r}" for k, v in combo.items())
                        bad(f"base.{f}", f"{err['message']} (in trial {tname}: {varied})")
                continue
            key = _dedupe_key(spec)
            if key in seen:
                skipped.append({"name": tname, "params": combo, "same_as": seen[key]})
                continue
            base_name, n = tname, 2
            while tname in names:  # two values that read the same in a name
                tname = f"{base_name[:96]}-{n}"
                n += 1
            spec["lora_name"] = tname
            seen[key] = tname
            names.add(tname)
            trials.append(Trial(tname, combo, spec,
                                job_memory_mb("train", spec, paths.models)))

    if not combos and prefix and LORA_NAME_RE.match(prefix):
        # The values could not be expanded: still name every problem of the base spec.
        try:
            parse_train_spec({**base, "lora_name": prefix}, paths)
        except SpecError as e:
            for err in e.errors:
                if err["field"] not in (params_in or {}):
                    bad(f"base.{err['field']}", err["message"])

    metric = "loss"
    if trials:
        with_eval = {bool(t.spec.get("eval_dataset")) for t in trials}
        if len(with_eval) > 1 and policy.active:
            bad("parameters.eval_dataset", "early stopping compares one loss: every trial "
                                           "needs an evaluation set, or none")
        elif with_eval == {True}:
            metric = "eval_loss"
            if policy.active:
                for t in trials:
                    steps = t.spec["eval_steps"]
                    off = [r for r in policy.rungs if r % steps]
                    if off:
                        bad("early_stopping.rungs",
                            f"step {off[0]} is not a multiple of eval_steps ({steps}) of trial "
                            f"{t.name}: rungs compare evaluation losses, so put them where "
                            "evaluations happen")
                        break

    eval_template, eval_memory = None, {}
    if evaluate is not None and not any(e["field"].startswith("evaluate") for e in errors):
        eval_template = {k: evaluate[k] for k in EVAL_KEYS if k in evaluate}
        models = sorted({t.spec["base_model"] for t in trials}) or [str(base.get("base_model", ""))]
        for model in models:
            try:
                es = parse_eval_spec({**eval_template, "base_model": model, "loras": []}, paths)
            except SpecError as e:
                for err in e.errors:
                    bad(f"evaluate.{err['field']}", err["message"])
                break
            eval_template.update(text_file=es.text_file, stride=es.stride,
                                 max_length=es.max_length, precision=es.precision)
            eval_memory[model] = job_memory_mb("evaluate", es.to_dict(), paths.models)

    if combos and not trials and not errors:
        bad("parameters", "the sweep creates no trials")
    if errors:
        raise SpecError(errors)
    return SweepPlan(name=name, method=method, seed=seed, samples=samples,
                     max_concurrent=max_concurrent, policy=policy, metric=metric,
                     parameters={d.name: d.describe() for d in domains}, base=base,
                     trials=trials, skipped=skipped, evaluate=eval_template,
                     eval_memory_mb=eval_memory)


def _parse_early_stopping(data: Any, bad: Callable[[str, str], None]) -> Policy:
    if data in (None, "", "none", {}):
        return Policy()
    if isinstance(data, str):
        data = {"policy": data}
    if not isinstance(data, dict):
        bad("early_stopping", "must be an object: {policy, rungs, reduction_factor, min_trials}")
        return Policy()
    for key in data:
        if key not in EARLY_KEYS:
            bad(f"early_stopping.{key}", f"is not an early-stopping setting (use "
                                         f"{', '.join(EARLY_KEYS)})")
    kind = data.get("policy", "asha")
    if kind not in POLICIES:
        bad("early_stopping.policy", f"must be one of {', '.join(POLICIES)}")
        return Policy()
    rungs_in = data.get("rungs", [])
    if isinstance(rungs_in, str):
        rungs_in = [r for r in re.split(r"[,\s]+", rungs_in) if r]
    rungs: list[int] = []
    if not isinstance(rungs_in, list):
        bad("early_stopping.rungs", "must be a list of optimizer steps, like [10, 20, 40]")
    else:
        for r in rungs_in:
            try:
                if isinstance(r, bool) or float(r) != int(float(r)) or int(float(r)) < 1:
                    raise ValueError
                rungs.append(int(float(r)))
            except (TypeError, ValueError):
                bad("early_stopping.rungs", f"{r!r} is not a step number (a whole number of "
                                            "at least 1)")
                rungs = []
                break
        if rungs and rungs != sorted(set(rungs)):
            bad("early_stopping.rungs", "must be increasing steps, each once")
        elif len(rungs) > MAX_RUNGS:
            bad("early_stopping.rungs", f"at most {MAX_RUNGS} rungs")
        elif kind != "none" and not rungs and isinstance(rungs_in, list) and not rungs_in:
            bad("early_stopping.rungs", "name the steps where trials are compared, like "
                                        "[10, 20, 40]")
    eta = _int_setting(data, "reduction_factor", 3, 2, 100, "early_stopping.reduction_factor",
                       bad)
    min_trials = _int_setting(data, "min_trials", 3, 1, 1000, "early_stopping.min_trials", bad)
    return Policy(kind=kind, rungs=tuple(rungs), reduction_factor=eta, min_trials=min_trials)


# ---------------------------------------------------------------------------------------------
# Redis


class SweepNotFound(KeyError):
    pass


_SWEEP_JSON = ("trials", "skipped", "parameters", "base", "early_stopping", "evaluate",
               "eval_memory_mb")
_SWEEP_NUM = ("created", "finished", "cancelled", "max_concurrent", "seed", "samples")


def is_stopped_early(rec: dict[str, Any]) -> bool:
    return rec.get("state") == JobState.CANCELLED.value and str(
        rec.get("reason", "")).startswith(STOPPED_EARLY)


class SweepStore:
    def __init__(self, store: JobStore):
        self.store = store
        self.r = store.r
        self.p = store.p
        self.clock = store.clock

    def key(self, sweep_id: str, part: str = "") -> str:
        return f"{self.p}:sweep:{sweep_id}" + (f":{part}" if part else "")

    @property
    def index_key(self) -> str:
        return f"{self.p}:sweeps"

    @property
    def active_key(self) -> str:
        return f"{self.p}:sweeps:active"

    def create(self, plan: SweepPlan, owner: str = "local", priority: str = "normal") -> str:
        """Record the sweep, then queue its trials (each an ordinary training job)."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        sweep_id = "s" + uuid.uuid4().hex[:11]
        now = self.clock()
        record = {
            "id": sweep_id, "name": plan.name, "owner": owner, "priority": priority,
            "created": now, "method": plan.method, "seed": plan.seed, "samples": plan.samples,
            "max_concurrent": plan.max_concurrent, "metric": plan.metric,
            "parameters": json.dumps(plan.parameters), "base": json.dumps(plan.base),
            "early_stopping": json.dumps(plan.policy.to_dict()),
            "evaluate": json.dumps(plan.evaluate), "eval_memory_mb": json.dumps(plan.eval_memory_mb),
            "skipped": json.dumps(plan.skipped), "trials": "[]", "finished": "", "cancelled": "",
        }
        with self.r.pipeline() as pipe:
            pipe.hset(self.key(sweep_id), mapping=record)
            pipe.zadd(self.index_key, {sweep_id: now})
            pipe.sadd(self.active_key, sweep_id)
            pipe.execute()
        for t in plan.trials:
            t.job = self.store.create("train", t.spec, owner, priority,
                                      gpu_memory_mb=t.gpu_memory_mb,
                                      fields={"sweep": sweep_id,
                                              "sweep_cap": plan.max_concurrent})
        self.r.hset(self.key(sweep_id), "trials", json.dumps([t.to_dict() for t in plan.trials]))
        return sweep_id

    def get(self, sweep_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.key(sweep_id))
        if not raw:
            raise SweepNotFound(sweep_id)
        rec: dict[str, Any] = dict(raw)
        for k in _SWEEP_JSON:
            rec[k] = json.loads(rec[k]) if rec.get(k) else None
        for k in _SWEEP_NUM:
            if rec.get(k) not in (None, ""):
                v = float(rec[k])
                rec[k] = int(v) if k in ("max_concurrent", "seed", "samples") else v
            else:
                rec[k] = None
        rec["trials"] = rec["trials"] or []
        return rec

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        ids = self.r.zrevrange(self.index_key, 0, limit - 1)
        out = []
        for i in ids:
            try:
                out.append(self.get(i))
            except SweepNotFound:
                pass
        return out

    def policy(self, rec: dict[str, Any]) -> Policy:
        es = rec.get("early_stopping") or {}
        return Policy(kind=es.get("policy", "none"), rungs=tuple(es.get("rungs", ())),
                      reduction_factor=int(es.get("reduction_factor", 3)),
                      min_trials=int(es.get("min_trials", 3)))

    def trial_jobs(self, rec: dict[str, Any]) -> list[dict[str, Any]]:
        """The trials' job records, in trial order (a deleted job is left out)."""
        return self.store.get_many(t["job"] for t in rec["trials"])

    def evals(self, sweep_id: str) -> dict[str, str]:
        return self.r.hgetall(self.key(sweep_id, "evals"))

    def decisions(self, sweep_id: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.key(sweep_id, "decisions")).items()}

    def rung_values(self, sweep_id: str, rung: int) -> list[tuple[str, float]]:
        return [tuple(json.loads(x)) for x in self.r.lrange(self.key(sweep_id, f"rung:{rung}"),
                                                            0, -1)]

    def cancel(self, sweep_id: str, reason: str = "cancelled with its sweep") -> dict[str, Any]:
        """Cancel every trial (and perplexity job) that has not ended; queue no more."""
        rec = self.get(sweep_id)
        self.r.hset(self.key(sweep_id), "cancelled", self.clock())
        self.announce(sweep_id, "cancelled")
        jobs = [t["job"] for t in rec["trials"]] + list(self.evals(sweep_id).values())
        for job_id in jobs:
            try:
                job = self.store.get(job_id)
                if JobState(job["state"]).terminal:
                    continue
                self.store.cancel(job_id, reason, stop_reason=f"stopped: {reason}")
            except Exception:  # it ended (or vanished) meanwhile
                log.exception("sweep %s: could not cancel job %s", sweep_id, job_id)
        return self.get(sweep_id)

    # the dispatcher's pass -------------------------------------------------------------------
    def tick(self, active: list[dict[str, Any]] | None = None) -> None:
        """One pass over the sweeps that may have work: with `active` (the running and
        assigned jobs), only the sweeps one of whose jobs changed state since the last pass
        (JobStore.transition marks them) or is on a worker (early stopping follows its
        steps); without, every unfinished sweep. A sweep of 1,000 queued trials costs nothing
        until one of them moves."""
        with self.r.pipeline() as pipe:  # take the marks: a change from now on marks again
            pipe.smembers(self.store.dirty_sweeps_key)
            pipe.delete(self.store.dirty_sweeps_key)
            pipe.smembers(self.active_key)
            dirty, _, unfinished = pipe.execute()
        if active is not None:
            wanted = set(dirty) | {j.get("sweep") or j.get("sweep_eval") for j in active}
            unfinished &= wanted
        for sweep_id in sorted(unfinished):
            try:
                self._tick_one(sweep_id)
            except SweepNotFound:
                self.r.srem(self.active_key, sweep_id)

    def _tick_one(self, sweep_id: str) -> None:
        rec = self.get(sweep_id)
        jobs = self.trial_jobs(rec)
        policy = self.policy(rec)
        if policy.active and not rec["cancelled"]:
            self._early_stopping(rec, jobs, policy)
        evals = self.evals(sweep_id)
        if rec.get("evaluate") and not rec["cancelled"]:
            evals = self._queue_evaluations(rec, jobs, evals)
        ended = all(JobState(j["state"]).terminal for j in jobs)
        if ended and evals:
            with self.r.pipeline() as pipe:
                for e in evals.values():
                    pipe.hget(self.store.key(e), "state")
                states = pipe.execute()
            ended = all(s is None or JobState(s).terminal for s in states)
        if ended and rec["trials"]:
            self.r.hset(self.key(sweep_id), "finished", self.clock())
            self.r.srem(self.active_key, sweep_id)
            self.announce(sweep_id, "finished")

    def announce(self, sweep_id: str, change: str) -> None:
        """Tell open Sweep pages that the sweep itself changed (cancelled, finished): no job
        event follows a sweep's own end, and a page that re-reads only on job events would
        keep showing the state it read last. Announced on the live channel as an event of
        type `sweep` (not a job's: it goes into no job's stream)."""
        event = {"type": "sweep", "sweep": sweep_id, "change": change, "time": self.clock()}
        self.r.publish(self.store.events.channel,
                       json.dumps({"job": None, "sweep": sweep_id, "event": event}))

    def _early_stopping(self, rec: dict[str, Any], jobs: list[dict[str, Any]],
                        policy: Policy) -> None:
        sid = rec["id"]
        decisions_key = self.key(sid, "decisions")
        decided = {k: json.loads(v) for k, v in self.r.hgetall(decisions_key).items()}
        scanned = self.r.smembers(self.key(sid, "scanned"))
        metric = rec.get("metric") or "loss"
        for job in jobs:
            jid, state = job["id"], JobState(job["state"])
            ended = state.terminal
            if (state != JobState.RUNNING and not ended) or jid in scanned:
                continue
            if any(decided.get(f"{jid}:{r}", {}).get("stop") for r in policy.rungs):
                if ended:
                    self.r.sadd(self.key(sid, "scanned"), jid)
                continue
            step = int(job.get("step") or 0)
            events: list[dict[str, Any]] | None = None
            for rung in policy.rungs:
                if f"{jid}:{rung}" in decided:
                    continue
                if not ended and step < rung:
                    break
                if events is None:
                    events = [e for _, e in self.store.events.history(jid)]
                value = rung_value(events, rung, policy.previous_rung(rung), metric)
                if value is None:
                    break
                earlier = [v for _, v in self.rung_values(sid, rung)]
                if ended:  # it ended before it was judged here: its value still counts
                    d = Decision(False, f"ended before the check at step {rung}", value, rung)
                else:
                    d = decide(policy, rung, value, earlier, metric)
                record = {"rung": rung, "value": value, "stop": d.stop, "reason": d.reason,
                          "rank": d.rank, "compared": d.compared, "time": self.clock()}
                if not self.r.hsetnx(decisions_key, f"{jid}:{rung}", json.dumps(record)):
                    continue  # decided already (by another dispatcher): never decide twice
                self.r.rpush(self.key(sid, f"rung:{rung}"), json.dumps([jid, value]))
                if d.stop:
                    self.store.request_stop(jid, reason=d.reason)
                    self.store.events.append(jid, "log", line=f"sweep {sid}: {d.reason}")
                    break
            if ended:
                self.r.sadd(self.key(sid, "scanned"), jid)

    def _queue_evaluations(self, rec: dict[str, Any], jobs: list[dict[str, Any]],
                           evals: dict[str, str]) -> dict[str, str]:
        """A perplexity job for each trial that succeeded, once."""
        template = rec["evaluate"]
        for job in jobs:
            if job["state"] != JobState.SUCCEEDED.value or job["id"] in evals:
                continue
            spec_full = job.get("spec") or {}
            spec = {**{f.name: f.default for f in fields(EvalSpec) if f.name != "loras"},
                    **template, "base_model": spec_full.get("base_model", ""),
                    "loras": [spec_full.get("lora_name", "")],
                    "comment": f"sweep {rec['name']} ({rec['id']}): {job.get('name', '')}"}
            # Claim the slot first, so two passes never queue two evaluations of one trial.
            if not self.r.hsetnx(self.key(rec["id"], "evals"), job["id"], "pending"):
                continue
            need = int((rec.get("eval_memory_mb") or {}).get(spec["base_model"], 0))
            eval_id = self.store.create("evaluate", spec, rec.get("owner") or "local",
                                        rec.get("priority") or "normal", gpu_memory_mb=need,
                                        fields={"sweep_eval": rec["id"]})
            self.r.hset(self.key(rec["id"], "evals"), job["id"], eval_id)
            evals[job["id"]] = eval_id
        return {k: v for k, v in evals.items() if v != "pending"}


def tick(store: JobStore, active: list[dict[str, Any]] | None = None) -> None:
    """The dispatcher's pass over sweeps that still have work (see SweepStore.tick)."""
    SweepStore(store).tick(active)


# ---------------------------------------------------------------------------------------------
# reading a sweep's results


def trial_rows(sweeps: SweepStore, rec: dict[str, Any], now: float | None = None,
               with_curves: bool = False) -> list[dict[str, Any]]:
    """One row per trial for the Sweep page, the API and the CSV: varied values, state
    ("stopped early" counted apart from cancelled), final training loss, best eval loss,
    perplexity (when evaluated), tokens/s and GPU time (seconds on a worker)."""
    now = time.time() if now is None else now
    store = sweeps.store
    jobs = {j["id"]: j for j in sweeps.trial_jobs(rec)}
    evals = sweeps.evals(rec["id"])
    eval_jobs: dict[str, dict[str, Any]] = {}
    for trial_job, eval_id in evals.items():
        try:
            eval_jobs[trial_job] = store.get(eval_id)
        except KeyError:
            pass
    rows = []
    for t in rec["trials"]:
        job = jobs.get(t["job"])
        if job is None:
            continue
        events = [e for _, e in store.events.history(t["job"])]
        train = [(int(e["step"]), float(e["loss"])) for e in events
                 if e.get("type") == "train" and e.get("loss") is not None]
        ev = [(int(e["step"]), float(e["eval_loss"])) for e in events
              if e.get("type") == "eval" and e.get("eval_loss") is not None]
        result = job.get("result") or {}
        tps = result.get("tokens_per_s")
        if tps in (None, ""):
            tps = next((e.get("tokens_per_s") for e in reversed(events)
                        if e.get("type") == "train" and e.get("tokens_per_s") is not None), None)
        final = result.get("final_loss")
        if final in (None, ""):
            final = train[-1][1] if train else job.get("loss")
        started = job.get("started")
        gpu_time = None
        if started not in (None, ""):
            gpu_time = round(float(job.get("finished") or now) - float(started), 1)
        ej = eval_jobs.get(t["job"])
        perplexity = (ej.get("result") or {}).get("perplexity") if ej else None
        state = job["state"]
        row = {
            "id": t["job"], "name": t["name"], "params": t["params"], "state": state,
            "display_state": STOPPED_EARLY if is_stopped_early(job) else state,
            "reason": job.get("reason", ""), "step": job.get("step"),
            "total_steps": job.get("total_steps"), "final_loss": final,
            "best_eval_loss": min(v for _, v in ev) if ev else None,
            "perplexity": perplexity, "tokens_per_s": tps, "gpu_time_s": gpu_time,
            "eval_job": ej["id"] if ej else None, "eval_state": ej["state"] if ej else None,
            "owner": job.get("owner"),
        }
        if with_curves:
            row["curve"] = train
            row["eval_curve"] = ev
        rows.append(row)
    return rows


def best_trial(rows: list[dict[str, Any]]) -> str | None:
    """The succeeded trial with the lowest best eval loss (the lowest final training loss when
    no trial was evaluated during training)."""
    done = [r for r in rows if r["state"] == JobState.SUCCEEDED.value]
    key = "best_eval_loss" if any(r["best_eval_loss"] is not None for r in done) else "final_loss"
    scored = [r for r in done if r.get(key) is not None]
    return min(scored, key=lambda r: float(r[key]))["id"] if scored else None


def summary(rec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of the trials by outcome and the sweep's own state."""
    counts = {"trials": len(rows), "succeeded": 0, "failed": 0, "stopped_early": 0,
              "cancelled": 0, "running": 0, "queued": 0}
    for r in rows:
        s = r["state"]
        if r["display_state"] == STOPPED_EARLY:
            counts["stopped_early"] += 1
        elif s in ("succeeded", "failed", "cancelled"):
            counts[s] += 1
        elif s in ("assigned", "running"):
            counts["running"] += 1
        else:
            counts["queued"] += 1
    ended = all(JobState(r["state"]) in TERMINAL for r in rows)
    if rec.get("finished"):
        state = "cancelled" if rec.get("cancelled") else "finished"
    elif rec.get("cancelled"):
        state = "cancelling" if not ended else "cancelled"
    else:
        state = "finished" if ended and not rec.get("evaluate") else (
            "evaluating" if ended else "running")
    return {**counts, "state": state}
