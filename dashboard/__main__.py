"""`python -m dashboard`: run the dashboard with settings from the environment."""

from __future__ import annotations

from dashboard.app import serve
from dispatcher.settings import Settings

if __name__ == "__main__":
    serve(Settings.from_env())
