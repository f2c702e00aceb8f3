"""Server-Sent Events fed from Redis: a job's event stream, and the pub/sub live feed.

A job's stream is replayed from the Redis Stream, then followed with XREAD BLOCK; each message
carries `id: <stream id>` so a browser reconnecting with Last-Event-ID resumes exactly where it
stopped. The stream ends with `event: end` shortly after the job reaches a terminal state.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import redis as redis_lib

from dispatcher.events import EventLog
from dispatcher.states import TERMINAL
from dispatcher.store import JobNotFound, JobStore

log = logging.getLogger(__name__)

STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")
REPLAY_BATCH = 1000
KEEP_ALIVE = ": keep-alive\n\n"
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
# Tell the browser how long to wait before reconnecting after a dropped connection (ms).
RETRY_MS = 3000


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


def job_events(store: JobStore, events: EventLog, job_id: str, after: str | None,
               block_ms: int = 15000, grace_ms: int = 1000) -> Iterator[str]:
    """Replay a job's events after `after`, follow live ones, and end after the job ends."""
    yield f"retry: {RETRY_MS}\n\n"
    last = after
    state = ""
    try:
        state = store.get(job_id).get("state", "")
    except JobNotFound:
        yield message({"error": f"no job {job_id}"}, event="end")
        return

    def emit(batch: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[str]:
        nonlocal last, state
        for eid, ev in batch:
            last = eid
            if ev.get("type") == "state" and ev.get("state"):
                state = ev["state"]
            yield message({"id": eid, **ev}, id=eid)

    try:
        while True:  # replay in batches, so a long run never loads in one reply
            batch = events.history(job_id, after=last, count=REPLAY_BATCH)
            yield from emit(batch)
            if len(batch) < REPLAY_BATCH:
                break
        while state not in TERMINAL_VALUES:
            batch = events.wait(job_id, last or "0-0", block_ms=max(1, block_ms))
            if batch:
                yield from emit(batch)
                continue
            yield KEEP_ALIVE
            # The stream is the source of truth, but re-read the record when idle in case an
            # event was lost between the record change and the stream append.
            state = store.get(job_id).get("state", state)
        # Terminal: pick up what the worker writes right after (e.g. its result), then end.
        while True:
            batch = events.wait(job_id, last or "0-0", block_ms=max(1, grace_ms))
            if not batch:
                break
            yield from emit(batch)
        yield message({"state": state}, event="end")
    except (redis_lib.ConnectionError, redis_lib.TimeoutError, JobNotFound) as e:
        # The browser reconnects with Last-Event-ID and resumes; the CLI does the same.
        log.warning("job event stream %s stopped: %s", job_id, e)
        yield message({"error": "the event stream was interrupted; reconnecting"}, event="interrupted")


def live_feed(redis: Any, channel: str, types: frozenset[str] | None = None,
              block_ms: int = 15000) -> Iterator[str]:
    """Every pub/sub announcement on `channel` (optionally only some event types), as SSE."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(channel)
        # Sent after subscribing: a reader that sees it knows no later event is missed.
        yield f"retry: {RETRY_MS}\n: connected\n\n"
        while True:
            msg = pubsub.get_message(timeout=max(0.001, block_ms / 1000))
            if msg is None:
                yield KEEP_ALIVE
                continue
            if msg.get("type") != "message":
                continue
            try:
                payload = json.loads(msg["data"])
                event = payload.get("event") or {}
            except (TypeError, ValueError, AttributeError):
                continue
            if types and event.get("type") not in types:
                continue
            yield message(payload, event="job")
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as e:
        log.warning("live feed stopped: %s", e)
        yield message({"error": "the live feed was interrupted; reconnecting"}, event="interrupted")
    finally:
        try:
            pubsub.close()
        except Exception:  # closing a broken connection must not hide the real error
            pass


def is_terminal(state: str) -> bool:
    return state in TERMINAL_VALUES

