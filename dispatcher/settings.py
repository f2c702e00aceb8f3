"""Settings shared by every lorafleet process, read from the environment in one place.

Every LORAFLEET_* variable (and the few others lorafleet looks at) is read here, by
`Settings.from_env` or by one of the small readers below; other modules take what they need as
arguments. Each reader takes an optional `env` mapping (default: the process's environment), so
a test hands in its own.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

DEFAULT_PORT = 8765
DEFAULT_EMBEDDED_REDIS_PORT = 6390
# The embedded Redis's password, made once by `lorafleet up` / `lorafleet redis` (mode 0600).
REDIS_PASSWORD_FILE = ".redis_password"
# The port the embedded server of the data folder last started on: a file in redis/ that
# dispatcher.host.embedded.start_server writes.
REDIS_PORT_FILE = "port"


class RedisCredentialsError(RuntimeError):
    """The embedded Redis's password cannot be had from the data folder."""


class RedisPortTakenError(RedisCredentialsError):
    """Another OS user's process listens on the embedded server's port: no password goes there."""


@dataclass(frozen=True)
class DataPaths:
    """The data folder's layout (DESIGN.md: models/, datasets/, formats/, loras/, evals/, redis/)."""

    home: Path

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def formats(self) -> Path:
        return self.home / "formats"

    @property
    def loras(self) -> Path:
        return self.home / "loras"

    @property
    def evals(self) -> Path:
        return self.home / "evals"

    @property
    def redis(self) -> Path:
        return self.home / "redis"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def redis_password(self) -> Path:
        return self.home / REDIS_PASSWORD_FILE

    @property
    def redis_port(self) -> Path:
        return self.redis / REDIS_PORT_FILE

    def ensure(self) -> None:
        """Make the folders that are missing. A new data folder is the fleet's OS user's alone
        (0700: others use the dashboard, not the files); redis/ and logs/ are always 0700."""
        from dispatcher.host.private import make_folder

        make_folder(self.home)
        for p in (self.models, self.datasets, self.formats, self.loras, self.evals):
            p.mkdir(parents=True, exist_ok=True)
        for p in (self.redis, self.logs):
            p.mkdir(mode=0o700, parents=True, exist_ok=True)


@dataclass(frozen=True)
class Settings:
    """Where the data lives and how to reach Redis and the dashboard."""

    home: Path = field(default_factory=lambda: Path("lorafleet-data").resolve())
    # Empty means: `lorafleet up` starts the embedded server and everything finds it through
    # the data folder (its port, and the password in .redis_password).
    redis_url: str = ""
    embedded_redis_port: int = DEFAULT_EMBEDDED_REDIS_PORT
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = DEFAULT_PORT
    # Key prefix in Redis, so tests (and two deployments) can share one server.
    prefix: str = "lf"
    # Seconds without a heartbeat after which a worker counts as gone.
    worker_timeout: float = 15.0
    heartbeat_interval: float = 2.0
    # Seconds a running job's trainer has to answer a stop request (cancel) before the worker
    # kills the process that runs it.
    stop_grace_s: float = 60.0
    trusted_proxies: int = 0
    # Whether LORAFLEET_HOME was set (rather than the default ./lorafleet-data): the CLI then
    # knows which data folder's dashboard token is meant.
    home_given: bool = False

    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.home)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(environ(env))
        home = Path(env.get("LORAFLEET_HOME", "lorafleet-data")).expanduser().resolve()
        return cls(
            home=home,
            redis_url=env.get("LORAFLEET_REDIS_URL", ""),
            embedded_redis_port=_embedded_port(env, DataPaths(home)),
            dashboard_host=env.get("LORAFLEET_HOST", "127.0.0.1"),
            dashboard_port=int(env.get("LORAFLEET_PORT", DEFAULT_PORT)),
            prefix=env.get("LORAFLEET_PREFIX", "lf"),
            worker_timeout=float(env.get("LORAFLEET_WORKER_TIMEOUT", 15.0)),
            heartbeat_interval=float(env.get("LORAFLEET_HEARTBEAT", 2.0)),
            stop_grace_s=_positive(env, "LORAFLEET_STOP_GRACE_S", 60.0),
            trusted_proxies=int(env.get("LORAFLEET_TRUSTED_PROXIES") or 0),
            home_given="LORAFLEET_HOME" in env,
        )

    def effective_redis_url(self) -> str:
        """The URL every process uses: LORAFLEET_REDIS_URL, else the embedded server of this
        data folder, with the password read from the folder (never printed or logged)."""
        if self.redis_url:
            return self.redis_url
        password = self.embedded_redis_password()
        check_redis_listener(self.embedded_redis_port)
        return f"redis://:{quote(password, safe='')}@127.0.0.1:{self.embedded_redis_port}/0"

    def embedded_redis_password(self) -> str:
        from dispatcher.host.private import read_private

        path = self.paths.redis_password
        try:
            password = read_private(path).strip()
        except PermissionError:
            raise RedisCredentialsError(
                f"cannot read the data folder's Redis password ({path}): run lorafleet as the "
                "OS user that owns the data folder, or set LORAFLEET_REDIS_URL") from None
        except FileNotFoundError:
            password = ""
        except OSError as e:  # a link in its place (ELOOP), a folder: not the fleet's secret
            raise RedisCredentialsError(
                f"the data folder's Redis password ({path}) is not a plain file of yours ({e}); "
                "remove it and start the fleet again") from None
        if not password:
            raise RedisCredentialsError(
                f"no Redis password in the data folder ({path}): the embedded Redis of this "
                "data folder has not been started yet; start it with `lorafleet up` (or "
                "`lorafleet redis`) with the same LORAFLEET_HOME, or set LORAFLEET_REDIS_URL")
        return password

    def redis_display(self) -> str:
        """Where Redis is, for messages: the URL without its password."""
        if not self.redis_url:
            return f"embedded server on port {self.embedded_redis_port}"
        return redact_url(self.redis_url)


