"""Who the request is and what they may do, for every blueprint: the request's user, the owner a
new job gets, the priorities and jobs they may touch, and their server-side session.

The request hook that decides who the user is lives in dashboard/auth.py (accounts) and
dashboard/solo.py (the single-user token); both, and every blueprint, import from here, so the
imports form a tree.

    current_user()                  the request's user: .name, .role, .is_admin
    check_owner(requested, p)       the owner a new job (or sweep) gets; problems into `p` if
                                    the user may not submit as `requested`
    check_priority(priority, p)     problems into `p` if `priority` is unknown or not theirs
    may_manage(owner)               may the user cancel / re-prioritise what `owner` owns?
"""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

from flask import g, request, session, url_for

from dashboard.services import services
from dashboard.sessions import Sessions
from dispatcher.access.accounts import Account, Accounts
from dispatcher.jobs.problems import Problems
from dispatcher.jobs.store import PRIORITIES

OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
ADMIN_ONLY_PRIORITIES = ("urgent",)
# Reachable without a login: the login page itself and the files every page needs.
PUBLIC_ENDPOINTS = ("auth.login", "auth.login_post", "auth.healthz", "static", "solo.token_post")

User = Account  # .name, .role, .is_admin

# Who a request is that the hook let through unauthenticated (a public endpoint: the login
# page, the token form): no name, no role, no rights.
ANONYMOUS = User("", "anonymous")


def accounts_store() -> Accounts:
    return services().accounts


def accounts_mode() -> bool:
    return accounts_store().has_users()


def local_user() -> User:
    """The single-user dashboard's user (an admin): the holder of the data folder's token, who
    may name itself with the `X-Lorafleet-User` header."""
    return User(request.headers.get("X-Lorafleet-User") or "local", "admin")


def current_user() -> User:
    if "user" not in g:  # outside the request hook (a test calling a view directly)
        return local_user()
    # The hook ran: None is an anonymous request on a public endpoint, never the admin.
    return g.user if g.user is not None else ANONYMOUS


def check_owner(requested: object, problems: Problems) -> str:
    """The owner a new job (or sweep) gets: `requested`, else the user; a problem (field
    `owner`) when it is no user name or a member asks for someone else."""
    user = current_user()
    owner = requested or user.name
    if not isinstance(owner, str) or not OWNER_RE.match(owner):
        problems.add("owner", "must be a user name of letters, digits, '.', '_', '@' or '-' "
                              "(at most 64)")
        return str(owner)
    if owner != user.name and accounts_mode() and not user.is_admin:
        problems.add("owner", f"{user.name} is a member: only an admin may submit for another "
                              "user")
    return owner


def priority_problem(priority: str) -> str | None:
    """Why the user may not use `priority` (a known one), or None."""
    if priority in ADMIN_ONLY_PRIORITIES and not current_user().is_admin:
        return f"only an admin may set {priority}"
    return None


def check_priority(priority: object, problems: Problems) -> None:
    """A problem (field `priority`) when `priority` is unknown or the user may not use it."""
    if not (isinstance(priority, str) and priority in PRIORITIES):
        problems.add("priority", f"must be one of {', '.join(PRIORITIES)}")
        return
    why = priority_problem(str(priority))
    if why:
        problems.add("priority", why)


def may_manage(owner: str) -> bool:
    user = current_user()
    return user.is_admin or user.name == owner


# -- sessions ------------------------------------------------------------------------------------
def sessions() -> Sessions:
    svc = services()
    return Sessions(svc.redis, svc.settings.prefix)


def start_session(sid: str) -> None:
    """A fresh signed cookie (and CSRF token) holding only the new session id."""
    session.clear()
    session.permanent = True
    session["sid"] = sid


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def safe_next(target: str | None) -> str:
    """`target` if it is a path on this dashboard, else the Jobs page. No white space or control
    character (browsers and Werkzeug drop tabs, so "/\t/evil" would become "//evil"), no
    scheme, no host, one leading slash."""
    if (target and target.startswith("/") and not target.startswith("//")
            and "\\" not in target and all(c.isprintable() and not c.isspace() for c in target)):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("pages.jobs")
