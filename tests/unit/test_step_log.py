"""How often the trainer writes a step line into the job log (issue 11, point 9)."""

from __future__ import annotations

import pytest

from gpuworker.engine.loop import step_log_interval


@pytest.mark.parametrize("total, every", [(1, 1), (6, 1), (50, 1), (51, 2), (400, 10),
                                          (1800, 45), (100000, 2500)])
def test_short_runs_log_every_step_long_ones_20_to_50_lines(total, every):
    assert step_log_interval(total) == every
    lines = total // every + (total % every != 0)  # the last step is always logged
    assert lines == total if total <= 50 else 20 <= lines <= 50
