"""The `lorafleet` command.

Process commands (`up`, `redis`, `dispatcher`, `dashboard`, `worker`, `init`) start the parts of
the fleet; user commands (`submit`, `status`, `logs`, `cancel`) talk to the dashboard's REST API.
This module is the composition root: it starts the worker and the dashboard as their own
processes (`python -m ...`), so the dispatcher package itself never imports them or torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from dispatcher.cli.client import TERMINAL_STATES, ApiError, Client
from dispatcher.jobs.states import JobState
from dispatcher.settings import DEFAULT_EMBEDDED_REDIS_PORT, DEFAULT_PORT, Settings

URL_HELP = "dashboard URL (default: $LORAFLEET_URL or http://127.0.0.1:8765)"


def _url(url: str | None) -> str:
    """The dashboard URL: the command's own --url, else the --url given before the command
    (`lorafleet --url URL status`), else $LORAFLEET_URL, else this machine's dashboard."""
    ctx = click.get_current_context(silent=True)
    before = ctx.find_root().params.get("url") if ctx else None
    return (url or before or os.environ.get("LORAFLEET_URL")
            or f"http://127.0.0.1:{DEFAULT_PORT}")


@click.group()
@click.option("--url", default=None,
              help=f"{URL_HELP}, for every command; a command's own --url wins")
def main(url: str | None) -> None:
    """lorafleet: a queue, a dashboard and a fleet of GPU workers for LoRA fine-tuning."""


# ---------------------------------------------------------------------------------------------
# processes


def _detect_gpus() -> list[int]:
    """Physical card indices this process may use, found without initialising CUDA (NVML,
    then nvidia-smi), filtered by CUDA_VISIBLE_DEVICES."""
    cards: dict[int, str] = {}  # index -> UUID
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            cards[i] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    except Exception:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            for line in out.splitlines():
                index, _, uuid = line.partition(",")
                cards[int(index)] = uuid.strip()
        except Exception:
            cards = {}
    return visible_cards(cards, os.environ.get("CUDA_VISIBLE_DEVICES"))


def visible_cards(cards: dict[int, str], visible: str | None) -> list[int]:
    """The cards of `cards` (index -> UUID) that CUDA_VISIBLE_DEVICES = `visible` lets through.

    As CUDA reads it: unset means every card, set but empty means none; entries are indices or
    UUIDs (a unique prefix such as ``GPU-8a3f`` is enough), and the list ends at the first entry
    that names no card. Indices come back in the order the variable gives them."""
    if visible is None:
        return sorted(cards)
    chosen: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) in cards:
            match = [int(entry)]
        else:
            match = [i for i, uuid in cards.items() if entry and uuid.startswith(entry)]
        if len(match) != 1:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def parse_gpus(value: str) -> list[int | None]:
    """`all` -> every card (or one CPU worker when there is none), `cpu`, or a list `0,2`."""
    value = value.strip().lower()
    if value == "cpu":
        return [None]
    if value == "all":
        cards = _detect_gpus()
        return list(cards) if cards else [None]
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: use all, cpu, or card numbers like 0,2") from None


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal a child's whole process group (a Celery worker and its pool), or the child."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


