"""Evaluations (perplexity table, comments) and Generate (try a LoRA) pages and their API."""

from __future__ import annotations

from flask import Blueprint, abort, jsonify, render_template, request

from dashboard.app import services
from dashboard.auth import current_user
from dashboard.forms import form_fields
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
        abort(404, f"no job {job_id} to copy parameters from")
    if rec.get("kind", "train") != kind:
        abort(400, f"job {job_id} is a {rec.get('kind', 'train')} job, not a {kind} job")
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


def _comment_refusal(row_id: str):
    """Only the owner of the evaluation job that made the row, or an admin, edits its comment.
    A row with no job (written by hand, or its job record gone) is the admins' alone."""
    user = current_user()
    if user.is_admin:
        return None
    row = next((r for r in _table().rows() if r["id"] == row_id), None)
    if row is None:
        return jsonify({"error": f"no evaluation {row_id}"}), 404
    owner = None
    if row.get("job"):
        try:
            owner = services().store.get(row["job"]).get("owner")
        except JobNotFound:
            owner = None
    if owner == user.name:
        return None
    whose = f"it belongs to {owner} (job {row['job']})" if owner else \
        "it was not made by a job of the fleet"
    return jsonify({"error": f"only the owner of evaluation {row_id} or an admin may edit its "
                             f"comment: {whose}"}), 403


@bp.post("/api/v1/evaluations/<row_id>")
def edit_evaluation(row_id: str):
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("comment"), str):
        return jsonify({"error": "send a JSON object with a text `comment`",
                        "errors": [{"field": "comment", "message": "must be text"}]}), 400
    if len(body["comment"]) > 500:
        return jsonify({"error": "comment too long",
                        "errors": [{"field": "comment", "message": "must be at most 500 characters"}]}), 400
    refused = _comment_refusal(row_id)
    if refused is not None:
        return refused
    try:
        row = _table().set_comment(row_id, body["comment"])
    except KeyError:
        return jsonify({"error": f"no evaluation {row_id}"}), 404
    return jsonify(row)
