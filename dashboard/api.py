"""The JSON REST API under /api/v1: what the pages' scripts and the CLI use.

Errors are JSON objects `{"error": "..."}`; an invalid spec also lists every problem as
`{"errors": [{"field", "message"}, ...]}` and queues nothing.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from dashboard.app import services
from dashboard.auth import current_user, may_manage, owner_for, priority_problem
from dashboard.forms import form_fields
from dashboard.job_summary import summary
from dashboard.live import TooManyLive
from dashboard.lora_zip import lora_available, lora_dir, stream_zip
from dashboard.ownership import OwnerRefused, admit_train_job
from dashboard.ownership import actor as request_actor
from dashboard.ownership import owners as owner_registry
from dashboard.sse import is_terminal, job_events, live_feed, valid_stream_id
from dispatcher.jobs.lora_info import lora_info, notice, refused
from dispatcher.jobs.outcome import list_fields
from dispatcher.jobs.specs import (
    FIELD_DOCS,
    SpecError,
    default_spec,
    list_choices,
    lora_parameters,
    parse_spec,
)
from dispatcher.jobs.states import TransitionError
from dispatcher.jobs.store import KINDS, PRIORITIES, JobNotFound
from dispatcher.schedule.estimate import job_memory_mb
from dispatcher.schedule.queue import QueueView, queue_view, scheduling_env

bp = Blueprint("api", __name__, url_prefix="/api/v1")

ENVELOPE_KEYS = {"kind", "spec", "owner", "priority"}
# Record fields that the job list leaves out (the spec can be long; the page fetches it).
LIST_OMITS = ("spec", "result")
SUMMARY_DEFAULTS = {"step": None, "total_steps": None, "loss": None, "eta_s": None,
                    "epoch": None, "worker": "", "reason": "", "position": None,
                    "estimated_start_s": None}
PENDING_STATES = ("queued", "retrying")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def api_error(status: int, message: str, errors: list[dict[str, str]] | None = None):
    """A JSON error: {"error": one sentence, "errors": [{field, message}, ...]}."""
    body: dict[str, Any] = {"error": message}
    if errors is not None:
        body["errors"] = errors
    return jsonify(body), status



def _queue() -> QueueView:
    """The dispatcher's plan of the pending jobs, worked out once per request."""
    if "lorafleet_queue" not in g:
        svc = services()
        window_s, _ = scheduling_env()
        g.lorafleet_queue = queue_view(svc.store, time.time(), window_s,
                                       workers=svc.fleet.alive(), pending=svc.pending.read())
    return g.lorafleet_queue


def with_queue_place(rec: dict[str, Any]) -> dict[str, Any]:
    """Add `position` (1 = next to start) and `estimated_start_s` (seconds from now; None when
    no live worker could take it) to a queued or retrying job."""
    if rec.get("state") in PENDING_STATES:
        view = _queue()
        rec["position"] = view.positions.get(rec["id"])
        rec["estimated_start_s"] = view.starts.get(rec["id"])
    return rec


def job_summary(rec: dict[str, Any]) -> dict[str, Any]:
    out = {**SUMMARY_DEFAULTS, **{k: v for k, v in rec.items() if k not in LIST_OMITS},
           **list_fields(rec)}  # kind, outcome, duration_s (issue 11: points 7, 20)
    return with_queue_place(out)


def _get_job(job_id: str) -> dict[str, Any]:
    return services().store.get(job_id)


@bp.errorhandler(JobNotFound)
def _job_not_found(e: JobNotFound):
    return api_error(404, f"no job {e.args[0] if e.args else ''}".strip())


