"""The Datasets page and its API: upload checked data files, list them, preview samples.

Routes:
  GET  /datasets                  the page
  GET  /api/v1/datasets           datasets, format files (user and shipped), raw texts
  POST /api/v1/datasets           multipart upload: `file`, optional `kind`, `overwrite=1`
  GET  /api/v1/datasets/preview   the samples a job would train on (dashboard/previews.py)
  GET  /api/v1/formats/<name>     one format file: its listing entry plus `templates` (the
                                  file's JSON object); the user's file first, else the shipped
                                  one, or `?source=user|shipped`
  POST /api/v1/formats/copy       JSON {"from", "name", "overwrite": false, "source"?}: copy a
                                  format file to formats/<name>.json; 201 with its listing entry

The format routes are guarded like the upload (dashboard/auth.py's request hook: a login or a
token with accounts, the CSRF token on a browser's POST); any user who may upload may copy.

Config keys:
  LORAFLEET_UPLOAD_MAX_BYTES      largest file accepted (default 50 MB); larger gets 413
  LORAFLEET_PREVIEW_TIMEOUT_S     how long one preview may run (default 60 s); then 504
"""

from __future__ import annotations

import threading

from flask import Blueprint, current_app, jsonify, render_template, request
from werkzeug.exceptions import RequestEntityTooLarge

from dashboard.data_files import (
    DEFAULT_MAX_UPLOAD_BYTES,
    KINDS,
    TRUE_WORDS,
    check_upload,
    human_size,
    list_data,
)
from dashboard.errors import BadRequest, TooLarge, Unavailable
from dashboard.format_files import copy_format, read_format
from dashboard.ownership import owners, save_owned, with_owners
from dashboard.previews import (
    DEFAULT_PREVIEW_TIMEOUT_S,
    PREVIEW_SLOTS,
    describe,
    parse_preview_request,
    run_preview,
)
from dashboard.services import services
from dispatcher.jobs.specs import default_spec, list_choices

bp = Blueprint("datasets", __name__, template_folder="templates")

# Room for the multipart envelope and the small form fields around the file itself.
MULTIPART_SLACK = 64 * 1024
PREVIEWS_KEY = "lorafleet_previews"


@bp.record_once
def _setup(state) -> None:
    state.app.config.setdefault("LORAFLEET_UPLOAD_MAX_BYTES", DEFAULT_MAX_UPLOAD_BYTES)
    state.app.config.setdefault("LORAFLEET_PREVIEW_TIMEOUT_S", DEFAULT_PREVIEW_TIMEOUT_S)
    # Each preview is a Python process with transformers loaded: a few at a time at most.
    state.app.extensions[PREVIEWS_KEY] = threading.BoundedSemaphore(PREVIEW_SLOTS)


def _max_upload() -> int:
    return int(current_app.config["LORAFLEET_UPLOAD_MAX_BYTES"])


def _too_large(name: str = "") -> TooLarge:
    limit = human_size(_max_upload())
    return TooLarge.on("file", f"{name or 'the upload'} is larger than the upload limit of "
                               f"{limit}")


def _listing() -> dict:
    out = with_owners(list_data(services().settings.paths))
    out["max_upload_bytes"] = _max_upload()
    return out


@bp.get("/datasets")
def page():
    paths = services().settings.paths
    return render_template("datasets.html", nav="datasets", listing=_listing(),
                           choices=list_choices(paths), kinds=KINDS,
                           max_upload=human_size(_max_upload()), defaults=default_spec())


@bp.get("/api/v1/datasets")
def list_files():
    return jsonify(_listing())


@bp.post("/api/v1/datasets")
def upload():
    limit = _max_upload()
    request.max_content_length = limit + MULTIPART_SLACK
    if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
        raise _too_large()
    try:
        sent = request.files.get("file")
        kind = request.form.get("kind", "")
        overwrite = request.form.get("overwrite", "").strip().lower() in TRUE_WORDS
    except RequestEntityTooLarge:
        raise _too_large() from None
    if sent is None or not sent.filename:
        raise BadRequest("no file was sent: use the multipart form field 'file'",
                         [{"field": "file", "message": "choose a file to upload"}])
    name = sent.filename
    data = sent.stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(name)
    paths = services().settings.paths
    checked = check_upload(name, kind, data, paths)
    existed = (checked.folder / checked.name).exists()
    target = save_owned(checked, data, overwrite)
    return jsonify({
        "name": checked.name, "kind": checked.kind,
        "path": f"{checked.folder.name}/{checked.name}", "size": len(data),
        "rows": checked.rows, "key_sets": checked.key_sets, "replaced": existed,
        "modified": target.stat().st_mtime,
    }), 201


@bp.get("/api/v1/datasets/preview")
def preview():
    paths = services().settings.paths
    req = parse_preview_request(request.args, paths)
    timeout = float(current_app.config["LORAFLEET_PREVIEW_TIMEOUT_S"])
    slots: threading.BoundedSemaphore = current_app.extensions[PREVIEWS_KEY]
    if not slots.acquire(timeout=timeout):
        raise Unavailable("too many previews are running; try again in a moment")
    try:
        result = run_preview(req, paths, timeout=timeout)
    finally:
        slots.release()
    result["request"] = describe(req, paths)
    return jsonify(result)


@bp.get("/api/v1/formats/<path:name>")
def format_file(name: str):
    # <path:...> so that a name with a slash gets the name rule's 400, not the router's 404.
    paths = services().settings.paths
    return jsonify(read_format(name, paths, request.args.get("source", "")))


@bp.post("/api/v1/formats/copy")
def copy_format_file():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest.on("body", 'send a JSON object: {"from": NAME, "name": NEW_NAME, '
                                    '"overwrite": false}')
    overwrite = body.get("overwrite", False)
    if isinstance(overwrite, str):
        overwrite = overwrite.strip().lower() in TRUE_WORDS
    if not isinstance(overwrite, bool):
        raise BadRequest("overwrite must be true or false",
                         [{"field": "overwrite", "message": "must be true or false"}])
    entry, replaced = copy_format(body.get("from"), body.get("name"), overwrite,
                                  services().settings.paths, body.get("source", ""),
                                  save=save_owned)
    owner = owners().get(f"formats/{entry['file']}")
    return jsonify({**entry, "owner": owner, "replaced": replaced}), 201
