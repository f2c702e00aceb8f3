"""Job commands, through the dashboard's REST API: `submit`, `evaluate`, `generate`, `params`,
`status`, `logs`, `priority`, `cancel`."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import click

from dispatcher.cli.client import ApiError, Client
from dispatcher.cli.common import PRIORITIES, api_errors, load_spec, priority_option, url_option
from dispatcher.jobs.states import TERMINAL_VALUES, JobState


def fmt_eta(seconds: Any) -> str:
    """Seconds as `m:ss` or `h:mm:ss`; `-` when there is no number."""
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


def _train_line(ev: dict[str, Any]) -> str:
    """The live progress line of a training event."""
    return (f"{_bar(int(ev.get('step', 0)), int(ev.get('total_steps', 0)))}  "
            f"loss {float(ev.get('loss', 0)):.4f}  lr {float(ev.get('learning_rate', 0)):.2e}"
            f"  {float(ev.get('tokens_per_s') or 0):.0f} tok/s  ETA {fmt_eta(ev.get('eta_s'))}")


def follow_job(client: Client, job_id: str, out: IO[str] | None = None) -> str:
    """Print a live progress line (loss, ETA) and log lines until the job ends; return state."""
    out = out or sys.stdout
    tty = out.isatty()
    state = "?"
    for ev in client.follow(job_id):
        t = ev.get("type")
        if t == "train":
            line = _train_line(ev)
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
    if state in TERMINAL_VALUES:
        return state
    # The stream ended before its state event came (or it was missed): ask, patient with an
    # outage at this moment as `follow` was.
    return client.job_patiently(job_id)["state"]


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False), required=False)
@click.option("--from-lora", default=None,
              help="start from this LoRA's training_parameters.json; SPEC's keys override it")
@click.option("--wait", is_flag=True, help="follow the job; exit non-zero unless it succeeds")
@priority_option
@click.option("--owner", default=None, help="submit for this user (admins only when there are accounts)")
@url_option
@api_errors()
def submit(spec: str | None, from_lora: str | None, wait: bool, priority: str,
           owner: str | None, url: str) -> None:
    """Submit a job from a JSON or YAML SPEC file; prints the job id.

    The file holds the training parameters; a `kind: evaluate` or `kind: generate` key makes
    it an evaluation or generation job instead."""
    if not spec and not from_lora:
        raise click.UsageError("give a SPEC file, --from-lora NAME, or both")
    data = load_spec(spec) if spec else {}
    client = Client(url)
    if from_lora:
        data = {**client.lora_parameters(from_lora), **data}
    # A spec file may say what kind of job it is; a training job by default.
    kind = data.pop("kind", "train") if isinstance(data.get("kind"), str) else "train"
    if kind == "train":
        _say_what_the_name_holds(client, data)
    _submit_and_maybe_wait(client, kind, data, wait, priority, owner)


def _say_what_the_name_holds(client: Client, spec: dict[str, Any]) -> None:
    """An existing lora_name is continued (or, with always_override, started over): say so on
    stderr before the job id. A name the dashboard cannot look up is left to the submission."""
    name = spec.get("lora_name")
    if not isinstance(name, str) or not name:
        return
    try:
        line = client.lora_info(name, spec.get("always_override") is True)["notice"]
    except (ApiError, KeyError, TypeError):
        return  # the submission says what is wrong with the name, if anything
    if line:
        click.echo(f"{name}: {line}", err=True)


def _submit_and_maybe_wait(client: Client, kind: str, spec: dict[str, Any], wait: bool,
                           priority: str, owner: str | None) -> dict[str, Any] | None:
    """Queue the job and print its id; with `wait`, follow it on stderr and return its record
    (exit code 1 unless it succeeded)."""
    job_id = client.submit(spec, kind=kind, priority=priority, owner=owner)
    click.echo(job_id)
    if not wait:
        return None
    state = follow_job(client, job_id, sys.stderr)
    rec = client.job(job_id)
    click.echo(f"{job_id} {state}" + (f": {rec.get('reason')}" if rec.get("reason") else ""),
               err=True)
    if state != JobState.SUCCEEDED.value:
        sys.exit(1)
    return rec


@click.command()
@click.option("--model", "base_model", required=True, help="base model folder under models/")
@click.option("--lora", "loras", multiple=True, help="a LoRA under loras/ (repeat for several)")
@click.option("--text", "text_file", required=True, help="a .txt file under datasets/")
@click.option("--stride", default=512, show_default=True)
@click.option("--max-length", default=0, show_default=True, help="0 = the model's context")
@click.option("--precision", default="auto", show_default=True)
@click.option("--comment", default="")
@click.option("--force", is_flag=True, help="evaluate again even if this was evaluated before")
@click.option("--wait", is_flag=True, help="wait and print the perplexity")
@priority_option
@click.option("--owner", default=None)
@url_option
@api_errors()
def evaluate(base_model: str, loras: tuple[str, ...], text_file: str, stride: int,
             max_length: int, precision: str, comment: str, force: bool, wait: bool,
             priority: str, owner: str | None, url: str) -> None:
    """Queue a perplexity evaluation of a base model with none, one or several LoRAs."""
    spec = {"base_model": base_model, "loras": list(loras), "text_file": text_file,
            "stride": stride, "max_length": max_length, "precision": precision,
            "comment": comment, "force": force}
    rec = _submit_and_maybe_wait(Client(url), "evaluate", spec, wait, priority, owner)
    if rec is not None:
        r = rec.get("result") or {}
        click.echo(f"perplexity {r.get('perplexity'):.4f}"
                   + (" (already evaluated; --force runs it again)" if r.get("skipped") else ""))


@click.command()
@click.option("--model", "base_model", required=True, help="base model folder under models/")
@click.option("--lora", default="", help="a LoRA under loras/ to compare with the base model")
@click.option("--prompt", required=True)
@click.option("--format", "format_name", default="", help="format file: the prompt is its instruction")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", default="auto", show_default=True)
@priority_option
@click.option("--owner", default=None)
@url_option
@api_errors()
def generate(base_model: str, lora: str, prompt: str, format_name: str, max_new_tokens: int,
             temperature: float, top_p: float, seed: int, precision: str, priority: str,
             owner: str | None, url: str) -> None:
    """Answer a prompt with the base model and with base + LoRA, side by side (waits)."""
    spec = {"base_model": base_model, "lora": lora, "prompt": prompt, "format": format_name,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed, "precision": precision}
    rec = _submit_and_maybe_wait(Client(url), "generate", spec, True, priority, owner)
    r = (rec or {}).get("result") or {}
    click.echo(f"--- base model ({(r.get('base') or {}).get('tokens')} tokens)")
    click.echo((r.get("base") or {}).get("text", ""))
    if r.get("lora"):
        click.echo(f"--- base + {lora} ({r['lora'].get('tokens')} tokens)")
        click.echo(r["lora"].get("text", ""))


@click.command()
@click.argument("lora")
@url_option
@api_errors()
def params(lora: str, url: str) -> None:
    """Print a LoRA's training parameters as a YAML spec (edit it, then `lorafleet submit`)."""
    import yaml

    spec = Client(url).lora_parameters(lora)
    click.echo(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), nl=False)


