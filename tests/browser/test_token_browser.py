"""The single-user dashboard's token, as users meet it: a real dashboard process, Chromium
opening the printed URL, the CLI run as a subprocess by the data folder's OS user with no
setting, a process of another data folder (or, as root, another OS user) that gets nothing, and
wrong tokens refused and then throttled."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys

import pytest
import requests

from dispatcher.access.dashtoken import TOKEN_FILE
from tests.fleetproc import ROOT, tiny_fleet

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def solo(redis_server, tmp_path_factory):
    """A single-user fleet's dashboard (named `solo`, not `fleet`: pages here start logged out)."""
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("solohome"), "tok")
    f.start_dashboard()
    yield f
    f.stop()


def _cli(env: dict[str, str], *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "LORAFLEET_TOKEN"}
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_no_token_gets_the_token_page_or_a_401(solo, page):
    resp = requests.get(solo.url + "/api/v1/jobs", timeout=10)
    assert resp.status_code == 401 and TOKEN_FILE in resp.json()["error"]
    resp = requests.post(solo.url + "/api/v1/jobs", json={"spec": {}}, timeout=10)
    assert resp.status_code == 401 and solo.store.list() == []
    assert requests.get(solo.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(solo.url + "/static/app.css", timeout=10).status_code == 200
    page.goto(solo.url + "/fleet")
    assert page.locator("[data-testid='token-page']").is_visible()
    assert page.locator("#token").is_visible() and "lorafleet up" in page.content()


def test_the_printed_url_logs_the_browser_in_and_leaves_the_address_bar(solo, page):
    page.goto(f"{solo.url}/fleet?token={solo.token}&x=1")
    page.wait_for_url(re.compile(r"/fleet\?x=1$"))
    assert "token" not in page.url
    assert page.locator("[data-testid='nav-jobs']").is_visible()
    assert not page.locator("[data-testid='token-page']").is_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "lorafleet_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.goto(solo.url + "/jobs")  # the session carries on without the token
    assert page.locator("[data-testid='nav-jobs']").is_visible()
    page.click("[data-testid='logout']")
    page.wait_for_selector("[data-testid='token-page']")


def test_pasting_the_token_logs_in_and_a_wrong_one_is_refused(solo, page):
    page.goto(solo.url + "/sweeps")
    page.fill("#token", "not-the-token")
    page.click("[data-testid='token-submit']")
    assert "wrong token" in page.locator("[data-testid='token-error']").inner_text()
    page.fill("#token", solo.token)
    page.click("[data-testid='token-submit']")
    page.wait_for_url(re.compile(r"/sweeps$"))
    assert not page.locator("[data-testid='token-page']").is_visible()
    solo.r.delete(f"{solo.prefix}:token-failures:address:127.0.0.1")


def test_the_cli_of_the_data_folders_user_needs_no_setting(solo, tmp_path):
    """LORAFLEET_HOME set (as `lorafleet up` was started), or from any other directory with no
    setting at all (the per-user registry the dashboard wrote)."""
    r = _cli(solo.env, "status", "--json", "--url", solo.url)
    assert r.returncode == 0, r.stderr
    anywhere = {k: v for k, v in solo.env.items() if k not in ("LORAFLEET_HOME", "LORAFLEET_PORT")}
    r = _cli(anywhere, "status", "--json", "--url", solo.url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_another_data_folder_gets_a_401_that_says_what_to_do(solo, tmp_path):
    """A process without this data folder's token (what another local account is)."""
    other = {**solo.env, "LORAFLEET_HOME": str(tmp_path / "other"),
             "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = _cli(other, "status", "--url", solo.url)
    assert r.returncode != 0 and "needs its token" in r.stderr
    assert "OS user who started the fleet" in r.stderr


def test_wrong_tokens_are_refused_then_throttled(solo):
    solo.r.delete(f"{solo.prefix}:token-failures:address:127.0.0.1")
    wrong = {"Authorization": "Bearer " + "x" * 43}
    codes = [requests.get(solo.url + "/api/v1/jobs", headers=wrong, timeout=10).status_code
             for _ in range(5)]
    assert codes == [401] * 5
    assert requests.get(solo.url + "/api/v1/jobs?token=nope", timeout=10).status_code == 429
    resp = requests.get(solo.url + "/api/v1/jobs", headers=wrong, timeout=10)
    assert resp.status_code == 429 and "too many wrong tokens" in resp.json()["error"]
    # The owner is not locked out by someone else's guesses: the right token still works.
    assert solo.http.get(solo.url + "/api/v1/jobs", timeout=10).status_code == 200
    solo.r.delete(f"{solo.prefix}:token-failures:address:127.0.0.1")


def test_a_new_token_file_ends_the_old_sessions(solo, tmp_path):
    s = requests.Session()
    assert s.get(f"{solo.url}/jobs?token={solo.token}", timeout=10).status_code == 200
    assert s.get(solo.url + "/api/v1/me", timeout=10).status_code == 200
    token_file = solo.home / TOKEN_FILE
    old = token_file.read_text()
    token_file.unlink()
    try:
        subprocess.run([sys.executable, "-c", "from dispatcher.access.dashtoken import dashboard_token;"
                        f"dashboard_token({str(solo.home)!r})"], cwd=ROOT, check=True,
                       env=solo.env)
        assert solo.token != old.strip()
        assert s.get(solo.url + "/api/v1/me", timeout=10).status_code == 401
        assert solo.http.get(solo.url + "/api/v1/me", timeout=10).status_code == 200
    finally:
        token_file.write_text(old)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                    reason="needs root to make a throwaway OS user")
def test_another_os_user_can_neither_read_the_token_nor_get_in(solo):
    name = "lfprobe"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        pwd.getpwnam(name)
        as_other = ["runuser", "-u", name, "--"]
        r = subprocess.run([*as_other, "cat", str(solo.home / TOKEN_FILE)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = subprocess.run([*as_other, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            solo.url + "/api/v1/jobs"], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout == "401"
    finally:
        subprocess.run(["userdel", name], capture_output=True)
