"""Failed logins slow down a password guesser: after too many in a window, a user name (or a
client address) is refused for the rest of that window, before its password is even checked.

Counts live in Redis (shared by every dashboard process and kept across restarts) with the
window as their expiry: the first failure starts the window, and it ends on its own. A
successful login clears its user name's count. The address limit is higher than the name's,
since a team behind one NAT address shares it; API tokens are long random strings and are not
throttled.
"""

from __future__ import annotations

from typing import Any

NAME_LIMIT = 5
ADDRESS_LIMIT = 20
WINDOW_S = 15 * 60


class LoginThrottle:
    def __init__(self, redis: Any, prefix: str, name_limit: int = NAME_LIMIT,
                 address_limit: int = ADDRESS_LIMIT, window_s: int = WINDOW_S):
        self.r = redis
        self.p = prefix
        self.limits = {"name": name_limit, "address": address_limit}
        self.window_s = window_s

    def _keys(self, name: str, address: str | None) -> dict[str, str]:
        keys = {"name": f"{self.p}:login-failures:name:{name.strip().lower()}"}
        if address:
            keys["address"] = f"{self.p}:login-failures:address:{address}"
        return keys

    def wait_s(self, name: str, address: str | None) -> int:
        """Seconds until `name` from `address` may try again; 0 when it may now."""
        wait = 0
        for kind, key in self._keys(name, address).items():
            count = self.r.get(key)
            if count is not None and int(count) >= self.limits[kind]:
                wait = max(wait, int(self.r.ttl(key)), 1)
        return wait

    def failed(self, name: str, address: str | None) -> None:
        for key in self._keys(name, address).values():
            if self.r.incr(key) == 1:  # the first failure opens the window
                self.r.expire(key, self.window_s)

    def succeeded(self, name: str) -> None:
        self.r.delete(self._keys(name, None)["name"])
