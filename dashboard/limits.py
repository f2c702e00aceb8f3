"""Per-user limits in the API: `GET /api/v1/limits` (anyone: their own effective limits; admins
also every setting) and `POST /api/v1/limits` (admins: set or unset one), (the guard that
submissions queue under is in quota.py). The values live in dispatcher/access/limits.py.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from dashboard.errors import BadRequest, Forbidden
from dashboard.identity import OWNER_RE, current_user
from dashboard.quota import limits as _limits
from dashboard.services import services
from dispatcher.access.limits import DEFAULTS, EVERYONE, HELP, LimitError
from dispatcher.jobs.problems import Problems

bp = Blueprint("limits", __name__)
API = "/api/v1/limits"


def effective(user: str) -> dict[str, dict[str, object]]:
    return {name: {"value": lim.value, "source": lim.source, "help": HELP[name]}
            for name, lim in _limits().for_user(user).items()}


@bp.get(API)
def get_limits():
    """Your limits (value 0 = none; source default, everyone or user) and how many of your jobs
    wait; for admins also `settings` ({user or "*": {name: value}}) and the built-in defaults."""
    user = current_user()
    body: dict[str, object] = {"user": user.name, "limits": effective(user.name),
                               "waiting": services().store.pending_count(user.name)}
    if user.is_admin:
        body["settings"] = _limits().settings()
        body["defaults"] = dict(DEFAULTS)
    return jsonify(body)


@bp.post(API)
def set_limit():
    """{"name", "value", "user"}: value null unsets; user "*" (the default) is everyone."""
    if not current_user().is_admin:
        raise Forbidden("only an admin may change limits")
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "name" not in body or "value" not in body:
        field = "body" if not isinstance(body, dict) else ("name" if "name" not in body
                                                            else "value")
        raise BadRequest.on(field, 'send a JSON object: {"name", "value", "user"} (value null '
                                   'unsets, user "*" is everyone)')
    unknown = sorted(set(body) - {"name", "value", "user"})
    if unknown:
        problems = Problems()
        for k in unknown:
            problems.add(str(k), "is not a limits field")
        raise BadRequest(f"unknown field(s) {', '.join(p['field'] for p in problems.errors)}",
                         problems.errors)
    who = body.get("user") or EVERYONE
    if who != EVERYONE and not (isinstance(who, str) and OWNER_RE.match(who)):
        raise BadRequest("user must be a user name or \"*\" (everyone)",
                         [{"field": "user", "message": "must be a user name or \"*\""}])
    try:
        _limits().set(who, str(body["name"]), body["value"])
    except LimitError as e:
        raise BadRequest.on(e.field, str(e)) from None
    return jsonify({"settings": _limits().settings(), "defaults": dict(DEFAULTS)})
