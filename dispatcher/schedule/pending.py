"""The dispatcher's (and each dashboard process's) kept copy of the pending jobs' records."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from dispatcher.jobs.store import JobStore

# The kept copy of the queue (PendingCache) is read again in full at least this often.
FULL_PENDING_READ_S = 60.0


class PendingCache:
    """A copy of the pending jobs' records kept from one read to the next: the dispatcher's,
    from one pass to the next, and each dashboard process's, for the queue places of its job
    lists (dashboard/services.py Services.pending).

    Reading and decoding every queued record each half second was most of a busy dispatcher's
    work (3,010 queued jobs: 0.46 s a pass, 44 % of a core). The store raises a counter with
    every change a pending job can see; while it stands still the copy is used as it is, and
    when it moves only the records whose `updated` stamp changed are read again. The
    dispatcher's own notes (`reason`) are written to Redis and to the copy alike. A write that
    does not go through JobStore moves no counter: every `full_every_s` the whole queue is
    read again anyway, so such a change is seen within that time. Safe to share between
    threads (the dashboard's requests)."""

    def __init__(self, store: JobStore, full_every_s: float = FULL_PENDING_READ_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.full_every_s = full_every_s
        self.clock = clock
        self.rev: int | None = None
        self.jobs: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self._full_at = -math.inf
        self._lock = threading.Lock()
        self.version = 0  # raised whenever the copy is read again (what it holds may differ)

    def read(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.clock()
            if now - self._full_at >= self.full_every_s:
                self.jobs, self._full_at = {}, now  # read every record again below
                self.rev = None
            rev = self.store.pending_rev()  # read first: a change after it is seen next time
            if rev != self.rev:
                self._refresh(rev)
            return [self.jobs[i] for i in self.order]

    def _refresh(self, rev: int) -> None:
        heads = self.store.pending_heads()
        # A record whose `updated` moved went through more than a waiting job's changes
        # (it ran, say): read it whole; a new one too. Others take the waiting fields.
        again = [i for i, head in heads if i not in self.jobs
                 or self.jobs[i].get("updated") != head.get("updated")]
        fresh = {j["id"]: j for j in self.store.get_many(again)}
        jobs: dict[str, dict[str, Any]] = {}
        for i, head in heads:
            if i in fresh:
                jobs[i] = fresh[i]
            elif i in self.jobs and i not in again:
                jobs[i] = {**self.jobs[i], **head}
        self.jobs, self.order, self.rev = jobs, [i for i, _ in heads if i in jobs], rev
        self.version += 1
