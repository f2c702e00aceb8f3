"""The `lorafleet` command: the click group `main` and where its commands live.

- processes.py  `up`, `redis`, `dispatcher`, `dashboard`, `worker`, `init`: start the parts of
                the fleet (thin wrappers over dispatcher/host/up.py, which supervises them)
- jobs.py       `submit`, `evaluate`, `generate`, `params`, `status`, `logs`, `priority`, `cancel`
- sweeps.py     `sweep`, `sweeps`
- data.py       `data list|upload|show-format|copy-format|preview`
- accounts.py   `user ...` (the data folder's accounts) and `limits`
- common.py     the --url option, the one API-error handler, the priority choices
- client.py     the HTTP client of the dashboard's REST API

User commands talk to the dashboard's REST API only, never to Redis.
"""

from __future__ import annotations

import click

from dispatcher.cli import accounts, data, jobs, processes, sweeps
from dispatcher.cli.common import URL_HELP


@click.group()
@click.option("--url", default=None,
              help=f"{URL_HELP}, for every command; a command's own --url wins")
def main(url: str | None) -> None:
    """lorafleet: a queue, a dashboard and a fleet of GPU workers for LoRA fine-tuning."""


for _command in (*processes.COMMANDS, *jobs.COMMANDS, *sweeps.COMMANDS, *data.COMMANDS,
                 *accounts.COMMANDS):
    main.add_command(_command)
