"""Early stopping of sweep trials: rung values and decisions on synthetic loss curves, exact."""

from __future__ import annotations

import pytest

from dispatcher.schedule.early_stop import Policy, decide, rung_value, simulate


def train(losses):
    return [{"type": "train", "step": i + 1, "loss": v} for i, v in enumerate(losses)]


def test_training_loss_rung_value_is_the_mean_since_the_previous_rung():
    ev = train([6.0, 5.0, 4.0, 3.0, 2.0])
    assert rung_value(ev, 2, 0, "loss") == 5.5
    assert rung_value(ev, 4, 2, "loss") == 3.5
    assert rung_value(ev, 5, 4, "loss") == 2.0
    assert rung_value(ev, 6, 5, "loss") is None  # not reached yet
    # A step logged twice (a resumed run) counts once, with its latest loss.
    assert rung_value(ev + [{"type": "train", "step": 2, "loss": 1.0}], 2, 0, "loss") == 3.5


def test_eval_loss_rung_value_waits_for_the_evaluation():
    ev = train([6, 5, 4, 3]) + [{"type": "eval", "step": 2, "eval_loss": 4.2}]
    assert rung_value(ev, 2, 0, "eval_loss") == 4.2
    # The training event of step 4 alone is not enough: its evaluation comes after it.
    assert rung_value(ev, 4, 2, "eval_loss") is None
    ev.append({"type": "eval", "step": 4, "eval_loss": 3.9})
    assert rung_value(ev, 4, 2, "eval_loss") == 3.9
    # A rung between evaluations uses the latest one before it.
    assert rung_value(ev, 3, 2, "eval_loss") == 4.2


def test_asha_keeps_the_best_fraction_at_a_rung():
    p = Policy("asha", (10,), reduction_factor=3)
    # Fewer than 3 values at the rung: nobody is cut.
    assert not decide(p, 10, 9.0, []).stop
    assert not decide(p, 10, 9.0, [1.0]).stop
    # 3 values: keep the best 1.
    d = decide(p, 10, 1.5, [1.0, 2.0])
    assert d.stop and (d.rank, d.compared) == (2, 3)
    assert d.reason == ("stopped early: training loss 1.5000 at step 10 ranks 2 of 3 trials, "
                        "not in the best 1 (ASHA, reduction factor 3)")
    assert not decide(p, 10, 0.9, [1.0, 2.0]).stop
    # A tie goes to the trial that reached the rung first.
    assert decide(p, 10, 1.0, [1.0, 2.0]).stop
    # 6 values: keep the best 2.
    assert not decide(p, 10, 1.5, [1.0, 2.0, 3.0, 4.0, 5.0]).stop
    assert decide(p, 10, 2.5, [1.0, 2.0, 3.0, 4.0, 5.0], "eval_loss").reason.startswith(
        "stopped early: eval loss 2.5000 at step 10 ranks 3 of 6")


def test_median_stops_a_trial_worse_than_the_median_of_the_others():
    p = Policy("median", (10,), min_trials=2)
    assert not decide(p, 10, 9.0, [1.0]).stop  # only one other trial
    d = decide(p, 10, 2.5, [1.0, 3.0])
    assert d.stop
    assert d.reason == ("stopped early: training loss 2.5000 at step 10 is worse than the "
                        "median 2.0000 of 2 other trials (median stopping)")
    assert not decide(p, 10, 2.0, [1.0, 3.0]).stop  # equal to the median is not worse
    assert decide(p, 10, 2.1, [1.0, 2.0, 9.0]).stop  # odd count: the middle value


def test_no_policy_never_stops():
    assert not decide(Policy(), 10, 100.0, [1.0, 1.0, 1.0]).stop


CURVES = {
    "A": [5, 4, 3, 2, 1, 1],
    "B": [5, 5, 5, 5, 5, 5],
    "C": [5, 3, 2, 1, 1, 1],
    "D": [6, 6, 4, 3, 2, 2],
}
STARTS = {"A": 0, "B": 0, "C": 1, "D": 3}


def test_asha_on_synthetic_curves():
    # Rung values (mean since the previous rung): step 2: A 4.5, B 5, C 4, D 6; step 4:
    # A 2.5, B 5, C 1.5, D 3.5. Arrivals: A2 B2 C2 A4 (B4 skipped) D2 C4.
    r = simulate(Policy("asha", (2, 4), reduction_factor=2), CURVES, STARTS)
    assert [(t, d.rung, d.stop) for t, d in r.decisions] == [
        ("A", 2, False), ("B", 2, True), ("C", 2, False), ("A", 4, False),
        ("D", 2, True), ("C", 4, False)]
    assert sorted(r.stopped) == ["B", "D"]
    assert r.stopped["B"].reason == ("stopped early: training loss 5.0000 at step 2 ranks 2 of "
                                     "2 trials, not in the best 1 (ASHA, reduction factor 2)")
    assert r.stopped["D"].reason == ("stopped early: training loss 6.0000 at step 2 ranks 4 of "
                                     "4 trials, not in the best 2 (ASHA, reduction factor 2)")


def test_median_on_synthetic_curves():
    r = simulate(Policy("median", (2, 4), min_trials=2), CURVES, STARTS)
    assert [(t, d.rung, d.stop) for t, d in r.decisions] == [
        ("A", 2, False), ("B", 2, False), ("C", 2, False), ("A", 4, False), ("B", 4, False),
        ("D", 2, True), ("C", 4, False)]
    assert list(r.stopped) == ["D"]
    assert r.stopped["D"].reason == ("stopped early: training loss 6.0000 at step 2 is worse "
                                     "than the median 4.5000 of 3 other trials (median stopping)")


def test_eval_metric_and_a_curve_too_short_for_a_rung():
    curves = {"A": [3.0, 2.0, 1.0], "B": [3.0, 2.5, 2.4], "C": [3.0]}
    r = simulate(Policy("asha", (2,), reduction_factor=2), curves, metric="eval_loss")
    # C never reaches step 2, so it is never judged; B (2.5 after A's 2.0) is cut.
    assert [(t, d.value, d.stop) for t, d in r.decisions] == [("A", 2.0, False), ("B", 2.5, True)]
    assert r.stopped["B"].reason.startswith("stopped early: eval loss 2.5000 at step 2")


@pytest.mark.parametrize("order", [["A", "B"], ["B", "A"]])
def test_arrival_order_decides_who_is_judged_against_whom(order):
    curves = {t: CURVES[t] for t in order}
    r = simulate(Policy("asha", (2,), reduction_factor=2), curves)
    # The first at the rung always goes on; the second is cut only if it is worse.
    assert list(r.stopped) == (["B"] if order == ["A", "B"] else [])


def test_a_nan_value_is_the_worst_not_the_best():
    asha = Policy("asha", (10,), reduction_factor=2)
    assert decide(asha, 10, float("nan"), [2.0]).stop
    assert not decide(asha, 10, 2.0, [float("nan")]).stop
    median = Policy("median", (10,), min_trials=2)
    assert decide(median, 10, float("nan"), [2.0, 3.0]).stop


def test_a_retried_trial_uses_its_last_evaluation_at_a_step():
    events = [{"type": "eval", "step": 10, "eval_loss": 3.0},   # first attempt
              {"type": "eval", "step": 10, "eval_loss": 2.5}]   # the retry, same step
    assert rung_value(events, 10, 0, "eval_loss") == 2.5
