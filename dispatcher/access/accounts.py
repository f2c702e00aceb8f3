"""User accounts: names, roles, password hashes and API tokens, in one file of the data folder.

`accounts.json` (mode 0600) holds, per user, the role (admin | member), the password as a scrypt
hash (hashlib.scrypt, a random 16-byte salt; never the password), and the API tokens as SHA-256
digests (a token is 32 random bytes: a fast digest is enough, and the token itself is shown once,
when it is made). Each account also has a random `uid` (made when it is added, so a name removed
and added again is a new account) and a `session_version`, raised by a password or role change:
a login session is valid only while both still match (dashboard/sessions.py), which ends it even
when the change is made by the CLI with no dashboard running. The last admin can be neither
removed nor demoted (checked here, under the lock, for the CLI and the dashboard alike). Writes take an exclusive lock on `accounts.lock` and replace the file
atomically, so the CLI and a running dashboard never see half a file.

With no user at all lorafleet runs in single-user mode, which only a loopback address may serve.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.host.private import make_folder, read_private, write_private

ROLES = ("admin", "member")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
TOKEN_PREFIX = "lf_"
# scrypt cost: 2**15 x 8 x 1 takes ~50 ms and 32 MiB, the common interactive setting.
_N, _R, _P = 2**15, 8, 1


class AccountError(ValueError):
    """A refused account change, with a message for the user and the field it is about."""

    def __init__(self, message: str, field: str = "name"):
        super().__init__(message)
        self.field = field


class LastAdmin(AccountError):
    """The change would leave users without an admin."""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    uid: str = ""
    version: int = 0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=64 * 2**20)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=64 * 2**20, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    """The accounts file of a data folder. Reads are cached until the file changes."""

    def __init__(self, home: Path):
        self.path = Path(home) / "accounts.json"
        self._lock_path = Path(home) / "accounts.lock"
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    # -- reading ---------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {"users": {}}
        # Every write replaces the file (a new inode), so a change is seen even within one
        # tick of a coarse file-system clock.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != stamp:
            data = json.loads(read_private(self.path))
            self._cache = (stamp, data)
        return self._cache[1]

    def has_users(self) -> bool:
        return bool(self._load()["users"])

    def users(self) -> list[dict[str, Any]]:
        return [{"name": n, "role": u["role"], "created": u.get("created"),
                 "tokens": len(u.get("tokens", []))}
                for n, u in sorted(self._load()["users"].items())]

    def get(self, name: str) -> Account | None:
        u = self._load()["users"].get(name)
        return _account(name, u) if u else None

    def login(self, name: str, password: str) -> Account | None:
        u = self._load()["users"].get(name)
        if not u:
            # Spend the same time as a real check, so a wrong name looks like a wrong password.
            check_password(password, _dummy_hash())
            return None
        return _account(name, u) if check_password(password, u["password"]) else None

    def for_token(self, token: str) -> Account | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = _token_digest(token)
        for name, u in self._load()["users"].items():
            for t in u.get("tokens", []):
                if hmac.compare_digest(t["sha256"], digest):
                    return _account(name, u)
        return None

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        make_folder(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._cache = None
            data = json.loads(json.dumps(self._load()))  # a copy to change
            yield data
            write_private(self.path, json.dumps(data, indent=1, sort_keys=True))
            self._cache = None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def add(self, name: str, password: str, role: str = "member") -> Account:
        if not NAME_RE.match(name or ""):
            raise AccountError(f"user name {name!r}: use letters, digits, '.', '_', '@' or '-' "
                               "(at most 64, starting with a letter or digit)")
        if role not in ROLES:
            raise AccountError(f"role {role!r}: must be one of {', '.join(ROLES)}", "role")
        _check_password(password)
        if not self.has_users() and role != "admin":  # (again under the lock, below)
            raise AccountError("the first account must be an admin (--role admin): "
                               "someone has to manage the others", "role")
        with self._editing() as data:
            if not data["users"] and role != "admin":
                raise AccountError("the first account must be an admin (--role admin): "
                                   "someone has to manage the others", "role")
            if name in data["users"]:
                raise AccountError(f"user {name} already exists (remove it first, or use "
                                   "`lorafleet user password` to change the password)")
            data["users"][name] = {"role": role, "password": hash_password(password),
                                   "tokens": [], "created": time.time(),
                                   "uid": secrets.token_hex(8), "session_version": 0}
            return _account(name, data["users"][name])

    def set_password(self, name: str, password: str) -> None:
        _check_password(password)
        self._known(name)
        with self._editing() as data:
            u = self._user(data, name)
            u["password"] = hash_password(password)
            _end_sessions(u)

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise AccountError(f"role {role!r}: must be one of {', '.join(ROLES)}", "role")
        self._known(name)
        with self._editing() as data:
            u = self._user(data, name)
            if role != "admin" and u["role"] == "admin":
                _keep_an_admin(data, name, "demoted")
            if u["role"] != role:
                u["role"] = role
                _end_sessions(u)

    def remove(self, name: str) -> None:
        self._known(name)
        with self._editing() as data:
            if self._user(data, name)["role"] == "admin":
                _keep_an_admin(data, name, "removed")
            del data["users"][name]

    def new_token(self, name: str, label: str = "") -> str:
        """A new API token for `name`; returned once, only its digest is kept."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._known(name)
        with self._editing() as data:
            self._user(data, name).setdefault("tokens", []).append(
                {"sha256": _token_digest(token), "label": label[:100], "created": time.time()})
        return token

    def revoke_tokens(self, name: str) -> int:
        self._known(name)
        with self._editing() as data:
            u = self._user(data, name)
            n = len(u.get("tokens", []))
            u["tokens"] = []
        return n

    def _known(self, name: str) -> None:
        """Refuse a change of an account that is not there before the lock file is touched
        (a refused request writes nothing to the data folder); `_user` checks again under
        the lock."""
        self._user(self._load(), name)

    @staticmethod
    def _user(data: dict[str, Any], name: str) -> dict[str, Any]:
        try:
            return data["users"][name]
        except KeyError:
            raise AccountError(f"no user {name}") from None


def _account(name: str, u: dict[str, Any]) -> Account:
    return Account(name, u["role"], u.get("uid", ""), int(u.get("session_version", 0)))


def _end_sessions(u: dict[str, Any]) -> None:
    """Every login session of this account stops matching it (and so ends)."""
    u["session_version"] = int(u.get("session_version", 0)) + 1


def _keep_an_admin(data: dict[str, Any], name: str, what: str) -> None:
    # The last account of all may go (that turns accounts off): no member is left without one.
    admins = [n for n, u in data["users"].items() if u["role"] == "admin"]
    if admins == [name] and (what == "demoted" or len(data["users"]) > 1):
        raise LastAdmin(f"{name} is the last admin and cannot be {what}: make another "
                           "admin first", "role" if what == "demoted" else "name")


def _check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters",
                           "password")


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(8))


def is_loopback(host: str) -> bool:
    """Is `host` an address only this machine can reach?"""
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def single_user_refusal(host: str, accounts: Accounts) -> str | None:
    """Why the dashboard must not start on `host`, or None."""
    if accounts.has_users() or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without accounts: anyone who can reach it could run "
            "jobs and read every file. Create an admin first (`lorafleet user add NAME --role "
            "admin`), or bind to 127.0.0.1 for single-user mode.")
