"""The token URL `lorafleet up` prints stays the fleet's user's: it is in no log file (and the
logs are 0600 in a 0700 folder), it is printed only once the dashboard answers on a port this OS
user holds, and a taken port stops `up` before anything starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess

import pytest
import requests

from dispatcher.host.embedded import free_port
from tests.integration.test_up import _read_until, _start_up

pytestmark = pytest.mark.integration


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_printed_url_leaves_no_token_in_the_logs(tmp_path):
    # A data folder from an older version: readable by all, logs/ 0755 with a 0644 log.
    home = tmp_path / "data"
    (home / "logs").mkdir(parents=True)
    os.chmod(home, 0o755)
    os.chmod(home / "logs", 0o755)
    (home / "logs" / "dashboard.log").write_text("an old line\n")
    os.chmod(home / "logs" / "dashboard.log", 0o644)
    port, redis_port = free_port(), free_port()
    proc = _start_up(home, port, redis_port)
    try:
        out = _read_until(proc, r"dashboard:\s+http://")
        assert f"note: other OS users can read the data folder {home}" in out
        assert f"chmod 700 {home}" in out
        assert mode(home) == 0o755  # the user's folder is not changed behind their back
        printed = re.search(r"dashboard:\s+(http://\S+)", out).group(1)
        token = (home / ".dashboard_token").read_text().strip()
        assert printed.endswith(f"/?token={token}")
        http = requests.Session()
        page = http.get(printed, timeout=10)  # follows the redirect that drops the token
        assert page.status_code == 200 and "token" not in page.url
        assert http.get(f"http://127.0.0.1:{port}/api/v1/me", timeout=10).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/?token=x{token}",
                            timeout=10).status_code in (200, 401, 403)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    logs = home / "logs"
    assert mode(logs) == 0o700
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"dashboard.log", "redis.log", "dispatcher.log"}
    for p in files:
        assert mode(p) == 0o600, p
        assert token not in p.read_text(errors="replace"), p
    # The request lines are there, their token is not.
    assert "GET /?token=*** HTTP/1.1" in (logs / "dashboard.log").read_text()


def test_up_refuses_a_taken_dashboard_port_before_printing_the_url(tmp_path):
    home = tmp_path / "new"
    port, redis_port = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = _start_up(home, port, redis_port)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"the dashboard's port {port} on 127.0.0.1 is already in use" in out
    assert "lorafleet up --port" in out
    assert "token=" not in out and "redis:" not in out  # nothing started, no URL
    assert mode(home) == 0o700  # a new data folder is the fleet's user's alone
    assert subprocess.run(["ss", "-ltn", f"sport = :{redis_port}"], capture_output=True,
                          text=True).stdout.count("LISTEN") == 0