# jobs -----------------------------------------------------------------------------------------
@bp.post("/jobs")
def submit_job():
    body = request.get_json(silent=True)
    if body is None:
        return api_error(400, "the request body must be a JSON object (a spec, or "
                           '{"kind": "train", "spec": {...}})')
    if not isinstance(body, dict):
        return api_error(400, "the request body must be a JSON object",
                      [{"field": "spec", "message": "must be a JSON object of training parameters"}])
    problems: list[dict[str, str]] = []
    if "spec" in body:  # an envelope: {"kind", "spec", "owner", "priority"}
        for key in sorted(set(body) - ENVELOPE_KEYS):
            problems.append({"field": str(key), "message": "is not a known request field "
                             f"(use {', '.join(sorted(ENVELOPE_KEYS))})"})
        spec_in = body["spec"]
        kind = body.get("kind", "train")
        priority = body.get("priority", "normal")
        owner = body.get("owner")
    else:
        spec_in, kind, priority, owner = body, "train", request.args.get("priority", "normal"), None
    owner, owner_problems = owner_for(owner)
    problems.extend(owner_problems)
    if kind not in KINDS:
        problems.append({"field": "kind", "message": f"must be one of {', '.join(KINDS)}"})
    if priority not in PRIORITIES:
        problems.append({"field": "priority",
                         "message": f"must be one of {', '.join(PRIORITIES)}"})
    elif priority_problem(priority):
        problems.append(priority_problem(priority))
    settings = services().settings
    spec = None
    if kind in KINDS:
        try:
            spec = parse_spec(kind, spec_in, settings.paths)
        except SpecError as e:
            problems.extend(e.errors)
    if problems or spec is None:
        n = len(problems)
        return api_error(400, f"the job was not queued: {n} problem{'s' if n != 1 else ''} "
                           "in the request", problems)
    spec_dict = spec.to_dict()
    need = job_memory_mb(kind, spec_dict, settings.paths.models)
    from dashboard.limits import queue_guard

    with queue_guard(owner, 1) as over:
        if over:
            return api_error(400, f"the job was not queued: {over['message']}", [over])
        fields = {}
        if kind == "train":  # the LoRA folder it writes: the owner's, or an admin's word for it
            # Last check before queueing: a refused job must not keep the name it claimed.
            try:
                admitted_by = admit_train_job(spec_dict, owner)
            except OwnerRefused as e:
                return api_error(403, f"the job was not queued: {e}",
                                 [{"field": e.field, "message": str(e)}])
            fields = {"lora_admitted_by": admitted_by} if admitted_by else {}
            # After the owner check (whose LoRA it is comes first); a name claimed just now is
            # a new one, which neither check below can refuse.
            problems = lora_write_problems(spec_dict)
            if problems:
                return api_error(400, f"the job was not queued: {problems[0]['message']}",
                                 problems)
        job_id = services().store.create(kind, spec_dict, owner, priority, gpu_memory_mb=need,
                                         fields=fields)
    return jsonify({"id": job_id, "state": "queued"}), 201


def lora_names_in_use() -> set[str]:
    """The LoRA names that waiting or running training jobs write."""
    svc = services()
    return {str((j.get("spec") or {}).get("lora_name") or "")
            for j in svc.pending.read() + svc.store.active() if j.get("kind") == "train"}


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


def job_filters(args: Any) -> tuple[list[str], list[str]]:
    """The job list's `state` and `owner` filters of a request: comma-separated, spaces ignored."""
    def values(key: str) -> list[str]:
        return [v.strip() for v in args.get(key, "").split(",") if v.strip()]

    return values("state"), values("owner")


@bp.get("/jobs")
def list_jobs():
    try:
        limit = max(1, min(1000, int(request.args.get("limit", 200))))
        offset = max(0, int(request.args.get("offset", 0)))
    except ValueError:
        return api_error(400, "limit and offset must be whole numbers")
    # state/owner filter the whole list before paging; `total` counts every match.
    states, owners = job_filters(request.args)
    before = request.args.get("before") or None
    try:
        records, total = services().store.page(limit, offset, states, owners, before)
    except KeyError:
        return api_error(400, f"before: there is no job {before}")
    return jsonify({"jobs": [job_summary(r) for r in records], "total": total,
                    "limit": limit, "offset": offset})


def job_detail(job_id: str) -> dict[str, Any]:
    """A job's record with its history and whether its LoRA can be downloaded."""
    svc = services()
    rec = svc.store.get(job_id)
    rec = {**SUMMARY_DEFAULTS, **rec}
    rec["history"] = svc.store.history(job_id)
    rec["stop_requested"] = svc.store.stop_requested(job_id)
    rec["lora_available"] = lora_available(rec, svc.settings.paths)
    rec.update(list_fields(rec))
    rec["summary"] = summary(rec, svc.settings.paths, lora_names_in_use())
    return with_queue_place(rec)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return jsonify(job_detail(job_id))


def _not_yours(rec: dict[str, Any], action: str):
    """A 403 response unless the user may change this job (its owner, or an admin)."""
    owner = rec.get("owner", "")
    if may_manage(owner):
        return None
    return api_error(403, f"job {rec['id']} belongs to {owner}: only its owner or an admin may "
                       f"{action} it")


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    store = services().store
    rec = store.get(job_id)
    denied = _not_yours(rec, "cancel")
    if denied:
        return denied
    if is_terminal(rec.get("state", "")):
        return api_error(409, f"job {job_id} has already {rec['state']}: nothing to cancel")
    try:
        rec = store.cancel(job_id)
    except TransitionError as e:  # it changed state under us (e.g. it just finished)
        return api_error(409, str(e))
    rec["stop_requested"] = store.stop_requested(job_id)
    return jsonify(rec)


