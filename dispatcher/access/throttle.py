"""Failed logins slow down a password guesser: after too many in a window, a user name (or a
client address) is refused for the rest of that window, before its password is even checked.

An attempt is counted *before* the slow password check (`reserve`: INCR, and EXPIRE on the first
one, in one Lua script), so parallel guesses get no more checks than serial ones: with a limit of
5, the 6th concurrent attempt is refused without a check even while the first five are still
hashing. A successful login gives its reservation back: the name's count is cleared and the
address's lowered by one.

Counts live in Redis (shared by every dashboard process and kept across restarts) with the
window as their expiry: the first attempt starts the window, and it ends on its own. The address
limit is higher than the name's, since a team behind one NAT address shares it. Wrong dashboard
tokens (single-user mode) are counted per address the same way (`kind="token"`).

The trade-off: counting before the check means anyone who can reach the login page can use up
a name's (or an address's) tries: a local account can lock a name for the window. An admin lifts
it (`lorafleet user unlock NAME`, or `POST /api/v1/users/NAME/unlock`); behind a reverse proxy,
LORAFLEET_TRUSTED_PROXIES makes addresses real (dashboard/auth.py). API tokens are not throttled.
"""

from __future__ import annotations

from typing import Any

NAME_LIMIT = 5
ADDRESS_LIMIT = 20
TOKEN_LIMIT = 5
WINDOW_S = 15 * 60

# KEYS: the counters; ARGV[1]: the window. Returns, per key, its count and its seconds left.
_RESERVE = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
  out[#out + 1] = n
  out[#out + 1] = redis.call('TTL', key)
end
return out
"""


class LoginThrottle:
    def __init__(self, redis: Any, prefix: str, name_limit: int = NAME_LIMIT,
                 address_limit: int = ADDRESS_LIMIT, window_s: int = WINDOW_S,
                 kind: str = "login"):
        self.r = redis
        self.p = f"{prefix}:{kind}-failures"
        self.limits = {"name": name_limit, "address": address_limit}
        self.window_s = window_s

    def _keys(self, name: str | None, address: str | None) -> dict[str, str]:
        keys = {}
        if name is not None:
            keys["name"] = f"{self.p}:name:{name.strip().lower()}"
        if address:
            keys["address"] = f"{self.p}:address:{address}"
        return keys

    def reserve(self, name: str | None, address: str | None) -> int:
        """Count one attempt now. Returns 0 if it may go on (be checked), else the seconds until
        `name` / `address` may try again (this attempt is refused unchecked)."""
        keys = self._keys(name, address)
        if not keys:
            return 0
        got = self.r.eval(_RESERVE, len(keys), *keys.values(), self.window_s)
        wait = 0
        for i, kind in enumerate(keys):
            count, ttl = int(got[2 * i]), int(got[2 * i + 1])
            if count > self.limits[kind]:
                wait = max(wait, ttl, 1)
        return wait

    def succeeded(self, name: str | None, address: str | None = None) -> None:
        keys = self._keys(name, address)
        pipe = self.r.pipeline()
        if "name" in keys:
            pipe.delete(keys["name"])
        if "address" in keys:  # lowered only while its window lasts (never below a fresh 0)
            pipe.eval("if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', "
                      "KEYS[1]) end return 0", 1, keys["address"])
        pipe.execute()

    def unlock(self, name: str | None = None, addresses: tuple[str, ...] = ()) -> int:
        """Clear the failed-login counts of `name` and of `addresses` (an admin lifting a lock
        that another account caused). Returns how many counts there were."""
        keys = [self._keys(name, None)["name"]] if name is not None else []
        keys += [self._keys(None, a)["address"] for a in addresses if a]
        return int(self.r.delete(*keys)) if keys else 0


def token_throttle(redis: Any, prefix: str) -> LoginThrottle:
    """Wrong dashboard tokens, per client address."""
    return LoginThrottle(redis, prefix, address_limit=TOKEN_LIMIT, kind="token")
