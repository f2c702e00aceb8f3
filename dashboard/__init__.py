"""The web dashboard: a Flask app factory with a JSON API under /api/v1, pages, and SSE."""

from __future__ import annotations

from dashboard.app import create_app, serve

__all__ = ["create_app", "serve"]
