"""A sweep definition (form, JSON, YAML) -> a validated `SweepPlan` with every trial it will
queue, or SpecError naming every bad field.

`parse_sweep` runs small checks in a fixed order, each adding what it finds to one problems
collector; every trial is validated with parse_train_spec first, so a bad sweep queues
nothing. The order of the checks is the order of the messages a refused sweep shows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dispatcher.jobs.problems import EMPTY_KEY, Problems
from dispatcher.jobs.specs import (
    LORA_NAME_RE,
    EvalSpec,
    SpecError,
    check_size,
    from_webui_keys,
    parse_eval_spec,
    parse_train_spec,
)
from dispatcher.schedule.early_stop import POLICIES, Policy
from dispatcher.schedule.estimate import base_memory_mb, job_memory_mb, pack_lane_mb
from dispatcher.schedule.sweeps.domains import MAX_TRIALS, Domain, expand, parse_domain, trial_name
from dispatcher.schedule.sweeps.packs import MAX_PACK
from dispatcher.settings import DataPaths

METHODS = ("grid", "random")
MAX_RUNGS = 20
# The most characters a sweep definition may take as JSON (its base spec is one spec; its
# value lists are at most MAX_TRIALS short values each): it is stored with the sweep.
MAX_SWEEP_CHARS = 256 * 1024
TOP_KEYS = ("name", "base", "base_job", "parameters", "method", "trials", "seed",
            "max_concurrent", "early_stopping", "evaluate", "priority", "owner", "pack",
            "pack_size")
PACK_MODES = ("auto", "off")
EARLY_KEYS = ("policy", "rungs", "reduction_factor", "min_trials")
EVAL_KEYS = ("text_file", "stride", "max_length", "precision")
# Every EvalSpec default but the LoRAs: what a perplexity job of a trial starts from.
EVAL_DEFAULTS = {f.name: f.default for f in fields(EvalSpec) if f.name != "loras"}


@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    spec: dict[str, Any]
    gpu_memory_mb: int = 0
    job: str = ""
    base_mb: int = 0  # of gpu_memory_mb, the base model's weights: what a pack holds once
    lane_mb: int = 0  # what the trial adds in a pack beside its estimate (estimate.pack_lane_mb)

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
    pack: str = "auto"  # auto: trials that can share a base train together (packs.py); off
    pack_size: int = 0  # the most trials in one pack; 0: as many as the card fits, MAX_PACK

    @property
    def pack_max(self) -> int:
        """The most trials of this sweep one pack may hold (1: each trial alone)."""
        return 1 if self.pack == "off" else (self.pack_size or MAX_PACK)

    def preview(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "count": len(self.trials),
                "trials": [t.to_dict() for t in self.trials], "skipped": self.skipped,
                "varied": list(self.parameters), "max_concurrent": self.max_concurrent,
                "early_stopping": self.policy.to_dict(), "metric": self.metric,
                "evaluate": self.evaluate, "pack": self.pack, "pack_size": self.pack_size}


class DistinctProblems(Problems):
    """Problems that name each (field, message) once: many trials can share one problem."""

    def add(self, field: str, message: str) -> None:
        entry = {"field": f"{self.where}{field or EMPTY_KEY}", "message": message}
        if entry not in self.errors:
            self.errors.append(entry)


# ---------------------------------------------------------------------------------------------
# the whole definition


def parse_sweep(data: Any, paths: DataPaths,
                job_spec: Callable[[str], dict[str, Any]] | None = None) -> SweepPlan:
    """Validate a sweep definition and every trial it creates; SpecError lists every problem.

    `job_spec(id)` returns a training job's spec, for `base_job` (KeyError if there is none)."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "sweep", "message": "must be an object with base, parameters "
                                                       "and method"}])
    check_size(data, "sweep", MAX_SWEEP_CHARS)
    problems = DistinctProblems()
    for key in data:
        if key not in TOP_KEYS:
            problems.add(str(key), f"is not a sweep setting (use {', '.join(TOP_KEYS)})")
    base = _base(data, job_spec, problems)
    method, samples, seed = _method(data, problems)
    max_concurrent = _int_setting(data, "max_concurrent", 0, 0, 1000, "max_concurrent", problems)
    pack = data.get("pack", "auto")
    if isinstance(pack, bool):  # YAML reads an unquoted off / on as false / true
        pack = "auto" if pack else "off"
    if pack not in PACK_MODES:
        problems.add("pack", f"must be auto or off, got {pack!r}")
        pack = "auto"
    pack_size = _int_setting(data, "pack_size", 0, 0, MAX_PACK, "pack_size", problems)
    domains = _domains(data.get("parameters"), method, problems)
    policy = parse_early_stopping(data.get("early_stopping"), problems)
    evaluate = _evaluate(data.get("evaluate"), problems)
    prefix, name = _names(data, base, problems)
    combos = _combinations(data, domains, method, samples, seed, problems)
    trials: list[Trial] = []
    skipped: list[dict[str, Any]] = []
    if prefix and LORA_NAME_RE.match(prefix):
        if combos:
            trials, skipped = _trials(base, prefix, combos, paths, problems)
        else:  # the values could not be expanded: still name every problem of the base spec
            _base_alone(base, prefix, data.get("parameters"), paths, problems)
    metric = _metric(trials, policy, problems)
    eval_template, eval_memory = _evaluation(evaluate, trials, base, paths, problems)
    if combos and not trials and not problems:
        problems.add("parameters", "the sweep creates no trials")
    problems.raise_if_any()
    return SweepPlan(name=name, method=method, seed=seed, samples=samples,
                     max_concurrent=max_concurrent, policy=policy, metric=metric,
                     parameters={d.name: d.describe() for d in domains}, base=base,
                     trials=trials, skipped=skipped, evaluate=eval_template,
                     eval_memory_mb=eval_memory, pack=pack, pack_size=pack_size)


