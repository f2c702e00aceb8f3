"""The data folder's private files are written and read one way (never through a link), the
warnings name links and files of other OS users, a per-user group is not "other users", and no
lorafleet process sends the embedded Redis's password to a port another OS user holds."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import redis

from dispatcher.access.dashtoken import (
    listener_is_mine,
    normal_url,
    registry_path,
    remember,
    token_for,
)
from dispatcher.host.embedded import EmbeddedRedisError, free_port, start_server, stop_server
from dispatcher.host.private import (
    exposure_warnings,
    foreign_listener,
    private_group,
    read_secret,
    readable_note,
    secret_file,
    tighten,
    write_private,
)
from dispatcher.settings import DataPaths, RedisPortTakenError, Settings, connect
from formats.files import atomic_write, umask_mode

SYSTEM_PYTHON = "/usr/bin/python3"
# Another OS user's process that takes a port and keeps whatever clients send it.
SQUATTER = r"""
import socket, sys
if sys.argv[2:3] == ["v6"]:  # the IPv6 wildcard; "only": IPv6 connections only
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(sys.argv[3] == "only"))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", int(sys.argv[1])))
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("LISTENING", flush=True)
s.settimeout(30)
while True:
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.settimeout(2)
    try:
        print("GOT", c.recv(4096), flush=True)
    except OSError:
        pass
    c.close()
"""


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def other_user():
    """A throwaway OS user (as in tests/integration/test_private_fleet.py); skipped when the
    tests cannot make one (not root, no useradd)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser") \
            or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root (to make a second OS user)")
    name = f"lfsq{os.getpid()}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def squatter(other_user):
    """Start another OS user's listener on a port; yields (port, uid, proc)."""
    port = free_port()
    proc = start_squatter(other_user, port)
    try:
        yield port, pwd.getpwnam(other_user).pw_uid, proc
    finally:
        stop_squatter(proc)