class Supervisor:
    """Starts child processes in their own sessions and stops all of them on the way out."""

    def __init__(self, logs: Path | None = None):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs = logs

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out: Any = None
        if self.logs is not None:
            # 0700 / 0600: a log line may hold what only the fleet's user may see (the
            # dashboard's request log is filtered, other libraries' output cannot be).
            self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.logs / f"{name}.log",
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # a log made by an older version
            out = open(fd, "ab")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def wait(self) -> int:
        """Block until Ctrl-C / SIGTERM or until a child exits on its own."""
        stop = {"flag": False}

        def on_signal(signum, frame):
            stop["flag"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        while not stop["flag"]:
            for name, p in self.procs:
                if p.poll() is not None:
                    click.echo(f"lorafleet: {name} exited with code {p.returncode}; stopping",
                               err=True)
                    stop["flag"] = True
                    code = 1
                    break
            time.sleep(0.3)
        return code

    def stop_all(self, grace: float = 10.0) -> None:
        # Reverse order: workers and the dashboard go before Redis.
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                # SIGTERM: Celery warm-stops, the dashboard and dispatcher exit, redis-server
                # flushes its append-only file.
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A worker still inside a training step: a running job is re-queued by the
                # dispatcher when it next starts, like any lost worker's.
                click.echo(f"lorafleet: {name} did not stop in {grace:.0f}s; killing it",
                           err=True)
                _signal_group(p, signal.SIGKILL)
                p.wait()


def _worker_cmds(gpus: list[int | None], env: dict[str, str],
                 memory_mb: int | None = None) -> list[tuple[str, list[str], dict]]:
    out = []
    for g in gpus:
        e = dict(env)
        if g is None:
            e["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab a card
            name = "worker-cpu"
        else:
            e["CUDA_VISIBLE_DEVICES"] = str(g)
            e["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            name = f"worker-gpu{g}"
        cmd = [sys.executable, "-m", "gpuworker.worker"] + ([] if g is None else ["--gpu", str(g)])
        cmd += [] if memory_mb is None else ["--memory-mb", str(memory_mb)]
        out.append((name, cmd, e))
    return out


@main.command()
@click.option("--gpus", default="all", show_default=True, help="all, cpu, or cards like 0,2")
@click.option("--host", default=None, help="dashboard address (default 127.0.0.1)")
@click.option("--port", default=None, type=int, help=f"dashboard port (default {DEFAULT_PORT})")
def up(gpus: str, host: str | None, port: int | None) -> None:
    """Start everything on this machine: Redis (embedded unless LORAFLEET_REDIS_URL is set),
    the dispatcher, the dashboard and one worker per GPU (or one CPU worker)."""
    settings = Settings.from_env()
    settings.paths.ensure()
    env = dict(os.environ)
    env["LORAFLEET_HOME"] = str(settings.home)
    if host:
        env["LORAFLEET_HOST"] = host
    if port:
        env["LORAFLEET_PORT"] = str(port)
    from dispatcher.access.accounts import Accounts, single_user_refusal

    s2 = Settings.from_env(env)
    refusal = single_user_refusal(s2.dashboard_host, Accounts(settings.paths.home))
    if refusal:  # before anything starts
        raise click.ClickException(refusal)
    _check_dashboard_port(s2)
    _guard_data_folder(settings)
    sup = Supervisor(logs=settings.paths.logs)
    code = 0
    try:
        if not settings.redis_url:
            sup.procs.append(("redis", _start_embedded_redis(settings)))
            # The children find the server as any later lorafleet process does: its port here,
            # its password in the data folder (not in their environment).
            env["LORAFLEET_EMBEDDED_REDIS_PORT"] = str(settings.embedded_redis_port)
            click.echo(f"redis:      {settings.redis_display()} "
                       f"(append-only file in {settings.paths.redis})")
        else:
            click.echo(f"redis:      {settings.redis_display()}")
        sup.start("dispatcher", [sys.executable, "-m", "dispatcher"], env)
        dash = sup.start("dashboard", [sys.executable, "-m", "dashboard"], env)
        cards = parse_gpus(gpus)
        for name, cmd, wenv in _worker_cmds(cards, env):
            sup.start(name, cmd, wenv)
        desc = ", ".join("CPU" if g is None else f"GPU {g}" for g in cards)
        click.echo(f"workers:    {len(cards)} ({desc})")
        click.echo(f"data:       {settings.home}")
        click.echo(f"logs:       {settings.paths.logs}")
        _wait_dashboard(s2, dash)  # the URL (and its token) only once the port is ours
        click.echo(f"dashboard:  {_dashboard_url(s2)}")
        click.echo("Press Ctrl-C to stop everything.")
        code = sup.wait()
    except Exception as e:
        click.echo(f"lorafleet: {e}", err=True)
        code = 1
    finally:
        click.echo("stopping ...")
        sup.stop_all()
        click.echo("stopped.")
    sys.exit(code)


def _guard_data_folder(settings: Settings) -> None:
    """Make the data folder's private files private again, and say (on stderr) how other OS
    users could still change the folder under the fleet, or read what is not private in it
    (a note: the folder is the user's, and is not changed for them)."""
    from dispatcher.host.private import exposure_warnings, readable_note, tighten

    tighten(settings.home)
    for line in exposure_warnings(settings.home):
        click.echo(f"lorafleet: warning: {line}", err=True)
    note = readable_note(settings.home)
    if note:
        click.echo(f"lorafleet: note: {note}", err=True)


def _check_dashboard_port(settings: Settings) -> None:
    """Refuse before anything starts when the dashboard's port is taken: the printed URL (with
    its token) would lead to whoever holds it."""
    from dispatcher.host.embedded import port_is_free

    host, port = settings.dashboard_host, settings.dashboard_port
    if not port_is_free(port, host):
        raise click.ClickException(
            f"the dashboard's port {port} on {host} is already in use (another lorafleet, or "
            f"another program); stop it, or pick another port: lorafleet up --port {port + 1} "
            "(or LORAFLEET_PORT)")


def _wait_dashboard(settings: Settings, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the dashboard answers /healthz on its port, which a socket of this OS user holds.
    Raises when the dashboard exits first (it could not bind) or another user's socket is
    there: then no URL is printed, and no token goes anywhere."""
    import requests

    from dispatcher.access.dashtoken import own_url
    from dispatcher.host.private import foreign_listener

    url = own_url(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode} before it "
                               f"answered on {url}; see {settings.paths.logs}/dashboard.log")
        uid = foreign_listener(settings.dashboard_host, settings.dashboard_port)
        if uid is not None:
            raise RuntimeError(f"port {settings.dashboard_port} is held by another OS user's "
                               f"process (uid {uid}), not this fleet's dashboard; pick another "
                               "port: lorafleet up --port N")
        try:
            # No proxy: an http_proxy of the environment would take even 127.0.0.1 elsewhere.
            if requests.get(url + "/healthz", timeout=2,
                            proxies={"http": None, "https": None}).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the dashboard did not answer on {url} within {timeout:.0f}s")


def _start_embedded_redis(settings: Settings) -> subprocess.Popen:
    """The embedded server of this data folder, with its password (made on first use)."""
    from dispatcher.host.embedded import start_server
    from dispatcher.host.private import secret_file
    from dispatcher.settings import RedisCredentialsError

    try:
        password = secret_file(settings.paths.redis_password)
    except PermissionError:
        raise RedisCredentialsError(
            f"cannot read or make the data folder's Redis password "
            f"({settings.paths.redis_password}): run lorafleet as the OS user that owns the "
            "data folder, or set LORAFLEET_REDIS_URL") from None
    return start_server(settings.paths.redis, settings.embedded_redis_port, password=password,
                        log_file=settings.paths.logs / "redis.log")


def _dashboard_url(settings: Settings) -> str:
    from dispatcher.access.dashtoken import url_to_open

    return url_to_open(settings)


@main.command()
@click.option("--port", default=None, type=int,
              help=f"port (default $LORAFLEET_EMBEDDED_REDIS_PORT or "
                   f"{DEFAULT_EMBEDDED_REDIS_PORT})")
def redis(port: int | None) -> None:
    """Run the embedded Redis-compatible server in the foreground. Clients started with the
    same data folder (LORAFLEET_HOME) and port find its password there."""
    from dataclasses import replace

    from dispatcher.host.embedded import stop_server

    settings = Settings.from_env()
    if port is not None:
        settings = replace(settings, embedded_redis_port=port)
    settings.paths.ensure()
    _guard_data_folder(settings)
    proc = _start_embedded_redis(settings)
    click.echo(f"redis: embedded server on port {settings.embedded_redis_port}, password in "
               f"{settings.paths.redis_password} (data in {settings.paths.redis}); "
               "Ctrl-C stops it")
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)


@main.command()
def dispatcher() -> None:
    """Run the scheduler (the dispatcher) in the foreground."""
    from dispatcher.__main__ import main as run

    run()


@main.command()
def dashboard() -> None:
    """Run the web dashboard in the foreground."""
    _check_dashboard_port(Settings.from_env())
    # The dashboard prints its URL (with the token) itself, once its port is bound.
    os.execv(sys.executable, [sys.executable, "-m", "dashboard", "--print-url"])


@main.command()
@click.option("--gpus", default="all", show_default=True, help="all, cpu, or cards like 0,2")
@click.option("--memory-mb", type=click.IntRange(min=1), default=None,
              help="each worker advertises at most this much memory (MB) and only gets jobs "
                   "that fit in it: share a card, or cap a CPU worker")
def worker(gpus: str, memory_mb: int | None) -> None:
    """Start one worker process per card (each pinned with CUDA_VISIBLE_DEVICES)."""
    cards = parse_gpus(gpus)
    sup = Supervisor()
    try:
        for name, cmd, env in _worker_cmds(cards, dict(os.environ), memory_mb):
            sup.start(name, cmd, env)
            click.echo(f"started {name}")
        code = sup.wait()
    finally:
        sup.stop_all()
    sys.exit(code)


@main.command()
def init() -> None:
    """Put the demo model (SmolLM2-135M-Instruct) and the sample datasets in the data folder."""
    env = dict(os.environ)
    env["LORAFLEET_HOME"] = str(Settings.from_env().home)
    sys.exit(subprocess.call([sys.executable, "-m", "gpuworker.demo"], env=env))


# ---------------------------------------------------------------------------------------------
# user commands


def _load_spec(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise click.ClickException(f"{path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: must hold an object of training parameters")
    return data


def _fail_api(e: ApiError) -> None:
    for err in e.errors:
        click.echo(f"error: {err.get('field')}: {err.get('message')}", err=True)
    if not e.errors:
        click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _fmt_eta(seconds: Any) -> str:
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return "-"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _bar(step: int, total: int, width: int = 30) -> str:
    frac = 0.0 if total <= 0 else min(1.0, step / total)
    full = int(frac * width)
    return "[" + "#" * full + "-" * (width - full) + f"] {step}/{total}"


def follow_job(client: Client, job_id: str, out=None) -> str:
    """Print a live progress line (loss, ETA) and log lines until the job ends; return state."""
    out = out or sys.stdout
    tty = out.isatty()
    state = "?"
    for ev in client.follow(job_id):
        t = ev.get("type")
        if t == "train":
            line = (f"{_bar(int(ev.get('step', 0)), int(ev.get('total_steps', 0)))}  "
                    f"loss {float(ev.get('loss', 0)):.4f}  lr {float(ev.get('learning_rate', 0)):.2e}"
                    f"  {float(ev.get('tokens_per_s') or 0):.0f} tok/s  ETA {_fmt_eta(ev.get('eta_s'))}")
            out.write(("\r" + line) if tty else line + "\n")
        elif t in ("log", "warning", "state"):  # an eval: the trainer's log line says it
            if tty:
                out.write("\n")
            if t == "state":
                state = ev.get("state", state)
                out.write(f"state: {state}" + (f" ({ev['reason']})" if ev.get("reason") else "") + "\n")
            else:
                out.write(f"{ev.get('line') or ev.get('message')}\n")
        out.flush()
    if tty:
        out.write("\n")
    return client.job(job_id)["state"]


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False), required=False)
@click.option("--from-lora", default=None,
              help="start from this LoRA's training_parameters.json; SPEC's keys override it")
@click.option("--wait", is_flag=True, help="follow the job; exit non-zero unless it succeeds")
@click.option("--priority", default="normal", type=click.Choice(["low", "normal", "high", "urgent"]))
@click.option("--owner", default=None, help="submit for this user (admins only when there are accounts)")
@click.option("--url", default=None, help=URL_HELP)
def submit(spec: str | None, from_lora: str | None, wait: bool, priority: str,
           owner: str | None, url: str | None) -> None:
    """Submit a job from a JSON or YAML SPEC file; prints the job id.

    The file holds the training parameters; a `kind: evaluate` or `kind: generate` key makes
    it an evaluation or generation job instead."""
    if not spec and not from_lora:
        raise click.UsageError("give a SPEC file, --from-lora NAME, or both")
    data = _load_spec(spec) if spec else {}
    if from_lora:
        try:
            data = {**Client(_url(url)).lora_parameters(from_lora), **data}
        except ApiError as e:
            _fail_api(e)
    # A spec file may say what kind of job it is; a training job by default.
    kind = data.pop("kind", "train") if isinstance(data.get("kind"), str) else "train"
    if kind == "train":
        _say_what_the_name_holds(data, url)
    _submit_and_maybe_wait(kind, data, wait, priority, owner, url)


def _say_what_the_name_holds(spec: dict[str, Any], url: str | None) -> None:
    """An existing lora_name is continued (or, with always_override, started over): say so on
    stderr before the job id. A name the dashboard cannot look up is left to the submission."""
    name = spec.get("lora_name")
    if not isinstance(name, str) or not name:
        return
    try:
        line = Client(_url(url)).lora_info(name, spec.get("always_override") is True)["notice"]
    except (ApiError, KeyError, TypeError):
        return
    if line:
        click.echo(f"{name}: {line}", err=True)


def _submit_and_maybe_wait(kind: str, spec: dict[str, Any], wait: bool, priority: str,
                           owner: str | None, url: str | None) -> dict[str, Any] | None:
    client = Client(_url(url))
    try:
        job_id = client.submit(spec, kind=kind, priority=priority, owner=owner)
    except ApiError as e:
        _fail_api(e)
    click.echo(job_id)
    if not wait:
        return None
    state = follow_job(client, job_id, sys.stderr)
    rec = client.job(job_id)
    click.echo(f"{job_id} {state}" + (f": {rec.get('reason')}" if rec.get("reason") else ""),
               err=True)
    if state != "succeeded":
        sys.exit(1)
    return rec


@main.command()
@click.option("--model", "base_model", required=True, help="base model folder under models/")
@click.option("--lora", "loras", multiple=True, help="a LoRA under loras/ (repeat for several)")
@click.option("--text", "text_file", required=True, help="a .txt file under datasets/")
@click.option("--stride", default=512, show_default=True)
@click.option("--max-length", default=0, show_default=True, help="0 = the model's context")
@click.option("--precision", default="auto", show_default=True)
@click.option("--comment", default="")
@click.option("--force", is_flag=True, help="evaluate again even if this was evaluated before")
@click.option("--wait", is_flag=True, help="wait and print the perplexity")
@click.option("--priority", default="normal", type=click.Choice(["low", "normal", "high", "urgent"]))
@click.option("--owner", default=None)
@click.option("--url", default=None, help=URL_HELP)
def evaluate(base_model: str, loras: tuple[str, ...], text_file: str, stride: int,
             max_length: int, precision: str, comment: str, force: bool, wait: bool,
             priority: str, owner: str | None, url: str | None) -> None:
    """Queue a perplexity evaluation of a base model with none, one or several LoRAs."""
    spec = {"base_model": base_model, "loras": list(loras), "text_file": text_file,
            "stride": stride, "max_length": max_length, "precision": precision,
            "comment": comment, "force": force}
    rec = _submit_and_maybe_wait("evaluate", spec, wait, priority, owner, url)
    if rec is not None:
        r = rec.get("result") or {}
        click.echo(f"perplexity {r.get('perplexity'):.4f}"
                   + (" (already evaluated; --force runs it again)" if r.get("skipped") else ""))


@main.command()
@click.option("--model", "base_model", required=True, help="base model folder under models/")
@click.option("--lora", default="", help="a LoRA under loras/ to compare with the base model")
@click.option("--prompt", required=True)
@click.option("--format", "format_name", default="", help="format file: the prompt is its instruction")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--priority", default="normal", type=click.Choice(["low", "normal", "high", "urgent"]))
@click.option("--owner", default=None)
@click.option("--url", default=None, help=URL_HELP)
def generate(base_model: str, lora: str, prompt: str, format_name: str, max_new_tokens: int,
             temperature: float, top_p: float, seed: int, precision: str, priority: str,
             owner: str | None, url: str | None) -> None:
    """Answer a prompt with the base model and with base + LoRA, side by side (waits)."""
    spec = {"base_model": base_model, "lora": lora, "prompt": prompt, "format": format_name,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed, "precision": precision}
    rec = _submit_and_maybe_wait("generate", spec, True, priority, owner, url)
    r = rec.get("result") or {}
    click.echo(f"--- base model ({(r.get('base') or {}).get('tokens')} tokens)")
    click.echo((r.get("base") or {}).get("text", ""))
    if r.get("lora"):
        click.echo(f"--- base + {lora} ({r['lora'].get('tokens')} tokens)")
        click.echo(r["lora"].get("text", ""))


@main.command()
@click.argument("lora")
@click.option("--url", default=None, help=URL_HELP)
def params(lora: str, url: str | None) -> None:
    """Print a LoRA's training parameters as a YAML spec (edit it, then `lorafleet submit`)."""
    import yaml

    try:
        spec = Client(_url(url)).lora_parameters(lora)
    except ApiError as e:
        _fail_api(e)
    click.echo(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), nl=False)


@main.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--owner", default=None, help="only these owners' jobs (comma-separated)")
@click.option("--state", default=None,
              help="only jobs in these states (comma-separated, e.g. queued,running)")
@click.option("--url", default=None, help=URL_HELP)
def status(job: str | None, as_json: bool, owner: str | None, state: str | None,
           url: str | None) -> None:
    """Show one job, or every job, newest first (a queued job's ETA column: #position and
    when it should start). --owner and --state filter the list."""
    if job and (owner or state):
        raise click.UsageError("--owner and --state filter the list: give them without a JOB")
    states = [v.strip() for v in (state or "").split(",") if v.strip()]
    known = [s.value for s in JobState]
    unknown = [v for v in states if v not in known]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: use {', '.join(known)}",
                                 param_hint="--state")
    client = Client(_url(url))
    try:
        owners = ",".join(v.strip() for v in (owner or "").split(",") if v.strip()) or None
        data: Any = client.job(job) if job else client.jobs(owner=owners, state=",".join(states))
    except ApiError as e:
        _fail_api(e)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [data] if job else data
    click.echo(f"{'ID':<13}{'STATE':<11}{'OWNER':<10}{'KIND':<9}{'PROGRESS':<14}{'RESULT':<21}"
               f"{'ETA':<9}NAME")
    for j in rows:
        kind = j.get("kind") or "train"
        # Evaluation and generation jobs have no steps: their result says what they did.
        prog = f"{j.get('step', 0) or 0}/{j.get('total_steps', 0) or 0}" if kind == "train" else ""
        loss = j.get("loss")
        result = j.get("outcome") or (f"loss {float(loss):.4f}" if loss not in (None, "") else "-")
        click.echo(f"{j['id']:<13}{j['state']:<11}{str(j.get('owner', ''))[:9]:<10}{kind:<9}"
                   f"{prog:<14}{result:<21}{_eta_column(j):<9}{j.get('name', '')}")
        if job and j.get("reason"):
            click.echo(f"reason: {j['reason']}")
        if job and j.get("sweep"):
            click.echo(f"sweep: {j['sweep']}")
        if job:
            _print_result(j)


def _print_result(j: dict[str, Any]) -> None:
    """`lorafleet status JOB`: an evaluation's perplexity, a generation's answers."""
    r = j.get("result") if isinstance(j.get("result"), dict) else {}
    if j.get("kind") == "evaluate" and r.get("perplexity") is not None:
        click.echo(f"perplexity: {float(r['perplexity']):.4f} over {r.get('tokens')} tokens"
                   + (" (already evaluated)" if r.get("skipped") else ""))
    elif j.get("kind") == "generate":
        for key, label in (("base", "base model"), ("lora", "with the LoRA")):
            if isinstance(r.get(key), dict):
                click.echo(f"answer ({label}): {r[key].get('text', '')}")


def _eta_column(j: dict[str, Any]) -> str:
    if j["state"] == "running":
        return _fmt_eta(j.get("eta_s"))
    if j.get("position"):
        start = j.get("estimated_start_s")
        return f"#{j['position']}" + (f" {_fmt_eta(start)}" if start is not None else "")
    return "-"


@main.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="follow live until the job ends")
@click.option("--url", default=None, help=URL_HELP)
def logs(job: str, follow: bool, url: str | None) -> None:
    """Print a job's log and progress (`-f` follows it live)."""
    client = Client(_url(url))
    try:
        if follow:
            state = follow_job(client, job)
            sys.exit(0 if state in TERMINAL_STATES else 1)
        for ev in client.history(job):
            t = ev.get("type")
            if t in ("log", "warning"):
                click.echo(ev.get("line") or ev.get("message"))
            elif t == "state":
                click.echo(f"state: {ev.get('state')} ({ev.get('reason', '')})")
            elif t == "train":
                click.echo(f"step {ev.get('step')}/{ev.get('total_steps')} loss "
                           f"{float(ev.get('loss', 0)):.4f}")
    except ApiError as e:
        _fail_api(e)


@main.command()
@click.argument("job")
@click.argument("level", type=click.Choice(["low", "normal", "high", "urgent"]))
@click.option("--url", default=None, help=URL_HELP)
def priority(job: str, level: str, url: str | None) -> None:
    """Change the priority of a queued (or retrying) JOB to LEVEL."""
    client = Client(_url(url))
    try:
        rec = client._call("POST", f"/jobs/{job}/priority", json={"priority": level})
    except ApiError as e:
        _fail_api(e)
    place = f", position {rec['position']} in the queue" if rec.get("position") else ""
    click.echo(f"{job} priority {rec.get('priority')}{place}")


@main.command()
@click.argument("job")
@click.option("--url", default=None, help=URL_HELP)
def cancel(job: str, url: str | None) -> None:
    """Cancel a queued job, or stop a running one after its current step (the LoRA is kept)."""
    client = Client(_url(url))
    try:
        rec = client.cancel(job)
    except ApiError as e:
        _fail_api(e)
    click.echo(f"{job} {rec.get('state')}" + (" (stopping after the current step)"
                                              if rec.get("state") in ("running", "assigned") else ""))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="only list the trials it would queue")
