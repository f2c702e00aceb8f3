"""Login locks as a denial of service (review of issue 10, #7): failed logins are counted before
the check, so whoever reaches the login page can use up a name's or an address's tries. Behind
a trusted reverse proxy the addresses are the real clients' (one client's guesses do not lock
the others out); an admin lifts a name's lock (`lorafleet user unlock`, or the Users API, which
an admin locked out of the page reaches with an API token). Real app, real Redis."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dashboard.app import create_app
from dispatcher.access.accounts import Accounts
from dispatcher.cli import main as cli
from dispatcher.settings import Settings

PASSWORD = "correct horse battery"


def _settings(tmp_path, redis_server, prefix, proxies: int = 0) -> Settings:
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix,
                 trusted_proxies=proxies)
    s.paths.ensure()
    acc = Accounts(s.home)
    if not acc.has_users():
        acc.add("ana", PASSWORD, "admin")
        acc.add("bo", PASSWORD, "member")
    return s


def _app(s: Settings):
    return create_app({"LORAFLEET_SETTINGS": s, "TESTING": True})


def _login(app, name: str, password: str, client_addr: str | None = None) -> int:
    """One browser's login attempt (through a proxy that names `client_addr`): its status."""
    headers = {"X-Forwarded-For": client_addr, "X-Forwarded-Proto": "https"} if client_addr \
        else {}
    c = app.test_client()
    page = c.get("/login", headers=headers)
    csrf = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    return c.post("/login", headers=headers, data={"username": name, "password": password,
                                                   "csrf_token": csrf}).status_code


def test_behind_a_trusted_proxy_one_clients_guesses_lock_out_only_that_client(
        tmp_path, redis_server, prefix):
    app = _app(_settings(tmp_path, redis_server, prefix, proxies=1))
    for n in range(20):  # every try of one address, each for another name
        assert _login(app, f"guess{n}", "wrong-password", "203.0.113.9") == 401
    assert _login(app, "ana", PASSWORD, "203.0.113.9") == 429
    # Another user behind the same proxy (the dashboard sees 127.0.0.1 for both) logs in.
    assert _login(app, "ana", PASSWORD, "198.51.100.7") == 302


def test_without_the_setting_forwarded_addresses_are_not_believed(tmp_path, redis_server,
                                                                  prefix):
    app = _app(_settings(tmp_path, redis_server, prefix))
    for n in range(20):  # a client naming a new address each time gains nothing
        assert _login(app, f"guess{n}", "wrong-password", f"203.0.113.{n}") == 401
    assert _login(app, "ana", PASSWORD, "198.51.100.7") == 429


def test_the_admin_lifts_a_lock_from_the_cli(tmp_path, redis_server, prefix, monkeypatch):
    s = _settings(tmp_path, redis_server, prefix, proxies=1)
    app = _app(s)
    for n in range(5):  # another account's wrong passwords for ana, from five addresses
        assert _login(app, "ana", "wrong-password", f"203.0.113.{n}") == 401
    assert _login(app, "ana", PASSWORD, "198.51.100.7") == 429
    for key, value in (("LORAFLEET_HOME", str(s.home)), ("LORAFLEET_REDIS_URL", redis_server),
                       ("LORAFLEET_PREFIX", prefix)):
        monkeypatch.setenv(key, value)
    out = CliRunner().invoke(cli, ["user", "unlock", "ana"])
    assert out.exit_code == 0 and "unlocked ana" in out.output, out.output
    assert _login(app, "ana", PASSWORD, "198.51.100.7") == 302
    out = CliRunner().invoke(cli, ["user", "unlock", "ana"])
    assert out.exit_code == 0 and "nothing to lift" in out.output


def test_an_admin_locked_out_of_the_page_unlocks_with_an_api_token(tmp_path, redis_server,
                                                                    prefix):
    s = _settings(tmp_path, redis_server, prefix)
    app = _app(s)
    for _ in range(5):
        assert _login(app, "ana", "wrong-password") == 401
    assert _login(app, "ana", PASSWORD) == 429  # the lock holds for the right password too
    acc = Accounts(s.home)
    admin = {"Authorization": f"Bearer {acc.new_token('ana')}"}  # tokens are not throttled
    member = {"Authorization": f"Bearer {acc.new_token('bo')}"}
    c = app.test_client()
    assert c.post("/api/v1/users/ana/unlock", headers=member).status_code == 403
    resp = c.post("/api/v1/users/ana/unlock", headers=admin)
    assert resp.status_code == 200 and resp.get_json() == {"name": "ana", "unlocked": True}
    assert _login(app, "ana", PASSWORD) == 302


def test_a_bad_proxy_count_is_refused(tmp_path, redis_server):
    s = Settings.from_env({"LORAFLEET_HOME": str(tmp_path / "h"), "LORAFLEET_TRUSTED_PROXIES":
                           "-1", "LORAFLEET_REDIS_URL": redis_server})
    with pytest.raises(SystemExit, match="LORAFLEET_TRUSTED_PROXIES"):
        _app(s)
