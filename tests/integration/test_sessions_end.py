"""Sessions and logins on a dashboard with accounts, as users meet them: a real dashboard
process, real HTTP with the browser's cookie, and `lorafleet user ...` run as a subprocess.

Each test replays a finding of the shared-machine issue: a cookie replayed after logout, a
password or role change or a removal (and a re-added name) that left old cookies working, 15
parallel wrong passwords that were all checked, a member editing another's evaluation comment.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
import requests

from dispatcher.access.accounts import Accounts
from dispatcher.jobs.evaltable import EvalTable
from tests.fleetproc import ROOT, tiny_fleet

pytestmark = pytest.mark.integration
PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def team(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("teamhome"), "ses")
    acc = Accounts(f.settings.home)
    acc.add("ana", PASSWORD, "admin")
    for name in ("bo", "cy", "dee", "eve"):
        acc.add(name, PASSWORD, "member")
    f.start_dashboard()  # no worker: nothing here runs a job
    yield f
    f.stop()


def log_in(fleet, name: str, password: str = PASSWORD) -> tuple[requests.Session, dict]:
    """A browser's cookie jar logged in as `name`, and the CSRF header its pages carry."""
    s = requests.Session()
    page = s.get(fleet.url + "/login", timeout=10)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    resp = s.post(fleet.url + "/login", data={"username": name, "password": password,
                                              "csrf_token": csrf}, allow_redirects=False,
                  timeout=30)
    assert resp.status_code == 302, resp.text
    jobs = s.get(fleet.url + "/jobs", timeout=10)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', jobs.text).group(1)
    return s, {"X-CSRF-Token": csrf}


def replay(fleet, cookies) -> requests.Response:
    """A fresh client sending only the old cookie (what an attacker who kept it would do)."""
    return requests.get(fleet.url + "/api/v1/me", cookies=cookies, timeout=10)


def cli(fleet, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args], env=fleet.env,
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def test_a_cookie_replayed_after_logout_is_refused(team):
    s, csrf = log_in(team, "bo")
    kept = s.cookies.copy()
    assert replay(team, kept).json()["name"] == "bo"
    s.post(team.url + "/logout", headers=csrf, timeout=10)
    assert replay(team, kept).status_code == 401
    page = requests.get(team.url + "/jobs", cookies=kept, allow_redirects=False, timeout=10)
    assert page.status_code == 302 and "/login" in page.headers["Location"]


def test_a_password_change_by_the_cli_ends_open_sessions(team):
    s, csrf = log_in(team, "cy")
    assert s.get(team.url + "/api/v1/me", timeout=10).json()["name"] == "cy"
    r = cli(team, "user", "password", "cy", "--password-stdin", stdin="a new long password\n")
    assert r.returncode == 0, r.stderr
    resp = s.post(team.url + "/api/v1/jobs", json={"spec": {}}, headers=csrf, timeout=10)
    assert resp.status_code == 401 and "log in" in resp.json()["error"]
    page = s.get(team.url + "/fleet", allow_redirects=False, timeout=10)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    again, _ = log_in(team, "cy", "a new long password")
    assert again.get(team.url + "/api/v1/me", timeout=10).json()["name"] == "cy"


def test_a_role_change_ends_open_sessions(team):
    s, _ = log_in(team, "dee")
    r = cli(team, "user", "role", "dee", "admin")
    assert r.returncode == 0, r.stderr
    assert s.get(team.url + "/api/v1/me", timeout=10).status_code == 401
    # And one made on the Users page (by an admin) too.
    s, _ = log_in(team, "dee")
    ana, ana_csrf = log_in(team, "ana")
    resp = ana.post(team.url + "/api/v1/users/dee/role", json={"role": "member"},
                    headers=ana_csrf, timeout=10)
    assert resp.status_code == 200
    assert s.get(team.url + "/api/v1/me", timeout=10).status_code == 401
    assert team.r.exists(f"{team.prefix}:sessions:dee") == 0


def test_a_removed_and_re_added_name_gets_none_of_the_old_sessions(team):
    s, _ = log_in(team, "eve")
    kept = s.cookies.copy()
    assert cli(team, "user", "remove", "eve").returncode == 0
    assert replay(team, kept).status_code == 401
    r = cli(team, "user", "add", "eve", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert replay(team, kept).status_code == 401  # same name, new account
    fresh, _ = log_in(team, "eve")
    assert fresh.get(team.url + "/api/v1/me", timeout=10).json()["name"] == "eve"


def test_the_cli_keeps_the_last_admin(team):
    for args in (("user", "remove", "ana"), ("user", "role", "ana", "member")):
        r = cli(team, *args)
        assert r.returncode != 0 and "ana is the last admin" in r.stderr, r.stderr
    assert Accounts(team.settings.home).get("ana").is_admin


def test_parallel_wrong_passwords_get_no_more_checks_than_serial_ones(team):
    """15 wrong passwords for one name at once: at most 5 are checked (401), the rest are
    refused unchecked (429). Before, the limit was read, the slow hash ran, and only then was
    the count raised: all 15 were checked."""
    clients = []
    for _ in range(15):  # each its own browser, with its own login page and CSRF token
        s = requests.Session()
        page = s.get(team.url + "/login", timeout=10)
        clients.append((s, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)))
    start = threading.Barrier(15)
    codes: list[int] = []

    def guess(s, csrf):
        start.wait()
        resp = s.post(team.url + "/login", data={"username": "bo", "password": "guess-1234",
                                                 "csrf_token": csrf}, timeout=60)
        codes.append(resp.status_code)

    threads = [threading.Thread(target=guess, args=c) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(codes) == 15 and set(codes) <= {401, 429}
    assert codes.count(401) <= 5 and codes.count(429) >= 10, codes
    team.r.delete(f"{team.prefix}:login-failures:name:bo")
    team.r.delete(f"{team.prefix}:login-failures:address:127.0.0.1")


def test_only_the_owner_or_an_admin_edits_an_evaluation_comment(team):
    table = EvalTable(team.settings.paths.evals / "evaluations.csv")
    ana_job = team.store.create("evaluate", {"base_model": "tiny"}, owner="ana")
    bo_job = team.store.create("evaluate", {"base_model": "tiny"}, owner="bo")
    row = dict(base_model="tiny", loras=[], text_file="t.txt", perplexity=3.0, stride=8,
               max_length=16, tokens=10)
    anas, bos = table.add(**row, job=ana_job), table.add(**row, job=bo_job)
    by_hand = table.add(**row)  # no job: written by hand, or from before jobs were recorded
    bo, bo_csrf = log_in(team, "bo")
    ana, ana_csrf = log_in(team, "ana")

    def edit(who, headers, r, text):
        return who.post(f"{team.url}/api/v1/evaluations/{r['id']}", json={"comment": text},
                        headers=headers, timeout=10)

    resp = edit(bo, bo_csrf, anas, "mine now")
    assert resp.status_code == 403 and "belongs to ana" in resp.json()["error"]
    assert edit(bo, bo_csrf, by_hand, "x").status_code == 403
    assert edit(bo, bo_csrf, bos, "my own").status_code == 200
    assert edit(ana, ana_csrf, bos, "an admin's note").status_code == 200
    assert edit(ana, ana_csrf, by_hand, "ok").status_code == 200
    comments = {r["id"]: r["comment"] for r in table.rows()}
    assert comments == {anas["id"]: "", bos["id"]: "an admin's note", by_hand["id"]: "ok"}