@click.option("--wait", is_flag=True,
              help="follow the sweep until every trial has ended; exit 0 if one succeeded")
@click.option("--url", default=None, help=URL_HELP)
def sweep(file: str, dry_run: bool, wait: bool, url: str | None) -> None:
    """Queue a hyperparameter sweep from a YAML or JSON FILE (README, "Sweeps"); prints the
    sweep id. Nothing is queued when any field is wrong."""
    definition = _load_spec(file)
    client = Client(_url(url))
    try:
        plan = client.create_sweep(definition, dry_run=dry_run)
    except ApiError as e:
        _fail_api(e)
    if dry_run:
        varied = plan.get("varied", [])
        for t in plan["trials"]:
            values = "  ".join(f"{k}={t['params'][k]}" for k in varied)
            click.echo(f"{t['name']:<40} {values}")
        for s in plan.get("skipped", []):
            click.echo(f"skipped {s['name']}: the same as {s['same_as']}")
        click.echo(f"{plan['count']} trial{'s' if plan['count'] != 1 else ''} "
                   f"({len(plan.get('skipped', []))} duplicates skipped); nothing queued",
                   err=True)
        return
    click.echo(plan["id"])
    click.echo(f"{plan['count']} trials queued", err=True)
    if wait:
        sys.exit(follow_sweep(client, plan["id"]))