@bp.post("/jobs/<job_id>/priority")
def set_priority(job_id: str):
    """Re-prioritise a queued or retrying job: {"priority": "low"|"normal"|"high"|"urgent"}."""
    body = request.get_json(silent=True)
    priority = body.get("priority") if isinstance(body, dict) else None
    if priority not in PRIORITIES:
        return api_error(400, f"priority must be one of {', '.join(PRIORITIES)}",
                      [{"field": "priority", "message": f"must be one of {', '.join(PRIORITIES)}"}])
    denied = _not_yours(services().store.get(job_id), "re-prioritise")
    if denied:
        return denied
    problem = priority_problem(priority)
    if problem:
        return api_error(403, problem["message"], [problem])
    try:
        services().store.set_priority(job_id, priority)
    except TransitionError as e:
        return api_error(409, str(e))
    return jsonify(job_detail(job_id))


@bp.post("/estimate")
def estimate():
    """The card memory a job would need: a spec (or {"kind", "spec"}) -> {"gpu_memory_mb"}.

    The spec need not be complete (the form asks while it is being filled in); what the
    estimate reads must have the right type."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return api_error(400, "the request body must be a JSON object (a spec, or "
                           '{"kind": "train", "spec": {...}})')
    kind, spec = (body.get("kind", "train"), body["spec"]) if "spec" in body else ("train", body)
    if kind not in KINDS or not isinstance(spec, dict):
        return api_error(400, f"kind must be one of {', '.join(KINDS)} and spec a JSON object")
    problems = []
    for key in ("lora_rank", "micro_batch_size", "cutoff_len", "min_gpu_memory_mb",
                "max_length", "max_new_tokens"):
        if key in spec and spec[key] not in ("", None):
            try:
                if int(str(spec[key]).strip()) < 0:
                    raise ValueError
            except ValueError:
                problems.append({"field": key, "message": f"must be a whole number, got {spec[key]!r}"})
    if problems:
        return api_error(400, "cannot estimate: " + "; ".join(
            f"{p['field']} {p['message']}" for p in problems), problems)
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
        return api_error(400, str(e))
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
    try:
        view = svc.live.open(current_user().name, job_id)
    except TooManyLive as e:
        return api_error(429, str(e))
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
        return api_error(404, f"job {job_id} has no LoRA folder")
    if not is_terminal(rec.get("state", "")):
        return api_error(409, f"job {job_id} is {rec.get('state')}: its LoRA can be downloaded "
                           "once it has finished")
    if not lora_available(rec, svc.settings.paths):
        return api_error(404, f"job {job_id} saved no LoRA (loras/{folder.name}/ has no adapter)")
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
    try:
        view = svc.live.open(current_user().name)
    except TooManyLive as e:
        return api_error(429, str(e))
    gen = live_feed(view, svc.live, types,
                    block_ms=int(current_app.config["LORAFLEET_SSE_BLOCK_MS"]))
    return _live_response(gen, view)


# fleet and choices ----------------------------------------------------------------------------
def workers_with_jobs() -> list[dict[str, Any]]:
    """Every worker, with the name and owner of the job it runs (job_name, job_owner)."""
    svc = services()
    out = svc.fleet.workers()
    for w in out:
        if w.get("job"):
            try:
                rec = svc.store.get(w["job"])
            except JobNotFound:
                continue
            w["job_owner"] = rec.get("owner", "")
            w["job_name"] = (rec.get("spec") or {}).get("lora_name") or rec.get("kind", "")
    return out


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
        return api_error(404, str(e), e.errors)


@bp.get("/loras/<name>")
def lora_info_route(name: str):
    """What is under a LoRA name (exists, rank, steps, owner) and the line to show before a job
    writes it: `?always_override=1` when the job starts over, `?hint=spec` for a spec file."""
    try:
        info = lora_info(services().settings.paths.loras, name, owner_registry())
    except ValueError as e:
        return api_error(400, str(e), [{"field": "lora_name", "message": str(e)}])
    override = request.args.get("always_override", "") in ("1", "true", "yes")
    how = "set always_override: true" if request.args.get("hint") == "spec" else "tick always_override"
    who = request_actor()
    return jsonify({**info.to_dict(), "notice": notice(info, who, override, how),
                    "refused": refused(info, who) is not None})
