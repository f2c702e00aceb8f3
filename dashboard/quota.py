"""The per-user limits as the dashboard reads them, and the guard that submissions (single jobs
and sweeps) queue under; a module of its own so that blueprints (api, sweeps, limits) never
import each other. The values live in dispatcher/access/limits.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dashboard.services import services
from dispatcher.access.limits import Limits, queueing


def limits() -> Limits:
    svc = services()
    return Limits(svc.redis, svc.settings.prefix)


@contextmanager
def queue_guard(owner: str, adding: int) -> Iterator[dict[str, str] | None]:
    """Yield a problem if `adding` more waiting jobs would take `owner` over max_queued_jobs;
    else None, and the jobs queued inside the block count before anyone else's check."""
    with queueing(services().store, limits(), owner, adding) as problem:
        yield problem
