"""Links in the data folder must not lead out of it (see formats/paths.py, where the one
check lives so that formats, which imports nothing from the other packages, can use it too).
Kept free of Flask and torch: the dashboard, the CLI's preview and the engine all use it."""

from __future__ import annotations

from formats.paths import NAME_MAX, LeadsOutside, check_inside, inside, too_long

__all__ = ["NAME_MAX", "LeadsOutside", "check_inside", "inside", "too_long"]
