"""Sweep commands, through the dashboard's REST API: `sweep` queues one (README, "Sweeps"),
`sweeps` lists them, shows one or cancels it."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from dispatcher.cli.client import Client
from dispatcher.cli.common import api_errors, load_spec, url_option


def _print_plan(plan: dict[str, Any]) -> None:
    """A dry run's trials (the varied values of each) and the duplicates it skipped."""
    varied = plan.get("varied", [])
    for t in plan["trials"]:
        values = "  ".join(f"{k}={t['params'][k]}" for k in varied)
        click.echo(f"{t['name']:<40} {values}")
    for s in plan.get("skipped", []):
        click.echo(f"skipped {s['name']}: the same as {s['same_as']}")
    click.echo(f"{plan['count']} trial{'s' if plan['count'] != 1 else ''} "
               f"({len(plan.get('skipped', []))} duplicates skipped); nothing queued", err=True)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="only list the trials it would queue")
@click.option("--wait", is_flag=True,
              help="follow the sweep until every trial has ended; exit 0 if one succeeded")
@url_option
@api_errors()
def sweep(file: str, dry_run: bool, wait: bool, url: str) -> None:
    """Queue a hyperparameter sweep from a YAML or JSON FILE (README, "Sweeps"); prints the
    sweep id. Nothing is queued when any field is wrong."""
    definition = load_spec(file)
    client = Client(url)
    plan = client.create_sweep(definition, dry_run=dry_run)
    if dry_run:
        _print_plan(plan)
        return
    click.echo(plan["id"])
    click.echo(f"{plan['count']} trials queued", err=True)
    if wait:
        sys.exit(follow_sweep(client, plan["id"]))


def follow_sweep(client: Client, sweep_id: str, poll_s: float = 2.0) -> int:
    """Print the sweep's counts as they change until it finishes; 0 if a trial succeeded."""
    last = None
    while True:
        rec = client.sweep(sweep_id)
        s = rec["summary"]
        line = (f"{s['state']}: {s['succeeded']} succeeded, {s['failed']} failed, "
                f"{s['stopped_early']} stopped early, {s['cancelled']} cancelled, "
                f"{s['running']} running, {s['queued']} queued")
        if line != last:
            click.echo(line, err=True)
            last = line
        if rec.get("finished"):
            best = next((r for r in rec["rows"] if r["id"] == rec.get("best")), None)
            if best:
                click.echo(f"best: {best['name']} ({best['id']})", err=True)
            return 0 if s["succeeded"] else 1
        time.sleep(poll_s)


@click.command()
@click.argument("sweep_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--cancel", "do_cancel", is_flag=True, help="cancel the sweep's unfinished trials")
@url_option
@api_errors()
def sweeps(sweep_id: str | None, as_json: bool, do_cancel: bool, url: str) -> None:
    """List the sweeps, or show one sweep's trials (`--cancel` cancels it)."""
    client = Client(url)
    if do_cancel:
        if not sweep_id:
            raise click.UsageError("--cancel needs a SWEEP_ID")
        client.cancel_sweep(sweep_id)
    data: Any = client.sweep(sweep_id) if sweep_id else client.sweeps()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif sweep_id:
        _print_sweep(data)
    else:
        click.echo(f"{'ID':<14}{'STATE':<12}{'TRIALS':<8}{'OK':<5}{'FAIL':<6}{'STOP':<6}"
                   f"{'CANC':<6}NAME")
        for s in data:
            m = s["summary"]
            click.echo(f"{s['id']:<14}{m['state']:<12}{m['trials']:<8}{m['succeeded']:<5}"
                       f"{m['failed']:<6}{m['stopped_early']:<6}{m['cancelled']:<6}{s['name']}")


def _loss(v: Any) -> str:
    return f"{float(v):.4f}" if v not in (None, "") else "-"


def pack_setting(data: dict[str, Any]) -> str:
    """A sweep's pack setting in words, as the Sweep page says it: "auto (size: as the card
    fits)", "auto (size: 4)", "off" (a sweep from before packs: off)."""
    if data.get("pack") != "auto":
        return "off"
    return f"auto (size: {data.get('pack_size') or 'as the card fits'})"


def pack_line(pack: dict[str, Any]) -> str:
    """One pack of a sweep: "pack 1: 4 trials on w1: a, b, c, d" ("(training)" while on the
    card)."""
    n = len(pack["trials"])
    return (f"pack {pack['pack']}: {n} trial{'' if n == 1 else 's'}"
            + (f" on {pack['worker']}" if pack.get("worker") else "")
            + f": {', '.join(pack['trials'])}" + (" (training)" if pack.get("running") else ""))


def _print_sweep(data: dict[str, Any]) -> None:
    """One sweep: its counts, its pack setting and the packs it formed, then a row per trial
    (the best one starred)."""
    m = data["summary"]
    click.echo(f"sweep {data['id']} {data['name']}: {m['state']}; {m['succeeded']} succeeded, "
               f"{m['failed']} failed, {m['stopped_early']} stopped early, "
               f"{m['cancelled']} cancelled")
    click.echo(f"pack: {pack_setting(data)}")
    for p in data.get("packs") or []:
        click.echo(pack_line(p))
    click.echo(f"{'JOB':<13}{'STATE':<15}{'LOSS':<9}{'EVAL':<9}{'PPL':<9}{'PACK':<6}TRIAL")
    for r in data["rows"]:
        star = " *best*" if r["id"] == data.get("best") else ""
        click.echo(f"{r['id']:<13}{r['display_state']:<15}{_loss(r['final_loss']):<9}"
                   f"{_loss(r['best_eval_loss']):<9}{_loss(r['perplexity']):<9}"
                   f"{r.get('pack') or '-':<6}{r['name']}{star}")


COMMANDS = (sweep, sweeps)
