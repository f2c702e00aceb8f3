"""The JSON REST API under /api/v1: what the pages' scripts and the CLI use.

Errors are JSON objects `{"error": "..."}`; an invalid spec also lists every problem as
`{"errors": [{"field", "message"}, ...]}` and queues nothing. Views raise the types of
dashboard/errors.py; dashboard/app.py answers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from dashboard.errors import BadRequest, Conflict, Forbidden, NotFound, refuse_problems
from dashboard.forms import form_fields
from dashboard.identity import check_owner, check_priority, current_user, priority_problem
from dashboard.jobview import (
    check_may_manage,
    job_detail,
    job_filters,
    job_summary,
    lora_names_in_use,
    workers_with_jobs,
)
from dashboard.lora_zip import lora_available, lora_dir, stream_zip
from dashboard.ownership import actor as request_actor
from dashboard.ownership import admit_train_job
from dashboard.ownership import owners as owner_registry
from dashboard.quota import queue_guard
from dashboard.services import services
from dashboard.sse import job_events, live_feed, valid_stream_id
from dispatcher.access.owners import OwnerRefused
from dispatcher.jobs.lora_info import lora_info, notice, refused
from dispatcher.jobs.problems import Problems
from dispatcher.jobs.specs import (
    FIELD_DOCS,
    SpecError,
    default_spec,
    list_choices,
    lora_parameters,
    parse_spec,
)
from dispatcher.jobs.states import TERMINAL_VALUES, JobState
from dispatcher.jobs.store import KINDS, PRIORITIES
from dispatcher.schedule.estimate import job_memory_mb

bp = Blueprint("api", __name__, url_prefix="/api/v1")

ENVELOPE_KEYS = {"kind", "spec", "owner", "priority"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NOT_A_SPEC = ('the request body must be a JSON object (a spec, or {"kind": "train", '
              '"spec": {...}})')


# jobs -----------------------------------------------------------------------------------------
@dataclass
class Submission:
    """What a submit request asks for, read from a bare spec or an envelope."""

    spec: Any
    kind: Any = "train"
    priority: Any = "normal"
    owner: Any = None


def read_submission(body: Any, problems: Problems) -> Submission:
    """The request body: a bare spec (priority from `?priority=`), or an envelope
    {"kind", "spec", "owner", "priority"} whose unknown keys are problems."""
    if body is None:
        raise BadRequest.on("body", NOT_A_SPEC)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", [
            {"field": "spec", "message": "must be a JSON object of training parameters"}])
    if "spec" not in body:
        return Submission(body, priority=request.args.get("priority", "normal"))
    for key in sorted(set(body) - ENVELOPE_KEYS):
        problems.add(str(key), "is not a known request field "
                               f"(use {', '.join(sorted(ENVELOPE_KEYS))})")
    return Submission(body["spec"], body.get("kind", "train"), body.get("priority", "normal"),
                      body.get("owner"))


def check_submission(sub: Submission, problems: Problems) -> tuple[str, Any]:
    """The job's owner and its parsed spec (None when it did not parse); problems added."""
    owner = check_owner(sub.owner, problems)
    if sub.kind not in KINDS:
        problems.add("kind", f"must be one of {', '.join(KINDS)}")
    check_priority(sub.priority, problems)
    if sub.kind not in KINDS:
        return owner, None
    try:
        return owner, parse_spec(sub.kind, sub.spec, services().settings.paths)
    except SpecError as e:
        problems.errors.extend(e.errors)
        return owner, None


def admit_lora(spec: dict[str, Any], owner: str) -> dict[str, str]:
    """A training job's last checks before it is queued (the record fields they add): the
    LoRA folder it writes is the owner's, or an admin's word for it, and can be written."""
    # Last check before queueing: a refused job must not keep the name it claimed.
    try:
        admitted_by = admit_train_job(spec, owner)
    except OwnerRefused as e:
        raise Forbidden(f"the job was not queued: {e}",
                        [{"field": e.field, "message": str(e)}]) from None
    # After the owner check (whose LoRA it is comes first); a name claimed just now is a new
    # one, which neither check below can refuse.
    problems = lora_write_problems(spec)
    if problems:
        raise BadRequest(f"the job was not queued: {problems[0]['message']}", problems)
    return {"lora_admitted_by": admitted_by} if admitted_by else {}


@bp.post("/jobs")
def submit_job():
    problems = Problems()
    sub = read_submission(request.get_json(silent=True), problems)
    owner, spec = check_submission(sub, problems)
    refuse_problems(problems, "the job was not queued")
    assert spec is not None  # a spec that did not parse added a problem
    spec_dict = spec.to_dict()
    need = job_memory_mb(sub.kind, spec_dict, services().settings.paths.models)
    with queue_guard(owner, 1) as over:
        if over:
            raise BadRequest(f"the job was not queued: {over['message']}", [over])
        fields = admit_lora(spec_dict, owner) if sub.kind == "train" else {}
        job_id = services().store.create(sub.kind, spec_dict, owner, sub.priority,
                                         gpu_memory_mb=need, fields=fields)
    return jsonify({"id": job_id, "state": JobState.QUEUED.value}), 201


