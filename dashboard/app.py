"""The dashboard's app factory, its lazily connected services, and `serve` for the CLI.

No Redis connection is made at import or in `create_app`: the first request that needs Redis
opens the client (STYLE 2). Tests hand in a Settings (and may hand in a client) through config.

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
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import redis as redis_lib
from flask import Flask, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from dispatcher.jobs.events import EventLog
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.store import JobStore
from dispatcher.settings import RedisCredentialsError, Settings, connect

log = logging.getLogger(__name__)

REDIS_DOWN = ("cannot reach Redis: is `lorafleet up` (or the configured Redis server) running? "
              "Check LORAFLEET_REDIS_URL.")


class Services:
    """What the dashboard talks to, created on first use and shared by all request threads."""

    def __init__(self, settings: Settings, redis: Any = None):
        self.settings = settings
        self._redis_source = redis
        self._redis: Any = None
        self._lock = threading.Lock()
        self._live: Any = None
        self._pending: Any = None
        # Live views (SSE) open at once, per user and in all (LORAFLEET_LIVE_PER_USER/_TOTAL).
        self.live_per_user, self.live_total = live_caps()

    @property
    def redis(self) -> Any:
        if self._redis is None:
            with self._lock:
                if self._redis is None:
                    src = self._redis_source
                    if src is None:
                        self._redis = connect(self.settings)
                    elif callable(src) and not hasattr(src, "xadd"):
                        self._redis = src()
                    else:
                        self._redis = src
        return self._redis

    @property
    def store(self) -> JobStore:
        return JobStore(self.redis, self.settings.prefix)

    @property
    def events(self) -> EventLog:
        return EventLog(self.redis, self.settings.prefix)

    @property
    def fleet(self) -> Fleet:
        return Fleet(self.redis, self.settings.prefix, timeout=self.settings.worker_timeout)

    @property
    def pending(self) -> Any:
        """The process's kept copy of the queue (dispatcher.schedule.pending.PendingCache): a job list
        reads only what changed since the last one, not every queued record."""
        if self._pending is None:
            from dispatcher.schedule.pending import PendingCache

            store = self.store  # (outside the lock: connecting takes it too)
            with self._lock:
                if self._pending is None:
                    self._pending = PendingCache(store)
        return self._pending

    @property
    def live(self) -> Any:
        """The process's one live subscription, shared by every SSE view (dashboard/live.py)."""
        if self._live is None:
            from dashboard.live import Hub

            channel = EventLog(None, self.settings.prefix).channel
            with self._lock:
                if self._live is None:
                    self._live = Hub(lambda: self.redis, channel, self.live_per_user,
                                     self.live_total)
        return self._live


def live_caps(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(live views per user, in all) from LORAFLEET_LIVE_PER_USER and LORAFLEET_LIVE_TOTAL."""
    from dashboard.live import DEFAULT_PER_USER, DEFAULT_TOTAL

    env = os.environ if env is None else env
    try:
        per_user = int(env.get("LORAFLEET_LIVE_PER_USER") or DEFAULT_PER_USER)
        total = int(env.get("LORAFLEET_LIVE_TOTAL") or DEFAULT_TOTAL)
    except ValueError:
        raise SystemExit("LORAFLEET_LIVE_PER_USER and LORAFLEET_LIVE_TOTAL must be whole "
                         "numbers") from None
    return max(1, per_user), max(1, total)


def services() -> Services:
    """The current app's services (inside a request or app context)."""
    return current_app.extensions["lorafleet"]


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def _register_error_handlers(app: Flask) -> None:
    def respond(status: int, message: str, title: str):
        if _wants_json():
            return jsonify({"error": message}), status
        return render_template("error.html", status=status, title=title, message=message), status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return respond(e.code or 500, e.description or e.name, e.name)

    @app.errorhandler(redis_lib.ConnectionError)
    @app.errorhandler(redis_lib.TimeoutError)
    def redis_down(e: Exception):
        log.warning("redis unavailable: %s", e)
        return respond(503, REDIS_DOWN, "Redis is not reachable")

    @app.errorhandler(RedisCredentialsError)
    def no_credentials(e: RedisCredentialsError):
        return respond(503, str(e), "Redis is not reachable")

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        # Logged with its traceback for the operator; the user sees one plain sentence.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return respond(500, "internal error in the dashboard; see its log for details",
                       "Internal error")


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


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the dashboard app. Nothing here talks to Redis."""
    app = Flask(__name__)
    app.config.update(LORAFLEET_SSE_BLOCK_MS=15000, LORAFLEET_SSE_GRACE_MS=1000)
    if config:
        app.config.update(config)
    settings = app.config.get("LORAFLEET_SETTINGS")
    if settings is None:
        settings = Settings.from_env()
        app.config["LORAFLEET_SETTINGS"] = settings
    svc = app.extensions["lorafleet"] = Services(settings, app.config.get("LORAFLEET_REDIS"))
    svc.live_per_user = int(app.config.get("LORAFLEET_LIVE_PER_USER") or svc.live_per_user)
    svc.live_total = int(app.config.get("LORAFLEET_LIVE_TOTAL") or svc.live_total)

    from dashboard import auth, filters
    from dashboard.api import bp as api_bp
    from dashboard.datasets import bp as datasets_bp
    from dashboard.limits import bp as limits_bp
    from dashboard.pages import bp as pages_bp
    from dashboard.solo import bp as solo_bp
    from dashboard.sweeps import bp as sweeps_bp
    from dashboard.tools import bp as tools_bp
    from dashboard.users import bp as users_bp

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
    from werkzeug.serving import make_server

    from dispatcher.access.accounts import Accounts, single_user_refusal

    refusal = single_user_refusal(settings.dashboard_host, Accounts(settings.paths.home))
    if refusal:
        raise SystemExit(f"lorafleet dashboard: {refusal}")
    app = app_factory({"LORAFLEET_SETTINGS": settings})
    from dispatcher.access.dashtoken import remember

    try:
        remember(settings)  # so this OS user's CLI finds the token for this URL from anywhere
    except OSError as e:
        log.warning("could not record this dashboard for the CLI (%s): set LORAFLEET_HOME "
                    "or LORAFLEET_TOKEN where you run it", e)
    logging.getLogger("werkzeug").addFilter(RedactToken())
    server = make_server(settings.dashboard_host, settings.dashboard_port, app, threaded=True)
    if print_url:
        from dispatcher.access.dashtoken import url_to_open

        print(f"dashboard:  {url_to_open(settings)}", flush=True)
    log.info("serving on %s:%s", settings.dashboard_host, settings.dashboard_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
