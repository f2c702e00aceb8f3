"""A running fleet per test module: real dispatcher, worker and dashboard processes."""

from __future__ import annotations

import time

import pytest

from tests.fleetproc import FleetProcs
from tests.tiny import make_tiny_model, write_tiny_dataset, write_tiny_raw_text


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    f = FleetProcs(home, redis_server, prefix=f"it{time.monotonic_ns()}")
    make_tiny_model(f.settings.paths.models / "tiny")
    write_tiny_dataset(f.settings.paths.datasets / "tiny.json")
    write_tiny_raw_text(f.settings.paths.datasets / "story.txt")
    f.start_dispatcher()
    f.start_worker("w1")
    f.start_dashboard()
    f.wait_for_workers(1)
    yield f
    f.stop()
