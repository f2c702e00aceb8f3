"""The HTML pages: Jobs, New job, Job, Fleet. Live data comes from the API's SSE endpoints."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from dashboard.errors import BadRequest, NotFound
from dashboard.forms import form_fields, form_sections
from dashboard.jobview import job_detail, job_filters, job_summary, workers_with_jobs
from dashboard.ownership import owners as owner_registry
from dashboard.param_groups import param_groups
from dashboard.services import services
from dispatcher.access.owners import folder_exists, lora_rel
from dispatcher.jobs.lora_info import free_name
from dispatcher.jobs.specs import (
    LORA_NAME_RE,
    GenerateSpec,
    SpecError,
    list_choices,
    lora_parameters,
)
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import PRIORITIES, JobNotFound

bp = Blueprint("pages", __name__, template_folder="templates")


# Jobs per page of the Jobs list.
JOBS_PER_PAGE = 50


@bp.get("/")
@bp.get("/jobs")
def jobs():
    """The job list, newest first, JOBS_PER_PAGE a page: `?page=N&state=running&owner=ada`
    (state and owner may list several, comma-separated)."""
    try:
        page = int(request.args.get("page") or 1)
    except ValueError:
        page = 0
    if page < 1:
        raise BadRequest.on("page", f"page must be a whole number from 1, not "
                                    f"{request.args.get('page')!r}")
    state = request.args.get("state", "").strip()  # shown again in the filter fields
    owner = request.args.get("owner", "").strip()
    states, owners = job_filters(request.args)
    unknown = [s for s in states if s not in {st.value for st in JobState}]
    if unknown:
        raise BadRequest(f"unknown job state {unknown[0]!r}: use one of "
                         f"{', '.join(st.value for st in JobState)}")
    offset = (page - 1) * JOBS_PER_PAGE
    records, total = services().store.page(JOBS_PER_PAGE, offset, states, owners)
    pages = max(1, -(-total // JOBS_PER_PAGE))
    return render_template(
        "jobs.html", jobs=[job_summary(r) for r in records], nav="jobs", total=total,
        page=page, pages=pages, first=offset + 1, last=offset + len(records),
        per_page=JOBS_PER_PAGE, state=state, owner=owner, states=[st.value for st in JobState],
        filtered=bool(states or owners))


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
            raise NotFound(f"no job {copied_from} to copy parameters from") from None
        values = dict(rec.get("spec") or {})
        priority = rec.get("priority", "normal")
        _propose_free_name(values)
    elif from_lora:
        try:
            values = lora_parameters(from_lora, svc.settings.paths)
        except SpecError as e:
            raise NotFound(str(e)) from None
    data_choices = list_choices(svc.settings.paths)
    return render_template("new_job.html", sections=form_sections(data_choices, values),
                           priorities=list(PRIORITIES), priority=priority,
                           copied_from=copied_from, from_lora=from_lora,
                           choices=data_choices, nav="new")


def _propose_free_name(values: dict) -> None:
    """A copied lora_name that exists or is claimed would continue (or be refused): propose the
    first free `name-N` instead; the form says what an existing name would do if kept."""
    name = str(values.get("lora_name") or "")
    loras = services().settings.paths.loras
    if LORA_NAME_RE.match(name) and (folder_exists(loras / name)
                                     or owner_registry().get(lora_rel(name)) is not None):
        values["lora_name"] = free_name(loras, name, owner_registry())


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    rec = job_detail(job_id)  # JobNotFound: 404 "no job ID"
    return render_template("job.html", job=rec, try_fields=_try_fields(rec), nav="jobs",
                           copy_endpoint=COPY_PAGES.get(rec.get("kind", "train"), "pages.new_job"),
                           param_groups=param_groups(rec.get("kind", "train"), rec.get("spec") or {}))


# "Copy parameters" opens the form of the job's own kind, filled from it (`?from=<job id>`).
COPY_PAGES = {"train": "pages.new_job", "evaluate": "tools.evaluations_page",
              "generate": "tools.generate_page"}


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
    return render_template("fleet.html", workers=workers_with_jobs(), nav="fleet",
                           outside_pids=outside_pids, load_text=load_text)


def outside_pids(worker: dict) -> str:
    """`pid 123, 456` for a card held outside lorafleet (fleet.js words it the same way)."""
    pids = [p for p in str(worker.get("outside_pids") or "").split(",") if p]
    if not pids:
        return "pid unknown"
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(pids)


def load_text(worker: dict) -> str:
    """The Fleet page's load column: a card's utilisation and temperature, a CPU worker's CPU
    use and load average (fleet.js writes the same); "" when the heartbeat has none."""
    def given(key: str) -> bool:
        return str(worker.get(key, "")) not in ("", "None")

    cpu = worker.get("device") == "cpu"
    parts = []
    if given("util_pct"):
        parts.append(f"{float(worker['util_pct']):g} %" + (" CPU" if cpu else ""))
    if given("load_avg"):
        parts.append(f"load {float(worker['load_avg']):g}")
    if given("temp_c"):
        parts.append(f"{float(worker['temp_c']):g} °C")
    return " · ".join(parts)