def lora_write_problems(spec: dict[str, Any]) -> list[dict[str, str]]:
    """What makes a training job's LoRA folder impossible to write, found before it is queued:
    continuing a LoRA with another rank (the engine would refuse it after loading the model),
    or resuming a LoRA that a waiting or running job already writes (two writers would
    overwrite each other's checkpoints)."""
    name = str(spec.get("lora_name") or "")
    out = []
    if not spec.get("always_override"):
        try:
            info = lora_info(services().settings.paths.loras, name, owner_registry())
        except ValueError:
            info = None
        if info is not None and info.exists and info.rank not in (None, spec.get("lora_rank")):
            out.append({"field": "lora_rank", "message": (
                f"LoRA '{name}' already exists with rank {info.rank}, and lora_rank is "
                f"{spec.get('lora_rank')}: the rank cannot change when continuing a LoRA. Set "
                f"lora_rank to {info.rank}, pick another lora_name, or set always_override to "
                "start over")})
    if spec.get("resume_from_checkpoint") and name in lora_names_in_use():
        out.append({"field": "resume_from_checkpoint", "message": (
            f"a waiting or running job already trains loras/{name}: resume it once that job "
            "has ended")})
    return out


def whole_number_arg(name: str, default: int) -> int:
    """The query parameter `name` as a whole number (`default` when absent); 400 naming it."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest.on(name, f"{name} must be a whole number, not {raw[:40]!r}") from None


@bp.get("/jobs")
def list_jobs():
    limit = max(1, min(1000, whole_number_arg("limit", 200)))
    offset = max(0, whole_number_arg("offset", 0))
    # state/owner filter the whole list before paging; `total` counts every match.
    states, owners = job_filters(request.args)
    before = request.args.get("before") or None
    try:
        records, total = services().store.page(limit, offset, states, owners, before)
    except KeyError:
        raise BadRequest.on("before", f"before: there is no job {before}") from None
    return jsonify({"jobs": [job_summary(r) for r in records], "total": total,
                    "limit": limit, "offset": offset})


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(job_detail(job_id))


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    store = services().store
    rec = store.get(job_id)
    check_may_manage(rec, "cancel")
    if rec.get("state", "") in TERMINAL_VALUES:
        raise Conflict(f"job {job_id} has already {rec['state']}: nothing to cancel")
    rec = store.cancel(job_id)  # TransitionError (409) if it changed state under us
    rec["stop_requested"] = store.stop_requested(job_id)
    return jsonify(rec)


@bp.post("/jobs/<job_id>/priority")
def set_priority(job_id: str):
    """Re-prioritise a queued or retrying job: {"priority": "low"|"normal"|"high"|"urgent"}."""
    body = request.get_json(silent=True)
    priority = body.get("priority") if isinstance(body, dict) else None
    if not (isinstance(priority, str) and priority in PRIORITIES):
        raise BadRequest(f"priority must be one of {', '.join(PRIORITIES)}",
                         [{"field": "priority", "message": f"must be one of {', '.join(PRIORITIES)}"}])
    check_may_manage(services().store.get(job_id), "re-prioritise")
    why = priority_problem(priority)
    if why:
        raise Forbidden.on("priority", why)
    services().store.set_priority(job_id, priority)  # TransitionError: 409
    return jsonify(job_detail(job_id))


ESTIMATE_NUMBERS = ("lora_rank", "micro_batch_size", "cutoff_len", "min_gpu_memory_mb",
                    "max_length", "max_new_tokens")


def check_whole_number(spec: dict[str, Any], key: str, problems: Problems) -> None:
    """A problem unless `spec[key]` is absent, empty or a whole number of 0 or more."""
    if key not in spec or spec[key] in ("", None):
        return
    try:
        ok = int(str(spec[key]).strip()) >= 0
    except ValueError:
        ok = False
    if not ok:
        problems.add(key, f"must be a whole number, got {spec[key]!r}")


@bp.post("/estimate")
def estimate():
    """The card memory a job would need: a spec (or {"kind", "spec"}) -> {"gpu_memory_mb"}.

    The spec need not be complete (the form asks while it is being filled in); what the
    estimate reads must have the right type."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest.on("body", NOT_A_SPEC)
    kind, spec = (body.get("kind", "train"), body["spec"]) if "spec" in body else ("train", body)
    if kind not in KINDS:
        raise BadRequest.on("kind", f"kind must be one of {', '.join(KINDS)}")
    if not isinstance(spec, dict):
        raise BadRequest.on("spec", "spec must be a JSON object")
    problems = Problems()
    for key in ESTIMATE_NUMBERS:
        check_whole_number(spec, key, problems)
    if problems:
        raise BadRequest("cannot estimate: " + "; ".join(
            f"{p['field']} {p['message']}" for p in problems.errors), problems.errors)
    clean = {k: v for k, v in spec.items() if v not in ("", None)}
    models = services().settings.paths.models
    need = job_memory_mb(kind, clean, models)
    own = int(clean.get("min_gpu_memory_mb") or 0)
    return jsonify({"gpu_memory_mb": need, "source": "user" if own > 0 else
                    ("estimate" if need else "unknown")})