def follow_sweep(client: Client, sweep_id: str, poll_s: float = 2.0) -> int:
    """Print the sweep's counts as they change until it finishes; 0 if a trial succeeded."""
    last = None
    while True:
        try:
            rec = client.sweep(sweep_id)
        except ApiError as e:
            _fail_api(e)
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


@main.command()
@click.argument("sweep_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--cancel", "do_cancel", is_flag=True, help="cancel the sweep's unfinished trials")
@click.option("--url", default=None, help=URL_HELP)
def sweeps(sweep_id: str | None, as_json: bool, do_cancel: bool, url: str | None) -> None:
    """List the sweeps, or show one sweep's trials (`--cancel` cancels it)."""
    client = Client(_url(url))
    try:
        if do_cancel:
            if not sweep_id:
                raise click.UsageError("--cancel needs a SWEEP_ID")
            client.cancel_sweep(sweep_id)
        data: Any = client.sweep(sweep_id) if sweep_id else client.sweeps()
    except ApiError as e:
        _fail_api(e)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not sweep_id:
        click.echo(f"{'ID':<14}{'STATE':<12}{'TRIALS':<8}{'OK':<5}{'FAIL':<6}{'STOP':<6}NAME")
        for s in data:
            m = s["summary"]
            click.echo(f"{s['id']:<14}{m['state']:<12}{m['trials']:<8}{m['succeeded']:<5}"
                       f"{m['failed']:<6}{m['stopped_early']:<6}{s['name']}")
        return
    m = data["summary"]
    click.echo(f"sweep {data['id']} {data['name']}: {m['state']}; {m['succeeded']} succeeded, "
               f"{m['failed']} failed, {m['stopped_early']} stopped early")
    click.echo(f"{'JOB':<13}{'STATE':<15}{'LOSS':<9}{'EVAL':<9}{'PPL':<9}TRIAL")
    for r in data["rows"]:
        def f(v: Any) -> str:
            return f"{float(v):.4f}" if v not in (None, "") else "-"
        star = " *best*" if r["id"] == data.get("best") else ""
        click.echo(f"{r['id']:<13}{r['display_state']:<15}{f(r['final_loss']):<9}"
                   f"{f(r['best_eval_loss']):<9}{f(r['perplexity']):<9}{r['name']}{star}")