def _state_filter(state: str | None) -> list[str]:
    """--state's comma-separated states, each one a job state."""
    states = [v.strip() for v in (state or "").split(",") if v.strip()]
    known = [s.value for s in JobState]
    unknown = [v for v in states if v not in known]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: use {', '.join(known)}",
                                 param_hint="--state")
    return states


@click.command()
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--owner", default=None, help="only these owners' jobs (comma-separated)")
@click.option("--state", default=None,
              help="only jobs in these states (comma-separated, e.g. queued,running)")
@url_option
@api_errors()
def status(job: str | None, as_json: bool, owner: str | None, state: str | None,
           url: str) -> None:
    """Show one job, or every job, newest first (a queued job's ETA column: #position and
    when it should start). --owner and --state filter the list."""
    if job and (owner or state):
        raise click.UsageError("--owner and --state filter the list: give them without a JOB")
    states = _state_filter(state)
    client = Client(url)
    owners = ",".join(v.strip() for v in (owner or "").split(",") if v.strip()) or None
    data: Any = client.job(job) if job else client.jobs(owner=owners, state=",".join(states))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'ID':<13}{'STATE':<11}{'OWNER':<10}{'KIND':<9}{'PROGRESS':<14}{'RESULT':<21}"
               f"{'ETA':<9}NAME")
    for j in [data] if job else data:
        _print_row(j)
        if job:
            _print_details(j)


