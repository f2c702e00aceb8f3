"""The dashboard's app factory, its one set of error handlers, and `serve` for the CLI.

No Redis connection is made at import or in `create_app`: the first request that needs Redis
opens the client (dashboard/services.py; STYLE 2). Tests hand in a Settings (and may hand in a
client) through config.

Config keys:
  LORAFLEET_SETTINGS        a dispatcher.settings.Settings (default: Settings.from_env())
  LORAFLEET_REDIS           optional: a ready Redis client (decode_responses=True), or a
                            callable returning one, instead of connecting from the settings
  LORAFLEET_SSE_BLOCK_MS    how long an SSE stream waits for news before a keep-alive (15000)
  LORAFLEET_SSE_GRACE_MS    how long a job's stream keeps reading after the job ended (1000)
  LORAFLEET_LIVE_PER_USER, LORAFLEET_LIVE_TOTAL   live views (SSE) open at once per user and
                            in all (default: the environment's, else 20 and 200); past them 429
  LORAFLEET_UPLOAD_MAX_BYTES   largest data file the Datasets page accepts (50 MB)
  LORAFLEET_PREVIEW_TIMEOUT_S  how long a sample preview may run (60)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import redis as redis_lib
from flask import Flask, jsonify, render_template, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import make_server

from dashboard import auth, filters
from dashboard.api import bp as api_bp
from dashboard.datasets import bp as datasets_bp
from dashboard.errors import DashboardError
from dashboard.limits import bp as limits_bp
from dashboard.live import TooManyLive
from dashboard.pages import bp as pages_bp
from dashboard.services import EXTENSION, Services
from dashboard.solo import bp as solo_bp
from dashboard.sweeps import bp as sweeps_bp
from dashboard.tools import bp as tools_bp
from dashboard.users import bp as users_bp
from dispatcher.access.accounts import Accounts, single_user_refusal
from dispatcher.access.dashtoken import remember, url_to_open
from dispatcher.jobs.states import TransitionError
from dispatcher.jobs.store import JobNotFound
from dispatcher.schedule.sweeps import SweepNotFound
from dispatcher.settings import RedisCredentialsError, Settings

log = logging.getLogger(__name__)

REDIS_DOWN = ("cannot reach Redis: is `lorafleet up` (or the configured Redis server) running? "
              "Check LORAFLEET_REDIS_URL.")


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def respond(status: int, message: str, errors: list[dict[str, str]] | None = None,
            title: str = ""):
    """The one error answer: `{"error", "errors"?}` under /api/, else the error page."""
    if _wants_json():
        body: dict[str, Any] = {"error": message}
        if errors:
            body["errors"] = errors
        return jsonify(body), status
    return render_template("error.html", status=status, message=message,
                           title=title or HTTP_STATUS_CODES.get(status, "Error")), status


def _missing(kind: str, e: KeyError) -> str:
    return f"no {kind} {e.args[0] if e.args else ''}".strip()


def _register_error_handlers(app: Flask) -> None:
    """Every refusal of every blueprint is answered here (dashboard/errors.py)."""

    @app.errorhandler(DashboardError)
    def refused(e: DashboardError):
        return respond(e.status, e.message, e.errors)

    @app.errorhandler(JobNotFound)
    def no_job(e: JobNotFound):
        return respond(404, _missing("job", e))

    @app.errorhandler(SweepNotFound)
    def no_sweep(e: SweepNotFound):
        return respond(404, _missing("sweep", e))

    @app.errorhandler(TransitionError)  # the job changed state under us (it just finished)
    def too_late(e: TransitionError):
        return respond(409, str(e))

    @app.errorhandler(TooManyLive)
    def too_many_live(e: TooManyLive):
        return respond(429, str(e))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return respond(e.code or 500, e.description or e.name, title=e.name)

    @app.errorhandler(redis_lib.ConnectionError)
    @app.errorhandler(redis_lib.TimeoutError)
    def redis_down(e: Exception):
        log.warning("redis unavailable: %s", e)
        return respond(503, REDIS_DOWN, title="Redis is not reachable")

    @app.errorhandler(RedisCredentialsError)
    def no_credentials(e: RedisCredentialsError):
        return respond(503, str(e), title="Redis is not reachable")

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        # Logged with its traceback for the operator; the user sees one plain sentence.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return respond(500, "internal error in the dashboard; see its log for details",
                       title="Internal error")


# The pages load nothing from elsewhere: scripts and styles are files under /static, data for
# scripts is in <script type="application/json"> blocks, and widths set from JS (progress bars,
# uPlot) go through element.style, which a CSP allows. No inline scripts, handlers or style=""
# attributes, so neither script-src nor style-src needs 'unsafe-inline'.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _security_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


class RequestJSON(DefaultJSONProvider):
    """Flask's JSON, except that a body nested deeper than Python's recursion limit is bad
    JSON like any other (a ValueError: `get_json(silent=True)` gives None and the view answers
    400 naming the body), not a RecursionError that would end as a 500."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the dashboard app. Nothing here talks to Redis."""
    app = Flask(__name__)
    app.json = RequestJSON(app)
    app.config.update(LORAFLEET_SSE_BLOCK_MS=15000, LORAFLEET_SSE_GRACE_MS=1000)
    if config:
        app.config.update(config)
    settings = app.config.get("LORAFLEET_SETTINGS")
    if settings is None:
        settings = Settings.from_env()
        app.config["LORAFLEET_SETTINGS"] = settings
    svc = app.extensions[EXTENSION] = Services(settings, app.config.get("LORAFLEET_REDIS"))
    svc.live_per_user = int(app.config.get("LORAFLEET_LIVE_PER_USER") or svc.live_per_user)
    svc.live_total = int(app.config.get("LORAFLEET_LIVE_TOTAL") or svc.live_total)

    filters.register(app)
    auth.init_app(app, settings.paths.home)
    app.register_blueprint(api_bp)
    app.register_blueprint(pages_bp)
    app.register_blueprint(datasets_bp)
    app.register_blueprint(tools_bp)
    app.register_blueprint(sweeps_bp)
    app.register_blueprint(users_bp)
    app.register_blueprint(solo_bp)
    app.register_blueprint(limits_bp)
    _register_error_handlers(app)
    app.after_request(_security_headers)
    # No request body may be larger than an upload (plus its multipart envelope): Werkzeug
    # refuses it (413) before anything reads it, login and CSRF checks included.
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = int(app.config["LORAFLEET_UPLOAD_MAX_BYTES"]) + 2**20
    return app


