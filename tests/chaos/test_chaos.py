"""The chaos run's short version (a few minutes; tests/chaos/harness.py): a fleet of real
processes under kill -9 of each of its parts, every invariant counted; none may be violated.
The long version is `python -m tests.chaos.run --minutes 30 --jobs 200` (docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os

import pytest

from tests.chaos.harness import Plan, run

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.mark.timeout(1200)
def test_a_short_chaos_run_loses_nothing(tmp_path):
    seed = int(os.environ.get("LORAFLEET_CHAOS_SEED", "0"))
    report = run(Plan(seed=seed, jobs=16, minutes=2.0, epochs=3), tmp_path / "home").to_dict()
    (tmp_path / "chaos-report.json").write_text(json.dumps(report, indent=1))
    counts = report["counts"]
    # It did what it is for: things were killed while jobs ran, and the jobs still ended.
    assert sum(report["kills"].values()) >= 5, report["kills"]
    assert counts["accepted"] >= 20 and counts["jobs"] >= counts["accepted"]
    assert counts["final_losses_compared"] >= 5 and counts["loras_loaded"] >= 5
    assert report["violations"] == {}, json.dumps(report["violations"], indent=1)