@main.group()
def data() -> None:
    """Datasets, format files and raw texts: list, upload, view and copy formats (through the
    dashboard), and preview samples the way the trainer will see them (locally)."""


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--url", default=None, help=URL_HELP)
def data_list(as_json: bool, url: str | None) -> None:
    """The data folder's datasets, format files (yours and the shipped ones) and raw texts."""
    try:
        listing = Client(_url(url)).data_files()
    except ApiError as e:
        _fail_api(e)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return

    def owner(entry: dict) -> str:  # who made it; "—": no one (put there by hand, or shipped)
        return f"{entry.get('owner') or '—':<12}"

    click.echo("datasets:")
    for d in listing.get("datasets", []):
        what = d["error"] if d.get("error") else f"{d.get('rows')} rows"
        click.echo(f"  {d['name']:<40} {what:<12} {owner(d)}".rstrip())
    click.echo("format files:")
    for f in listing.get("formats", []):
        hidden = ", hidden by a file in formats/" if f.get("hidden_by_user_file") else ""
        what = f["error"] if f.get("error") else " | ".join(f.get("key_sets", []))
        click.echo(f"  {f['name']:<32} {f.get('source', ''):<8}{owner(f)}{hidden} {what}")
    click.echo("raw texts:")
    for r in listing.get("raw_texts", []):
        click.echo(f"  {r['name']:<40} {owner(r)}".rstrip())


