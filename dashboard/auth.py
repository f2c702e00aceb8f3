"""Who is asking, and what they may do: login, API tokens, CSRF, roles.

Two modes, decided by the data folder's accounts file (dispatcher/access/accounts.py):

- **Accounts** (at least one user): every page needs a login (a session cookie: HttpOnly,
  SameSite=Lax) and every API call a login or an API token (`Authorization: Bearer lf_...`).
  Roles: an admin may do anything (submit for others, urgent priority, cancel or re-prioritise
  any job); a member submits and manages their own jobs and sees everything else read-only.
- **Single user** (no accounts; the dashboard refuses to start on a non-loopback address): the
  holder of the data folder's dashboard token (dashboard/solo.py) is the local user, an admin:
  a browser through a session made from `?token=` (or the token page's form), a script or the
  CLI with `Authorization: Bearer <token>`. Such a client may name itself with the
  `X-Lorafleet-User` header (used by scripts that act for several people on one machine).

Sessions are server-side (dashboard/sessions.py): the signed cookie holds a random id (and the
CSRF token), never who the user is.

CSRF: a request that changes something (POST, PUT, PATCH, DELETE) and is not authenticated by a
token must carry the session's CSRF token (`X-CSRF-Token` header, which LF.api adds from the
page's meta tag, or a `csrf_token` form field).

The request hook is here (accounts) and in dashboard/solo.py (the single-user token); who the
user is and what they may do is dashboard/identity.py, which every blueprint imports.
"""

from __future__ import annotations

import hmac
from datetime import timedelta
from pathlib import Path

from flask import Blueprint, Flask, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.middleware.proxy_fix import ProxyFix

from dashboard import solo
from dashboard.errors import error_for
from dashboard.identity import (
    PUBLIC_ENDPOINTS,
    accounts_mode,
    accounts_store,
    csrf_token,
    current_user,
    may_manage,
    safe_next,
    sessions,
    start_session,
)
from dashboard.services import services
from dashboard.sessions import account_of
from dispatcher.access.accounts import Accounts, is_loopback
from dispatcher.access.dashtoken import dashboard_token
from dispatcher.access.throttle import LoginThrottle
from dispatcher.host.private import secret_file
from dispatcher.settings import secure_cookies, session_secret

UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# The token page's form checks nothing but the dashboard token (dashboard/solo.py says why it
# needs no CSRF token).
CSRF_EXEMPT = ("solo.token_post",)
# Served without looking at the session or Redis at all.
OPEN_ENDPOINTS = ("auth.healthz", "static")

bp = Blueprint("auth", __name__, template_folder="templates")


# -- the request hook ----------------------------------------------------------------------------
def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _deny(status: int, message: str):
    """A page without a login goes to the login page; everything else is refused (the app's
    error handlers answer: JSON under /api/, the error page elsewhere)."""
    if status == 401 and not request.path.startswith("/api/"):
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    raise error_for(status)(message)


def _before_request():
    g.user = None
    g.by_token = False
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    accounts = accounts_store()
    if accounts.has_users():
        refused = _accounts_user(accounts)
    else:
        refused = _single_user()
    if refused is not None:
        return refused
    if (request.method in UNSAFE_METHODS and not g.by_token
            and request.endpoint not in CSRF_EXEMPT and not _csrf_ok()):
        return _deny(403, "missing or wrong CSRF token: reload the page and try again")
    return None


def _accounts_user(accounts: Accounts):
    token = _bearer()
    if token is not None:
        user = accounts.for_token(token)
        if user is None:
            hint = (" (the data folder's dashboard token is for single-user mode only)"
                    if solo.is_dashboard_token(token) else "")
            return _deny(401, f"this API token is not valid{hint}: make one with "
                              "`lorafleet user token NAME` and set LORAFLEET_TOKEN")
        g.user, g.by_token = user, True
        return None
    sid = session.get("sid")
    record = sessions().get(sid) if sid else None
    user = account_of(record, accounts) if record else None
    if user is None:
        if sid:  # ended (logout, password or role change, removal) or expired
            sessions().delete(sid)
            session.pop("sid", None)
        if request.endpoint not in PUBLIC_ENDPOINTS:
            return _deny(401, "log in first (or send an API token: `Authorization: Bearer "
                              "...`, made with `lorafleet user token NAME`)")
    g.user = user
    return None


