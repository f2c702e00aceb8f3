"""The dashboard's HTML forms as a browser sends them, and CSRF on every change.

- Every unsafe route (POST), sent by a logged-in browser with its CSRF token missing, wrong or
  another session's: a 403 that says so, and nothing at all changes (not even a throttle
  counter: the check comes before anything else).
- The login form (accounts mode) and the token form (single-user mode), filled in with anything,
  from the page's own hidden fields (the CSRF token right, wrong or missing): a redirect to a
  page of this dashboard, or the form again with its message (401, 429) or the error page
  (403); a refusal writes nothing but the login throttle's counters.
- The log-out form: the session ends only with the page's own CSRF token.
"""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import tally
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import (
    ACCOUNTS,
    SINGLE_USER,
    Answer,
    Req,
    changes,
    check_answer,
    refused,
    send,
    snapshot,
)
from tests.fuzz.strategies import ROUTES, draw_request, form_body, wire_text

pytestmark = pytest.mark.fuzz

UNSAFE = sorted(r for r in ROUTES if r[0] == "POST" and r[1] != "/token")  # /token: no CSRF
HIDDEN_CSRF = re.compile(rb'name="csrf_token" value="([^"]+)"')


@pytest.mark.parametrize("mode", [SINGLE_USER, ACCOUNTS])
@fuzz_settings(short=30, weight=2)
@given(data=st.data())
def test_a_change_without_the_sessions_csrf_token_is_refused(fleets, mode, data):
    fleet = fleets[mode]
    prop = f"forms: CSRF {mode}"
    fleet.heal()
    route = data.draw(st.sampled_from(UNSAFE), label="route")
    req = draw_request(data, fleet, *route)
    req.method, req.who, req.host = route[0], "browser", "localhost"
    req.csrf = data.draw(st.sampled_from(("missing", "wrong", "other")), label="csrf")
    req.headers = [(k, v) for k, v in req.headers
                   if k.lower() not in ("x-csrf-token", "authorization", "cookie", "host")]
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    ans = send(fleet, req)
    changed = changes(before, snapshot(fleet), strict=True)
    tally.answer(prop, ans.status, refused(ans), changed.bytes_written)
    check_answer(fleet, req, ans, secret_values)
    assert ans.status == 403 and b"CSRF token" in ans.body, (route, ans.status, ans.body[:300])
    assert not changed, f"{route} without its CSRF token wrote {changed.describe()}"


def _page_form(client, path: str, host: str = "localhost") -> bytes:
    page = client.get(path, base_url=f"http://{host}")
    return page.get_data()


def _post_form(fleet, client, path: str, fields: dict[str, str]) -> tuple[Req, Answer]:
    body = urlencode({k: wire_text(v) for k, v in fields.items()}).encode()
    req = Req(method="POST", path=path, body=body,
              content_type="application/x-www-form-urlencoded", who="browser")
    resp = client.post(path, data=body, content_type=req.content_type,
                       base_url="http://localhost")
    ans = Answer(resp.status_code, resp.headers, resp.get_data(), resp.mimetype)
    return req, ans


@fuzz_settings(short=12, weight=0.5)
@given(data=st.data())
def test_the_login_form_filled_in_with_anything(fleets, data):
    """Accounts mode: the login page's form, its CSRF token right, wrong or missing."""
    fleet = fleets[ACCOUNTS]
    prop = "forms: login form"
    fleet.heal()
    client = fleet.app.test_client()
    page = _page_form(client, "/login")
    token = HIDDEN_CSRF.search(page).group(1).decode()
    fields = form_body(data, fleet, "login")
    csrf = data.draw(st.sampled_from(("right", "right", "wrong", "missing")), label="csrf")
    if csrf != "missing":
        fields["csrf_token"] = token if csrf == "right" else token[::-1]
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    req, ans = _post_form(fleet, client, "/login", fields)
    changed = changes(before, snapshot(fleet))
    tally.answer(prop, ans.status, refused(ans), changed.bytes_written if refused(ans) else 0)
    check_answer(fleet, req, ans, secret_values)
    assert not changed.outside_files, changed.describe()
    if csrf != "right":
        assert ans.status == 403 and not changes(before, snapshot(fleet), strict=True)
        return
    assert ans.status in (302, 401, 429), (ans.status, ans.body[:300])
    if refused(ans):
        assert not changed, changed.describe()
        assert b'data-testid="login-error"' in ans.body


@fuzz_settings(short=12, weight=0.5)
@given(data=st.data())
def test_the_token_form_filled_in_with_anything(fleets, data):
    """Single-user mode: the token page's form (it needs no CSRF token: README, Accounts)."""
    fleet = fleets[SINGLE_USER]
    prop = "forms: token form"
    client = fleet.app.test_client()
    page = _page_form(client, "/fleet")
    assert b'data-testid="token-form"' in page
    fields = form_body(data, fleet, "token")
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    req, ans = _post_form(fleet, client, "/token", fields)
    changed = changes(before, snapshot(fleet))
    tally.answer(prop, ans.status, refused(ans), changed.bytes_written if refused(ans) else 0)
    check_answer(fleet, req, ans, secret_values)
    assert not changed.outside_files, changed.describe()
    right = fields.get("token", "").strip() == fleet.dashboard_token
    assert ans.status == 302 if right else ans.status in (401, 429), (ans.status, right)
    if refused(ans):
        assert not changed, changed.describe()
        assert b'data-testid="token-error"' in ans.body


@pytest.mark.parametrize("mode", [SINGLE_USER, ACCOUNTS])
@fuzz_settings(short=6, weight=0.5)
@given(data=st.data())
def test_the_logout_form_needs_the_pages_csrf_token(fleets, mode, data):
    fleet = fleets[mode]
    prop = f"forms: logout {mode}"
    fleet.heal()
    user = fleet.session_user(data.draw(st.sampled_from(fleet.users), label="user"))
    sid, _ = fleet.browser_session(user)
    client = fleet.app.test_client()
    with client.session_transaction(base_url="http://localhost") as sess:
        sess["sid"] = sid
    page = _page_form(client, "/jobs")
    token = HIDDEN_CSRF.search(page).group(1).decode()
    csrf = data.draw(st.sampled_from(("right", "wrong", "missing", "non-ascii")), label="csrf")
    fields = {"right": {"csrf_token": token}, "wrong": {"csrf_token": token[::-1]},
              "missing": {}, "non-ascii": {"csrf_token": token[:-1] + "é"}}[csrf]
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    req, ans = _post_form(fleet, client, "/logout", fields)
    changed = changes(before, snapshot(fleet), strict=True)
    tally.answer(prop, ans.status, refused(ans), changed.bytes_written if refused(ans) else 0)
    check_answer(fleet, req, ans, secret_values)
    assert not changed.outside_files, changed.describe()
    if csrf == "right":
        assert ans.status == 302 and fleet.r.exists(f"{fleet.prefix}:session:{sid}") == 0
    else:
        assert ans.status == 403 and not changed, changed.describe()