def _int_setting(data: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str,
                 problems: Problems) -> int:
    v = data.get(key, default)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        problems.add(where, f"must be a whole number from {lo} to {hi}, got {data.get(key)!r}")
        return default
    return v


def _base(data: dict[str, Any], job_spec: Callable[[str], dict[str, Any]] | None,
          problems: Problems) -> dict[str, Any]:
    """The base spec: a copied job's (`base_job`), then the `base` keys over it."""
    base: dict[str, Any] = {}
    if data.get("base_job"):
        if job_spec is None:
            problems.add("base_job", "cannot be looked up here")
        else:
            try:
                base = dict(job_spec(str(data["base_job"])))
            except KeyError:
                problems.add("base_job", f"no training job {data['base_job']}")
    given = data.get("base", {})
    if not isinstance(given, dict):
        problems.add("base", "must be an object of training parameters")
        given = {}
    base.update(from_webui_keys(given))
    if data.get("base_job"):  # a copied job's checkpoint belongs to that job's run
        base.pop("resume_from_checkpoint", None)
    return base


def _method(data: dict[str, Any], problems: Problems) -> tuple[str, int, int]:
    """(method, samples, seed): samples and seed belong to method random only."""
    method = data.get("method", "grid")
    if method not in METHODS:
        problems.add("method", f"must be one of {', '.join(METHODS)}")
        method = "grid"
    if method == "random":
        samples = _int_setting(data, "trials", 0, 1, MAX_TRIALS, "trials", problems)
        seed = _int_setting(data, "seed", 0, 0, 2**31 - 1, "seed", problems)
        return method, samples, seed
    for key in ("trials", "seed"):
        if key in data:
            problems.add(key, "applies to method random only")
    return method, 0, 0


def _domains(params: Any, method: str, problems: Problems) -> list[Domain]:
    if not isinstance(params, dict) or not params:
        problems.add("parameters", "name at least one parameter to vary, with its values")
        return []
    found = (parse_domain(str(name), spec, method, problems) for name, spec in params.items())
    return [d for d in found if d is not None]


def _evaluate(given: Any, problems: Problems) -> dict[str, Any] | None:
    """The `evaluate` object as given (its keys checked), or None when there is none."""
    if given in (None, {}, ""):
        return None
    if not isinstance(given, dict):
        problems.add("evaluate", "must be an object: {text_file, stride, max_length}")
        return None
    for key in given:
        if key not in EVAL_KEYS:
            problems.add(f"evaluate.{key}",
                         f"is not an evaluation setting (use {', '.join(EVAL_KEYS)})")
    return given


def _names(data: dict[str, Any], base: dict[str, Any], problems: Problems) -> tuple[str, str]:
    """(the trials' name prefix, the sweep's name)."""
    prefix = str(base.get("lora_name") or data.get("name") or "").strip()
    name = str(data.get("name") or prefix).strip()
    if not prefix:
        problems.add("base.lora_name", "is required: the trials are named after it")
    elif not LORA_NAME_RE.match(prefix):
        problems.add("base.lora_name", f"'{prefix}' may use only letters, digits, '.', '_' and '-'")
    if len(name) > 100:
        problems.add("name", "must be at most 100 characters")
    return prefix, name