@data.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--kind", type=click.Choice(["dataset", "format", "raw_text"]), default=None,
              help="what the file is (default: from its name: .txt raw text, *-format.json or "
                   "*_format.json a format file, other .json/.jsonl a dataset)")
@click.option("--overwrite", is_flag=True, help="replace a file of the same name")
@click.option("--url", default=None, help=URL_HELP)
def data_upload(file: str, kind: str | None, overwrite: bool, url: str | None) -> None:
    """Upload a dataset, format file or raw text into the data folder. It is checked in full
    first: a bad file is refused with its row and reason, and nothing is written."""
    try:
        saved = Client(_url(url)).upload(file, kind or "", overwrite)
    except ApiError as e:
        _fail_api(e)
    rows = f", {saved['rows']} rows" if saved.get("rows") is not None else ""
    click.echo(f"{'replaced' if saved.get('replaced') else 'saved'} {saved['path']} "
               f"({saved['kind']}{rows})")


@data.command("show-format")
@click.argument("name")
@click.option("--source", type=click.Choice(["user", "shipped"]), default=None,
              help="the shipped file even where your own file of that name hides it")
@click.option("--json", "as_json", is_flag=True, help="print the format file's JSON")
@click.option("--url", default=None, help=URL_HELP)
def data_show_format(name: str, source: str | None, as_json: bool, url: str | None) -> None:
    """A format file's templates, in the order rows are matched against them."""
    try:
        fmt = Client(_url(url)).format_file(name, source or "")
    except ApiError as e:
        _fail_api(e)
    templates = fmt.get("templates", {})
    if as_json:
        click.echo(json.dumps({k: templates[k] for k in fmt.get("key_sets", templates)},
                              indent=2, ensure_ascii=False))
        return
    click.echo(f"{fmt['name']} ({fmt.get('source')}: {fmt.get('file')})")
    for keys in fmt.get("key_sets", list(templates)):
        click.echo(f"\n[{keys}]\n{templates.get(keys, '')}")


