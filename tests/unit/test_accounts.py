"""Accounts file, the dashboard's login / token / CSRF / role checks, and the CLI's `user`
commands, against a real Redis server and the real app."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from click.testing import CliRunner

from dashboard.app import create_app
from dispatcher.access.accounts import AccountError, Accounts, is_loopback, single_user_refusal
from dispatcher.cli import main as cli
from dispatcher.settings import Settings
from tests.appclient import browser_for, client_for
from tests.datafolder import PASSWORD, small_data_folder


# ------------------------------------------------------------------------------ the file
def test_passwords_are_hashed_and_checked(tmp_path):
    acc = Accounts(tmp_path)
    assert not acc.has_users()
    acc.add("ana", PASSWORD, "admin")
    raw = (tmp_path / "accounts.json").read_text()
    assert PASSWORD not in raw and "scrypt$" in raw
    assert stat.S_IMODE(os.stat(tmp_path / "accounts.json").st_mode) == 0o600
    assert acc.login("ana", PASSWORD).is_admin
    assert acc.login("ana", PASSWORD + "x") is None
    assert acc.login("nobody", PASSWORD) is None
    # A second process's view (a fresh object) sees the same.
    assert Accounts(tmp_path).get("ana").role == "admin"


def test_account_changes_refuse_bad_input(tmp_path):
    acc = Accounts(tmp_path)
    with pytest.raises(AccountError, match="first account must be an admin"):
        acc.add("ana", PASSWORD)
    acc.add("ana", PASSWORD, "admin")
    with pytest.raises(AccountError, match="already exists"):
        acc.add("ana", PASSWORD)
    with pytest.raises(AccountError, match="at least 8"):
        acc.add("bo", "short")
    with pytest.raises(AccountError, match="user name"):
        acc.add("../x", PASSWORD)
    with pytest.raises(AccountError, match="role"):
        acc.add("bo", PASSWORD, "root")
    with pytest.raises(AccountError, match="no user"):
        acc.remove("bo")
    assert [u["name"] for u in acc.users()] == ["ana"]


def test_tokens_are_kept_as_digests_and_can_be_revoked(tmp_path):
    acc = Accounts(tmp_path)
    acc.add("ana", PASSWORD, "admin")
    token = acc.new_token("ana", "laptop")
    assert token.startswith("lf_") and token not in (tmp_path / "accounts.json").read_text()
    assert acc.for_token(token).name == "ana"
    assert acc.for_token(token + "x") is None and acc.for_token("nonsense") is None
    assert acc.revoke_tokens("ana") == 1
    assert acc.for_token(token) is None
    acc.new_token("ana")
    acc.remove("ana")
    assert acc.for_token(token) is None and not acc.has_users()


def test_only_loopback_may_run_without_accounts(tmp_path):
    acc = Accounts(tmp_path)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert is_loopback(host) and single_user_refusal(host, acc) is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        assert "without accounts" in single_user_refusal(host, acc)
    acc.add("ana", PASSWORD, "admin")
    assert single_user_refusal("0.0.0.0", acc) is None


# ------------------------------------------------------------------------------ the dashboard
@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix, users=True)


@pytest.fixture
def app(settings):
    return create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True})


SPEC = {"lora_name": "l", "base_model": "tiny", "dataset": "d.json", "format": "alpaca-format",
        "epochs": 1, "micro_batch_size": 1, "batch_size": 1}


def login(app, name):
    """A browser-like client logged in as `name`, with the CSRF token its pages carry."""
    c = app.test_client()
    page = c.get("/login")
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    resp = c.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": csrf,
                                  "next": "/fleet"})
    assert resp.status_code == 302 and resp.headers["Location"] == "/fleet"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    jobs = c.get("/jobs")
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', jobs.data).group(1).decode()
    return c, {"X-CSRF-Token": csrf}


def test_pages_need_a_login_and_api_calls_a_login_or_token(app, settings):
    c = app.test_client()
    resp = c.get("/jobs")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login?next=/jobs")
    resp = c.get("/api/v1/jobs")
    assert resp.status_code == 401 and "log in" in resp.get_json()["error"]
    assert c.get("/static/app.css").status_code == 200  # the login page needs its styles
    bad = c.post("/login", data={"username": "ana", "password": "wrong-password",
                                 "csrf_token": "x"})
    assert bad.status_code == 403  # no CSRF token from a login page: refused before checking
    token = Accounts(settings.home).new_token("bo")
    resp = c.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert resp.get_json() == {"name": "bo", "role": "member", "mode": "accounts",
                               "by_token": True}
    resp = c.get("/api/v1/jobs", headers={"Authorization": "Bearer lf_forged"})
    assert resp.status_code == 401 and "not valid" in resp.get_json()["error"]


def test_wrong_password_is_refused_with_one_message(app):
    c = app.test_client()
    page = c.get("/login")
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    for name in ("ana", "nobody"):
        resp = c.post("/login", data={"username": name, "password": "wrong-password",
                                      "csrf_token": csrf})
        assert resp.status_code == 401 and b"wrong user name or password" in resp.data
    assert c.get("/api/v1/jobs").status_code == 401


def test_session_posts_need_the_csrf_token(app, store):
    c, csrf = login(app, "bo")
    assert c.post("/api/v1/jobs", json={"kind": "train", "spec": SPEC}).status_code == 403
    assert c.post("/api/v1/jobs", json={"kind": "train", "spec": SPEC},
                  headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert store.list() == []
    resp = c.post("/api/v1/jobs", json={"kind": "train", "spec": SPEC}, headers=csrf)
    assert resp.status_code == 201
    assert store.get(resp.get_json()["id"])["owner"] == "bo"


def test_members_manage_their_own_jobs_admins_any(app, store, settings):
    bo, bo_csrf = login(app, "bo")
    ana, ana_csrf = login(app, "ana")
    cy_token = Accounts(settings.home).new_token("cy")
    cy = {"Authorization": f"Bearer {cy_token}"}  # a token needs no CSRF token
    bo_job = bo.post("/api/v1/jobs", json={"spec": SPEC}, headers=bo_csrf).get_json()["id"]
    # (Another LoRA name: "l" is bo's now, and a member may not train into another's LoRA.)
    cy_job = app.test_client().post("/api/v1/jobs", json={"spec": {**SPEC, "lora_name": "cy-l"}},
                                    headers=cy)
    cy_job = cy_job.get_json()["id"]

    # A member cannot submit for someone else, nor use urgent; an admin can.
    resp = bo.post("/api/v1/jobs", json={"spec": SPEC, "owner": "cy"}, headers=bo_csrf)
    assert resp.status_code == 400 and resp.get_json()["errors"][0]["field"] == "owner"
    resp = bo.post("/api/v1/jobs", json={"spec": SPEC, "priority": "urgent"}, headers=bo_csrf)
    assert resp.status_code == 400 and "only an admin" in json.dumps(resp.get_json())
    resp = ana.post("/api/v1/jobs", json={"spec": SPEC, "owner": "cy", "priority": "urgent"},
                    headers=ana_csrf)
    assert resp.status_code == 201 and store.get(resp.get_json()["id"])["owner"] == "cy"

    # Everyone sees every job; only the owner (or an admin) changes one.
    assert {j["id"] for j in bo.get("/api/v1/jobs").get_json()["jobs"]} >= {bo_job, cy_job}
    assert bo.get(f"/jobs/{cy_job}").status_code == 200
    resp = bo.post(f"/api/v1/jobs/{cy_job}/cancel", headers=bo_csrf)
    assert resp.status_code == 403 and "cy" in resp.get_json()["error"]
    resp = bo.post(f"/api/v1/jobs/{cy_job}/priority", json={"priority": "high"}, headers=bo_csrf)
    assert resp.status_code == 403
    assert store.get(cy_job)["state"] == "queued" and store.get(cy_job)["priority"] == "normal"
    resp = bo.post(f"/api/v1/jobs/{bo_job}/priority", json={"priority": "urgent"},
                   headers=bo_csrf)
    assert resp.status_code == 403 and "only an admin" in resp.get_json()["error"]
    assert bo.post(f"/api/v1/jobs/{bo_job}/cancel", headers=bo_csrf).status_code == 200
    assert ana.post(f"/api/v1/jobs/{cy_job}/cancel", headers=ana_csrf).status_code == 200
    assert store.get(cy_job)["state"] == "cancelled"


def test_logout_ends_the_session(app):
    c, csrf = login(app, "ana")
    assert c.get("/fleet").status_code == 200
    assert b'data-testid="current-user">ana' in c.get("/fleet").data
    c.post("/logout", headers=csrf)
    assert c.get("/fleet").status_code == 302


def test_login_redirects_only_inside_the_dashboard(app):
    c = app.test_client()
    page = c.get("/login")
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example",
                   "/\t/evil.example", "/\n/evil.example", "/ /evil.example"):
        resp = c.post("/login", data={"username": "ana", "password": PASSWORD,
                                      "csrf_token": csrf, "next": target})
        assert resp.headers["Location"] == "/jobs"
        page = c.get("/login")  # logged in now: /login sends on; a fresh token for the next try
        c = app.test_client()
        page = c.get("/login")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()


def test_single_user_mode_browser_posts_need_the_csrf_token(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "solo", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": True})
    c, csrf = browser_for(app)
    page = c.get("/jobs")
    assert page.status_code == 200 and b"single-user mode" in page.data
    # A cross-site page posting from the user's browser: it has the cookie, not the token.
    resp = c.post("/api/v1/jobs", json={"spec": SPEC}, headers={"Origin": "https://evil.example"})
    assert resp.status_code == 403
    assert c.post("/api/v1/jobs", json={"spec": SPEC}).status_code == 403
    resp = c.post("/api/v1/jobs", json={"spec": SPEC}, headers=csrf)
    assert resp.status_code == 400  # reached the spec check: no model in this data folder
    # A script or the CLI sends the dashboard token and needs no CSRF token.
    resp = client_for(app).post("/api/v1/jobs", json={"spec": SPEC})
    assert resp.status_code == 400
    assert client_for(app).get("/api/v1/me").get_json()["mode"] == "single-user"
    # Neither a cookie-less request without the token (another local account) gets in.
    assert app.test_client().post("/api/v1/jobs", json={"spec": SPEC}).status_code == 401


# ------------------------------------------------------------------------------ the CLI
def test_cli_user_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "h"))
    run = CliRunner().invoke
    r = run(cli, ["user", "add", "ana", "--role", "admin", "--password-stdin"],
            input=PASSWORD + "\n")
    assert r.exit_code == 0 and "added admin ana" in r.output
    r = run(cli, ["user", "add", "ana", "--password-stdin"], input=PASSWORD + "\n")
    assert r.exit_code != 0 and "already exists" in r.output
    r = run(cli, ["user", "add", "bo", "--password-stdin"], input="short\n")
    assert r.exit_code != 0 and "at least 8" in r.output
    r = run(cli, ["user", "token", "ana"])
    token = r.output.strip()
    assert r.exit_code == 0 and token.startswith("lf_")
    assert Accounts(tmp_path / "h").for_token(token).name == "ana"
    r = run(cli, ["user", "list"])
    assert "ana" in r.output and "admin" in r.output and "1 token" in r.output
    r = run(cli, ["user", "remove", "ana"])
    assert r.exit_code == 0 and not Accounts(tmp_path / "h").has_users()


def test_up_refuses_a_public_address_without_accounts(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "h"))
    r = CliRunner().invoke(cli, ["up", "--gpus", "cpu", "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "without accounts" in r.output
    assert not (tmp_path / "h" / "redis").exists() or not any((tmp_path / "h" / "redis").iterdir())


# ------------------------------------------------------------------------------ the Users page
def test_admins_manage_users_in_the_dashboard(app, settings):
    ana, ana_csrf = login(app, "ana")
    page = ana.get("/users")
    assert page.status_code == 200 and b'data-user="bo"' in page.data
    assert b'data-testid="nav-users"' in ana.get("/jobs").data

    def post(client, path, body, headers):
        return client.post(f"/api/v1/users{path}", json=body, headers=headers)

    resp = post(ana, "", {"name": "dee", "role": "member", "password": PASSWORD}, ana_csrf)
    assert resp.status_code == 201 and Accounts(settings.home).login("dee", PASSWORD)
    resp = post(ana, "", {"name": "dee", "role": "member", "password": PASSWORD}, ana_csrf)
    assert resp.status_code == 400 and resp.get_json()["errors"][0]["field"] == "name"
    resp = post(ana, "", {"name": "eve", "role": "member", "password": "short"}, ana_csrf)
    assert resp.status_code == 400 and resp.get_json()["errors"][0]["field"] == "password"
    assert post(ana, "", {"name": "eve", "password": PASSWORD}, {}).status_code == 403  # no CSRF

    token = post(ana, "/dee/token", {}, ana_csrf).get_json()["token"]
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.get_json()["name"] == "dee"
    assert post(ana, "/dee/token/revoke", {}, ana_csrf).get_json()["revoked"] == 1
    assert post(ana, "/dee/role", {"role": "admin"}, ana_csrf).status_code == 200
    assert Accounts(settings.home).get("dee").is_admin
    assert post(ana, "/dee/remove", {}, ana_csrf).status_code == 200
    assert Accounts(settings.home).get("dee") is None

    # No lock-out: an admin cannot remove or demote themself.
    resp = post(ana, "/ana/remove", {}, ana_csrf)
    assert resp.status_code == 409 and "your own account" in resp.get_json()["error"]
    assert post(ana, "/ana/role", {"role": "member"}, ana_csrf).status_code == 409
    assert Accounts(settings.home).get("ana").is_admin

    # Members neither see nor use any of it.
    bo, bo_csrf = login(app, "bo")
    assert bo.get("/users").status_code == 403
    assert b'data-testid="nav-users"' not in bo.get("/jobs").data
    resp = post(bo, "", {"name": "mal", "role": "admin", "password": PASSWORD}, bo_csrf)
    assert resp.status_code == 403 and Accounts(settings.home).get("mal") is None


def test_the_first_account_made_in_the_dashboard_turns_logins_on(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "solo", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": True})
    c, _ = browser_for(app)
    page = c.get("/users")
    assert page.status_code == 200 and b"single-user mode" in page.data
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page.data).group(1).decode()
    resp = c.post("/api/v1/users", json={"name": "ana", "role": "admin", "password": PASSWORD},
                  headers={"X-CSRF-Token": csrf})
    assert resp.status_code == 201 and resp.get_json()["logins_on"] is True
    assert c.get("/api/v1/jobs").status_code == 401
    assert c.get("/jobs").status_code == 302


def test_a_public_dashboard_never_falls_back_to_single_user(tmp_path, redis_server, prefix):
    """Serving 0.0.0.0 with accounts, then every account removed (with the CLI): requests are
    refused, not served as the open single-user mode."""
    s = Settings(home=tmp_path / "pub", redis_url=redis_server, prefix=prefix,
                 dashboard_host="0.0.0.0")
    s.paths.ensure()
    acc = Accounts(s.home)
    acc.add("ana", PASSWORD, "admin")
    app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": True})
    assert app.test_client().get("/api/v1/jobs").status_code == 401
    acc.remove("ana")
    resp = app.test_client().get("/api/v1/jobs")
    assert resp.status_code == 503 and "no accounts left" in resp.get_json()["error"]
    assert app.test_client().get("/jobs").status_code == 503
    assert app.test_client().get("/healthz").status_code == 200


def test_single_user_mode_answers_only_to_this_machines_names(tmp_path, redis_server, prefix):
    """DNS rebinding: another site's name pointed at 127.0.0.1 must not reach the open
    dashboard."""
    s = Settings(home=tmp_path / "solo2", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    c = client_for(create_app({"LORAFLEET_SETTINGS": s, "TESTING": True}))
    for host in ("localhost", "127.0.0.1:8765", "[::1]:8765", "localhost:9000"):
        assert c.get("/api/v1/me", headers={"Host": host}).status_code == 200, host
    resp = c.get("/api/v1/me", headers={"Host": "evil.example:8765"})
    assert resp.status_code == 403 and "evil.example" in resp.get_json()["error"]


def test_request_bodies_are_bounded(tmp_path, redis_server, prefix):
    s = Settings(home=tmp_path / "small", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": True,
                      "LORAFLEET_UPLOAD_MAX_BYTES": 1000})
    resp = client_for(app).post("/api/v1/jobs", data=b"x" * (2 * 2**20),
                                  content_type="application/json")
    assert resp.status_code == 413


def test_failed_logins_lock_the_name_for_a_while(app, settings, redis_client, prefix):
    """Five wrong passwords for ana: the sixth try is refused before the password is checked,
    even the right one, until the window ends; other names still log in; a success resets."""
    def attempt(name, password):  # a fresh browser each time: a login renews the CSRF token
        c = app.test_client()
        page = c.get("/login")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
        return c.post("/login", data={"username": name, "password": password,
                                      "csrf_token": csrf})

    assert attempt("bo", "wrong-password").status_code == 401
    assert attempt("bo", PASSWORD).status_code == 302  # a success clears bo's count
    for _ in range(5):
        assert attempt("ana", "wrong-password").status_code == 401
    refused = attempt("ANA", PASSWORD)  # names count case-insensitively, as they log in
    assert refused.status_code == 429
    assert b"too many failed logins: try again in 15 min" in refused.data
    assert attempt("cy", PASSWORD).status_code == 302
    key = f"{prefix}:login-failures:name:ana"
    assert 0 < redis_client.ttl(key) <= 15 * 60
    redis_client.delete(key)  # the window has passed
    assert attempt("ana", PASSWORD).status_code == 302
    assert redis_client.get(key) is None


def test_failed_logins_from_one_address_are_limited_too(settings, redis_server, redis_client,
                                                        prefix):
    from dispatcher.access.throttle import LoginThrottle

    throttle = LoginThrottle(redis_client, prefix, name_limit=100, address_limit=3, window_s=60)
    for n in range(3):
        assert throttle.reserve(f"guess{n}", "203.0.113.9") == 0
    assert 0 < throttle.reserve("anyone", "203.0.113.9") <= 60
    assert throttle.reserve("anyone", "198.51.100.1") == 0
