"""What the dashboard talks to (Redis, the job store, the event log, the fleet, the live hub),
created on first use and shared by all request threads; `services()` finds the current app's.

Its own module, below every blueprint: the blueprints import it, and dashboard/app.py (which
imports the blueprints) only creates it. No Redis connection is made at import or when the
app is created: the first request that needs Redis opens the client.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import current_app

from dashboard.live import DEFAULT_PER_USER, DEFAULT_TOTAL, Hub
from dispatcher.access.accounts import Accounts
from dispatcher.jobs.events import EventLog
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.pending import PendingCache
from dispatcher.settings import Settings, connect
from dispatcher.settings import live_caps as _settings_live_caps

EXTENSION = "lorafleet"


class Services:
    """What the dashboard talks to, created on first use and shared by all request threads."""

    def __init__(self, settings: Settings, redis: Any = None):
        self.settings = settings
        self._redis_source = redis
        self._redis: Any = None
        self._lock = threading.Lock()
        self._live: Hub | None = None
        self._pending: PendingCache | None = None
        self._accounts: Accounts | None = None
        # Live views (SSE) open at once, per user and in all (LORAFLEET_LIVE_PER_USER/_TOTAL).
        self.live_per_user, self.live_total = live_caps()

    @property
    def redis(self) -> Any:
        if self._redis is None:
            with self._lock:
                if self._redis is None:
                    src = self._redis_source
                    if src is None:
                        self._redis = connect(self.settings)
                    elif callable(src) and not hasattr(src, "xadd"):
                        self._redis = src()
                    else:
                        self._redis = src
        return self._redis

    @property
    def store(self) -> JobStore:
        return JobStore(self.redis, self.settings.prefix)

    @property
    def events(self) -> EventLog:
        return EventLog(self.redis, self.settings.prefix)

    @property
    def fleet(self) -> Fleet:
        return Fleet(self.redis, self.settings.prefix, timeout=self.settings.worker_timeout)

    @property
    def accounts(self) -> Accounts:
        """The data folder's accounts (dispatcher/access/accounts.py)."""
        if self._accounts is None:
            self._accounts = Accounts(self.settings.paths.home)
        return self._accounts

    @property
    def pending(self) -> PendingCache:
        """The process's kept copy of the queue (dispatcher.schedule.scheduler.PendingCache): a
        job list reads only what changed since the last one, not every queued record."""
        if self._pending is None:
            store = self.store  # (outside the lock: connecting takes it too)
            with self._lock:
                if self._pending is None:
                    self._pending = PendingCache(store)
        return self._pending

    @property
    def live(self) -> Hub:
        """The process's one live subscription, shared by every SSE view (dashboard/live.py)."""
        if self._live is None:
            channel = EventLog(None, self.settings.prefix).channel
            with self._lock:
                if self._live is None:
                    self._live = Hub(lambda: self.redis, channel, self.live_per_user,
                                     self.live_total)
        return self._live


def live_caps(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(live views per user, in all): the settings' LORAFLEET_LIVE_PER_USER and
    LORAFLEET_LIVE_TOTAL, with this module's defaults."""
    return _settings_live_caps((DEFAULT_PER_USER, DEFAULT_TOTAL), env)


def services() -> Services:
    """The current app's services (inside a request or app context)."""
    return current_app.extensions[EXTENSION]