def start_squatter(user: str, port: int, *how: str) -> subprocess.Popen:
    """`how`: nothing (127.0.0.1), or "v6", "only" / "v6", "dual" (the IPv6 wildcard)."""
    proc = subprocess.Popen(["runuser", "-u", user, "--", SYSTEM_PYTHON, "-c", SQUATTER,
                             str(port), *how], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "LISTENING"
    return proc


def stop_squatter(proc: subprocess.Popen) -> str:
    """Its whole group (runuser and the python under it); what it received."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate(timeout=30)[0]


# -- one way to write and read a private file -----------------------------------------------
def test_write_private_is_0600_and_replaces_a_link_instead_of_following_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not yours to change\n")
    link = tmp_path / "registry.json"
    link.symlink_to(target)
    write_private(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and mode(link) == 0o600
    assert target.read_text() == "not yours to change\n"
    assert write_private(link, "second", replace=False) is False  # the first writer wins
    assert link.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_file_name_near_the_limit_can_be_written(tmp_path):
    long = tmp_path / ("n" * 250)  # legal (255 bytes at most), too long with a suffix added
    assert atomic_write(long, "whole") is True
    assert long.read_text() == "whole" and mode(long) == umask_mode()
    assert write_private(tmp_path / ("p" * 250), "mine") and mode(tmp_path / ("p" * 250)) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_secrets_are_never_read_through_a_link(tmp_path):
    planted = tmp_path / "planted"
    planted.write_text("a secret someone else chose\n")
    (tmp_path / ".secret_key").symlink_to(planted)
    assert read_secret(tmp_path / ".secret_key") == ""
    with pytest.raises(OSError):  # never used as the fleet's secret, never replaced
        secret_file(tmp_path / ".secret_key")
    assert (tmp_path / ".secret_key").is_symlink()
    (tmp_path / ".redis_password").symlink_to(planted)
    with pytest.raises(Exception, match="not a plain file of yours"):
        Settings(home=tmp_path).effective_redis_url()


def test_warnings_name_private_files_that_are_links_or_someone_elses(tmp_path):
    home = tmp_path / "data"
    home.mkdir(mode=0o700)
    (home / ".dashboard_token").symlink_to(tmp_path / "elsewhere")
    warnings = exposure_warnings(home)
    assert any(f"{home / '.dashboard_token'} is a link" in w for w in warnings), warnings
    assert tighten(home) == []  # nothing done through the link
    if os.geteuid() == 0:  # only root can give a file away
        (home / "accounts.json").write_text("{}")
        os.chown(home / "accounts.json", 65534, 65534)
        (warning,) = [w for w in exposure_warnings(home) if "accounts.json" in w]
        assert "belongs to another OS user (uid 65534)" in warning


def test_a_per_user_group_is_not_other_users(tmp_path):
    home = tmp_path / "data"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    gid = os.stat(home).st_gid
    me = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(gid)
    os.chmod(home, 0o770)
    if me.pw_gid == gid and group.gr_name == me.pw_name and not group.gr_mem:
        assert private_group(gid)
        assert not [w for w in exposure_warnings(home) if "can be written" in w]
        assert readable_note(home) == ""  # group-readable only by the user's own group
    if os.geteuid() == 0:  # a group of other users: its write right counts
        shared = next(g for g in grp.getgrall() if g.gr_gid != me.pw_gid)
        os.chown(home, -1, shared.gr_gid)
        assert not private_group(shared.gr_gid)
        (warning,) = [w for w in exposure_warnings(home) if "can be written" in w]
        assert f"chmod g-w,o-w {home}" in warning
        assert f"chmod 700 {home}" in readable_note(home)


def test_a_new_data_folder_is_private_and_an_old_one_gets_a_note(tmp_path):
    paths = DataPaths(tmp_path / "new" / "data")
    paths.ensure()
    assert mode(paths.home) == 0o700
    assert mode(paths.logs) == 0o700 and mode(paths.redis) == 0o700
    assert readable_note(paths.home) == ""
    os.chmod(paths.home, 0o755)  # a folder the user made readable, left as it is
    paths.ensure()
    assert mode(paths.home) == 0o755
    note = readable_note(paths.home)
    assert "other OS users can read the data folder" in note and f"chmod 700 {paths.home}" in note


def test_tighten_makes_old_logs_private(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.chmod(logs, 0o755)
    (logs / "dashboard.log").write_text("x")
    os.chmod(logs / "dashboard.log", 0o644)
    assert set(tighten(tmp_path)) == {logs, logs / "dashboard.log"}
    assert mode(logs) == 0o700 and mode(logs / "dashboard.log") == 0o600


# -- the registry of dashboards ------------------------------------------------------------------
def test_loopback_names_are_one_host(tmp_path):
    assert normal_url("http://localhost:8765") == normal_url("http://127.0.0.1:8765/")
    assert normal_url("http://[::1]:8765") == normal_url("http://127.0.0.1:8765")
    assert normal_url("http://LOCALHOST:8765/x") == "http://127.0.0.1:8765"
    assert normal_url("http://10.0.0.2:8765") != normal_url("http://127.0.0.1:8765")
    home = tmp_path / "data"
    port = free_port()
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "LORAFLEET_HOME": str(tmp_path / "x")}
    s = Settings.from_env({"LORAFLEET_HOME": str(home), "LORAFLEET_PORT": str(port)})
    from dispatcher.access.dashtoken import dashboard_token

    token = dashboard_token(home)
    remember(s, env)
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert token_for(f"http://{host}:{port}", env) == token, host
    assert token_for(f"http://127.0.0.1:{port + 1}", env) == ""


def test_dashboards_starting_at_once_all_stay_in_the_registry(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), PYTHONPATH=os.getcwd())
    code = ("import sys; from dispatcher.settings import Settings; "
            "from dispatcher.access.dashtoken import remember; "
            "s = Settings.from_env({'LORAFLEET_HOME': sys.argv[1], 'LORAFLEET_PORT': sys.argv[2]})\n"
            "for _ in range(20): remember(s)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"d{i}"),
                               str(9000 + i)], env=env) for i in range(6)]
    assert [p.wait(60) for p in procs] == [0] * 6
    path = registry_path({"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    data = json.loads(path.read_text())
    assert sorted(data) == [f"http://127.0.0.1:{9000 + i}" for i in range(6)]
    assert mode(path) == 0o600


# -- the embedded Redis's port --------------------------------------------------------------------
def test_every_process_of_the_folder_finds_the_recorded_port(tmp_path):
    port = free_port()
    password = secret_file(tmp_path / ".redis_password")
    proc = start_server(tmp_path / "redis", port, password=password)
    try:
        assert read_secret(tmp_path / "redis" / "port") == str(port)
        assert mode(tmp_path / "redis" / "port") == 0o600
        s = Settings.from_env({"LORAFLEET_HOME": str(tmp_path)})  # no port setting
        assert s.embedded_redis_port == port
        assert connect(s).ping()
        other = Settings.from_env({"LORAFLEET_HOME": str(tmp_path),
                                   "LORAFLEET_EMBEDDED_REDIS_PORT": "7002"})
        assert other.embedded_redis_port == 7002  # the setting, when given, wins
    finally:
        stop_server(proc)
    write_private(tmp_path / "redis" / "port", "not-a-port\n")
    with pytest.raises(ValueError, match="redis/port must be a port number"):
        Settings.from_env({"LORAFLEET_HOME": str(tmp_path)})


def test_a_listener_of_this_user_is_accepted(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert foreign_listener("127.0.0.1", port) is None
        assert listener_is_mine(f"http://127.0.0.1:{port}")
        assert listener_is_mine(f"http://localhost:{port}")
        secret_file(tmp_path / ".redis_password")
        s2 = Settings.from_env({"LORAFLEET_HOME": str(tmp_path),
                                "LORAFLEET_EMBEDDED_REDIS_PORT": str(port)})
        assert f":{port}/0" in s2.effective_redis_url()


def test_the_password_never_goes_to_another_users_listener(tmp_path, squatter):
    port, uid, proc = squatter
    password = secret_file(tmp_path / ".redis_password")
    s = Settings.from_env({"LORAFLEET_HOME": str(tmp_path),
                           "LORAFLEET_EMBEDDED_REDIS_PORT": str(port)})
    assert foreign_listener("127.0.0.1", port) == uid
    assert not listener_is_mine(f"http://localhost:{port}")
    want = (f"port {port} is held by another OS user's process (uid {uid}), not this data "
            "folder's Redis")
    with pytest.raises(RedisPortTakenError) as e:
        s.effective_redis_url()
    assert want in str(e.value)
    with pytest.raises(RedisPortTakenError):
        connect(s)
    with pytest.raises(EmbeddedRedisError, match=r"held by another OS user's process"):
        start_server(tmp_path / "redis", port, password=password)
    out = stop_squatter(proc)
    assert password not in out


def test_a_client_made_before_the_port_was_taken_checks_again(tmp_path, other_user):
    """The server stops; another user takes its port; the dashboard's client reconnects."""
    port = free_port()
    password = secret_file(tmp_path / ".redis_password")
    server = start_server(tmp_path / "redis", port, password=password)
    s = Settings.from_env({"LORAFLEET_HOME": str(tmp_path)})
    client = connect(s)
    assert client.ping()
    stop_server(server)
    squat = start_squatter(other_user, port)
    try:
        with pytest.raises(redis.ConnectionError, match="held by another OS user"):
            client.ping()
        time.sleep(0.3)
    finally:
        out = stop_squatter(squat)
    assert password not in out and "AUTH" not in out


def test_an_ipv6_only_socket_beside_the_fleets_port_is_not_taken_for_it(tmp_path, other_user):
    """Another user may bind [::]:P (IPv6 only) next to the fleet's 127.0.0.1:P: IPv4
    connections still reach the fleet's server, so nothing is refused (no way to cut a running
    fleet off); with no IPv4 listener, a dual-stack [::]:P would receive them, and is refused."""
    port = free_port()
    password = secret_file(tmp_path / ".redis_password")
    server = start_server(tmp_path / "redis", port, password=password)
    squat = start_squatter(other_user, port, "v6", "only")
    try:
        assert foreign_listener("127.0.0.1", port) is None
        client = connect(Settings.from_env({"LORAFLEET_HOME": str(tmp_path)}))
        assert client.ping()
        client.close()
    finally:
        stop_squatter(squat)
        stop_server(server)
    squat = start_squatter(other_user, port, "v6", "dual")
    try:
        assert foreign_listener("127.0.0.1", port) == pwd.getpwnam(other_user).pw_uid
    finally:
        stop_squatter(squat)


def test_a_data_folder_made_by_user_add_is_private_and_accounts_are_never_read_through_a_link(
        tmp_path):
    from dispatcher.access.accounts import Accounts

    home = tmp_path / "fresh" / "lorafleet-data"
    Accounts(home).add("ana", "correct horse", "admin")  # the README's first command with accounts
    assert mode(home) == 0o700 and mode(home / "accounts.json") == 0o600
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"users": {}}))
    (home / "accounts.json").unlink()
    (home / "accounts.json").symlink_to(elsewhere)
    with pytest.raises(OSError):
        Accounts(home).has_users()
