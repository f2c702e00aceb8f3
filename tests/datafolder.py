"""A small data folder for dashboard tests: the settings of a real Redis (under the test's own
key prefix), a tiny model's config, a one-row dataset `d.json` and an `alpaca-format`; with
`users`, accounts ana (admin), bo and cy (members), all with PASSWORD. `files` (a path inside the
data folder -> its text) adds files or replaces the ones above, for a test module's own needs."""

from __future__ import annotations

import json
from pathlib import Path

from dispatcher.access.accounts import Accounts
from dispatcher.settings import Settings

PASSWORD = "correct horse battery"


def small_data_folder(home: Path, redis_url: str, prefix: str, users: bool = False,
                      files: dict[str, str] | None = None) -> Settings:
    s = Settings(home=home, redis_url=redis_url, prefix=prefix)
    s.paths.ensure()
    (s.paths.models / "tiny").mkdir()
    (s.paths.models / "tiny" / "config.json").write_text("{}")
    (s.paths.datasets / "d.json").write_text(json.dumps([{"instruction": "hi", "output": "yo"}]))
    (s.paths.formats / "alpaca-format.json").write_text(json.dumps({
        "instruction,output": "%instruction% %output%"}))
    for rel, text in (files or {}).items():
        (s.home / rel).parent.mkdir(parents=True, exist_ok=True)
        (s.home / rel).write_text(text)
    if users:
        acc = Accounts(s.home)
        acc.add("ana", PASSWORD, "admin")
        acc.add("bo", PASSWORD, "member")
        acc.add("cy", PASSWORD, "member")
    return s
