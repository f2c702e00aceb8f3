"""Live views without a Redis connection each: one pub/sub subscription per dashboard process,
fanned out to every open live view, with a cap per user and in all.

Before this, each open `GET /api/v1/live` held a pooled Redis connection (its own pub/sub) and
each job event stream held one blocked in XREAD: a hundred browser tabs used up redis-py's pool
of 100 and every page of every user answered 503. Now:

- `Hub` runs one background thread (started by the first view, gone a while after the last)
  that holds the only pub/sub connection and copies each announcement onto the queue of every
  view that wants it. It reconnects after Redis restarts; views open at that moment get LOST
  and end with `event: interrupted`, so browsers reconnect and resume from Last-Event-ID.
- A job's event stream waits on its queue for announcements of its job, then reads the new
  events with a short XRANGE: no connection is held while it waits.
- `Hub.open` refuses past `per_user` views of one user or `total` in all (`TooManyLive`,
  answered 429); `Hub.close` frees the slot (idempotent: called when the response closes,
  which the server does when the client goes away, and by the generator's `finally`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis as redis_lib

log = logging.getLogger(__name__)

LOST = object()  # put on every queue when the subscription broke
DEFAULT_PER_USER = 20
DEFAULT_TOTAL = 200
# Announcements a view may fall behind by before it is ended (it reconnects and catches up).
BACKLOG = 1000
# The subscription stays this long after the last view closed (a page reload reopens it).
LINGER_S = 30.0
RECONNECT_S = 1.0


class TooManyLive(Exception):
    """A live view refused by a cap; the message names the cap."""


class View:
    """One open live view: its user, the job it follows (None: every job) and its queue."""

    def __init__(self, user: str, job: str | None):
        self.user = user
        self.job = job
        self.queue: queue.Queue[Any] = queue.Queue(BACKLOG)
        self.overflowed = False

    def offer(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.overflowed = True

    def get(self, timeout: float) -> Any:
        """The next announcement (a dict), LOST, or None after `timeout` seconds of quiet."""
        if self.overflowed:
            return LOST
        try:
            return self.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def drain(self) -> bool:
        """Empty the queue; False if the subscription was lost meanwhile."""
        ok = not self.overflowed
        while True:
            try:
                ok = self.queue.get_nowait() is not LOST and ok
            except queue.Empty:
                return ok


class Hub:
    def __init__(self, redis: Callable[[], Any], channel: str, per_user: int = DEFAULT_PER_USER,
                 total: int = DEFAULT_TOTAL, linger_s: float = LINGER_S):
        self._redis = redis  # a callable: the client is made on first use (STYLE 2)
        self.channel = channel
        self.per_user = per_user
        self.total = total
        self.linger_s = linger_s
        self._lock = threading.Lock()
        self._views: set[View] = set()
        self._count: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._idle_since = time.monotonic()

    # views ----------------------------------------------------------------------------------
    def open(self, user: str, job: str | None = None) -> View:
        with self._lock:
            if len(self._views) >= self.total:
                raise TooManyLive(f"too many live views open on this dashboard ({self.total}): "
                                  "try again in a minute")
            if self._count[user] >= self.per_user:
                raise TooManyLive(f"too many live views open for {user} ({self.per_user}): "
                                  "close some tabs")
            view = View(user, job)
            self._views.add(view)
            self._count[user] += 1
            if self._thread is None:
                self._ready.clear()
                self._thread = threading.Thread(target=self._run, name="lorafleet-live",
                                                daemon=True)
                self._thread.start()
        return view

    def close(self, view: View) -> None:
        with self._lock:
            if view in self._views:
                self._views.remove(view)
                self._count[view.user] -= 1
                if not self._count[view.user]:
                    del self._count[view.user]
                if not self._views:
                    self._idle_since = time.monotonic()

    def open_count(self, user: str | None = None) -> int:
        with self._lock:
            return len(self._views) if user is None else self._count[user]

    def wait_ready(self, timeout: float) -> bool:
        """True once the subscription is in place: nothing announced after this is missed."""
        return self._ready.wait(timeout)

    # the subscription -----------------------------------------------------------------------
    def _idle(self) -> bool:
        """No view for LINGER_S: the thread ends (under the lock, so `open` starts a new one)."""
        with self._lock:
            if not self._views and time.monotonic() - self._idle_since >= self.linger_s:
                self._thread = None
                self._ready.clear()
                return True
        return False

    def _broadcast(self, item: Any) -> None:
        with self._lock:
            views = list(self._views)
        for v in views:
            if item is LOST or v.job is None or v.job == item.get("job"):
                v.offer(item)

    def _run(self) -> None:
        while True:
            pubsub = None
            try:
                pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._ready.set()
                while True:
                    if self._idle():
                        return
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        payload = json.loads(msg["data"])
                    except (TypeError, ValueError):
                        continue
                    if isinstance(payload, dict):
                        self._broadcast(payload)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, OSError) as e:
                log.warning("live subscription lost (%s); reconnecting", e)
                self._ready.clear()
                self._broadcast(LOST)
                time.sleep(RECONNECT_S)
                if self._idle():
                    return
            except Exception:  # never let a bad message end every live view for good
                log.exception("live subscription failed; restarting it")
                self._ready.clear()
                self._broadcast(LOST)
                time.sleep(RECONNECT_S)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # closing a broken connection must not hide the cause
                        pass
