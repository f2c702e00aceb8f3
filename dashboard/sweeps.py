"""Sweeps: the REST API under /api/v1/sweeps and the Sweeps, New sweep and Sweep pages.

A sweep's definition is the same object in the form, the API body and a `lorafleet sweep`
file (README, "Sweeps"); dispatcher.schedule.sweeps validates it and queues nothing when anything is
wrong.
"""

from __future__ import annotations

import csv
import io
import re
import time
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from dashboard.errors import BadRequest, Conflict, Forbidden, NotFound, refuse_problems
from dashboard.forms import form_sections
from dashboard.identity import check_owner, check_priority, may_manage
from dashboard.ownership import owners
from dashboard.quota import queue_guard
from dashboard.services import services
from dispatcher.access.limits import Limits, trials_problem
from dispatcher.access.owners import claim_loras, lora_rel
from dispatcher.jobs.csvcells import cell as _csv_value
from dispatcher.jobs.problems import Problems
from dispatcher.jobs.specs import SpecError, list_choices
from dispatcher.jobs.store import PRIORITIES, JobNotFound
from dispatcher.schedule.sweeps import (
    METHODS,
    SweepStore,
    best_trial,
    parse_sweep,
    summary,
    trial_rows,
)
from dispatcher.schedule.sweeps.packs import MAX_PACK
from dispatcher.schedule.sweeps.results import trial_packs

bp = Blueprint("sweeps", __name__, template_folder="templates")
API = "/api/v1/sweeps"
CSV_COLUMNS = ("final_loss", "best_eval_loss", "perplexity", "tokens_per_s", "gpu_time_s")


def _sweeps() -> SweepStore:
    return SweepStore(services().store)


def _job_spec(job_id: str) -> dict[str, Any]:
    """A training job's spec, as the base of a sweep (KeyError if there is no such job)."""
    try:
        rec = services().store.get(job_id)
    except JobNotFound:
        raise KeyError(job_id) from None
    if rec.get("kind", "train") != "train":
        raise KeyError(job_id)
    return dict(rec.get("spec") or {})


def sweep_detail(sweep_id: str, with_curves: bool = False) -> dict[str, Any]:
    sweeps = _sweeps()
    rec = sweeps.get(sweep_id)
    rows = trial_rows(sweeps, rec, time.time(), with_curves=with_curves)
    # `varied` keeps the parameters' order: JSON responses sort the keys of `parameters`.
    # The record's `pack` and `pack_size` are the sweep's settings; `packs` what it formed.
    return {**rec, "rows": rows, "summary": summary(rec, rows), "best": best_trial(rows),
            "packs": trial_packs(rows), "decisions": sweeps.decisions(sweep_id),
            "varied": list(rec["parameters"] or {})}


# API ------------------------------------------------------------------------------------------
@bp.post(API)
@bp.post(API + "/preview")
def create_sweep():
    """A sweep definition -> 201 {id, count, trials, skipped}; with ?dry_run=1 (or at
    /preview) 200 and the trials it would create, queueing nothing."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object: a sweep definition "
                         "{base, parameters, method, ...}",
                         [{"field": "sweep", "message": "must be a JSON object"}])
    dry = request.path.endswith("/preview") or request.args.get("dry_run", "") in (
        "1", "true", "yes")
    problems = Problems()
    owner = check_owner(body.get("owner"), problems)
    priority = body.get("priority", "normal")
    check_priority(priority, problems)
    plan = _check_plan(body, owner, problems)
    refuse_problems(problems, "the sweep was not queued", "the definition")
    assert plan is not None  # a plan that did not parse added a problem
    if dry:
        return jsonify({"dry_run": True, **plan.preview()})
    with queue_guard(owner, len(plan.trials)) as over:  # every trial counts
        if over:
            raise BadRequest(f"the sweep was not queued: {over['message']}", [over])
        refused = _claim_trial_names(plan, owner)  # last: a refused sweep claims no name
        if refused:
            raise Forbidden(f"the sweep was not queued: {refused[0]['message']}", refused)
        sweep_id = _sweeps().create(plan, owner, priority)
    return jsonify({"id": sweep_id, **plan.preview()}), 201


def _check_plan(body: dict[str, Any], owner: str, problems: Problems) -> Any:
    """The sweep's plan (None when the definition does not parse), with the problems of the
    definition, of trial names in use and of the owner's trial limit added."""
    try:
        plan = parse_sweep(body, services().settings.paths, job_spec=_job_spec)
    except SpecError as e:
        problems.errors.extend(e.errors)
        return None
    problems.errors.extend(_names_in_use(plan))
    svc = services()
    over = trials_problem(Limits(svc.redis, svc.settings.prefix), owner, len(plan.trials))
    if over:
        problems.errors.append(over)
    return plan


def _claim_trial_names(plan: Any, owner: str) -> list[dict[str, str]]:
    """Claim every trial's LoRA name for the sweep's owner, all or none
    (dispatcher/access/owners.py claim_loras): a name someone else holds refuses the sweep, and a
    refused sweep claims no name."""
    taken = claim_loras(owners(), [t.name for t in plan.trials], owner)
    if not taken:
        return []
    name, who = next(iter(taken.items()))
    return [{"field": "base.lora_name",
             "message": f"{lora_rel(name)} belongs to {who}"
                        + (f" (and {len(taken) - 1} more trial names are taken)"
                           if len(taken) > 1 else "")
                        + "; choose another lora_name for the sweep"}]


