"""Server-side login sessions: the cookie holds only a random session id.

`{prefix}:session:{sid}` is a hash (kind, user, uid, version or token fingerprint, created) that
expires after the session lifetime; `{prefix}:sessions:{user}` is the set of a user's ids, so all
of them can be ended at once. Logout deletes the session. A session is valid only while what it
was made for still holds (`valid`): for an account, the same account (`uid`: a name removed and
added again is a new account) with the same `session_version` (raised by a password or role
change, also by the CLI with no dashboard running); for the single-user token, the same token
(its fingerprint: replacing the token file ends those sessions).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from dispatcher.access.accounts import Account, Accounts

LIFETIME_S = 14 * 24 * 3600


class Sessions:
    def __init__(self, redis: Any, prefix: str, lifetime_s: int = LIFETIME_S):
        self.r = redis
        self.p = prefix
        self.lifetime_s = lifetime_s

    def _key(self, sid: str) -> str:
        return f"{self.p}:session:{sid}"

    def _user_key(self, user: str) -> str:
        return f"{self.p}:sessions:{user}"

    def create(self, user: str, **fields: str | int) -> str:
        sid = secrets.token_urlsafe(32)
        record = {"user": user, "created": time.time(), **fields}
        pipe = self.r.pipeline()
        pipe.hset(self._key(sid), mapping=record)
        pipe.expire(self._key(sid), self.lifetime_s)
        pipe.sadd(self._user_key(user), sid)
        pipe.expire(self._user_key(user), self.lifetime_s)
        pipe.execute()
        return sid

    def for_account(self, account: Account) -> str:
        return self.create(account.name, kind="account", uid=account.uid,
                           version=account.version)

    def for_token(self, fingerprint: str) -> str:
        return self.create("local", kind="token", fp=fingerprint)

    def get(self, sid: str | None) -> dict[str, str] | None:
        if not sid or not isinstance(sid, str):
            return None
        return self.r.hgetall(self._key(sid)) or None

    def delete(self, sid: str | None) -> None:
        record = self.get(sid)
        if record:
            self.r.delete(self._key(sid))
            self.r.srem(self._user_key(record.get("user", "")), sid)

    def end_all(self, user: str) -> int:
        """End every session of `user` (a removal or a change made in the dashboard)."""
        sids = self.r.smembers(self._user_key(user))
        if sids:
            self.r.delete(*[self._key(s) for s in sids])
        self.r.delete(self._user_key(user))
        return len(sids)


def account_of(record: dict[str, str], accounts: Accounts) -> Account | None:
    """The account a session belongs to, if the session is still valid for it."""
    if record.get("kind") != "account":
        return None
    account = accounts.get(record.get("user", ""))
    if (account is None or account.uid != record.get("uid", "")
            or str(account.version) != record.get("version")):
        return None
    return account


def token_session_ok(record: dict[str, str], fingerprint: str) -> bool:
    return record.get("kind") == "token" and bool(fingerprint) and record.get("fp") == fingerprint
