"""Jobs as the API and the pages show them: list entries with their queue place, a job's
detail, the list filters, the Fleet page's workers with their jobs, and who may change a job.

Shared by dashboard/api.py and dashboard/pages.py (neither imports the other).
"""

from __future__ import annotations

import time
from typing import Any

from flask import g

from dashboard.errors import Forbidden
from dashboard.identity import may_manage
from dashboard.job_summary import summary
from dashboard.lora_zip import lora_available
from dashboard.services import services
from dispatcher.jobs.outcome import list_fields
from dispatcher.jobs.states import PENDING_VALUES
from dispatcher.jobs.store import JobNotFound
from dispatcher.schedule.queue import QueueView, queue_view
from dispatcher.settings import scheduling_env

# Record fields that the job list leaves out (the spec can be long; the page fetches it).
LIST_OMITS = ("spec", "result")
SUMMARY_DEFAULTS = {"step": None, "total_steps": None, "loss": None, "eta_s": None,
                    "epoch": None, "worker": "", "reason": "", "position": None,
                    "estimated_start_s": None}


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
    if rec.get("state") in PENDING_VALUES:
        view = _queue()
        rec["position"] = view.positions.get(rec["id"])
        rec["estimated_start_s"] = view.starts.get(rec["id"])
    return rec


def job_summary(rec: dict[str, Any]) -> dict[str, Any]:
    out = {**SUMMARY_DEFAULTS, **{k: v for k, v in rec.items() if k not in LIST_OMITS},
           **list_fields(rec)}  # kind, outcome, duration_s (issue 11: points 7, 20)
    return with_queue_place(out)


def lora_names_in_use() -> set[str]:
    """The LoRA names that waiting or running training jobs write."""
    svc = services()
    return {str((j.get("spec") or {}).get("lora_name") or "")
            for j in svc.pending.read() + svc.store.active() if j.get("kind") == "train"}


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
    rec["pack_mates"] = pack_mates(rec)
    return with_queue_place(rec)


def _ids(text: Any) -> list[str]:
    """A comma-separated list of job ids (a record's `pack_jobs`, a heartbeat's `jobs`)."""
    return [i for i in str(text or "").split(",") if i]


def pack_mates(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The other trials of the pack a sweep's trial was last assigned with ({id, name,
    state}, in the pack's order; [] for a trial that trains alone or any other job). A trial
    whose record was deleted since is named by its id."""
    others = [i for i in _ids(rec.get("pack_jobs")) if i != rec["id"]]
    if not rec.get("pack") or not others:
        return []
    found = {j["id"]: j for j in services().store.get_many(others)}
    return [{"id": i, "name": str(found.get(i, {}).get("name") or i),
             "state": str(found.get(i, {}).get("state") or "")} for i in others]


def job_filters(args: Any) -> tuple[list[str], list[str]]:
    """The job list's `state` and `owner` filters of a request: comma-separated, spaces ignored."""
    def values(key: str) -> list[str]:
        return [v.strip() for v in args.get(key, "").split(",") if v.strip()]

    return values("state"), values("owner")


def check_may_manage(rec: dict[str, Any], action: str) -> None:
    """Refuse (403) unless the user may change this job: its owner, or an admin."""
    owner = rec.get("owner", "")
    if not may_manage(owner):
        raise Forbidden(f"job {rec['id']} belongs to {owner}: only its owner or an admin may "
                        f"{action} it")


def workers_with_jobs() -> list[dict[str, Any]]:
    """Every worker, with the name and owner of the job it runs (job_name, job_owner); a worker
    that trains a pack (its heartbeat's `pack` "<sweep>:<number>" and `jobs`) also with
    pack_sweep, pack_number and pack_trials ({id, name} of each trial, in the pack's order)."""
    svc = services()
    out = svc.fleet.workers()
    for w in out:
        if w.get("pack") and _ids(w.get("jobs")):
            sweep, _, number = str(w["pack"]).rpartition(":")
            ids = _ids(w["jobs"])
            found = {j["id"]: j for j in svc.store.get_many(ids)}
            w["pack_sweep"], w["pack_number"] = sweep, number
            w["pack_trials"] = [{"id": i, "name": _job_name(found[i]) if i in found else i}
                                for i in ids]
        if w.get("job"):
            try:
                rec = svc.store.get(w["job"])
            except JobNotFound:
                continue  # it ended and was removed since the heartbeat: no job to name
            w["job_owner"] = rec.get("owner", "")
            w["job_name"] = _job_name(rec)
    return out


def _job_name(rec: dict[str, Any]) -> str:
    return (rec.get("spec") or {}).get("lora_name") or rec.get("kind", "")
