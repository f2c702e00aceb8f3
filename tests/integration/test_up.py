"""`lorafleet up` as a user runs it: the embedded Redis, the dispatcher, the dashboard and a CPU
worker start, the URL is printed, Ctrl-C stops every process, and records survive a restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from dispatcher.host.embedded import free_port
from tests.fleetproc import ROOT, small_spec
from tests.tiny import make_tiny_model, write_tiny_dataset

pytestmark = pytest.mark.integration


def _start_up(home, port, redis_port):
    env = dict(os.environ)
    env.pop("LORAFLEET_REDIS_URL", None)
    env.update({"LORAFLEET_HOME": str(home), "LORAFLEET_PORT": str(port),
                "LORAFLEET_EMBEDDED_REDIS_PORT": str(redis_port), "PYTHONPATH": str(ROOT),
                "LORAFLEET_HEARTBEAT": "0.5", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "XDG_CONFIG_HOME": str(home / ".config")})
    return subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "up", "--gpus", "cpu"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _read_until(proc, pattern: str, timeout: float = 60) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(seen)}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; ps shows it as Z.
    st = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return bool(st.stdout.strip()) and not st.stdout.strip().startswith("Z")


def _wait_worker(http: requests.Session, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ws = http.get(url + "/api/v1/workers", timeout=2).json()["workers"]
            if any(w["alive"] for w in ws):
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError("no live worker")


def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path):
    home = tmp_path / "data"
    make_tiny_model(home / "models" / "tiny")
    write_tiny_dataset(home / "datasets" / "tiny.json")
    port, redis_port = free_port(), free_port()
    proc = _start_up(home, port, redis_port)
    try:
        out = _read_until(proc, r"dashboard:\s+http://")
        # The printed URL carries the data folder's token (single-user mode).
        printed = re.search(r"dashboard:\s+(http://\S+)", out).group(1)
        url, token = re.fullmatch(r"(http://[^/]+)/\?token=(\S+)", printed).groups()
        assert url == f"http://127.0.0.1:{port}"
        assert token == (home / ".dashboard_token").read_text().strip()
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        assert "embedded server" in out and "1 (CPU)" in out
        _wait_worker(http, url)
        assert requests.get(url + "/api/v1/workers", timeout=10).status_code == 401  # no token
        w = http.get(url + "/api/v1/workers").json()["workers"][0]
        assert w["device"] == "cpu" and w["state"] == "idle"
        children = _children(proc.pid)
        assert len(children) >= 4  # redis, dispatcher, dashboard, worker

        resp = http.post(url + "/api/v1/jobs", json=small_spec(lora_name="up-lora"))
        assert resp.status_code == 201, resp.text
        job = resp.json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"{url}/api/v1/jobs/{job}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline, "job did not succeed"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped." in rest
    time.sleep(0.5)
    assert [c for c in children if _alive(c)] == []
    assert (home / "redis" / "lorafleet.aof").stat().st_size > 0

    # Start again: the job record and its events come back from the append-only file.
    proc = _start_up(home, port, redis_port)
    try:
        _read_until(proc, r"dashboard:\s+http://")
        deadline = time.monotonic() + 30
        while True:
            try:
                rec = http.get(f"{url}/api/v1/jobs/{job}", timeout=2)
                if rec.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert rec.json()["state"] == "succeeded"
        events = http.get(f"{url}/api/v1/jobs/{job}/events?format=json").json()
        assert sum(e["type"] == "train" for e in events) == rec.json()["total_steps"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
