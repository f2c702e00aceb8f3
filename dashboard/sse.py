"""Server-Sent Events fed from Redis: a job's event stream, and the pub/sub live feed.

A job's stream is replayed from the Redis Stream, then followed: the dashboard's one shared
subscription (dashboard/live.py) wakes it when the job's events are announced, and it reads
them with XRANGE. Each message carries `id: <stream id>` so a browser reconnecting with
Last-Event-ID resumes exactly where it stopped. The stream ends with `event: end` shortly after
the job reaches a terminal state.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import redis as redis_lib

from dashboard.live import LOST, Hub, View
from dispatcher.jobs.events import EventLog
from dispatcher.jobs.states import TERMINAL_VALUES
from dispatcher.jobs.store import JobNotFound, JobStore

log = logging.getLogger(__name__)

STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
REPLAY_BATCH = 1000
KEEP_ALIVE = ": keep-alive\n\n"
# Tell the browser how long to wait before reconnecting after a dropped connection (ms).
RETRY_MS = 3000
# How long a new view waits for the shared subscription (Redis just restarted, say).
SUBSCRIBE_WAIT_S = 5.0


def message(data: Any, event: str | None = None, id: str | None = None) -> str:
    """One SSE message; `data` is sent as compact JSON on a single line."""
    out = []
    if id:
        out.append(f"id: {id}")
    if event:
        out.append(f"event: {event}")
    out.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(out) + "\n\n"


def valid_stream_id(value: str | None) -> str | None:
    """A Redis stream id from a header or query (None for empty/zero); ValueError when malformed."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "0", "0-0"):
        return None
    if not STREAM_ID_RE.match(value):
        raise ValueError(f"'{value[:40]}' is not an event id (like 1700000000000-0)")
    return value


class _JobStream:
    """One job's stream as it is sent: the last event id sent and the job's state so far."""

    def __init__(self, store: JobStore, events: EventLog, job_id: str, after: str | None,
                 view: View, state: str):
        self.store, self.events, self.job_id, self.view = store, events, job_id, view
        self.last = after
        self.state = state

    def emit(self, batch: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[str]:
        for eid, ev in batch:
            self.last = eid
            if ev.get("type") == "state" and ev.get("state"):
                self.state = ev["state"]
            yield message({"id": eid, **ev}, id=eid)

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        return self.events.history(self.job_id, after=self.last, count=REPLAY_BATCH)

    def news(self, wait_s: float) -> list[tuple[str, dict[str, Any]]] | None:
        """Wait up to `wait_s` for an announcement, then read what is new (None: no news)."""
        item = self.view.get(wait_s)
        if item is LOST or not self.view.drain():
            raise redis_lib.ConnectionError("the live subscription was lost")
        batch = self.read()
        return batch if (batch or item is not None) else None

    def replay(self) -> Iterator[str]:
        """Everything after `after`, in batches, so a long run never loads in one reply."""
        while True:
            batch = self.read()
            yield from self.emit(batch)
            if len(batch) < REPLAY_BATCH:
                return

    def follow(self, block_ms: int) -> Iterator[str]:
        """Live events until the job is in a terminal state; keep-alives while idle."""
        while self.state not in TERMINAL_VALUES:
            batch = self.news(max(1, block_ms) / 1000)
            if batch:
                yield from self.emit(batch)
                continue
            if batch is None:
                yield KEEP_ALIVE
                # The stream is the source of truth (a change and its state event are written
                # together), but re-read the record when idle in case the stream lost entries
                # the record kept (a Redis restarted from an older append-only file).
                self.state = self.store.get(self.job_id).get("state", self.state)

    def grace(self, grace_ms: int) -> Iterator[str]:
        """After the end: what the worker writes right after (e.g. its result)."""
        while batch := self.news(max(1, grace_ms) / 1000):
            yield from self.emit(batch)


def job_events(store: JobStore, events: EventLog, job_id: str, after: str | None, view: View,
               hub: Hub, block_ms: int = 15000, grace_ms: int = 1000) -> Iterator[str]:
    """Replay a job's events after `after`, follow live ones, and end after the job ends.

    `view` (opened on `hub` for this job) wakes the stream when the job's events are announced;
    each wake-up reads the new events with one short XRANGE, so no Redis connection is held
    while the stream waits."""
    yield f"retry: {RETRY_MS}\n\n"
    try:
        try:
            stream = _JobStream(store, events, job_id, after, view,
                                store.get(job_id).get("state", ""))
        except JobNotFound:
            yield message({"error": f"no job {job_id}"}, event="end")
            return
        # Announcements from here on are queued (the hub is subscribed): none slips between
        # the replay and the wait.
        if not hub.wait_ready(SUBSCRIBE_WAIT_S):
            raise redis_lib.ConnectionError("cannot subscribe to the live channel")
        yield from stream.replay()
        yield from stream.follow(block_ms)
        yield from stream.grace(grace_ms)
        yield message({"state": stream.state}, event="end")
    except (redis_lib.ConnectionError, redis_lib.TimeoutError, JobNotFound) as e:
        # The browser reconnects with Last-Event-ID and resumes; the CLI does the same.
        log.warning("job event stream %s stopped: %s", job_id, e)
        yield message({"error": "the event stream was interrupted; reconnecting"},
                      event="interrupted")
    finally:
        hub.close(view)


def live_feed(view: View, hub: Hub, types: frozenset[str] | None = None,
              block_ms: int = 15000) -> Iterator[str]:
    """Every announcement on the live channel (optionally only some event types), as SSE,
    from the dashboard's one shared subscription (`hub`)."""
    try:
        if not hub.wait_ready(SUBSCRIBE_WAIT_S):
            raise redis_lib.ConnectionError("cannot subscribe to the live channel")
        # Sent once subscribed: a reader that sees it knows no later event is missed.
        yield f"retry: {RETRY_MS}\n: connected\n\n"
        while True:
            payload = view.get(max(0.001, block_ms / 1000))
            if payload is None:
                yield KEEP_ALIVE
                continue
            if payload is LOST:
                raise redis_lib.ConnectionError("the live subscription was lost")
            event = payload.get("event") or {}
            if not isinstance(event, dict) or (types and event.get("type") not in types):
                continue
            yield message(payload, event="job")
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as e:
        log.warning("live feed stopped: %s", e)
        yield message({"error": "the live feed was interrupted; reconnecting"}, event="interrupted")
    finally:
        hub.close(view)
