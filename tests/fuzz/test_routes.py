"""Every route of the dashboard (the app's url_map, so a new route cannot be forgotten) under
hostile requests, in single-user and in accounts mode: no answer of 500 or more and no
traceback; no secret the request did not send; a refusal is a 4xx that says why (under /api/v1
JSON whose 400s name the field; elsewhere a page with the message) and changes nothing in the
data folder or Redis (tests/fuzz/harness.py lists the throttle and session keys a refusal may
touch, and why); no request, whatever its answer, writes outside the data folder."""

from __future__ import annotations

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import tally
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import (
    ACCOUNTS,
    SINGLE_USER,
    changes,
    check_answer,
    outside_changes,
    refused,
    send,
    snapshot,
)
from tests.fuzz.strategies import ROUTES, app_routes, draw_request

pytestmark = pytest.mark.fuzz


def missing_routes(app: Flask) -> tuple[set, set]:
    """(routes of the app without a fuzz strategy, strategies of routes the app lacks)."""
    have = set(app_routes(app))
    return have - set(ROUTES), set(ROUTES) - have


def test_every_route_has_a_fuzz_strategy(fleets):
    app = fleets[SINGLE_USER].app
    unfuzzed, stale = missing_routes(app)
    assert not unfuzzed, f"routes without an entry in tests/fuzz/strategies.py ROUTES: {unfuzzed}"
    assert not stale, f"ROUTES entries of routes the app no longer has: {stale}"


def test_a_new_route_is_noticed(fleets):
    from dashboard.app import create_app

    app = create_app({"LORAFLEET_SETTINGS": fleets[SINGLE_USER].settings})
    app.add_url_rule("/api/v1/brand-new/<thing>", "brand_new", lambda thing: "",
                     methods=["POST"])
    assert missing_routes(app) == ({("POST", "/api/v1/brand-new/<thing>")}, set())


@pytest.mark.parametrize("mode", [SINGLE_USER, ACCOUNTS])
@pytest.mark.parametrize("route", sorted(ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
@fuzz_settings(short=4)
@given(data=st.data())
def test_route_under_hostile_requests(fleets, mode, route, data):
    fleet = fleets[mode]
    prop = f"routes {mode} | {route[0]} {route[1]}"
    fleet.heal()
    req = draw_request(data, fleet, *route)
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    ans = send(fleet, req)
    changed = changes(before, snapshot(fleet)) if refused(ans) else None
    tally.answer(prop, ans.status, refused(ans), changed.bytes_written if changed else 0)
    check_answer(fleet, req, ans, secret_values)
    outside = outside_changes(fleet, before)
    assert not outside, f"{req.method} {req.path} ({ans.status}) wrote outside: {outside}"
    if changed:
        pytest.fail(f"{req.method} {req.path} was refused ({ans.status}) but wrote: "
                    f"{changed.describe()}")
