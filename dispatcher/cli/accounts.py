"""Account commands: `user ...` works on the data folder's accounts.json itself (for whoever
runs the fleet's machine); `limits` reads and sets per-user limits through the dashboard."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from dispatcher.access.accounts import ROLES, AccountError, Accounts
from dispatcher.cli.client import Client
from dispatcher.cli.common import api_errors, url_option
from dispatcher.settings import Settings


@click.group()
def user() -> None:
    """Accounts (in the data folder's accounts.json): add, remove, list, tokens, passwords.

    These commands work on the data folder itself (LORAFLEET_HOME), so they are for whoever runs
    the fleet's machine. With no account at all the dashboard is single-user and only serves
    127.0.0.1; with accounts it needs a login (or an API token for the CLI)."""


def _accounts() -> Accounts:
    """The accounts of the data folder (LORAFLEET_HOME)."""
    return Accounts(Settings.from_env().paths.home)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _account_call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, with an account's refusal (no such user, a weak password) as click's error."""
    try:
        return fn(*args)
    except AccountError as e:
        raise click.ClickException(str(e)) from None


@user.command("add")
@click.argument("name")
@click.option("--role", default="member", show_default=True, type=click.Choice(ROLES))
@click.option("--password-stdin", is_flag=True, help="read the password from one line of stdin")
def user_add(name: str, role: str, password_stdin: bool) -> None:
    """Add a user (the password is asked twice, or read from stdin)."""
    acc = _accounts()
    first = not acc.has_users()
    _account_call(acc.add, name, _read_password(password_stdin), role)
    click.echo(f"added {role} {name}")
    if first:
        click.echo("accounts are now on: the dashboard asks for a login from its next request")


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove a user and their tokens (their jobs stay)."""
    _account_call(_accounts().remove, name)
    click.echo(f"removed {name}")


@user.command("list")
def user_list() -> None:
    """The users, their roles and how many API tokens each has."""
    for u in _accounts().users():
        click.echo(f"{u['name']:<24}{u['role']:<8}{u['tokens']} token(s)")


@user.command("token")
@click.argument("name")
@click.option("--label", default="", help="what the token is for (shown nowhere but the file)")
@click.option("--revoke", is_flag=True, help="revoke every token of NAME instead")
def user_token(name: str, label: str, revoke: bool) -> None:
    """Make an API token for NAME (printed once: set it as LORAFLEET_TOKEN for the CLI)."""
    acc = _accounts()
    if revoke:
        click.echo(f"revoked {_account_call(acc.revoke_tokens, name)} token(s) of {name}")
        return
    click.echo(_account_call(acc.new_token, name, label))


@user.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read the password from one line of stdin")
def user_password(name: str, password_stdin: bool) -> None:
    """Set a new password for NAME."""
    _account_call(_accounts().set_password, name, _read_password(password_stdin))
    click.echo(f"password of {name} changed")


@user.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice(ROLES))
def user_role(name: str, role: str) -> None:
    """Make NAME an admin or a member."""
    _account_call(_accounts().set_role, name, role)
    click.echo(f"{name} is now {role}")


@user.command("unlock")
@click.argument("name")
@click.option("--address", "addresses", multiple=True,
              help="also clear this client address's failed logins (e.g. 127.0.0.1)")
def user_unlock(name: str, addresses: tuple[str, ...]) -> None:
    """Lift a login lock: clear NAME's failed logins (and --address's), so NAME may log in now.

    Failed logins are counted before the password is checked, so any local account can lock a
    name for 15 minutes with wrong passwords; this undoes it. Needs the fleet's Redis."""
    from dispatcher.access.throttle import LoginThrottle
    from dispatcher.settings import RedisCredentialsError, connect

    settings = Settings.from_env()
    try:
        r = connect(settings)
        n = LoginThrottle(r, settings.prefix).unlock(name, addresses)
    except RedisCredentialsError as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:  # redis-py's connection errors
        raise click.ClickException(f"cannot reach Redis ({settings.redis_display()}): {e}") \
            from None
    click.echo(f"unlocked {name}" if n else f"{name} had no failed logins counted: nothing to "
               "lift", err=not n)



@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@url_option
@click.pass_context
@api_errors()
def limits(ctx: click.Context, as_json: bool, url: str) -> None:
    """Per-user limits (queued jobs, trials per sweep, upload space): yours, and for admins
    every setting. `lorafleet limits set NAME VALUE [--user NAME]` changes one (admins)."""
    if ctx.invoked_subcommand is not None:
        return
    body = Client(url).limits()
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(f"limits of {body['user']} ({body['waiting']} job(s) waiting; 0 = no limit):")
    for name, lim in body["limits"].items():
        click.echo(f"  {name:<18} {lim['value']:>10}  ({lim['source']}) {lim['help']}")
    for who, values in sorted((body.get("settings") or {}).items()):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
        click.echo(f"set for {'everyone' if who == '*' else who}: {shown}")


@limits.command("set")
@click.argument("name")
@click.argument("value")
@click.option("--user", default="*", show_default=True, help='a user name, or "*" for everyone')
@url_option
@api_errors()
def limits_set(name: str, value: str, user: str, url: str) -> None:
    """Set limit NAME to VALUE (0 = no limit; "unset" removes the setting) for --user."""
    if value.lower() in ("unset", "none", "default"):
        number = None
    else:
        try:
            number = int(value)
        except ValueError:
            raise click.BadParameter("a whole number, or unset", param_hint="VALUE") from None
    Client(url).set_limit(name, number, user)
    who = "everyone" if user == "*" else user
    click.echo(f"{name} {'unset' if number is None else f'= {number}'} for {who}")


COMMANDS = (user, limits)
