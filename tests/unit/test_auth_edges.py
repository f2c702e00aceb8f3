"""Edges of the dashboard's request hook (review of issue 10, #11 and #18): an anonymous request
on a public endpoint is nobody, not the admin; the printed URL's redirect never leaves the
dashboard. Real app, real Redis."""

from __future__ import annotations

import pytest

from dashboard.app import create_app
from dashboard.errors import Forbidden
from dashboard.identity import current_user
from dispatcher.access.accounts import Accounts
from dispatcher.access.dashtoken import dashboard_token
from dispatcher.settings import Settings

PASSWORD = "correct horse battery"


def _app(tmp_path, redis_server, prefix, accounts: bool):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    if accounts:
        Accounts(s.home).add("ana", PASSWORD, "admin")
    return create_app({"LORAFLEET_SETTINGS": s, "TESTING": True}), s


def test_an_anonymous_request_on_a_public_endpoint_is_no_admin(tmp_path, redis_server, prefix):
    app, _ = _app(tmp_path, redis_server, prefix, accounts=True)
    for path in ("/login", "/healthz"):
        with app.test_request_context(path):
            assert app.preprocess_request() is None  # public: the hook lets it through
            user = current_user()
            assert not user.is_admin and user.name == "", (path, user)
    with app.test_request_context("/login", method="POST", data={"username": "ana"}):
        with pytest.raises(Forbidden):  # no CSRF token: refused, and still nobody
            app.preprocess_request()
        assert not current_user().is_admin
    # Outside the hook (a view called directly) it is still the single-user admin.
    with app.test_request_context("/api/v1/me"):
        assert current_user().is_admin and current_user().name == "local"


def test_the_token_page_form_is_anonymous_too(tmp_path, redis_server, prefix):
    app, _ = _app(tmp_path, redis_server, prefix, accounts=False)
    with app.test_request_context("/token", method="POST"):
        assert app.preprocess_request() is None
        assert not current_user().is_admin


def test_the_printed_url_redirects_only_inside_the_dashboard(tmp_path, redis_server, prefix):
    app, s = _app(tmp_path, redis_server, prefix, accounts=False)
    token = dashboard_token(s.home)
    c = app.test_client()
    # (Werkzeug turns a leading "//" into "/"; browsers read "/\\" as "//", another host.)
    for path in ("//evil.example/", "/\\evil.example/", "/\\/evil.example/", "/\t/evil"):
        resp = c.get("/", query_string={"token": token, "a": "1"},
                      environ_overrides={"PATH_INFO": path})
        assert resp.status_code == 302, path
        where = resp.headers["Location"]
        assert where.startswith("/") and not where.startswith(("//", "/\\")), (path, where)
        assert "\\" not in where and "token" not in where
    # An ordinary path keeps its place and its other arguments.
    resp = c.get(f"/fleet?token={token}&x=1")
    assert resp.status_code == 302 and resp.headers["Location"] == "/fleet?x=1"
