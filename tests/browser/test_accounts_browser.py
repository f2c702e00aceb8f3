"""Accounts as users meet them: a real dashboard process with accounts, Chromium logging in and
submitting through the form (CSRF token and session cookie), the CLI with and without a token,
and a dashboard that refuses a public address without accounts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dispatcher.access.accounts import Accounts
from tests.fleetproc import ROOT, tiny_fleet

pytestmark = pytest.mark.browser
PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    f = tiny_fleet(redis_server, tmp_path_factory.mktemp("accountshome"), "acc")
    acc = Accounts(f.settings.home)
    acc.add("ana", PASSWORD, "admin")
    acc.add("bo", PASSWORD, "member")
    f.start_dashboard()  # no worker: jobs stay queued, which is all these tests need
    yield f
    f.stop()


def test_login_then_submit_through_the_form(fleet, page):
    cy_job = fleet.store.create("train", {"lora_name": "theirs"}, owner="cy")
    page.goto(fleet.url + "/jobs")
    page.wait_for_url(re.compile(r"/login\?next=/jobs$"))
    page.fill("#username", "bo")
    page.fill("#password", "not the password")
    page.click("[data-testid='login-submit']")
    assert "wrong user name or password" in page.locator("[data-testid='login-error']").inner_text()
    page.fill("#password", PASSWORD)
    page.click("[data-testid='login-submit']")
    page.wait_for_url(re.compile(r"/jobs$"))
    assert page.locator("[data-testid='current-user']").inner_text() == "bo"
    cookie = next(c for c in page.context.cookies() if c["name"] == "lorafleet_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    page.goto(fleet.url + "/jobs/new")
    for name, value in dict(lora_name="bo-lora", base_model="tiny", dataset="tiny.json",
                            format="alpaca-format").items():
        el = page.locator(f"[name='{name}']")
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(value)
        else:
            el.fill(value)
    page.click("[data-testid='submit-job']")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"), timeout=15000)
    job_id = page.url.rsplit("/", 1)[-1]
    assert fleet.store.get(job_id)["owner"] == "bo"
    assert page.locator("[data-testid='job-owner']").inner_text() == "bo"
    assert page.locator("[data-testid='stop-button']").is_visible()

    # Someone else's job: visible, but no Stop button and no priority change for a member.
    page.goto(f"{fleet.url}/jobs/{cy_job}")
    assert page.locator("[data-testid='job-owner']").inner_text() == "cy"
    assert not page.locator("[data-testid='stop-button']").is_visible()
    assert page.locator("[data-testid='priority-select']").is_disabled()

    page.click("[data-testid='logout']")
    page.wait_for_url(re.compile(r"/login"))
    page.goto(fleet.url + "/fleet")
    page.wait_for_url(re.compile(r"/login\?next=/fleet$"))


def _cli(fleet, *args, token=None):
    env = {k: v for k, v in fleet.env.items() if k != "LORAFLEET_TOKEN"}
    if token:
        env["LORAFLEET_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "dispatcher.cli", *args, "--url", fleet.url],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_needs_a_token_and_acts_as_its_user(fleet):
    acc = Accounts(fleet.settings.home)
    their = fleet.store.create("train", {"lora_name": "ana-lora"}, owner="ana")
    r = _cli(fleet, "status")
    assert r.returncode != 0 and "LORAFLEET_TOKEN" in r.stderr
    bo = acc.new_token("bo")
    r = _cli(fleet, "status", "--json", token=bo)
    assert r.returncode == 0 and their in r.stdout
    r = _cli(fleet, "cancel", their, token=bo)
    assert r.returncode != 0 and "only its owner or an admin" in r.stderr
    assert fleet.store.get(their)["state"] == "queued"
    r = _cli(fleet, "cancel", their, token=acc.new_token("ana"))
    assert r.returncode == 0 and fleet.store.get(their)["state"] == "cancelled"


def test_dashboard_refuses_a_public_address_without_accounts(tmp_path):
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "empty"), "LORAFLEET_HOST": "0.0.0.0",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dashboard"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "without accounts" in r.stderr


def test_an_admin_adds_a_user_and_makes_a_token_on_the_users_page(fleet, page):
    page.goto(fleet.url + "/login")
    page.fill("#username", "ana")
    page.fill("#password", PASSWORD)
    page.click("[data-testid='login-submit']")
    page.wait_for_url(re.compile(r"/jobs$"))
    page.click("[data-testid='nav-users']")
    page.fill("#u-name", "flo")
    page.fill("#u-password", PASSWORD)
    page.fill("#u-password2", PASSWORD)
    page.click("[data-testid='add-user-submit']")
    row = page.locator("[data-testid='user-row'][data-user='flo']")
    row.wait_for()
    assert Accounts(fleet.settings.home).login("flo", PASSWORD).role == "member"
    row.locator("[data-testid='user-token']").click()
    token = page.locator("[data-testid='new-token'] code").inner_text()
    assert Accounts(fleet.settings.home).for_token(token).name == "flo"
    page.on("dialog", lambda d: d.accept())
    row.locator("[data-testid='user-remove']").click()
    row.wait_for(state="detached")
    assert Accounts(fleet.settings.home).get("flo") is None