def _embedded_port(env: Mapping[str, str], paths: DataPaths) -> int:
    """LORAFLEET_EMBEDDED_REDIS_PORT when set (it wins, and the server records it when it
    starts), else the port the data folder's server last started on, else 6390: every process
    of one data folder finds the same server with no setting."""
    from dispatcher.host.private import read_secret

    raw = env.get("LORAFLEET_EMBEDDED_REDIS_PORT") or read_secret(paths.redis_port)
    if not raw:
        return DEFAULT_EMBEDDED_REDIS_PORT
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        where = ("LORAFLEET_EMBEDDED_REDIS_PORT" if env.get("LORAFLEET_EMBEDDED_REDIS_PORT")
                 else str(paths.redis_port))
        raise ValueError(f"{where} must be a port number (1-65535), not {raw!r}")
    return port


def check_redis_listener(port: int) -> None:
    """Refuse to send the embedded server's password to 127.0.0.1:`port` when another OS user's
    process listens there (it took the port while the fleet's server was down)."""
    from dispatcher.host.private import foreign_listener

    uid = foreign_listener("127.0.0.1", port)
    if uid is not None:
        raise RedisPortTakenError(
            f"port {port} is held by another OS user's process (uid {uid}), not this data "
            "folder's Redis: lorafleet does not send it the password. Find it with "
            f"`ss -ltnp 'sport = :{port}'`, or start the fleet on another port "
            "(LORAFLEET_EMBEDDED_REDIS_PORT)")


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name} must be a number of seconds above 0, not {raw!r}")
    return value


