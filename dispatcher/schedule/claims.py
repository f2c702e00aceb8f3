"""The dispatcher's care of LoRA name claims (dispatcher/access/owners.py): owners back-filled once
after an upgrade, and claims released when no job will make their folder.

Back-fill. Versions before owners recorded none: every LoRA folder then belongs to no one, so
a member could no longer continue their own LoRA, and jobs queued before the upgrade hold no
claim. Once per Redis prefix (the marker {p}:owners:backfilled), from the job records: a LoRA
folder that exists and has no owner gets the owner of the newest training job with its name
that ran (one that never started never wrote the folder),
and the name of every waiting or active training job is claimed for that job's owner (its
newest). Uploaded data files from before stay no one's: nothing recorded who uploaded them.
The dispatcher does it as it starts: it runs once per fleet and before it no job is placed.

Release. A claim is made when a job is accepted, before its folder exists. When the job ends
(failed, cancelled) without making the folder, the name is released, so names cannot be
squatted by jobs that never run. The dispatcher's loop does it every RELEASE_EVERY_S rather
than the code that ends jobs: jobs end in the dashboard (cancel), the worker and the
dispatcher (lost workers), and a pass that looks at claims finds every case in one place.
It holds the owner's lock (the one their submissions hold while claiming and queueing), so a
name is never released between a submission's claim and its job, nor while any waiting or
active job still uses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dispatcher.access.limits import owner_lock
from dispatcher.access.owners import Owners, folder_exists, lora_rel
from dispatcher.jobs.states import TERMINAL_VALUES
from dispatcher.jobs.store import JobStore

log = logging.getLogger("lorafleet.claims")

RELEASE_EVERY_S = 60.0


def names_in_use(store: JobStore,
                 pending: Callable[[], list[dict[str, Any]]] | None = None) -> set[str]:
    """The LoRA names of every waiting or active training job. `pending` reads the queue (the
    dispatcher's kept copy; else every queued record). The two reads are not one snapshot, but
    only the dispatcher moves a job between the queue and the workers, and it is the one
    calling this, between its passes."""
    waiting = (pending or store.pending)()
    return {str((j.get("spec") or {}).get("lora_name") or "")
            for j in waiting + store.active() if j.get("kind", "train") == "train"}


def release_unused(owners: Owners, store: JobStore, loras: Path, wait_s: float = 0.5,
                   pending: Callable[[], list[dict[str, Any]]] | None = None) -> list[str]:
    """Release every LoRA claim whose folder does not exist and that no waiting or active job
    uses; returns the released paths. An owner whose lock is busy is left for the next pass.
    `pending` as in names_in_use: with thousands queued, the kept copy is what keeps a pass
    per owner cheap while their lock is held."""
    unmade: dict[str, list[str]] = {}
    for rel, who in owners.r.hscan_iter(owners.key, match="loras/*", count=1000):
        if not folder_exists(loras / rel.removeprefix("loras/")):
            unmade.setdefault(who, []).append(rel)
    released: list[str] = []
    for who, rels in unmade.items():
        with owner_lock(store.r, store.p, who, wait_s) as held:
            if not held:
                continue
            busy = names_in_use(store, pending)  # under the lock: no submission of theirs between
            for rel in rels:
                name = rel.removeprefix("loras/")
                if name not in busy and not folder_exists(loras / name) and owners.release(rel, who):
                    released.append(rel)
    return released


def backfill(owners: Owners, store: JobStore, loras: Path) -> dict[str, int] | None:
    """Give owners from the job records, once per prefix (None if done before); returns how
    many folders got an owner and how many waiting jobs' names were claimed."""
    marker = f"{store.p}:owners:backfilled"
    if store.r.exists(marker):
        return None
    owners.reindex()  # entries recorded before the per-user sets
    done = {"folders": 0, "waiting": 0}
    seen: set[str] = set()  # names whose owner the newest job that counts has decided
    for rec in _train_jobs_newest_first(store):
        name, owner = rec["lora_name"], rec["owner"]
        made = folder_exists(loras / name)
        if name in seen:
            continue
        if made and not rec["started"]:
            continue  # never ran, so never wrote the folder (a refused continue, say)
        if not made and rec["state"] in TERMINAL_VALUES:
            continue  # an ended job that made no folder gives no owner
        seen.add(name)
        if owners.get(lora_rel(name)) is None and owners.claim(lora_rel(name), owner) == owner:
            done["folders" if made else "waiting"] += 1
    store.r.set(marker, 1)
    return done


def _train_jobs_newest_first(store: JobStore, chunk: int = 500
                             ) -> Iterator[dict[str, str]]:
    """{lora_name, owner, state, started} of every training job with a LoRA name, newest
    first."""
    ids = store.r.zrevrange(f"{store.p}:jobs", 0, -1)
    for start in range(0, len(ids), chunk):
        with store.r.pipeline(transaction=False) as pipe:
            for job_id in ids[start:start + chunk]:
                pipe.hmget(store.key(job_id), "kind", "owner", "state", "spec", "started")
            rows = pipe.execute()
        for kind, owner, state, spec, started in rows:
            if (kind or "train") != "train" or not spec:
                continue
            try:
                name = str(json.loads(spec).get("lora_name") or "")
            except (ValueError, AttributeError):
                continue  # a spec that is not a JSON object names no LoRA
            if name and "/" not in name:
                yield {"lora_name": name, "owner": owner or "local", "state": state or "",
                       "started": started or ""}
