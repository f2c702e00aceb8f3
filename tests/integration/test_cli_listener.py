"""The CLI sends the data folder's dashboard token only to this OS user's own listener, checked
before every request, not once when the client is made (review of issue 10, #6): a real
dashboard process stops while a client is in use (as during `submit --wait` or `logs -f`), a
throwaway OS user's program takes its port, and the next request does not carry the token."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import requests

from dispatcher.cli.client import Client, ListenerNotOurs
from tests.fleetproc import FleetProcs

# A listener that prints the Authorization header of every request it gets (or "-").
SQUATTER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("auth:", self.headers.get("Authorization") or "-", flush=True)
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(b'{"workers": []}')
    do_POST = do_GET
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
OTHER = "lfsquat"


@pytest.fixture
def dash(redis_server, tmp_path, monkeypatch):
    f = FleetProcs(tmp_path / "home", redis_server, f"cl{time.monotonic_ns()}")
    for key in ("LORAFLEET_HOME", "LORAFLEET_PORT", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, f.env[key])
    monkeypatch.delenv("LORAFLEET_TOKEN", raising=False)
    f.start_dashboard()
    yield f
    f.stop()


def _other_user_listens(port: int) -> subprocess.Popen:
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
                   capture_output=True)
    p = subprocess.Popen(["runuser", "-u", OTHER, "--", "/usr/bin/python3", "-c", SQUATTER,
                          str(port)], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)  # (runuser forks: end the whole group)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=2)
            p.stdout.readline()  # our own probe (no token)
            return p
        except requests.ConnectionError:
            time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("the other user's listener did not start")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd")
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to make a throwaway OS user (and a system python)")
def test_a_port_taken_by_another_user_after_a_restart_never_gets_the_token(dash):
    client, follower = Client(dash.url), Client(dash.url)
    assert client.token_source == "dashboard token"
    assert client.workers() == []  # our dashboard: the token goes with it
    dash.kill("dashboard")
    squatter = _other_user_listens(dash.port)
    try:
        with pytest.raises(ListenerNotOurs, match="another OS user.*not sent"):
            client.workers()
        with pytest.raises(ListenerNotOurs):  # follow() (re)connecting: the same check
            next(follower.follow("any"))
        # The token is dropped for good: later requests go without it (and get nowhere).
        assert client.token == "" and client._auth() == {}
    finally:
        os.killpg(squatter.pid, signal.SIGKILL)
        out, _ = squatter.communicate(timeout=10)
        subprocess.run(["userdel", OTHER], capture_output=True)
    assert dash.token not in out and "Bearer" not in out, out


def test_the_token_still_goes_to_our_own_dashboard_after_a_restart(dash):
    client = Client(dash.url)
    assert client.workers() == []
    dash.kill("dashboard")
    dash.start_dashboard()
    assert client.workers() == []  # checked again: ours, so the token goes


def test_a_user_given_token_is_the_users_choice(dash, monkeypatch):
    monkeypatch.setenv("LORAFLEET_TOKEN", dash.token)
    client = Client(dash.url)
    assert client.token_source == "LORAFLEET_TOKEN" and client.workers() == []
