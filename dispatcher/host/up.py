"""Process supervision for `lorafleet up`, `worker`, `redis`, `dashboard` and `init`.

This is the composition root: it starts the dispatcher, the dashboard and the workers as their
own processes (`python -m ...`), so the dispatcher package itself never imports them or torch.
Each child runs in its own session; `Supervisor` stops all of them on the way out (Ctrl-C,
SIGTERM, or a child that exits on its own). The CLI's commands are thin wrappers over the `run_*`
functions here; a refusal before anything starts is a `StartRefused`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from dispatcher.host.gpus import parse_gpus
from dispatcher.settings import Settings, child_env


class StartRefused(RuntimeError):
    """Nothing was started: the fleet would be unsafe or could not work (a taken port, a
    single-user dashboard on a public address)."""


def _say(line: str, err: bool = False) -> None:
    """One line for the person at the terminal (stderr for problems), shown at once."""
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal a child's whole process group (a Celery worker and its pool), or the child."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass  # it is gone already


class Supervisor:
    """Starts child processes in their own sessions and stops all of them on the way out."""

    def __init__(self, logs: Path | None = None):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs = logs

    def _log_file(self, name: str) -> IO[bytes]:
        # 0700 / 0600: a log line may hold what only the fleet's user may see (the dashboard's
        # request log is filtered, other libraries' output cannot be).
        assert self.logs is not None
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.logs / f"{name}.log",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # a log made by an older version
        return open(fd, "ab")

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out: Any = self._log_file(name) if self.logs is not None else None
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def wait(self) -> int:
        """Block until Ctrl-C / SIGTERM or until a child exits on its own."""
        stop = {"flag": False}

        def on_signal(signum, frame):
            stop["flag"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        while not stop["flag"]:
            for name, p in self.procs:
                if p.poll() is not None:
                    _say(f"lorafleet: {name} exited with code {p.returncode}; stopping", err=True)
                    stop["flag"] = True
                    code = 1
                    break
            time.sleep(0.3)
        return code

    def stop_all(self, grace: float = 10.0) -> None:
        # Reverse order: workers and the dashboard go before Redis.
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                # SIGTERM: Celery warm-stops, the dashboard and dispatcher exit, redis-server
                # flushes its append-only file.
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A worker still inside a training step: a running job is re-queued by the
                # dispatcher when it next starts, like any lost worker's.
                _say(f"lorafleet: {name} did not stop in {grace:.0f}s; killing it", err=True)
                _signal_group(p, signal.SIGKILL)
                p.wait()


def worker_cmds(gpus: list[int | None], env: dict[str, str],
                memory_mb: int | None = None) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, environment) of one worker per card, each pinned to its card (None: a
    CPU worker, which sees no card)."""
    out = []
    for g in gpus:
        e = dict(env)
        if g is None:
            e["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab a card
            name = "worker-cpu"
        else:
            e["CUDA_VISIBLE_DEVICES"] = str(g)
            e["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            name = f"worker-gpu{g}"
        cmd = [sys.executable, "-m", "gpuworker.worker"] + ([] if g is None else ["--gpu", str(g)])
        cmd += [] if memory_mb is None else ["--memory-mb", str(memory_mb)]
        out.append((name, cmd, e))
    return out


# -- lorafleet up ----------------------------------------------------------------------------


def _up_env(settings: Settings, host: str | None, port: int | None) -> dict[str, str]:
    """The children's environment: ours, with the data folder and the dashboard's address."""
    env = child_env()
    env["LORAFLEET_HOME"] = str(settings.home)
    if host:
        env["LORAFLEET_HOST"] = host
    if port:
        env["LORAFLEET_PORT"] = str(port)
    return env


def run_up(gpus: str, host: str | None, port: int | None) -> int:
    """Start everything on this machine and supervise it until Ctrl-C; the exit code.
    Raises StartRefused (nothing started) when the fleet must not start."""
    from dispatcher.access.accounts import Accounts, single_user_refusal

    settings = Settings.from_env()
    settings.paths.ensure()
    env = _up_env(settings, host, port)
    dash_settings = Settings.from_env(env)  # with --host / --port
    refusal = single_user_refusal(dash_settings.dashboard_host, Accounts(settings.paths.home))
    if refusal:  # before anything starts
        raise StartRefused(refusal)
    check_dashboard_port(dash_settings)
    guard_data_folder(settings)
    sup = Supervisor(logs=settings.paths.logs)
    code = 0
    try:
        _start_fleet(sup, settings, dash_settings, env, gpus)
        _say("Press Ctrl-C to stop everything.")
        code = sup.wait()
    except Exception as e:  # any failure to start: say it, then stop what did start
        _say(f"lorafleet: {e}", err=True)
        code = 1
    finally:
        _say("stopping ...")
        sup.stop_all()
        _say("stopped.")
    return code


def _start_fleet(sup: Supervisor, settings: Settings, dash_settings: Settings,
                 env: dict[str, str], gpus: str) -> None:
    """Redis (embedded unless LORAFLEET_REDIS_URL is set), the dispatcher, the dashboard and
    the workers; print where everything is, the dashboard's URL last, once it answers."""
    if not settings.redis_url:
        sup.procs.append(("redis", _start_embedded_redis(settings)))
        # The children find the server as any later lorafleet process does: its port here,
        # its password in the data folder (not in their environment).
        env["LORAFLEET_EMBEDDED_REDIS_PORT"] = str(settings.embedded_redis_port)
        _say(f"redis:      {settings.redis_display()} "
             f"(append-only file in {settings.paths.redis})")
    else:
        _say(f"redis:      {settings.redis_display()}")
    sup.start("dispatcher", [sys.executable, "-m", "dispatcher"], env)
    dash = sup.start("dashboard", [sys.executable, "-m", "dashboard"], env)
    cards = parse_gpus(gpus)
    for name, cmd, wenv in worker_cmds(cards, env):
        sup.start(name, cmd, wenv)
    desc = ", ".join("CPU" if g is None else f"GPU {g}" for g in cards)
    _say(f"workers:    {len(cards)} ({desc})")
    _say(f"data:       {settings.home}")
    _say(f"logs:       {settings.paths.logs}")
    _wait_dashboard(dash_settings, dash)  # the URL (and its token) only once the port is ours
    _say(f"dashboard:  {_dashboard_url(dash_settings)}")


def guard_data_folder(settings: Settings) -> None:
    """Make the data folder's private files private again, and say (on stderr) how other OS
    users could still change the folder under the fleet, or read what is not private in it
    (a note: the folder is the user's, and is not changed for them)."""
    from dispatcher.host.private import exposure_warnings, readable_note, tighten

    tighten(settings.home)
    for line in exposure_warnings(settings.home):
        _say(f"lorafleet: warning: {line}", err=True)
    note = readable_note(settings.home)
    if note:
        _say(f"lorafleet: note: {note}", err=True)


def check_dashboard_port(settings: Settings) -> None:
    """Refuse before anything starts when the dashboard's port is taken: the printed URL (with
    its token) would lead to whoever holds it."""
    from dispatcher.host.embedded import port_is_free

    host, port = settings.dashboard_host, settings.dashboard_port
    if not port_is_free(port, host):
        raise StartRefused(
            f"the dashboard's port {port} on {host} is already in use (another lorafleet, or "
            f"another program); stop it, or pick another port: lorafleet up --port {port + 1} "
            "(or LORAFLEET_PORT)")


def _wait_dashboard(settings: Settings, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the dashboard answers /healthz on its port, which a socket of this OS user holds.
    Raises when the dashboard exits first (it could not bind) or another user's socket is
    there: then no URL is printed, and no token goes anywhere."""
    import requests

    from dispatcher.access.dashtoken import own_url
    from dispatcher.host.private import foreign_listener

    url = own_url(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode} before it "
                               f"answered on {url}; see {settings.paths.logs}/dashboard.log")
        uid = foreign_listener(settings.dashboard_host, settings.dashboard_port)
        if uid is not None:
            raise RuntimeError(f"port {settings.dashboard_port} is held by another OS user's "
                               f"process (uid {uid}), not this fleet's dashboard; pick another "
                               "port: lorafleet up --port N")
        try:
            # No proxy: an http_proxy of the environment would take even 127.0.0.1 elsewhere.
            if requests.get(url + "/healthz", timeout=2,
                            proxies={"http": None, "https": None}).ok:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"the dashboard did not answer on {url} within {timeout:.0f}s")


def _start_embedded_redis(settings: Settings) -> subprocess.Popen:
    """The embedded server of this data folder, with its password (made on first use)."""
    from dispatcher.host.embedded import start_server
    from dispatcher.host.private import secret_file
    from dispatcher.settings import RedisCredentialsError

    try:
        password = secret_file(settings.paths.redis_password)
    except PermissionError:
        raise RedisCredentialsError(
            f"cannot read or make the data folder's Redis password "
            f"({settings.paths.redis_password}): run lorafleet as the OS user that owns the "
            "data folder, or set LORAFLEET_REDIS_URL") from None
    return start_server(settings.paths.redis, settings.embedded_redis_port, password=password,
                        log_file=settings.paths.logs / "redis.log")


def _dashboard_url(settings: Settings) -> str:
    from dispatcher.access.dashtoken import url_to_open

    return url_to_open(settings)


# -- the parts one at a time -----------------------------------------------------------------


def run_redis(port: int | None) -> None:
    """The embedded Redis-compatible server in the foreground, until Ctrl-C."""
    from dispatcher.host.embedded import stop_server

    settings = Settings.from_env()
    if port is not None:
        settings = replace(settings, embedded_redis_port=port)
    settings.paths.ensure()
    guard_data_folder(settings)
    proc = _start_embedded_redis(settings)
    _say(f"redis: embedded server on port {settings.embedded_redis_port}, password in "
         f"{settings.paths.redis_password} (data in {settings.paths.redis}); Ctrl-C stops it")
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how it is meant to end
    finally:
        stop_server(proc)


def run_dashboard() -> None:
    """Become the dashboard (exec), after refusing a taken port (StartRefused)."""
    check_dashboard_port(Settings.from_env())
    # The dashboard prints its URL (with the token) itself, once its port is bound.
    os.execv(sys.executable, [sys.executable, "-m", "dashboard", "--print-url"])


def run_workers(cards: list[int | None], memory_mb: int | None) -> int:
    """One worker process per card (see `worker_cmds`), supervised until Ctrl-C."""
    sup = Supervisor()
    try:
        for name, cmd, env in worker_cmds(cards, child_env(), memory_mb):
            sup.start(name, cmd, env)
            _say(f"started {name}")
        code = sup.wait()
    finally:
        sup.stop_all()
    return code


def run_init() -> int:
    """The demo model and sample datasets into the data folder (gpuworker.demo, which needs
    torch, so it runs as its own process); its exit code."""
    env = child_env()
    env["LORAFLEET_HOME"] = str(Settings.from_env().home)
    return subprocess.call([sys.executable, "-m", "gpuworker.demo"], env=env)
