"""Who is asking, and what they may do.

(Accounts are being added: for now every request is the single local user, an admin.)

    current_user()                  the request's user: .name, .role, .is_admin
    owner_for(requested)            the owner a new job (or sweep) gets, and problems if the
                                    user may not submit as `requested`
    priority_problem(priority)      a problem dict if the user may not use `priority`
    may_manage(owner)               may the user cancel / re-prioritise what `owner` owns?
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flask import request

OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
ADMIN_ONLY_PRIORITIES = ("urgent",)


@dataclass(frozen=True)
class User:
    name: str
    role: str  # "admin" | "member"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def current_user() -> User:
    return User(request.headers.get("X-Lorafleet-User") or "local", "admin")


def owner_for(requested: object) -> tuple[str, list[dict[str, str]]]:
    owner = requested or current_user().name
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        return str(owner), [{"field": "owner", "message": "must be a user name of letters, "
                                                          "digits, '.', '_', '@' or '-' (at most 64)"}]
    return owner, []


def priority_problem(priority: str) -> dict[str, str] | None:
    if priority in ADMIN_ONLY_PRIORITIES and not current_user().is_admin:
        return {"field": "priority", "message": f"only an admin may set {priority}"}
    return None


def may_manage(owner: str) -> bool:
    user = current_user()
    return user.is_admin or user.name == owner
