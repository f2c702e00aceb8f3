"""Evaluations (perplexity table, comments) and Generate (try a LoRA) pages and their API."""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template, request

from dashboard.errors import BadRequest, Forbidden, NotFound
from dashboard.forms import form_fields
from dashboard.identity import current_user
from dashboard.services import services
from dispatcher.jobs.evaltable import EvalTable, settings_key, with_base
from dispatcher.jobs.specs import EvalSpec, GenerateSpec, list_choices
from dispatcher.jobs.store import JobNotFound

bp = Blueprint("tools", __name__, template_folder="templates")
EVAL_TABLE = "evaluations.csv"  # the worker writes the same file (gpuworker/jobs.py)


def _table() -> EvalTable:
    return EvalTable(services().settings.paths.evals / EVAL_TABLE)


def _copied_spec(kind: str) -> tuple[str, dict]:
    """`?from=<job id>` ("Copy parameters" on a job page): that job's id and spec, when it is
    a job of this page's kind (404 for a job that is not there, 400 for another kind)."""
    job_id = request.args.get("from", "")
    if not job_id:
        return "", {}
    try:
        rec = services().store.get(job_id)
    except JobNotFound:
        raise NotFound(f"no job {job_id} to copy parameters from") from None
    if rec.get("kind", "train") != kind:
        raise BadRequest(f"job {job_id} is a {rec.get('kind', 'train')} job, not a {kind} job")
    return job_id, dict(rec.get("spec") or {})


@bp.get("/evaluations")
def evaluations_page():
    paths = services().settings.paths
    copied_from, values = _copied_spec("evaluate")
    fields = form_fields(list_choices(paths), values, spec_cls=EvalSpec,
                         required=("base_model", "text_file"))
    rows = list(reversed(with_base(_table().rows())))
    measuring = _base_jobs_under_way()
    for r in rows:
        r["base_job"] = measuring.get(settings_key(r)) if r["loras"] else None
    return render_template("evaluations.html", fields=fields, rows=rows, nav="evaluations",
                           copied_from=copied_from)


def _base_jobs_under_way() -> dict[tuple, str]:
    """Queued or running perplexity jobs of a base model alone, by their text and settings: a
    row whose base is being measured links to that job instead of offering to queue another."""
    svc = services()
    out = {}
    for j in svc.pending.read() + svc.store.active():
        spec = j.get("spec") or {}
        if j.get("kind") == "evaluate" and not spec.get("loras"):
            try:
                out[settings_key({**spec, "loras": []})] = j["id"]
            except (KeyError, TypeError, ValueError):
                continue
    return out


@bp.get("/generate")
def generate_page():
    paths = services().settings.paths
    copied_from, values = _copied_spec("generate")
    values.update({k: request.args[k] for k in ("base_model", "lora") if k in request.args})
    fields = form_fields(list_choices(paths), values, spec_cls=GenerateSpec,
                         required=("base_model", "prompt"))
    return render_template("generate.html", fields=fields, nav="generate",
                           copied_from=copied_from)


@bp.get("/api/v1/evaluations")
def evaluations_api():
    return jsonify({"evaluations": list(reversed(with_base(_table().rows())))})


def _check_comment_rights(row_id: str) -> None:
    """Only the owner of the evaluation job that made the row, or an admin, edits its comment.
    A row with no job (written by hand, or its job record gone) is the admins' alone."""
    user = current_user()
    if user.is_admin:
        return
    row = next((r for r in _table().rows() if r["id"] == row_id), None)
    if row is None:
        raise NotFound(f"no evaluation {row_id}")
    owner = None
    if row.get("job"):
        try:
            owner = services().store.get(row["job"]).get("owner")
        except JobNotFound:
            owner = None
    if owner == user.name:
        return
    whose = f"it belongs to {owner} (job {row['job']})" if owner else \
        "it was not made by a job of the fleet"
    raise Forbidden(f"only the owner of evaluation {row_id} or an admin may edit its comment: "
                    f"{whose}")


@bp.post("/api/v1/evaluations/<row_id>")
def edit_evaluation(row_id: str):
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("comment"), str):
        raise BadRequest("send a JSON object with a text `comment`",
                         [{"field": "comment", "message": "must be text"}])
    if len(body["comment"]) > 500:
        raise BadRequest("comment too long",
                         [{"field": "comment", "message": "must be at most 500 characters"}])
    _check_comment_rights(row_id)
    try:
        row = _table().set_comment(row_id, body["comment"])
    except KeyError:
        raise NotFound(f"no evaluation {row_id}") from None
    return jsonify(row)
