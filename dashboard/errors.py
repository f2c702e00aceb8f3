"""The dashboard's one error contract: a request that cannot be done raises one of these types,
and the app's error handlers (dashboard/app.py) answer it in one place: a JSON object
`{"error": one sentence, "errors": [{"field", "message"}, ...]}` under /api/, the error page
elsewhere. No view builds an error response itself.

Nothing here knows Flask, so code below the blueprints (dashboard/data_files.py) raises the same
types. Errors of the job model that mean the same everywhere (a job or sweep that is not there,
a state change that came too late, a live view past its cap) are mapped by the handlers too.
"""

from __future__ import annotations

from dispatcher.jobs.problems import Problems


class DashboardError(Exception):
    """A refused request: its HTTP status, one sentence, and the problems by field (may be
    empty: the answer then has no `errors`)."""

    status = 500

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.errors = list(errors or [])

    @classmethod
    def on(cls, field: str, message: str) -> DashboardError:
        """The error about one request field, the sentence repeated as its problem."""
        return cls(message, [{"field": field, "message": message}])

    def on_field(self, field: str) -> DashboardError:
        """The same refusal, named as being about `field` (a copy: `self` is not changed)."""
        return type(self).on(field, self.message)

    def __str__(self) -> str:
        return self.message


class BadRequest(DashboardError):
    """The request itself is wrong (a value, a missing field); nothing was done."""

    status = 400


class Unauthorized(DashboardError):
    """No login, token or a wrong one."""

    status = 401


class Forbidden(DashboardError):
    """The user may not do this (someone else's job or file, an admin's action)."""

    status = 403


class NotFound(DashboardError):
    status = 404


class Conflict(DashboardError):
    """The request clashes with what is there now (a file that exists, a job that ended)."""

    status = 409


class TooLarge(DashboardError):
    status = 413


class TooMany(DashboardError):
    """Past a rate or a cap: try again later."""

    status = 429


class Unavailable(DashboardError):
    status = 503


class TimedOut(DashboardError):
    status = 504


class Failed(DashboardError):
    """Something the dashboard ran failed in a way the user cannot fix (a crashed preview)."""

    status = 500


BY_STATUS: dict[int, type[DashboardError]] = {
    cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict,
                                TooLarge, TooMany, Unavailable, TimedOut, Failed)}


def error_for(status: int) -> type[DashboardError]:
    """The error type answered with `status` (for code that is handed a status, like a denial
    of the request hook)."""
    return BY_STATUS[status]


def refuse_problems(problems: Problems, what: str, where: str = "the request") -> None:
    """Raise a 400 naming every problem, if there is any: "`what`: N problems in `where`"."""
    if problems:
        n = len(problems)
        raise BadRequest(f"{what}: {n} problem{'s' if n != 1 else ''} in {where}",
                         problems.errors)
