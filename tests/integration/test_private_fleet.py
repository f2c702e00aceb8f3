"""`lorafleet up` on a shared machine: the embedded Redis answers nothing without the data
folder's password, has no commands that reach the file system, and the data folder's private
files are the fleet's OS user's alone. When the tests run as root, a throwaway OS user shows
it from another account; a process with a different, empty data folder stands in as well."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from dispatcher.host.embedded import free_port
from dispatcher.host.private import private_group
from dispatcher.settings import RedisCredentialsError, Settings
from tests.fleetproc import ROOT
from tests.integration.test_up import _children, _read_until, _start_up

pytestmark = pytest.mark.integration

PRIVATE = {".redis_password": 0o600, ".secret_key": 0o600, "redis": 0o700,
           "redis/redis.conf": 0o600, "redis/lorafleet.aof": 0o600, "logs/redis.log": 0o600}

SYSTEM_PYTHON = "/usr/bin/python3"
# What another account runs, with the system's own python3 and no lorafleet code: the file it
# may not read, and Redis over a plain socket.
PROBE = r"""
import socket, sys
home, port = sys.argv[1], int(sys.argv[2])
for name in (".redis_password", "redis/lorafleet.aof", "redis/redis.conf"):
    try:
        open(f"{home}/{name}").read()
        print("READ", name)
    except PermissionError:
        print("DENIED", name)
with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
    s.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n*2\r\n$3\r\nGET\r\n$7\r\nlf:jobs\r\n")
    data = b""
    while data.count(b"\r\n") < 2:
        data += s.recv(4096)
    print("REDIS", data.decode().replace("\r\n", " | "))
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def resp(port: int, *args: str) -> bytes:
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(4096)


def check_from_another_account(user: str, home: Path, redis_port: int) -> None:
    """`user` cannot read the password, the AOF or the config; Redis answers it only NOAUTH;
    and lorafleet run by it against this data folder says why it cannot reach Redis."""
    probe = subprocess.run(["runuser", "-u", user, "--", SYSTEM_PYTHON, "-c", PROBE,
                            str(home), str(redis_port)], capture_output=True, text=True,
                           timeout=30)
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith(("READ", "DENIED"))] == [
        "DENIED .redis_password", "DENIED redis/lorafleet.aof", "DENIED redis/redis.conf"]
    (answer,) = [ln for ln in lines if ln.startswith("REDIS")]
    assert answer.count("-NOAUTH") == 2, answer

    code = ROOT / "dispatcher" / "settings.py"
    if subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(code)]).returncode:
        return  # this checkout is not readable by other accounts
    probe = subprocess.run(
        ["runuser", "-u", user, "--", SYSTEM_PYTHON, "-c",
         "from dispatcher.settings import Settings; "
         "print(Settings.from_env().effective_redis_url())"],
        env={"PYTHONPATH": str(ROOT), "LORAFLEET_HOME": str(home),
             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0
    assert "cannot read the data folder's Redis password" in probe.stderr, probe.stderr
    assert "OS user that owns the data folder" in probe.stderr


@pytest.fixture
def other_user():
    """A throwaway OS user, removed afterwards; None where the tests cannot make one (not
    root, no useradd): then the process of another data folder is the only stand-in."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser") \
            or not os.path.exists(SYSTEM_PYTHON):
        yield None
        return
    name = f"lfprobe{os.getpid()}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_a_fresh_up_keeps_redis_and_the_private_files_to_the_fleet(other_user):
    # A data folder others may enter and list (as in a home folder on a team machine), but
    # that its group may write: `up` must say so.
    home = Path(tempfile.mkdtemp(prefix="lf-private-"))
    try:
        os.chmod(home, 0o775)
        if private_group(os.stat(home).st_gid):  # a per-user group counts as the user
            if os.geteuid() == 0:  # give the folder to a group of other users
                os.chown(home, -1, next(g.gr_gid for g in grp.getgrall()
                                        if not private_group(g.gr_gid)))
            else:
                os.chmod(home, 0o777)
        (home / ".secret_key").write_text("made-by-an-older-version\n")
        os.chmod(home / ".secret_key", 0o644)
        port, redis_port = free_port(), free_port()
        proc = _start_up(home, port, redis_port)
        try:
            out = _read_until(proc, r"dashboard:\s+http://")
            password = (home / ".redis_password").read_text().strip()
            assert password and password not in out
            assert f"embedded server on port {redis_port}" in out
            assert f"warning: the data folder {home} can be written by other OS users" in out
            assert f"chmod g-w,o-w {home}" in out
            for name, want in PRIVATE.items():
                assert mode(home / name) == want, (name, oct(mode(home / name)))

            # No credentials: refused, whatever the command.
            assert resp(redis_port, "KEYS", "*").startswith(b"-NOAUTH")
            assert resp(redis_port, "GET", "lf:jobs").startswith(b"-NOAUTH")
            assert resp(redis_port, "CONFIG", "GET", "dir").startswith(b"-ERR unknown command")
            # With them: the fleet's data, but nothing beyond Redis.
            r = redis.Redis(port=redis_port, password=password, decode_responses=True)
            assert r.ping()
            for command in (["CONFIG", "SET", "dir", "/tmp"], ["DEBUG", "OBJECT", "x"],
                            ["MODULE", "LOAD", "/tmp/x.so"], ["SLAVEOF", "127.0.0.1", "1"],
                            ["REPLICAOF", "127.0.0.1", "1"],
                            ["MIGRATE", "127.0.0.1", "1", "k", "0", "100"]):
                with pytest.raises(redis.ResponseError, match="unknown command"):
                    r.execute_command(*command)
            # The children found the server through the data folder: no password in their
            # environment or on anyone's command line.
            for pid in _children(proc.pid):
                for part in ("environ", "cmdline"):
                    with open(f"/proc/{pid}/{part}", "rb") as f:
                        assert password.encode() not in f.read(), (pid, part)

            # A process of another data folder (holding none of its files) gets nothing.
            stranger = Settings.from_env({"LORAFLEET_HOME": str(home / "elsewhere"),
                                          "LORAFLEET_EMBEDDED_REDIS_PORT": str(redis_port)})
            with pytest.raises(RedisCredentialsError):
                stranger.effective_redis_url()

            if other_user is not None:
                check_from_another_account(other_user, home, redis_port)

            # The worker connected (Celery prints its broker URL): no log holds the password.
            deadline = time.monotonic() + 60
            while "Connected to redis://" not in (home / "logs" / "worker-cpu.log").read_text():
                assert time.monotonic() < deadline, "the worker did not connect"
                time.sleep(0.3)
            for log in (home / "logs").iterdir():
                assert password not in log.read_text(), log
        finally:
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
    finally:
        shutil.rmtree(home, ignore_errors=True)
