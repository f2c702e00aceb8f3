"""Settings shared by every lorafleet process, read from the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765
DEFAULT_EMBEDDED_REDIS_PORT = 6390


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

    def ensure(self) -> None:
        for p in (self.models, self.datasets, self.formats, self.loras, self.evals, self.redis,
                  self.logs):
            p.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Settings:
    """Where the data lives and how to reach Redis and the dashboard."""

    home: Path = field(default_factory=lambda: Path("lorafleet-data").resolve())
    # Empty means: `lorafleet up` starts the embedded server and everything uses its URL.
    redis_url: str = ""
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

    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.home)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("LORAFLEET_HOME", "lorafleet-data")).expanduser().resolve()
        return cls(
            home=home,
            redis_url=env.get("LORAFLEET_REDIS_URL", ""),
            dashboard_host=env.get("LORAFLEET_HOST", "127.0.0.1"),
            dashboard_port=int(env.get("LORAFLEET_PORT", DEFAULT_PORT)),
            prefix=env.get("LORAFLEET_PREFIX", "lf"),
            worker_timeout=float(env.get("LORAFLEET_WORKER_TIMEOUT", 15.0)),
            heartbeat_interval=float(env.get("LORAFLEET_HEARTBEAT", 2.0)),
            stop_grace_s=_positive(env, "LORAFLEET_STOP_GRACE_S", 60.0),
        )

    def effective_redis_url(self) -> str:
        """The URL every process uses; the embedded server's default when none is configured."""
        return self.redis_url or f"redis://127.0.0.1:{DEFAULT_EMBEDDED_REDIS_PORT}/0"


def _positive(env: dict[str, str], name: str, default: float) -> float:
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


# A command that gets no answer in this long fails (redis-py's own default, 5 s, is shorter
# than the blocking reads that feed the live pages: XREAD BLOCK waits up to 15 s for a job's
# next event, and must not be cut off while a queued job or a model load is quiet).
SOCKET_TIMEOUT_S = 60.0


def connect(settings: Settings, **kwargs: Any):
    """A Redis client for these settings (created only when asked, never at import)."""
    import redis

    kwargs.setdefault("socket_timeout", SOCKET_TIMEOUT_S)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    return redis.Redis.from_url(settings.effective_redis_url(), decode_responses=True, **kwargs)
