"""How many examples each fuzz property runs.

The fast tier runs a few fixed (derandomized) examples per property, so it is quick and the same
on every run. `LORAFLEET_FUZZ_EXAMPLES=N` is the long run by hand: every property then runs about
N examples (times its `weight`: a property whose example starts a subprocess runs fewer), drawn
at random; `pytest --hypothesis-seed=S` repeats a long run exactly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

ENV = "LORAFLEET_FUZZ_EXAMPLES"


def long_run() -> int:
    """N of LORAFLEET_FUZZ_EXAMPLES, or 0 in the fast tier."""
    raw = os.environ.get(ENV, "").strip()
    return int(raw) if raw else 0


def fuzz_settings(short: int = 5, weight: float = 1.0) -> settings:
    """Hypothesis settings for one property: `short` examples in the fast tier, else
    round(N * weight) (at least 1)."""
    n = long_run()
    return settings(
        max_examples=max(1, round(n * weight)) if n else short,
        derandomize=not n,
        deadline=None,  # a request may wait on Redis or a file system: no per-example deadline
        database=None,  # no .hypothesis/ folder in the checkout; failures print their example
        print_blob=True,
        # No "explain" phase: on Python < 3.12 it traces every line and takes minutes.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.large_base_example],
    )
