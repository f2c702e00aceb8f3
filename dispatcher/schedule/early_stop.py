"""Early stopping of sweep trials: pure functions of losses at rung steps -> decisions.

A sweep names its rungs in optimizer steps (e.g. 10, 20, 40). When a trial reaches a rung, its
*rung value* is read from its events (`rung_value`): the evaluation loss of its latest
evaluation at or before the rung when it has an evaluation set, else the mean training loss of
the steps since the previous rung (previous rung, rung]. Lower is better. That value is then
compared with the values other trials recorded at the same rung before it (`decide`):

  asha     successive halving, asynchronous (ASHA): with n values at the rung (this trial's
           included) and reduction factor eta, the trial goes on while n < eta (too few to cut
           1/eta of them); otherwise it goes on only if it is among the best max(1, n // eta)
           (ties favour the trial that got there first) and is stopped otherwise.
  median   median stopping: once at least `min_trials` other trials have a value at the rung,
           the trial is stopped if its value is worse (higher) than their median.

Decisions are made once per trial and rung, in the order trials reach the rung, and never
revisited; `simulate` replays the same rule over whole synthetic curves (what the tests check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("none", "asha", "median")


@dataclass(frozen=True)
class Policy:
    """How a sweep stops its losing trials early."""

    kind: str = "none"  # none | asha | median
    rungs: tuple[int, ...] = ()  # optimizer steps, increasing
    reduction_factor: int = 3  # asha: keep the best 1/reduction_factor at each rung
    min_trials: int = 3  # median: other trials needed at a rung before anyone is stopped

    @property
    def active(self) -> bool:
        return self.kind != "none" and bool(self.rungs)

    def previous_rung(self, rung: int) -> int:
        earlier = [r for r in self.rungs if r < rung]
        return earlier[-1] if earlier else 0

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.kind, "rungs": list(self.rungs),
                "reduction_factor": self.reduction_factor, "min_trials": self.min_trials}


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str = ""
    value: float = math.nan
    rung: int = 0
    rank: int = 0  # 1 = best at the rung so far
    compared: int = 0  # values at the rung, this one included


def metric_name(metric: str) -> str:
    return "eval loss" if metric == "eval_loss" else "training loss"


def rung_value(events: Iterable[dict[str, Any]], rung: int, previous: int,
               metric: str) -> float | None:
    """A trial's value at `rung` from its events, or None while it has not reached the rung.

    metric "eval_loss": the loss of the latest `eval` event at a step <= rung, once an eval at
    a step >= rung exists (evaluation runs after the step's training event, so the training
    event alone does not mean the evaluation is there). metric "loss": the mean loss of the
    `train` events with previous < step <= rung, once the rung's step has been logged.
    """
    if metric == "eval_loss":
        evals: dict[int, float] = {}
        for e in events:
            if e.get("type") == "eval" and e.get("eval_loss") is not None:
                evals[int(e["step"])] = float(e["eval_loss"])  # a retried run: last wins
        if not any(step >= rung for step in evals):
            return None
        upto = [s for s in evals if s <= rung]
        return evals[max(upto)] if upto else None
    steps: dict[int, float] = {}
    for e in events:
        if e.get("type") == "train" and e.get("loss") is not None:
            steps[int(e["step"])] = float(e["loss"])  # a resumed run logs a step again: last wins
    if rung not in steps and not any(s > rung for s in steps):
        return None
    window = [v for s, v in steps.items() if previous < s <= rung]
    return sum(window) / len(window) if window else None


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def decide(policy: Policy, rung: int, value: float, earlier: list[float],
           metric: str = "loss") -> Decision:
    """Stop or go on, for a trial that reached `rung` with `value`, given the values recorded
    at that rung by the trials that reached it before (in arrival order)."""
    what = metric_name(metric)
    # A loss that is not a number (NaN, inf) is the worst there is, not the best.
    value = value if math.isfinite(value) else math.inf
    earlier = [v if math.isfinite(v) else math.inf for v in earlier]
    n = len(earlier) + 1
    # Rank among the values so far; an equal earlier value ranks ahead (first come wins ties).
    rank = 1 + sum(1 for v in earlier if v <= value)
    if policy.kind == "asha":
        eta = policy.reduction_factor
        if n < eta:
            return Decision(False, f"{n} of {eta} trials needed at step {rung}", value, rung,
                            rank, n)
        keep = max(1, n // eta)
        if rank <= keep:
            return Decision(False, f"rank {rank} of {n} at step {rung}", value, rung, rank, n)
        return Decision(True, f"stopped early: {what} {value:.4f} at step {rung} ranks {rank} "
                              f"of {n} trials, not in the best {keep} (ASHA, reduction factor "
                              f"{eta})", value, rung, rank, n)
    if policy.kind == "median":
        if len(earlier) < policy.min_trials:
            return Decision(False, f"{len(earlier)} of {policy.min_trials} other trials at "
                                   f"step {rung}", value, rung, rank, n)
        med = _median(earlier)
        if value > med:
            return Decision(True, f"stopped early: {what} {value:.4f} at step {rung} is worse "
                                  f"than the median {med:.4f} of {len(earlier)} other trials "
                                  "(median stopping)", value, rung, rank, n)
        return Decision(False, f"not worse than the median {med:.4f} at step {rung}", value,
                        rung, rank, n)
    return Decision(False, "no early stopping", value, rung, rank, n)


@dataclass
class Replay:
    """What `simulate` decided: stopped trials with their rung and reason, and every decision."""

    stopped: dict[str, Decision] = field(default_factory=dict)
    decisions: list[tuple[str, Decision]] = field(default_factory=list)


def simulate(policy: Policy, curves: dict[str, list[float]], starts: dict[str, int] | None = None,
             metric: str = "loss") -> Replay:
    """Replay the rule over whole loss curves (curves[trial][i] = the value logged at step i+1;
    with metric "eval_loss", one evaluation per step). Trial t runs its step s at time
    starts[t] + s; trials reach a rung in that order (ties: the order of `curves`). A stopped
    trial reaches no later rung."""
    starts = starts or {}
    order = list(curves)
    arrivals = []
    for t in order:
        for rung in policy.rungs:
            if rung <= len(curves[t]):
                arrivals.append((starts.get(t, 0) + rung, rung, order.index(t), t))
    arrivals.sort()
    recorded: dict[int, list[float]] = {}
    out = Replay()
    for _, rung, _, t in arrivals:
        if t in out.stopped:
            continue
        if metric == "eval_loss":
            events = [{"type": "eval", "step": i + 1, "eval_loss": v}
                      for i, v in enumerate(curves[t])]
        else:
            events = [{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(curves[t])]
        value = rung_value(events, rung, policy.previous_rung(rung), metric)
        if value is None:
            continue
        d = decide(policy, rung, value, recorded.get(rung, []), metric)
        recorded.setdefault(rung, []).append(value)
        out.decisions.append((t, d))
        if d.stop:
            out.stopped[t] = d
    return out
