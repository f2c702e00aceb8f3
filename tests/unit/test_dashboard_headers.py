"""Every answer of the dashboard carries the framing, sniffing, referrer and content policies."""

from __future__ import annotations

import pytest

from dashboard.app import create_app
from dispatcher.settings import Settings
from tests.appclient import client_for


@pytest.fixture
def client(tmp_path, redis_server, prefix):
    app = create_app({"TESTING": True, "LORAFLEET_SETTINGS": Settings(
        home=tmp_path, redis_url=redis_server, prefix=prefix)})
    return client_for(app)


@pytest.mark.parametrize("path", ["/", "/jobs", "/api/v1/jobs", "/static/common.js",
                                  "/no-such-page", "/api/v1/jobs/nope"])
def test_security_headers_on_every_answer(client, path):
    resp = client.get(path)
    h = resp.headers
    assert h["X-Frame-Options"] == "DENY"
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "same-origin"
    csp = dict(d.strip().split(" ", 1) for d in h["Content-Security-Policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'self'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert "unsafe" not in h["Content-Security-Policy"]


def test_an_unreadable_redis_password_is_a_503_that_says_why(tmp_path):
    """A dashboard started from a data folder whose Redis password it cannot have answers with
    the reason, not with an internal error."""
    client = client_for(create_app({"TESTING": True,
                                    "LORAFLEET_SETTINGS": Settings(home=tmp_path)}))
    resp = client.get("/api/v1/jobs")
    assert resp.status_code == 503
    assert "Redis password" in resp.get_json()["error"]
