"""Process commands: `up`, `redis`, `dispatcher`, `dashboard`, `worker`, `init` start the parts
of the fleet on this machine. Thin wrappers: the supervision lives in dispatcher/host/up.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from dispatcher.host.gpus import GpuListError, parse_gpus
from dispatcher.host.up import StartRefused, run_dashboard, run_init, run_redis, run_up, run_workers
from dispatcher.settings import DEFAULT_EMBEDDED_REDIS_PORT, DEFAULT_PORT

GPUS_HELP = "all, cpu, or cards like 0,2"


@contextmanager
def _refusals() -> Iterator[None]:
    """A refusal before anything started: click's `Error: ...` and exit code 1."""
    try:
        yield
    except StartRefused as e:
        raise click.ClickException(str(e)) from None


@click.command()
@click.option("--gpus", default="all", show_default=True, help=GPUS_HELP)
@click.option("--host", default=None, help="dashboard address (default 127.0.0.1)")
@click.option("--port", default=None, type=int, help=f"dashboard port (default {DEFAULT_PORT})")
def up(gpus: str, host: str | None, port: int | None) -> None:
    """Start everything on this machine: Redis (embedded unless LORAFLEET_REDIS_URL is set),
    the dispatcher, the dashboard and one worker per GPU (or one CPU worker)."""
    with _refusals():
        code = run_up(gpus, host, port)
    sys.exit(code)


@click.command("redis")
@click.option("--port", default=None, type=int,
              help=f"port (default $LORAFLEET_EMBEDDED_REDIS_PORT or "
                   f"{DEFAULT_EMBEDDED_REDIS_PORT})")
def redis_cmd(port: int | None) -> None:
    """Run the embedded Redis-compatible server in the foreground. Clients started with the
    same data folder (LORAFLEET_HOME) and port find its password there."""
    run_redis(port)


@click.command("dispatcher")
def dispatcher_cmd() -> None:
    """Run the scheduler (the dispatcher) in the foreground."""
    from dispatcher.__main__ import main as run

    run()


@click.command()
def dashboard() -> None:
    """Run the web dashboard in the foreground."""
    with _refusals():
        run_dashboard()


@click.command()
@click.option("--gpus", default="all", show_default=True, help=GPUS_HELP)
@click.option("--memory-mb", type=click.IntRange(min=1), default=None,
              help="each worker advertises at most this much memory (MB) and only gets jobs "
                   "that fit in it: share a card, or cap a CPU worker")
def worker(gpus: str, memory_mb: int | None) -> None:
    """Start one worker process per card (each pinned with CUDA_VISIBLE_DEVICES)."""
    try:
        cards = parse_gpus(gpus)
    except GpuListError as e:
        raise click.BadParameter(str(e)) from None
    sys.exit(run_workers(cards, memory_mb))


@click.command()
def init() -> None:
    """Put the demo model (SmolLM2-135M-Instruct) and the sample datasets in the data folder."""
    sys.exit(run_init())


COMMANDS = (up, redis_cmd, dispatcher_cmd, dashboard, worker, init)
