"""The Users page and API: admins add and remove users, change roles, make and revoke API tokens.

The same accounts file as `lorafleet user` (dispatcher/access/accounts.py). Only admins get here (in
single-user mode the local user is one, so the first account can be made from the page; that
turns logins on). Two guards keep a fleet from locking itself out: an admin cannot remove or
demote themself (here: the CLI has no "self"), and the last admin cannot be removed or demoted
(dispatcher/access/accounts.py, under the accounts lock, so the CLI keeps it too). A removal or a role
change ends that user's open sessions at once. An admin may also lift a login lock
(`POST /api/v1/users/NAME/unlock`, like `lorafleet user unlock NAME`).
"""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template, request

from dashboard.errors import BadRequest, Conflict, DashboardError, Forbidden, NotFound
from dashboard.identity import accounts_mode, accounts_store, current_user, sessions
from dashboard.services import services
from dispatcher.access.accounts import ROLES, AccountError, LastAdmin
from dispatcher.access.throttle import LoginThrottle

bp = Blueprint("users", __name__, template_folder="templates")
API = "/api/v1/users"


@bp.before_request
def _admins_only() -> None:
    if not current_user().is_admin:
        raise Forbidden("only an admin may manage users")


def _guard(name: str, action: str) -> None:
    """Refuse (409) `action` when it is an admin's on their own account."""
    me = current_user()
    if accounts_mode() and name == me.name:
        raise Conflict(f"you cannot {action} your own account: ask another admin")


def _account_error(e: AccountError) -> DashboardError:
    """A refused change of an existing account: the last admin (409), else no such user (404)."""
    return Conflict(str(e)) if isinstance(e, LastAdmin) else NotFound(str(e))


@bp.get("/users")
def users_page():
    return render_template("users.html", users=accounts_store().users(), roles=ROLES, nav="users")


@bp.get(API)
def list_users():
    return jsonify({"users": accounts_store().users(), "mode": "accounts" if accounts_mode()
                    else "single-user"})


@bp.post(API)
def add_user():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest.on("body", "send a JSON object: {name, role, password}")
    name, role, password = body.get("name"), body.get("role", "member"), body.get("password")
    not_text = [k for k, v in (("name", name), ("role", role), ("password", password))
                if not isinstance(v, str)]
    if not_text:
        raise BadRequest("name, role and password must be text",
                         [{"field": k, "message": "must be text"} for k in not_text])
    first = not accounts_mode()
    try:
        accounts_store().add(name.strip(), password, role)
    except AccountError as e:
        raise BadRequest.on(e.field, str(e)) from None
    return jsonify({"name": name.strip(), "role": role, "logins_on": first}), 201


@bp.post(API + "/<name>/remove")
def remove_user(name: str):
    _guard(name, "remove")
    try:
        accounts_store().remove(name)
    except AccountError as e:
        raise _account_error(e) from None
    sessions().end_all(name)  # (the account's uid is gone too: they could not be used anyway)
    return jsonify({"removed": name})


@bp.post(API + "/<name>/role")
def set_role(name: str):
    body = request.get_json(silent=True)
    role = body.get("role") if isinstance(body, dict) else None
    if role not in ROLES:
        raise BadRequest.on("role", f"role must be one of {', '.join(ROLES)}")
    if role != "admin":
        _guard(name, "demote")
    try:
        accounts_store().set_role(name, role)
    except AccountError as e:
        raise _account_error(e) from None
    sessions().end_all(name)
    return jsonify({"name": name, "role": role})


@bp.post(API + "/<name>/unlock")
def unlock_user(name: str):
    """Clear `name`'s failed logins (another account's wrong passwords may have locked it)."""
    svc = services()
    cleared = LoginThrottle(svc.redis, svc.settings.prefix).unlock(name)
    return jsonify({"name": name, "unlocked": bool(cleared)})


@bp.post(API + "/<name>/token")
def new_token(name: str):
    """A new API token for `name`, in the answer only (it is not kept in clear anywhere)."""
    body = request.get_json(silent=True) or {}
    label = body.get("label", "") if isinstance(body, dict) else ""
    try:
        token = accounts_store().new_token(name, str(label))
    except AccountError as e:
        raise NotFound(str(e)) from None
    return jsonify({"name": name, "token": token}), 201


@bp.post(API + "/<name>/token/revoke")
def revoke_tokens(name: str):
    try:
        n = accounts_store().revoke_tokens(name)
    except AccountError as e:
        raise NotFound(str(e)) from None
    return jsonify({"name": name, "revoked": n})
