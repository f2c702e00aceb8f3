"""The chaos run's short version (a few minutes; tests/chaos/harness.py): a fleet of real
processes under kill -9 of each of its parts, every invariant counted; none may be violated.
The long version is `python -m tests.chaos.run --minutes 30 --jobs 200` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os

import pytest

from tests.chaos.harness import KINDS, Plan, run

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.mark.timeout(1200)
def test_a_short_chaos_run_loses_nothing(tmp_path):
    seed = int(os.environ.get("LORAFLEET_CHAOS_SEED", "0"))
    report = run(Plan(seed=seed, jobs=16, minutes=2.0, epochs=3), tmp_path / "home").to_dict()
    (tmp_path / "chaos-report.json").write_text(json.dumps(report, indent=1))
    counts = report["counts"]
    shown = json.dumps({k: report[k] for k in ("kills", "counts", "schedule")}, indent=1)
    # It did what it is for: every part of the fleet was killed at least once while jobs ran
    # (the schedule starts with one kill of each kind), followers reconnected through those
    # restarts, a killed job resumed from its checkpoint, cy's jobs ran, and the jobs ended.
    assert all(report["kills"].get(kind, 0) >= 1 for kind in KINDS), shown
    assert counts["sse_reconnects"] >= 1, shown
    assert counts["resumed_jobs"] >= 1 and counts["attempts_over_1"] >= 1, shown
    assert counts["cy_jobs_started"] == 2, shown
    assert counts["training_processes_watched"] >= 10, shown
    assert counts["accepted"] >= 20 and counts["jobs"] >= counts["accepted"], shown
    assert counts["final_losses_compared"] >= 5 and counts["loras_loaded"] >= 5, shown
    assert report["violations"] == {}, json.dumps(report["violations"], indent=1)
