"""Flask test clients for the dashboard app, set up as a real caller would be."""

from __future__ import annotations

from typing import Any


def client_for(app: Any) -> Any:
    """A test client of `app` for the fleet's own user (what the CLI of the data folder's
    owner is)."""
    return app.test_client()
