"""A running fleet per test module: real dispatcher, worker and dashboard processes."""

from __future__ import annotations

import pytest

from tests.fleetproc import tiny_fleet
from tests.tiny import write_tiny_raw_text


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("home"), "it")
    write_tiny_raw_text(f.settings.paths.datasets / "story.txt")
    f.start_fleet("w1")
    yield f
    f.stop()
