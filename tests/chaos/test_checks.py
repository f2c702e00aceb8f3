"""The chaos run's checks catch what they are for (pure: no fleet)."""

from __future__ import annotations

from collections import defaultdict

from tests.chaos.harness import _check_attempts


def ev(attempt: int, step: int, t: float) -> dict:
    return {"type": "train", "attempt": attempt, "step": step, "time": t}


def test_two_attempts_training_at_once_and_steps_out_of_order_are_violations():
    v: dict = defaultdict(list)
    job = {"id": "j"}
    # Attempt 1 steps 1-4, killed; attempt 2 resumes from step 2 later: fine.
    _check_attempts(job, [ev(1, 1, 1.0), ev(1, 2, 2.0), ev(1, 3, 3.0), ev(1, 4, 4.0),
                          ev(2, 3, 9.0), ev(2, 4, 10.0)], v)
    assert dict(v) == {}
    # Attempt 1 (an orphaned process) still trained while attempt 2 had started.
    _check_attempts(job, [ev(1, 1, 1.0), ev(2, 1, 2.0), ev(1, 2, 3.0), ev(2, 2, 4.0)], v)
    assert len(v["overlap"]) == 1 and "attempt 2 trained from 2.00" in v["overlap"][0]
    _check_attempts(job, [ev(1, 1, 1.0), ev(1, 3, 2.0), ev(1, 2, 3.0)], v)
    assert v["order"] == ["j attempt 1: steps [1, 3, 2]"]