class RedactToken(logging.Filter):
    """Werkzeug logs each request line with its query ("GET /?token=… HTTP/1.1" 200): the
    dashboard's log keeps the line, never the token's value."""

    PATTERN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg, record.args = self.PATTERN.sub(r"\1***", message), ()
        return True


def serve(settings: Settings, app_factory: Callable[..., Flask] = create_app,
          print_url: bool = False) -> None:
    """Run the dashboard with a threaded server (each live SSE view holds one thread); with
    `print_url`, print the URL to open once the port is bound."""
    refusal = single_user_refusal(settings.dashboard_host, Accounts(settings.paths.home))
    if refusal:
        raise SystemExit(f"lorafleet dashboard: {refusal}")
    app = app_factory({"LORAFLEET_SETTINGS": settings})
    try:
        remember(settings)  # so this OS user's CLI finds the token for this URL from anywhere
    except OSError as e:
        log.warning("could not record this dashboard for the CLI (%s): set LORAFLEET_HOME "
                    "or LORAFLEET_TOKEN where you run it", e)
    logging.getLogger("werkzeug").addFilter(RedactToken())
    server = make_server(settings.dashboard_host, settings.dashboard_port, app, threaded=True)
    if print_url:
        print(f"dashboard:  {url_to_open(settings)}", flush=True)
    log.info("serving on %s:%s", settings.dashboard_host, settings.dashboard_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
