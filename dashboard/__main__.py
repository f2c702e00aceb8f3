"""`python -m dashboard`: run the dashboard with settings from the environment."""

from __future__ import annotations

import sys

from dashboard.app import serve
from dispatcher.settings import Settings

if __name__ == "__main__":
    # --print-url (what `lorafleet dashboard` passes): print the URL to open once the port is
    # bound, never before (another account could hold the port, and the URL has the token).
    serve(Settings.from_env(), print_url="--print-url" in sys.argv[1:])
