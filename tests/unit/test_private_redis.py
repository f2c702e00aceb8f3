"""The embedded Redis is private to the fleet: its password in the data folder, its settings in
a private config file, the dangerous commands gone, and the data folder's private files 0600."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.host.embedded import RENAMED_COMMANDS, free_port, start_server, stop_server
from dispatcher.host.private import exposure_warnings, secret_file, tighten
from dispatcher.settings import RedisCredentialsError, Settings, redact_url


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def raw_command(port: int, *args: str) -> bytes:
    """One RESP command on a plain socket: what any local process can send, no client library."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(4096)


def test_settings_find_the_embedded_server_through_the_data_folder(tmp_path):
    password = secret_file(tmp_path / ".redis_password")
    assert mode(tmp_path / ".redis_password") == 0o600 and len(password) >= 40
    assert secret_file(tmp_path / ".redis_password") == password  # made once
    s = Settings.from_env({"LORAFLEET_HOME": str(tmp_path),
                           "LORAFLEET_EMBEDDED_REDIS_PORT": "7001"})
    assert s.effective_redis_url() == f"redis://:{password}@127.0.0.1:7001/0"
    assert password not in s.redis_display() and "7001" in s.redis_display()
    external = Settings.from_env({"LORAFLEET_HOME": str(tmp_path),
                                  "LORAFLEET_REDIS_URL": "rediss://:pw@head:6380/0"})
    assert external.effective_redis_url() == "rediss://:pw@head:6380/0"  # unchanged
    assert external.redis_display() == "rediss://:***@head:6380/0"
    assert redact_url("redis://u:p@[::1]:1/0") == "redis://u:***@[::1]:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_a_data_folder_whose_server_never_started_is_a_clear_error(tmp_path):
    s = Settings(home=tmp_path)
    with pytest.raises(RedisCredentialsError, match="has not been started yet"):
        s.effective_redis_url()
    (tmp_path / ".redis_password").write_text("\n")  # empty: as good as none
    with pytest.raises(RedisCredentialsError, match="lorafleet up"):
        s.effective_redis_url()


def test_unreadable_password_file_names_the_fix(tmp_path, monkeypatch):
    """Another OS user's process gets PermissionError reading the file (shown for real, from
    another account, in tests/integration/test_private_fleet.py); the message says what to do."""
    import dispatcher.host.private

    (tmp_path / ".redis_password").write_text("x")

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dispatcher.host.private, "read_private", refuse)
    with pytest.raises(RedisCredentialsError) as e:
        Settings(home=tmp_path).effective_redis_url()
    assert "cannot read the data folder's Redis password" in str(e.value)
    assert "OS user that owns the data folder" in str(e.value)
    assert "LORAFLEET_REDIS_URL" in str(e.value)


def test_server_wants_the_password_and_has_no_file_commands(tmp_path):
    port = free_port()
    folder = tmp_path / "redis"
    proc = start_server(folder, port, password="pw-123", log_file=tmp_path / "redis.log")
    try:
        assert raw_command(port, "PING").startswith(b"-NOAUTH")
        assert raw_command(port, "KEYS", "*").startswith(b"-NOAUTH")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).set("k", "v")
        r = redis.Redis(port=port, password="pw-123", decode_responses=True)
        r.set("k", "v")
        for command in ([*RENAMED_COMMANDS]):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                r.execute_command(command, "x")
        with pytest.raises(redis.ResponseError, match="unknown command"):
            r.execute_command("CONFIG", "SET", "dir", "/tmp")
        assert r.bgrewriteaof()  # AOF maintenance still works
        # Nothing secret on the command line, which every local account can read.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"pw-123" not in f.read()
        assert mode(folder) == 0o700 and mode(folder / "redis.conf") == 0o600
        assert mode(folder / "lorafleet.aof") == 0o600 and mode(tmp_path / "redis.log") == 0o600
    finally:
        stop_server(proc)


def test_tighten_and_warnings(tmp_path):
    home = tmp_path / "data"
    (home / "redis").mkdir(parents=True)
    for name in (".secret_key", ".redis_password", ".dashboard_token", "accounts.json",
                 "accounts.lock", "redis/lorafleet.aof"):
        (home / name).write_text("x")
        os.chmod(home / name, 0o644)
    os.chmod(home / "redis", 0o755)
    (home / "datasets.json").write_text("public")
    os.chmod(home / "datasets.json", 0o644)
    changed = tighten(home)
    assert len(changed) == 7
    for name in (".secret_key", ".redis_password", ".dashboard_token", "accounts.json",
                 "accounts.lock", "redis/lorafleet.aof"):
        assert mode(home / name) == 0o600, name
    assert mode(home / "redis") == 0o700 and mode(home / "datasets.json") == 0o644
    assert tighten(home) == []

    os.chmod(tmp_path, 0o755)
    os.chmod(home, 0o755)
    assert not [w for w in exposure_warnings(home) if str(tmp_path) in w]
    os.chmod(home, 0o777)
    (warning,) = [w for w in exposure_warnings(home) if str(tmp_path) in w]
    assert f"chmod g-w,o-w {home}" in warning
    os.chmod(home, 0o755)
    os.chmod(tmp_path, 0o1777)  # sticky, like /tmp: others cannot rename what is ours
    assert not [w for w in exposure_warnings(home) if str(tmp_path) in w]
    os.chmod(tmp_path, 0o777)
    (warning,) = [w for w in exposure_warnings(home) if str(tmp_path) in w]
    assert f"chmod g-w,o-w {tmp_path}" in warning and "above the data folder" in warning
    os.chmod(tmp_path, 0o755)
