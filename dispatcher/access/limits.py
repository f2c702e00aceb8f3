"""Per-user limits: how much of the shared fleet one user may claim at once.

One user must not be able to fill the queue, the data folder or the dispatcher's pass for
everyone else. Each limit has a default for every user, which an admin may change for everyone
(`*`) or for one user; the values live in one Redis hash, so every dashboard process and the
dispatcher read the same ones:

  {p}:limits    hash: "{user}:{name}" -> integer ("*" as the user: the default for everyone)

A value of 0 means "no limit". The names:

  max_queued_jobs     jobs of the user that are waiting (queued, retrying) at once
  max_sweep_trials    trials one sweep of the user may have
  upload_space_mb     MB of uploaded files (datasets, format files, raw texts) the user owns
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DEFAULTS: dict[str, int] = {
    "max_queued_jobs": 1000,
    "max_sweep_trials": 200,
    "upload_space_mb": 10 * 1024,
}
HELP: dict[str, str] = {
    "max_queued_jobs": "jobs a user may have waiting in the queue at once",
    "max_sweep_trials": "trials one sweep of a user may have",
    "upload_space_mb": "MB of uploaded data files a user may own",
}
EVERYONE = "*"
# Above this a limit is no limit in practice; it keeps a typo from being stored.
LIMIT_MAX = 10**9
# How long one submission may hold its owner's queueing lock (a 1,000-trial sweep takes ~2 s).
SUBMIT_LOCK_S = 60.0


class LimitError(ValueError):
    """A refused change of a limit, naming the field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limit:
    name: str
    value: int  # 0 = no limit
    source: str  # "default", "everyone" or "user"

    def exceeded_by(self, amount: int) -> bool:
        return self.value > 0 and amount > self.value


class Limits:
    def __init__(self, redis: Any, prefix: str = "lf"):
        self.r = redis
        self.key = f"{prefix}:limits"

    def for_user(self, user: str) -> dict[str, Limit]:
        """Every limit as it applies to `user`: their own value, else everyone's, else the
        built-in default."""
        fields = [f"{who}:{name}" for name in DEFAULTS for who in (user, EVERYONE)]
        values = dict(zip(fields, self.r.hmget(self.key, fields), strict=True))
        out = {}
        for name, default in DEFAULTS.items():
            own, everyone = values[f"{user}:{name}"], values[f"{EVERYONE}:{name}"]
            if own is not None:
                out[name] = Limit(name, int(own), "user")
            elif everyone is not None:
                out[name] = Limit(name, int(everyone), "everyone")
            else:
                out[name] = Limit(name, default, "default")
        return out

    def get(self, user: str, name: str) -> Limit:
        return self.for_user(user)[name]

    def set(self, user: str, name: str, value: int | None) -> None:
        """Set `name` for `user` (EVERYONE for the default); None removes the setting."""
        check(name, value)
        field = f"{user}:{name}"
        if value is None:
            self.r.hdel(self.key, field)
        else:
            self.r.hset(self.key, field, int(value))

    def settings(self) -> dict[str, dict[str, int]]:
        """What admins have set: {user or "*": {name: value}}."""
        out: dict[str, dict[str, int]] = {}
        for field, value in self.r.hgetall(self.key).items():
            who, _, name = field.rpartition(":")
            out.setdefault(who, {})[name] = int(value)
        return out


def check(name: str, value: object) -> None:
    if name not in DEFAULTS:
        raise LimitError(f"no limit named {name!r} (limits: {', '.join(DEFAULTS)})", "name")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= LIMIT_MAX:
        raise LimitError(f"{name} must be a whole number from 0 (no limit) to {LIMIT_MAX}",
                         name)


def refusal(limit: Limit, amount: int, what: str) -> str:
    """The sentence a refusal over `limit` gives: names the limit, its value and who sets it."""
    return (f"{what} would be {amount}, over your limit {limit.name} = {limit.value}; an admin "
            f"can raise it (`lorafleet limits set {limit.name} N --user NAME`)")


def queue_problem(store: Any, limits: Limits, owner: str, adding: int) -> dict[str, str] | None:
    """A problem ({"field", "message"}) if queueing `adding` more jobs for `owner` would take
    their waiting jobs (queued + retrying) over max_queued_jobs; None if there is room."""
    limit = limits.get(owner, "max_queued_jobs")
    if not limit.value:
        return None
    waiting = store.pending_count(owner)
    if not limit.exceeded_by(waiting + adding):
        return None
    what = (f"{owner}'s waiting jobs (queued or retrying: {waiting} now, {adding} more "
            f"asked for)")
    return {"field": limit.name, "message": refusal(limit, waiting + adding, what)}


def trials_problem(limits: Limits, owner: str, trials: int) -> dict[str, str] | None:
    """A problem if a sweep of `owner` with `trials` trials is over max_sweep_trials."""
    limit = limits.get(owner, "max_sweep_trials")
    if not limit.exceeded_by(trials):
        return None
    return {"field": limit.name,
            "message": refusal(limit, trials, f"the sweep's trials for {owner}")}


@contextmanager
def queueing(store: Any, limits: Limits, owner: str, adding: int
             ) -> Iterator[dict[str, str] | None]:
    """Check the room in `owner`'s queue and queue, under that owner's lock: two submissions
    sent at once cannot both pass the check with room for one. Yields the problem (then
    queue nothing) or None (then queue the `adding` jobs inside the block)."""
    with owner_lock(store.r, store.p, owner) as held:
        if not held:
            yield {"field": "max_queued_jobs", "message": f"another submission of {owner} is "
                                                          "still being queued; try again"}
            return
        yield queue_problem(store, limits, owner, adding)


@contextmanager
def owner_lock(r: Any, prefix: str, owner: str, wait_s: float = SUBMIT_LOCK_S
               ) -> Iterator[bool]:
    """Hold `owner`'s lock (yields True), or yield False after `wait_s`. Whatever checks one
    user's limit and then claims against it (queueing jobs, saving an upload, releasing a
    LoRA name nobody uses) holds it, so two of them cannot both pass one check."""
    lock = r.lock(f"{prefix}:queueing:{owner}", timeout=SUBMIT_LOCK_S, blocking_timeout=wait_s)
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        try:
            lock.release()
        except Exception:  # it expired under a very slow submission: nothing to release
            pass