def _print_row(j: dict[str, Any]) -> None:
    """One job's row of `lorafleet status`."""
    kind = j.get("kind") or "train"
    # Evaluation and generation jobs have no steps: their result says what they did.
    prog = f"{j.get('step', 0) or 0}/{j.get('total_steps', 0) or 0}" if kind == "train" else ""
    loss = j.get("loss")
    result = j.get("outcome") or (f"loss {float(loss):.4f}" if loss not in (None, "") else "-")
    click.echo(f"{j['id']:<13}{j['state']:<11}{str(j.get('owner', ''))[:9]:<10}{kind:<9}"
               f"{prog:<14}{result:<21}{_eta_column(j):<9}{j.get('name', '')}")


def _print_details(j: dict[str, Any]) -> None:
    """`lorafleet status JOB` below the row: the reason, the sweep and the trials of its pack,
    an evaluation's perplexity, a generation's answers."""
    if j.get("reason"):
        click.echo(f"reason: {j['reason']}")
    if j.get("sweep"):
        click.echo(f"sweep: {j['sweep']}")
    if j.get("pack_mates"):  # a trial trained in a pack (dashboard/jobview.py pack_mates)
        mates = ", ".join(f"{m['name']} ({m['id']})" for m in j["pack_mates"])
        click.echo(f"trained together with: {mates} (pack {j.get('pack')})")
    r = j.get("result") if isinstance(j.get("result"), dict) else {}
    if j.get("kind") == "evaluate" and r.get("perplexity") is not None:
        click.echo(f"perplexity: {float(r['perplexity']):.4f} over {r.get('tokens')} tokens"
                   + (" (already evaluated)" if r.get("skipped") else ""))
    elif j.get("kind") == "generate":
        for key, label in (("base", "base model"), ("lora", "with the LoRA")):
            if isinstance(r.get(key), dict):
                click.echo(f"answer ({label}): {r[key].get('text', '')}")


def _eta_column(j: dict[str, Any]) -> str:
    if j["state"] == JobState.RUNNING.value:
        return fmt_eta(j.get("eta_s"))
    if j.get("position"):
        start = j.get("estimated_start_s")
        return f"#{j['position']}" + (f" {fmt_eta(start)}" if start is not None else "")
    return "-"


@click.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True, help="follow live until the job ends")
@url_option
@api_errors()
def logs(job: str, follow: bool, url: str) -> None:
    """Print a job's log and progress (`-f` follows it live)."""
    client = Client(url)
    if follow:
        state = follow_job(client, job)
        sys.exit(0 if state in TERMINAL_VALUES else 1)
    for ev in client.history(job):
        t = ev.get("type")
        if t in ("log", "warning"):
            click.echo(ev.get("line") or ev.get("message"))
        elif t == "state":
            click.echo(f"state: {ev.get('state')} ({ev.get('reason', '')})")
        elif t == "train":
            click.echo(f"step {ev.get('step')}/{ev.get('total_steps')} loss "
                       f"{float(ev.get('loss', 0)):.4f}")


@click.command()
@click.argument("job")
@click.argument("level", type=click.Choice(PRIORITIES))
@url_option
@api_errors()
def priority(job: str, level: str, url: str) -> None:
    """Change the priority of a queued (or retrying) JOB to LEVEL."""
    rec = Client(url).set_priority(job, level)
    place = f", position {rec['position']} in the queue" if rec.get("position") else ""
    click.echo(f"{job} priority {rec.get('priority')}{place}")


@click.command()
@click.argument("job")
@url_option
@api_errors()
def cancel(job: str, url: str) -> None:
    """Cancel a queued job, or stop a running one after its current step (the LoRA is kept)."""
    rec = Client(url).cancel(job)
    stopping = rec.get("state") in (JobState.RUNNING.value, JobState.ASSIGNED.value)
    click.echo(f"{job} {rec.get('state')}" + (" (stopping after the current step)"
                                              if stopping else ""))


COMMANDS = (submit, evaluate, generate, params, status, logs, priority, cancel)