@data.command("copy-format")
@click.argument("source_name")
@click.argument("new_name")
@click.option("--overwrite", is_flag=True, help="replace your format file of that name")
@click.option("--source", type=click.Choice(["user", "shipped"]), default=None,
              help="copy the shipped file even where your own file of that name hides it")
@click.option("--url", default=None, help=URL_HELP)
def data_copy_format(source_name: str, new_name: str, overwrite: bool, source: str | None,
                     url: str | None) -> None:
    """Copy a format file (a shipped one, or yours) to formats/NEW_NAME.json to edit it."""
    try:
        made = Client(_url(url)).copy_format(source_name, new_name, overwrite, source or "")
    except ApiError as e:
        _fail_api(e)
    click.echo(f"copied {source_name} to formats/{made.get('file', new_name)}")


@data.command("preview")
@click.option("--tokenizer", "tokenizer_path", required=True,
              type=click.Path(exists=True, file_okay=False), help="tokenizer or model folder")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), help="JSON/JSONL dataset")
@click.option("--format", "format_path", type=click.Path(exists=True, dir_okay=False),
              help="format file for --dataset")
@click.option("--raw-text", type=click.Path(exists=True), help="a .txt file or a folder of them")
@click.option("--cutoff-len", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--overlap-len", default=128, show_default=True, type=click.IntRange(min=0))
@click.option("--newline-favor-len", default=128, show_default=True, type=click.IntRange(min=0))
@click.option("--hard-cut-string", default="\\n\\n\\n", show_default=True,
              help="\\n means a newline")
@click.option("--add-eos-token", is_flag=True)
@click.option("--train-only-after", default="")
@click.option("--min-chars", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0),
              help="samples to show (0 = all)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per sample per line")
@click.option("--stats", "with_stats", is_flag=True,
              help='end with one JSON line {"stats": {...}} of totals over all samples')
