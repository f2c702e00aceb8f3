"""Hyperparameter sweeps: a base training spec plus the parameters to vary; each trial is an
ordinary training job in the queue.

    domains   the values a parameter takes (lists, ranges, log-uniform), their expansion
              into trials (grid or random), and trial names (`mylora-r16-lr1e-4`)
    plan      parse_sweep: untrusted definition (form, JSON, YAML) -> SweepPlan, or SpecError
              naming every bad field; nothing is queued for a bad sweep
    store     SweepStore: the sweep records in Redis (their keys are listed there)
    tick      the dispatcher's per-pass work: early stopping, perplexity jobs, finishing
    results   rows per trial, the best trial, counts by outcome

The names other packages use are importable from here.
"""

from __future__ import annotations

from dispatcher.schedule.sweeps.domains import MAX_TRIALS, fmt_number, trial_name
from dispatcher.schedule.sweeps.plan import (
    MAX_SWEEP_CHARS,
    METHODS,
    SweepPlan,
    Trial,
    parse_sweep,
)
from dispatcher.schedule.sweeps.results import (
    STOPPED_EARLY,
    best_trial,
    is_stopped_early,
    summary,
    trial_rows,
)
from dispatcher.schedule.sweeps.store import SweepNotFound, SweepStore
from dispatcher.schedule.sweeps.tick import tick

__all__ = ["MAX_SWEEP_CHARS", "MAX_TRIALS", "METHODS", "STOPPED_EARLY", "SweepNotFound",
           "SweepPlan", "SweepStore", "Trial", "best_trial", "fmt_number", "is_stopped_early",
           "parse_sweep", "summary", "tick", "trial_name", "trial_rows"]
