"""Shared fixtures: a real Redis server (the embedded one) for every test that needs Redis."""

from __future__ import annotations

import itertools
import os
import secrets

import pytest

from dispatcher.host.embedded import free_port, start_server, stop_server

_prefixes = itertools.count()

# One math thread per process, inherited by every process a test starts (workers, `lorafleet
# up`, training children): the slow tier runs three test files at once on a CPU that may have
# two cores, and OpenMP threads spin-waiting on an oversubscribed CPU make a tiny model's step
# many times slower. The models here are far too small to gain from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server process on a free loopback port for the whole test session, started
    as `lorafleet up` starts it (a password, dangerous commands renamed); its URL carries the
    password."""
    data = tmp_path_factory.mktemp("redis")
    port = free_port()
    password = secrets.token_urlsafe(16)
    proc = start_server(data, port, password=password, log_file=data / "redis.log")
    yield f"redis://:{password}@127.0.0.1:{port}/0"
    stop_server(proc)


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def prefix():
    """A fresh key prefix per test, so tests sharing one server never see each other's keys."""
    return f"t{next(_prefixes)}"


@pytest.fixture
def store(redis_client, prefix):
    """A job store on the real Redis, under this test's own key prefix."""
    from dispatcher.jobs.store import JobStore

    return JobStore(redis_client, prefix)


def pytest_collection_modifyitems(config, items):
    """The tiers follow the folders: everything under tests/integration/ is `integration`, under
    tests/browser/ `browser` (so `-m "not integration and not browser"` is the fast tier, whether
    or not a module says its marker itself)."""
    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "browser" in parts:
            item.add_marker(pytest.mark.browser)


# The fuzz suite's figures (tests/fuzz/tally.py): each xdist worker hands its counts to the
# controller, which prints them after the run (and writes them to $LORAFLEET_FUZZ_REPORT).
def pytest_sessionfinish(session):
    from tests.fuzz import tally

    tally.sessionfinish(session)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from tests.fuzz import tally

    tally.testnodedown(node)


def pytest_terminal_summary(terminalreporter):
    from tests.fuzz import tally

    tally.terminal_summary(terminalreporter)