def data_preview(tokenizer_path: str, dataset: str | None, format_path: str | None,
                 raw_text: str | None, cutoff_len: int, overlap_len: int, newline_favor_len: int,
                 hard_cut_string: str, add_eos_token: bool, train_only_after: str,
                 min_chars: int, limit: int, as_json: bool, with_stats: bool) -> None:
    """Show the training samples a dataset + format (or a raw-text file) gives.

    Needs no Redis, GPU or running server. With --json each sample line also carries its token
    counts and its text decoded back from the ids, split where training starts: "prompt_text"
    (masked by --train-only-after) and "trained_text" (what the loss sees), so a page can
    highlight the trained part; special tokens (BOS, EOS) are kept in both, as trained.
    """
    if bool(raw_text) == bool(dataset):
        raise click.UsageError("give either --dataset with --format, or --raw-text")
    if dataset and not format_path:
        raise click.UsageError("--dataset needs --format")
    if raw_text and overlap_len >= cutoff_len:
        raise click.UsageError(f"--overlap-len ({overlap_len}) must be less than "
                               f"--cutoff-len ({cutoff_len})")
    # Raw text is a .txt file or a folder of them (whose other files formats.raw_text_files
    # skips); a single file of another kind is a mistake, such as a dataset given here.
    if raw_text and Path(raw_text).is_file() and Path(raw_text).suffix.lower() != ".txt":
        raise click.UsageError(f"--raw-text {raw_text}: not a .txt file (raw text is a .txt "
                               "file or a folder of them; for a JSON dataset use --dataset "
                               "with --format)")
    # Imported here: the pure data code and the tokenizer library are only needed by this command.
    from transformers import AutoTokenizer

    import formats

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as e:
        raise click.ClickException(f"{tokenizer_path}: cannot load a tokenizer: {e}") from None
    try:
        result = formats.preview(
            tokenizer=tok, cutoff_len=cutoff_len, dataset_path=dataset, format_path=format_path,
            raw_text_path=raw_text, raw_text_options=formats.RawTextOptions(
                overlap_len, newline_favor_len, hard_cut_string, min_chars),
            add_eos_token=add_eos_token, train_only_after=train_only_after)
    except formats.FormatError as e:
        raise click.ClickException(str(e)) from None
    shown = result.samples if limit == 0 else result.samples[:limit]
    st = result.stats
    if as_json:
        for smp in shown:
            ids, labels = list(smp["input_ids"]), list(smp["labels"])
            # The mask is a prefix (formats.tokenize): ids before the first trained label are
            # the prompt, the rest is trained.
            masked = next((i for i, lab in enumerate(labels) if lab != formats.IGNORE_INDEX),
                          len(labels))
            click.echo(json.dumps({
                "text": smp["text"], "input_ids": ids, "labels": labels,
                "truncated": bool(smp["truncated"]), "tokens": len(ids),
                "trained_tokens": len(ids) - masked,
                "prompt_text": tok.decode(ids[:masked]), "trained_text": tok.decode(ids[masked:]),
            }, ensure_ascii=False))
    else:
        click.echo(formats.format_table(shown))
        click.echo(f"\n{st.samples} samples, {st.tokens} tokens, {st.trained_tokens} trained, "
                   f"{st.truncated} cut at {cutoff_len}, longest {st.longest}"
                   + (f", {st.untrained} with nothing to train" if st.untrained else "")
                   + (f" (showing {len(shown)})" if len(shown) < st.samples else ""))
    if with_stats:
        click.echo(json.dumps({"stats": {
            "samples": st.samples, "tokens": st.tokens, "trained_tokens": st.trained_tokens,
            "truncated": st.truncated, "untrained": st.untrained, "longest": st.longest,
            "shown": len(shown), "cutoff_len": cutoff_len}}))


# -- accounts -------------------------------------------------------------------------------------
@main.group()
def user() -> None:
    """Accounts (in the data folder's accounts.json): add, remove, list, tokens, passwords.

    These commands work on the data folder itself (LORAFLEET_HOME), so they are for whoever runs
    the fleet's machine. With no account at all the dashboard is single-user and only serves
    127.0.0.1; with accounts it needs a login (or an API token for the CLI)."""


def _accounts():
    from dispatcher.access.accounts import Accounts

    return Accounts(Settings.from_env().paths.home)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _account_call(fn, *args):
    from dispatcher.access.accounts import AccountError

    try:
        return fn(*args)
    except AccountError as e:
        raise click.ClickException(str(e)) from None


@user.command("add")
@click.argument("name")
@click.option("--role", default="member", show_default=True, type=click.Choice(["admin", "member"]))
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
@click.argument("role", type=click.Choice(["admin", "member"]))
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
    from dashboard.throttle import LoginThrottle
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


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--url", default=None, help=URL_HELP)
@click.pass_context
def limits(ctx: click.Context, as_json: bool, url: str | None) -> None:
    """Per-user limits (queued jobs, trials per sweep, upload space): yours, and for admins
    every setting. `lorafleet limits set NAME VALUE [--user NAME]` changes one (admins)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        body = Client(_url(url)).limits()
    except ApiError as e:
        _fail_api(e)
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
@click.option("--url", default=None, help=URL_HELP)
def limits_set(name: str, value: str, user: str, url: str | None) -> None:
    """Set limit NAME to VALUE (0 = no limit; "unset" removes the setting) for --user."""
    if value.lower() in ("unset", "none", "default"):
        number = None
    else:
        try:
            number = int(value)
        except ValueError:
            raise click.BadParameter("a whole number, or unset", param_hint="VALUE") from None
    try:
        Client(_url(url)).set_limit(name, number, user)
    except ApiError as e:
        _fail_api(e)
    who = "everyone" if user == "*" else user
    click.echo(f"{name} {'unset' if number is None else f'= {number}'} for {who}")


if __name__ == "__main__":
    main()
