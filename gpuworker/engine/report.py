"""How the engine talks to whoever runs it: three callbacks, passed as one value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]


@dataclass(frozen=True)
class Report:
    """`progress` gets events (strict JSON dicts with a "type"), `log` the job log's lines,
    `should_stop` is asked between steps whether the user wants the run to end."""

    progress: Callable[[Event], None]
    should_stop: Callable[[], bool]
    log: Callable[[str], None]

    def warn(self, message: str) -> None:
        """A warning goes to the log and, as an event, to the job page."""
        self.log(message)
        self.progress({"type": "warning", "message": message})
