"""The HTML pages: Jobs, New job, Job, Fleet. Live data comes from the API's SSE endpoints."""

from __future__ import annotations

from flask import Blueprint, abort, render_template, request

from dashboard.api import job_detail, job_summary
from dashboard.app import services
from dashboard.forms import form_fields, form_sections
from dispatcher.specs import GenerateSpec, SpecError, list_choices, lora_parameters
from dispatcher.store import PRIORITIES, JobNotFound

bp = Blueprint("pages", __name__, template_folder="templates")


@bp.get("/")
@bp.get("/jobs")
def jobs():
    records = [job_summary(r) for r in services().store.list(limit=500)]
    return render_template("jobs.html", jobs=records, nav="jobs")


@bp.get("/jobs/new")
def new_job():
    """The form; `?from=<job id>` fills it with that job's parameters ("copy parameters from")."""
    svc = services()
    values = None
    copied_from = request.args.get("from", "")
    from_lora = request.args.get("from_lora", "")
    priority = "normal"
    if copied_from:
        try:
            rec = svc.store.get(copied_from)
        except JobNotFound:
            abort(404, f"no job {copied_from} to copy parameters from")
        values = dict(rec.get("spec") or {})
        priority = rec.get("priority", "normal")
    elif from_lora:
        try:
            values = lora_parameters(from_lora, svc.settings.paths)
        except SpecError as e:
            abort(404, str(e))
    data_choices = list_choices(svc.settings.paths)
    return render_template("new_job.html", sections=form_sections(data_choices, values),
                           priorities=list(PRIORITIES), priority=priority,
                           copied_from=copied_from, from_lora=from_lora,
                           choices=data_choices, nav="new")


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    try:
        rec = job_detail(job_id)
    except JobNotFound:
        abort(404, f"no job {job_id}")
    return render_template("job.html", job=rec, try_fields=_try_fields(rec), nav="jobs")


# The Try it box of a training job's page: these generation settings are shown; the base model
# and the LoRA are the job's own.
TRY_SHOWN = ("prompt", "format", "max_new_tokens", "temperature", "top_p", "seed")


def _try_fields(rec: dict) -> list:
    if rec.get("kind", "train") != "train":
        return []
    spec = rec.get("spec") or {}
    values = {"base_model": spec.get("base_model", ""), "lora": spec.get("lora_name", ""),
              "format": spec.get("format", "")}
    fields = form_fields(list_choices(services().settings.paths), values,
                         spec_cls=GenerateSpec, required=("prompt",))
    return [f for f in fields if f.name in TRY_SHOWN + ("base_model", "lora")]


@bp.get("/fleet")
def fleet():
    return render_template("fleet.html", workers=services().fleet.workers(), nav="fleet")
