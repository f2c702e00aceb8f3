"""Flask test clients for the dashboard app, set up as a real caller would be."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask.testing import FlaskClient


class OwnerClient(FlaskClient):
    """A test client that, while the data folder has no accounts, sends the dashboard token
    (`Authorization: Bearer`) with every request that names no Authorization of its own: what
    the CLI run by the data folder's owner does. With accounts it adds nothing (log in, or pass
    an API token's header)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        from werkzeug.datastructures import Headers

        from dispatcher.access.accounts import Accounts
        from dispatcher.access.dashtoken import read_token

        home = self.application.config["LORAFLEET_SETTINGS"].home
        if (not args or isinstance(args[0], str)) and not Accounts(home).has_users():
            headers = Headers(kwargs.pop("headers", None) or {})
            if "Authorization" not in headers:
                headers["Authorization"] = f"Bearer {read_token(home)}"
            kwargs["headers"] = headers
        return super().open(*args, **kwargs)


def client_for(app: Any) -> Any:
    """A test client of `app` for the fleet's own user (what the CLI of the data folder's
    owner is)."""
    return OwnerClient(app, app.response_class, use_cookies=True)


def browser_for(app: Any) -> tuple[Any, dict[str, str]]:
    """A browser-like test client of a single-user dashboard, logged in as a user is (it opened
    the printed URL, `/?token=...`: a session cookie, no Authorization header), and the CSRF
    header its pages carry."""
    import re

    from dispatcher.access.dashtoken import read_token

    c = app.test_client()
    resp = c.get(f"/?token={read_token(app.config['LORAFLEET_SETTINGS'].home)}")
    assert resp.status_code == 302 and "token=" not in resp.headers["Location"], resp.data
    page = c.get("/jobs")
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page.data).group(1).decode()
    return c, {"X-CSRF-Token": csrf}


def serve_dashboard(settings: Any, monkeypatch: Any) -> Iterator[str]:
    """The dashboard of `settings`, served over HTTP on a free loopback port while the caller
    is suspended (a fixture's `yield from`); the CLI runs as the OS user who owns its data
    folder (LORAFLEET_HOME and PORT set: it reads the token). Yields the URL."""
    import threading

    from werkzeug.serving import make_server

    from dashboard.app import create_app

    server = make_server("127.0.0.1", 0, create_app({"LORAFLEET_SETTINGS": settings,
                                                     "TESTING": True}), threaded=True)
    monkeypatch.setenv("LORAFLEET_HOME", str(settings.home))
    monkeypatch.setenv("LORAFLEET_PORT", str(server.server_port))
    monkeypatch.delenv("LORAFLEET_TOKEN", raising=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    server.server_close()
