"""What an engine job reports (events, log lines), collected by the engine tests; `should_stop`
answers the engine's stop check and each test module says when it turns true."""

from __future__ import annotations

import json
from typing import Any


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.stop_after = stop_after
        self.calls = 0  # how often the engine asked should_stop

    def progress(self, event: dict[str, Any]) -> None:
        json.dumps(event, allow_nan=False)  # events go to Redis as strict JSON
        self.events.append(event)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def should_stop(self) -> bool:
        """True once `stop_after` training steps were reported (a training job's check)."""
        return self.stop_after is not None and len(self.of("train")) >= self.stop_after