def _names_in_use(plan: Any) -> list[dict[str, str]]:
    """A trial whose LoRA folder exists, or whose name a queued or running job uses, would
    continue (or race with) that LoRA instead of training from scratch: refused, named."""
    svc = services()
    busy = {(j.get("spec") or {}).get("lora_name")
            for j in svc.pending.read() + svc.store.active()}
    taken = [t.name for t in plan.trials
             if (svc.settings.paths.loras / t.name).exists() or t.name in busy]
    if not taken:
        return []
    shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
    return [{"field": "base.lora_name",
             "message": f"trial LoRA names already in use ({shown}): a sweep trains every trial "
                        "from scratch, so choose another lora_name for the sweep (or remove "
                        "those LoRAs)"}]


@bp.get(API)
def list_sweeps():
    sweeps = _sweeps()
    out = []
    for rec in sweeps.list():
        rows = trial_rows(sweeps, rec)
        out.append({k: rec.get(k) for k in ("id", "name", "owner", "created", "method",
                                            "max_concurrent", "pack", "pack_size", "finished",
                                            "cancelled")}
                   | {"summary": summary(rec, rows), "varied": list(rec["parameters"] or {})})
    return jsonify({"sweeps": out})


@bp.get(API + "/<sweep_id>")
def get_sweep(sweep_id: str):
    return jsonify(sweep_detail(sweep_id, request.args.get("curves") in ("1", "true")))


@bp.post(API + "/<sweep_id>/cancel")
def cancel_sweep(sweep_id: str):
    sweeps = _sweeps()
    rec = sweeps.get(sweep_id)  # SweepNotFound: 404 "no sweep ID"
    if not may_manage(rec.get("owner", "")):
        raise Forbidden(f"sweep {sweep_id} belongs to {rec.get('owner')}: only its owner or an "
                        "admin may cancel it")
    if rec.get("finished"):
        raise Conflict(f"sweep {sweep_id} has already finished: nothing to cancel")
    sweeps.cancel(sweep_id)
    return jsonify(sweep_detail(sweep_id))


@bp.get(API + "/<sweep_id>/trials.csv")
def export_csv(sweep_id: str):
    detail = sweep_detail(sweep_id)  # SweepNotFound: 404
    varied = list(detail["parameters"] or {})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "job", *varied, "state", *CSV_COLUMNS, "best", "reason"])
    for r in detail["rows"]:
        w.writerow([_csv_value(r["name"]), r["id"],
                    *(_csv_value(r["params"].get(p)) for p in varied),
                    r["display_state"], *(_csv_value(r[c]) for c in CSV_COLUMNS),
                    "yes" if r["id"] == detail["best"] else "", _csv_value(r["reason"])])
    # A file name of plain characters: the sweep's name is free text.
    name = "sweep-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", detail["name"] or "").strip("_")
                       or sweep_id) + ".csv"
    return Response(buf.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


# pages ----------------------------------------------------------------------------------------
@bp.get("/sweeps")
def sweeps_page():
    sweeps = _sweeps()
    items = []
    for rec in sweeps.list():
        items.append({**rec, "summary": summary(rec, trial_rows(sweeps, rec))})
    return render_template("sweeps.html", sweeps=items, nav="sweeps")


@bp.get("/sweeps/new")
def new_sweep_page():
    """The form; `?from=<job id>` starts from that training job's parameters."""
    svc = services()
    values = None
    copied_from = request.args.get("from", "")
    if copied_from:
        try:
            values = _job_spec(copied_from)
        except KeyError:
            raise NotFound(f"no training job {copied_from} to start a sweep from") from None
    data_choices = list_choices(svc.settings.paths)
    train_jobs = [j for j in svc.store.list(limit=200) if j.get("kind", "train") == "train"]
    sections = form_sections(data_choices, values)
    varyable = [f.name for _, group in sections for f in group if f.name != "lora_name"]
    return render_template("sweep_new.html", sections=sections, priorities=list(PRIORITIES),
                           methods=METHODS, copied_from=copied_from, train_jobs=train_jobs,
                           varyable=varyable, choices=data_choices, max_pack=MAX_PACK,
                           nav="sweeps")


@bp.get("/sweeps/<sweep_id>")
def sweep_page(sweep_id: str):
    detail = sweep_detail(sweep_id)  # SweepNotFound: the 404 page
    return render_template("sweep.html", sweep=detail, nav="sweeps", pack_setting=pack_setting,
                           pack_head=pack_head)


def pack_setting(rec: dict[str, Any]) -> str:
    """A sweep's pack setting in words: "auto (size: as the card fits)", "auto (size: 4)",
    "off" (the CLI's `sweeps ID` words it the same way)."""
    if rec.get("pack") != "auto":
        return "off"
    size = rec.get("pack_size") or 0
    return f"auto (size: {size if size else 'as the card fits'})"


def pack_head(pack: dict[str, Any]) -> str:
    """What a pack's line on the Sweep page says before its trials' names: "pack 2: 4 trials on
    gpu0" (sweep.js words it the same way; the CLI's `sweeps ID` too)."""
    n = len(pack["trials"])
    return (f"pack {pack['pack']}: {n} trial{'' if n == 1 else 's'}"
            + (f" on {pack['worker']}" if pack.get("worker") else ""))
