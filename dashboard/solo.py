"""The single-user dashboard's token gate (no accounts): who holds the data folder's token is the
local user, an admin; nobody else gets anything but the token page, a 401, /healthz and the
static files.

- `?token=<token>` on any GET: the right token starts a server-side session bound to the
  token's fingerprint, then redirects to the same URL without the token (so it leaves the
  address bar and the history).
- The token page's form (`POST /token`): the same, for a pasted token. It needs no CSRF token:
  it checks nothing but the dashboard token, and a cross-site page cannot make use of it: to log
  a victim's browser into "the attacker's" session it would need the token, and whoever has the
  token is already the dashboard's one and only user (there is no second identity to plant).
- `Authorization: Bearer <token>`: scripts and the CLI (no session, no CSRF token needed).

A wrong token (query, form or bearer) is counted per client address (dispatcher/access/throttle.py):
past the limit the answer is 429. The right token is always accepted, throttled or not: every
local account shares 127.0.0.1, so refusing it would let any of them lock the fleet's owner out
by sending five wrong tokens, and a 43-character random token cannot be guessed anyway.
Replacing the token file ends every session made from the old token.
"""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, g, redirect, render_template, request, session

from dashboard.errors import error_for
from dashboard.identity import (
    PUBLIC_ENDPOINTS,
    accounts_mode,
    local_user,
    safe_next,
    sessions,
    start_session,
)
from dashboard.services import services
from dashboard.sessions import token_session_ok
from dispatcher.access.dashtoken import fingerprint, read_token, token_path, tokens_match
from dispatcher.access.throttle import token_throttle

bp = Blueprint("solo", __name__, template_folder="templates")


def _token() -> str:
    return read_token(services().settings.home)


def is_dashboard_token(sent: str) -> bool:
    return tokens_match(sent, _token())


def _how() -> str:
    return (f"open the dashboard URL that `lorafleet up` printed (…/?token=…), or send "
            f"`Authorization: Bearer <token>` with the token in {token_path(services().settings.home)} "
            "(the CLI, run by the OS user who owns that data folder, reads it itself)")


def _ask(status: int, error: str | None = None):
    """The token page (pages) or a JSON error (API) for a request without a valid token."""
    if request.path.startswith("/api/"):
        raise error_for(status)(f"{error or 'this dashboard needs its token'}: {_how()}")
    nxt = request.full_path.rstrip("?") if request.method == "GET" else request.form.get("next")
    return render_template("token.html", error=error, next=nxt or "/",
                           token_file=str(token_path(services().settings.home))), status


def _wrong():
    svc = services()
    wait = token_throttle(svc.redis, svc.settings.prefix).reserve(None, request.remote_addr)
    if wait:
        return _ask(429, f"too many wrong tokens from this address: try again in "
                         f"{-(-wait // 60)} min")
    return _ask(401, "wrong token")


def _start(token: str) -> None:
    start_session(sessions().for_token(fingerprint(token)))


def _without_token() -> str:
    """The same URL without `token=`: a path on this dashboard only (a request for
    `//evil.example/` must not turn into a redirect to another host)."""
    args = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
    return safe_next(request.path + ("?" + urlencode(args) if args else ""))


def gate(bearer: str | None):
    """The request hook's single-user part: None to go on, else the answer."""
    want = _token()
    if bearer is not None:
        if not tokens_match(bearer, want):
            return _wrong()
        g.user, g.by_token = local_user(), True
        return None
    if request.endpoint == "solo.token_post":
        return None
    sent = request.args.get("token") if request.method == "GET" else None
    if sent is not None:
        if not tokens_match(sent, want):
            return _wrong()
        _start(want)
        return redirect(_without_token())
    sid = session.get("sid")
    record = sessions().get(sid) if sid else None
    if record and token_session_ok(record, fingerprint(want) if want else ""):
        g.user = local_user()
        return None
    if sid:  # logged out, or made from a token that has since been replaced
        sessions().delete(sid)
        session.pop("sid", None)
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    return _ask(401)


@bp.post("/token")
def token_post():
    if accounts_mode():
        return redirect("/login")
    want = _token()
    if not tokens_match(request.form.get("token", "").strip(), want):
        return _wrong()
    _start(want)
    return redirect(safe_next(request.form.get("next")))
