"""What every user command shares: the dashboard URL option, the one API-error handler, the
priority choices and reading a spec file.

A command that talks to the dashboard takes `@url_option` (it then gets `url`, already resolved)
and `@api_errors()` (an `ApiError` anywhere in it ends the command with the API's error lines on
stderr and exit code 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dispatcher.cli.client import ApiError
from dispatcher.settings import DEFAULT_PORT
from dispatcher.settings import dashboard_url as _settings_dashboard_url

F = TypeVar("F", bound=Callable[..., Any])

URL_HELP = "dashboard URL (default: $LORAFLEET_URL or http://127.0.0.1:8765)"
# The queue's priority levels, lowest first. The store's `PRIORITIES` (dispatcher/jobs/store.py)
# holds the same names with their ranks; a test keeps the two equal. Not imported from there:
# the store loads redis-py, which no user command needs.
PRIORITIES = ("low", "normal", "high", "urgent")


def dashboard_url(ctx: click.Context, own: str | None) -> str:
    """The dashboard URL: the command's own --url, else the --url given before the command
    (`lorafleet --url URL status`), else $LORAFLEET_URL, else this machine's dashboard."""
    before = ctx.find_root().params.get("url")
    return (own or before or _settings_dashboard_url("")
            or f"http://127.0.0.1:{DEFAULT_PORT}")


def url_option(f: F) -> F:
    """`--url` on a command that talks to the dashboard; the command gets `url` resolved by
    `dashboard_url` (the group's --url is declared on the group itself, with its own help)."""
    return click.option("--url", default=None, help=URL_HELP,
                        callback=lambda ctx, _param, value: dashboard_url(ctx, value))(f)


def priority_option(f: F) -> F:
    """`--priority` of the commands that queue a job."""
    return click.option("--priority", default="normal", type=click.Choice(PRIORITIES))(f)


def fail_api(e: ApiError) -> NoReturn:
    """The API's field errors (or its message) on stderr, then exit code 2."""
    for err in e.errors:
        click.echo(f"error: {err.get('field')}: {err.get('message')}", err=True)
    if not e.errors:
        click.echo(f"error: {e}", err=True)
    sys.exit(2)


@contextmanager
def api_errors() -> Iterator[None]:
    """The one handler of the dashboard's errors (refusals, an unreachable URL, a listener that
    is not ours): as a decorator on a command, or as a `with` block."""
    try:
        yield
    except ApiError as e:
        fail_api(e)


def load_spec(path: str) -> dict[str, Any]:
    """A JSON or YAML file that holds one object (a job spec, a sweep definition)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        # As before the split: the name goes by the suffix as written (`.YAML` says JSON).
        kind = "YAML" if p.suffix in (".yaml", ".yml") else "JSON"
        raise click.ClickException(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: must hold an object of training parameters")
    return data