@bp.get("/jobs/<job_id>/events")
def job_events_route(job_id: str):
    svc = services()
    svc.store.get(job_id)  # 404 before any streaming starts
    raw_after = request.args.get("after") or request.headers.get("Last-Event-ID")
    try:
        after = valid_stream_id(raw_after)
    except ValueError as e:
        field = "after" if request.args.get("after") else "Last-Event-ID"
        raise BadRequest.on(field, str(e)) from None
    if request.args.get("format") == "json":
        # The history as a bare list of {"id", "type", ...}, oldest first (README, REST API).
        events = []
        last = after
        while True:
            batch = svc.events.history(job_id, after=last, count=1000)
            events.extend({"id": eid, **ev} for eid, ev in batch)
            if len(batch) < 1000:
                break
            last = batch[-1][0]
        return jsonify(events)
    cfg = current_app.config
    view = svc.live.open(current_user().name, job_id)  # TooManyLive: 429
    gen = job_events(svc.store, svc.events, job_id, after, view, svc.live,
                     block_ms=int(cfg["LORAFLEET_SSE_BLOCK_MS"]),
                     grace_ms=int(cfg["LORAFLEET_SSE_GRACE_MS"]))
    return _live_response(gen, view)


def _live_response(gen: Any, view: Any) -> Response:
    """An SSE response whose live-view slot is freed when it closes, even if the client went
    away before the stream began (the generator's `finally` never runs then)."""
    resp = Response(gen, mimetype="text/event-stream", headers=SSE_HEADERS)
    hub = services().live
    resp.call_on_close(lambda: hub.close(view))
    return resp


@bp.get("/jobs/<job_id>/lora.zip")
def download_lora(job_id: str):
    svc = services()
    rec = svc.store.get(job_id)
    folder = lora_dir(rec, svc.settings.paths)
    if folder is None:
        raise NotFound(f"job {job_id} has no LoRA folder")
    if rec.get("state", "") not in TERMINAL_VALUES:
        raise Conflict(f"job {job_id} is {rec.get('state')}: its LoRA can be downloaded once it "
                       "has finished")
    if not lora_available(rec, svc.settings.paths):
        raise NotFound(f"job {job_id} saved no LoRA (loras/{folder.name}/ has no adapter)")
    with_checkpoints = request.args.get("checkpoints", "") in ("1", "true", "yes")
    name = folder.name
    return Response(stream_zip(folder, name, with_checkpoints), mimetype="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


# live -----------------------------------------------------------------------------------------
@bp.get("/live")
def live():
    """Every job event announced on pub/sub, as SSE; `?types=state,train` keeps only those."""
    svc = services()
    types = frozenset(t for t in request.args.get("types", "").split(",") if t) or None
    view = svc.live.open(current_user().name)  # TooManyLive: 429
    gen = live_feed(view, svc.live, types,
                    block_ms=int(current_app.config["LORAFLEET_SSE_BLOCK_MS"]))
    return _live_response(gen, view)


# fleet and choices ----------------------------------------------------------------------------
@bp.get("/workers")
def workers():
    return jsonify({"workers": workers_with_jobs()})


@bp.get("/choices")
def choices():
    return jsonify(list_choices(services().settings.paths))


@bp.get("/spec/defaults")
def spec_defaults():
    data_choices = list_choices(services().settings.paths)
    return jsonify({"spec": default_spec(), "docs": FIELD_DOCS,
                    "fields": [f.to_dict() for f in form_fields(data_choices)],
                    "priorities": list(PRIORITIES)})



@bp.get("/loras/<name>/parameters")
def lora_parameters_route(name: str):
    """A LoRA's training parameters as a spec ("copy parameters from"); webui's files too."""
    try:
        return jsonify({"lora": name, "spec": lora_parameters(name, services().settings.paths)})
    except SpecError as e:
        raise NotFound(str(e), e.errors) from None


@bp.get("/loras/<name>")
def lora_info_route(name: str):
    """What is under a LoRA name (exists, rank, steps, owner) and the line to show before a job
    writes it: `?always_override=1` when the job starts over, `?hint=spec` for a spec file."""
    try:
        info = lora_info(services().settings.paths.loras, name, owner_registry())
    except ValueError as e:
        raise BadRequest.on("lora_name", str(e)) from None
    override = request.args.get("always_override", "") in ("1", "true", "yes")
    how = "set always_override: true" if request.args.get("hint") == "spec" else "tick always_override"
    who = request_actor()
    return jsonify({**info.to_dict(), "notice": notice(info, who, override, how),
                    "refused": refused(info, who) is not None})
