"""A running fleet per test module: real dispatcher, worker and dashboard processes."""

from __future__ import annotations

import pytest

from tests.faultkit import make_fleet
from tests.fleetproc import FleetProcs, tiny_fleet
from tests.tiny import write_tiny_raw_text


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("home"), "it")
    write_tiny_raw_text(f.settings.paths.datasets / "story.txt")
    f.start_fleet("w1")
    yield f
    f.stop()


@pytest.fixture
def fleet_factory(redis_server, tmp_path):
    """Fleets made to order (the fault tests): make(workers=..., dispatchers=..., dashboard=...),
    each stopped at the end of the test."""
    made: list[FleetProcs] = []

    def make(**kw) -> FleetProcs:
        f = make_fleet(kw.pop("redis_url", redis_server), tmp_path / f"home{len(made)}", **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()