def _combinations(data: dict[str, Any], domains: list[Domain], method: str, samples: int,
                  seed: int, problems: Problems) -> list[dict[str, Any]]:
    """Every trial's varied values, once every parameter and the method are good."""
    if (not domains or len(domains) != len(data.get("parameters") or {})
            or problems.fields() & {"method", "trials", "seed"}):
        return []
    total = math.prod(len(d.grid()) for d in domains) if method == "grid" else samples
    if total > MAX_TRIALS:
        problems.add("parameters", f"the grid has {total} combinations; at most {MAX_TRIALS}")
        return []
    return expand(domains, method, samples, seed)


def _spec_problems(spec: dict[str, Any], paths: DataPaths) -> list[dict[str, str]]:
    """What parse_train_spec refuses in `spec` (empty when it is good)."""
    try:
        parse_train_spec(spec, paths)
    except SpecError as e:
        return e.errors
    return []


def _base_alone(base: dict[str, Any], prefix: str, params: Any, paths: DataPaths,
                problems: Problems) -> None:
    """The base spec's own problems, but those of the parameters the sweep varies."""
    for err in _spec_problems({**base, "lora_name": prefix}, paths):
        if err["field"] not in (params or {}):
            problems.add(f"base.{err['field']}", err["message"])


def _trials(base: dict[str, Any], prefix: str, combos: list[dict[str, Any]], paths: DataPaths,
            problems: Problems) -> tuple[list[Trial], list[dict[str, Any]]]:
    """(the trials, the combinations skipped as the same spec as an earlier trial)."""
    # Problems of the base spec on its own, to tell them from those a trial's values cause
    # with it (cutoff_len 64 against the base's overlap_len 128).
    base_problems = {(e["field"], e["message"])
                     for e in _spec_problems({**base, "lora_name": prefix}, paths)}
    trials: list[Trial] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, str] = {}  # dedupe key -> the trial that has that spec
    names: set[str] = set()
    for combo in combos:
        tname = trial_name(prefix, combo)
        try:
            spec = parse_train_spec({**base, **combo, "lora_name": tname}, paths).to_dict()
        except SpecError as e:
            _name_trial_problems(e.errors, combo, tname, base_problems, problems)
            continue
        key = _dedupe_key(spec)
        if key in seen:
            skipped.append({"name": tname, "params": combo, "same_as": seen[key]})
            continue
        base_name, n = tname, 2
        while tname in names:  # two values that read the same in a name
            tname = f"{base_name[:96]}-{n}"
            n += 1
        spec["lora_name"] = seen[key] = tname
        names.add(tname)
        # A trial whose card memory the user gave (min_gpu_memory_mb) is packed by that figure
        # alone: nothing of it is taken for the shared base.
        shared = 0 if int(spec.get("min_gpu_memory_mb") or 0) > 0 else base_memory_mb(
            spec, paths.models)
        trials.append(Trial(tname, combo, spec, job_memory_mb("train", spec, paths.models),
                            base_mb=shared))
    lane = pack_lane_mb([t.spec for t in trials], paths.models)
    for t in trials:
        t.lane_mb = lane
    return trials, skipped


def _name_trial_problems(errors: list[dict[str, str]], combo: dict[str, Any], tname: str,
                         base_problems: set[tuple[str, str]], problems: Problems) -> None:
    """Say whether a trial's problem is its varied value's, the base's, or the two together."""
    for err in errors:
        f = err["field"]
        if f in combo:
            problems.add(f"parameters.{f}", f"value {_shown(combo[f])}: {err['message']}")
        elif (f, err["message"]) in base_problems:
            problems.add(f"base.{f}", err["message"])
        else:
            varied = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            problems.add(f"base.{f}", f"{err['message']} (in trial {tname}: {varied})")


def _dedupe_key(spec: dict[str, Any]) -> str:
    s = {k: v for k, v in spec.items() if k != "lora_name"}
    try:
        s["learning_rate"] = float(s["learning_rate"])
    except (KeyError, ValueError):
        pass  # no learning rate, or one parse_train_spec let through as text: compare as is
    return json.dumps(s, sort_keys=True)