def _single_user():
    if not _local_host_header():
        # DNS rebinding: a page on another site, its name pointed at 127.0.0.1, would be
        # same-origin with the open dashboard. Only names of this machine are served.
        return _deny(403, "single-user mode answers only to localhost, 127.0.0.1 or [::1] "
                          f"(this request named {request.host!r})")
    if not is_loopback(_bound_host()) and request.endpoint not in PUBLIC_ENDPOINTS:
        # Started with accounts on a public address, and every account has since been
        # removed: never fall back to the open single-user mode there.
        return _deny(503, "this dashboard serves a public address and has no accounts left: "
                          "add one with `lorafleet user add NAME --role admin`")
    return solo.gate(_bearer())


def _local_host_header() -> bool:
    """Does the request's Host name this machine (a loopback name or the configured host)?"""
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    host = host.strip("[]").lower()
    return host in ("localhost", _bound_host().lower()) or is_loopback(host)


def _bound_host() -> str:
    return services().settings.dashboard_host


def _csrf_ok() -> bool:
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    want = session.get("csrf")
    # As bytes: compare_digest refuses str with characters beyond ASCII, which a header can hold.
    return bool(want and sent and isinstance(want, str) and hmac.compare_digest(
        sent.encode("utf-8", "surrogateescape"), want.encode("utf-8", "surrogateescape")))


# -- login and logout ----------------------------------------------------------------------------
@bp.get("/login")
def login():
    if not accounts_mode():
        return redirect(url_for("pages.jobs"))
    return render_template("login.html", next=request.args.get("next", ""), error=None)


@bp.post("/login")
def login_post():
    name = request.form.get("username", "").strip()
    svc = services()
    throttle = LoginThrottle(svc.redis, svc.settings.prefix)
    # Counted before the (slow) check, so parallel guesses get no more checks than serial ones.
    wait = throttle.reserve(name, request.remote_addr)
    if wait:
        minutes = -(-wait // 60)
        return render_template("login.html", next=request.form.get("next", ""), username=name,
                               error=f"too many failed logins: try again in {minutes} min"), 429
    user = accounts_store().login(name, request.form.get("password", ""))
    if user is None:
        return render_template("login.html", next=request.form.get("next", ""), username=name,
                               error="wrong user name or password"), 401
    throttle.succeeded(name, request.remote_addr)
    start_session(sessions().for_account(user))  # a fresh session and CSRF token
    return redirect(safe_next(request.form.get("next")))


@bp.post("/logout")
def logout():
    sessions().delete(session.get("sid"))  # a replayed cookie finds nothing
    session.clear()
    return redirect(url_for("auth.login") if accounts_mode() else url_for("pages.jobs"))


@bp.get("/healthz")
def healthz():
    """Is the dashboard up? (No login needed, nothing about the fleet in the answer.)"""
    return jsonify({"ok": True})


@bp.get("/api/v1/me")
def me():
    user = current_user()
    return jsonify({"name": user.name, "role": user.role,
                    "mode": "accounts" if accounts_mode() else "single-user",
                    "by_token": bool(g.get("by_token"))})


# -- wiring --------------------------------------------------------------------------------------
def _secret_key(home: Path) -> str:
    """The session-signing key: $LORAFLEET_SECRET_KEY, else one made once in the data folder
    (mode 0600), so sessions survive a dashboard restart."""
    return session_secret() or secret_file(Path(home) / ".secret_key")


def _trust_proxies(app: Flask) -> None:
    """Behind N reverse proxies (LORAFLEET_TRUSTED_PROXIES=N) the client's address and scheme
    are the ones the proxies forwarded: without it every user behind the proxy (or an ssh
    tunnel) is 127.0.0.1, and one address's failed logins lock them all out. Only trusted when
    set: a client could otherwise name any address it likes."""
    settings = app.config.get("LORAFLEET_SETTINGS")
    n = int(getattr(settings, "trusted_proxies", 0) or 0)
    if n < 0:
        raise SystemExit(f"LORAFLEET_TRUSTED_PROXIES must be 0 or more, not {n}")
    if n:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]


def init_app(app: Flask, home: Path) -> None:
    _trust_proxies(app)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _secret_key(home)
    app.config.update(
        SESSION_COOKIE_NAME="lorafleet_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookies(),
        PERMANENT_SESSION_LIFETIME=timedelta(days=14),
    )
    # The single-user token is made with the app (like the key above), so it is in its file
    # before the first request, for `lorafleet up` to print and the CLI to read.
    dashboard_token(home)
    app.register_blueprint(bp)
    app.before_request(_before_request)

    @app.context_processor
    def _auth_context():
        return {"csrf_token": csrf_token, "current_user": g.get("user"),
                "accounts_mode": accounts_mode(), "may_manage": may_manage}