def environ(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """`env`, or the process's environment: what every reader here reads."""
    return os.environ if env is None else env


# -- the readers for one process kind each ------------------------------------------------------
# (fields of Settings hold what every process shares; these are read only where they matter)
DEFAULT_FAIR_WINDOW_S = 24 * 3600.0
OFF_WORDS = ("0", "false", "no", "off")


def child_env(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process lorafleet starts (`up`'s dispatcher, dashboard and
    workers, the demo download, the preview): this process's own, plus `extra`."""
    return {**environ(env), **extra}


def config_home(env: Mapping[str, str] | None = None) -> Path:
    """This OS user's configuration folder: $XDG_CONFIG_HOME, else ~/.config."""
    base = environ(env).get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base)


def dashboard_url(default: str, env: Mapping[str, str] | None = None) -> str:
    """The dashboard the CLI talks to when no --url is given: $LORAFLEET_URL, else `default`."""
    return environ(env).get("LORAFLEET_URL") or default


def api_token(env: Mapping[str, str] | None = None) -> str:
    """The API token the CLI sends when none is given: $LORAFLEET_TOKEN, else ""."""
    return environ(env).get("LORAFLEET_TOKEN") or ""


def visible_devices(env: Mapping[str, str] | None = None) -> str | None:
    """$CUDA_VISIBLE_DEVICES as set (None when unset: every card is visible)."""
    return environ(env).get("CUDA_VISIBLE_DEVICES")


def session_secret(env: Mapping[str, str] | None = None) -> str:
    """$LORAFLEET_SECRET_KEY, the dashboard's session-signing key, or "" (then one is made once
    in the data folder)."""
    return environ(env).get("LORAFLEET_SECRET_KEY") or ""


def secure_cookies(env: Mapping[str, str] | None = None) -> bool:
    """LORAFLEET_SECURE_COOKIES=1: the session cookie is sent over HTTPS only."""
    return environ(env).get("LORAFLEET_SECURE_COOKIES", "") == "1"


def live_caps(defaults: tuple[int, int], env: Mapping[str, str] | None = None
              ) -> tuple[int, int]:
    """(live views per user, in all) from LORAFLEET_LIVE_PER_USER and LORAFLEET_LIVE_TOTAL,
    else `defaults`; at least 1 each."""
    env = environ(env)
    try:
        per_user = int(env.get("LORAFLEET_LIVE_PER_USER") or defaults[0])
        total = int(env.get("LORAFLEET_LIVE_TOTAL") or defaults[1])
    except ValueError:
        raise SystemExit("LORAFLEET_LIVE_PER_USER and LORAFLEET_LIVE_TOTAL must be whole "
                         "numbers") from None
    return max(1, per_user), max(1, total)


def scheduling_env(env: Mapping[str, str] | None = None) -> tuple[float, int]:
    """(fair-share window in seconds, cards per user at once, 0 = no limit) from
    LORAFLEET_FAIR_WINDOW_S and LORAFLEET_MAX_CARDS_PER_USER."""
    env = environ(env)
    window = float(env.get("LORAFLEET_FAIR_WINDOW_S") or DEFAULT_FAIR_WINDOW_S)
    cards = int(env.get("LORAFLEET_MAX_CARDS_PER_USER") or 0)
    return max(1.0, window), max(0, cards)


# `lorafleet worker --memory-mb N` sets it for its jobs' processes: a run that fits its
# checkpointing to the card's memory stays under the worker's cap too (engine/boundary.py).
WORKER_MEMORY_ENV = "LORAFLEET_WORKER_MEMORY_MB"


def preload_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether a worker imports the training libraries before its first job (LORAFLEET_PRELOAD,
    on unless 0/false/no/off)."""
    return environ(env).get("LORAFLEET_PRELOAD", "1").strip().lower() not in OFF_WORDS


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    """Set the process's environment variable `name` for the block (a library that reads it,
    like torch's PYTORCH_NVML_BASED_CUDA_CHECK), then put back what was there."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# A command that gets no answer in this long fails (redis-py's own default, 5 s, is shorter
# than the blocking reads that feed the live pages: XREAD BLOCK waits up to 15 s for a job's
# next event, and must not be cut off while a queued job or a model load is quiet).
SOCKET_TIMEOUT_S = 60.0


def connect(settings: Settings, **kwargs: Any):
    """A Redis client for these settings (created only when asked, never at import)."""
    import redis

    kwargs.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    url = settings.effective_redis_url()
    if not settings.redis_url:  # every reconnect checks the listener again
        kwargs.setdefault("connection_class", _owned_connection_class())
    return redis.Redis.from_url(url, decode_responses=True, **kwargs)


@functools.cache
def _owned_connection_class():
    """A redis-py connection that, before it sends AUTH, checks that the socket it reached
    listens for this OS user (the server may have been restarted, or its port taken, since
    the client was made)."""
    import redis

    class OwnedConnection(redis.Connection):
        def _connect(self):
            sock = super()._connect()
            try:
                check_redis_listener(int(self.port))
            except RedisPortTakenError as e:
                sock.close()
                raise redis.ConnectionError(str(e)) from None
            return sock

    return OwnedConnection