def _shown(value: Any) -> str:
    """A value as a message names it: its first 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _metric(trials: list[Trial], policy: Policy, problems: Problems) -> str:
    """What early stopping compares: eval_loss when every trial has an evaluation set."""
    with_eval = {bool(t.spec.get("eval_dataset")) for t in trials}
    if len(with_eval) > 1 and policy.active:
        problems.add("parameters.eval_dataset", "early stopping compares one loss: every trial "
                                                "needs an evaluation set, or none")
        return "loss"
    if with_eval != {True}:
        return "loss"
    for t in trials if policy.active else ():
        steps = t.spec["eval_steps"]
        off = [r for r in policy.rungs if r % steps]
        if off:
            problems.add("early_stopping.rungs",
                         f"step {off[0]} is not a multiple of eval_steps ({steps}) of trial "
                         f"{t.name}: rungs compare evaluation losses, so put them where "
                         "evaluations happen")
            break
    return "eval_loss"


def _evaluation(evaluate: dict[str, Any] | None, trials: list[Trial], base: dict[str, Any],
                paths: DataPaths, problems: Problems) -> tuple[dict[str, Any] | None,
                                                               dict[str, int]]:
    """(the perplexity jobs' settings, their memory estimate per base model)."""
    if evaluate is None or any(f.startswith("evaluate") for f in problems.fields()):
        return None, {}
    template = {k: evaluate[k] for k in EVAL_KEYS if k in evaluate}
    memory: dict[str, int] = {}
    models = sorted({t.spec["base_model"] for t in trials}) or [str(base.get("base_model", ""))]
    for model in models:
        try:
            es = parse_eval_spec({**template, "base_model": model, "loras": []}, paths)
        except SpecError as e:
            for err in e.errors:
                problems.add(f"evaluate.{err['field']}", err["message"])
            break
        template.update(text_file=es.text_file, stride=es.stride, max_length=es.max_length,
                        precision=es.precision)
        memory[model] = job_memory_mb("evaluate", es.to_dict(), paths.models)
    return template, memory


# ---------------------------------------------------------------------------------------------
# early stopping


def parse_early_stopping(data: Any, problems: Problems) -> Policy:
    """`early_stopping`: none, a policy name, or {policy, rungs, reduction_factor, min_trials}."""
    if data in (None, "", "none", {}):
        return Policy()
    if isinstance(data, str):
        data = {"policy": data}
    if not isinstance(data, dict):
        problems.add("early_stopping",
                     "must be an object: {policy, rungs, reduction_factor, min_trials}")
        return Policy()
    for key in data:
        if key not in EARLY_KEYS:
            problems.add(f"early_stopping.{key}",
                         f"is not an early-stopping setting (use {', '.join(EARLY_KEYS)})")
    kind = data.get("policy", "asha")
    if kind not in POLICIES:
        problems.add("early_stopping.policy", f"must be one of {', '.join(POLICIES)}")
        return Policy()
    rungs = _rungs(data.get("rungs", []), kind, problems)
    eta = _int_setting(data, "reduction_factor", 3, 2, 100, "early_stopping.reduction_factor",
                       problems)
    min_trials = _int_setting(data, "min_trials", 3, 1, 1000, "early_stopping.min_trials",
                              problems)
    return Policy(kind=kind, rungs=tuple(rungs), reduction_factor=eta, min_trials=min_trials)


def _rungs(given: Any, kind: str, problems: Problems) -> list[int]:
    """The rung steps: a list (or text "10, 20 40") of increasing whole steps."""
    where = "early_stopping.rungs"
    if isinstance(given, str):
        given = [r for r in re.split(r"[,\s]+", given) if r]
    if not isinstance(given, list):
        problems.add(where, "must be a list of optimizer steps, like [10, 20, 40]")
        return []
    rungs: list[int] = []
    for r in given:
        try:
            if isinstance(r, bool) or float(r) != int(float(r)) or int(float(r)) < 1:
                raise ValueError
            rungs.append(int(float(r)))
        except (TypeError, ValueError):
            problems.add(where, f"{r!r} is not a step number (a whole number of at least 1)")
            return []
    if rungs and rungs != sorted(set(rungs)):
        problems.add(where, "must be increasing steps, each once")
    elif len(rungs) > MAX_RUNGS:
        problems.add(where, f"at most {MAX_RUNGS} rungs")
    elif kind != "none" and not given:
        problems.add(where, "name the steps where trials are compared, like [10, 20, 40]")
    return rungs
