"""Fixtures of the fuzz properties: one seeded fleet per mode for a whole test module (each
module its own data folder and Redis key prefix, on the session's real Redis server)."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.fuzz.harness import ACCOUNTS, SINGLE_USER, build_fleet

_fleets = itertools.count()


@pytest.fixture(scope="module")
def fleets(tmp_path_factory, redis_server):
    """{mode: Fleet} for single-user and accounts mode."""
    out = {}
    for mode in (SINGLE_USER, ACCOUNTS):
        prefix = f"fz{os.getpid()}-{next(_fleets)}"
        out[mode] = build_fleet(tmp_path_factory.mktemp(mode), redis_server, prefix, mode)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny real model folder (tests/tiny.py): its tokenizer is what previews use."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
