"""The dashboard's side of file and LoRA owners (dispatcher/access/owners.py): who asks, whether they
may write what they ask to, how much upload space they use, and what the listing shows.

A refusal is raised before anything is written (dashboard/errors.py: Forbidden for someone
else's file, BadRequest over the upload space, Conflict while another save of the user holds
their lock).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import formats
from dashboard.data_files import Upload, save_upload
from dashboard.errors import BadRequest, Conflict, Forbidden
from dashboard.identity import current_user
from dashboard.services import services
from dispatcher.access.limits import Limits, owner_lock
from dispatcher.access.limits import refusal as limit_refusal
from dispatcher.access.owners import (
    Actor,
    Owners,
    admit_lora_write,
    refusal,
    used_space,
)

MB = 1024 * 1024


def owners() -> Owners:
    svc = services()
    return Owners(svc.redis, svc.settings.prefix)


def actor() -> Actor:
    user = current_user()
    return Actor(user.name, user.is_admin)


def _check_shipped_name(upload: Upload, who: Actor) -> None:
    """A format file under a shipped format's name is what every user's jobs then get."""
    if upload.kind != "format" or who.is_admin:
        return
    if (formats.SHIPPED_DIR / upload.name).is_file():
        raise Forbidden.on("file", f"{Path(upload.name).stem} is a shipped format: a file of "
                                   "that name in formats/ would change it for every user's jobs, "
                                   "so only an admin may add one; choose another name")


def _check_space(reg: Owners, who: Actor, rel: str, adding: int, replacing: int) -> None:
    svc = services()
    limit = Limits(svc.redis, svc.settings.prefix).get(who.name, "upload_space_mb")
    total = used_space(reg, svc.settings.paths.home, who.name) - replacing + adding
    amount = math.ceil(total / MB)
    if limit.exceeded_by(amount):
        raise BadRequest.on("file", f"{rel} was not saved: " + limit_refusal(
            limit, amount, "the space of your uploaded files in MB"))


def save_owned(upload: Upload, data: bytes, overwrite: bool,
               replace_hint: str = "tick 'overwrite' to replace it") -> Path:
    """save_upload, for the current user: refused (nothing written) when the file is someone
    else's (or no one's, for a member), when it takes a shipped format's name, or when it
    would take the user past their upload space; the new file is then recorded as theirs."""
    who, reg = actor(), owners()
    rel = f"{upload.folder.name}/{upload.name}"
    target = upload.folder / upload.name
    _check_shipped_name(upload, who)
    existed = target.exists() or target.is_symlink()
    owner = reg.get(rel) if existed else None
    if existed:
        why = refusal(rel, owner, who)
        if why:
            raise Forbidden.on("file", why)
    svc = services()
    # Under the user's lock (the one their job submissions hold): parallel uploads cannot all
    # pass the space check before any of them is saved.
    with owner_lock(svc.redis, svc.settings.prefix, who.name) as held:
        if not held:
            raise Conflict.on("file", f"{rel} was not saved: another upload or submission of "
                                      f"{who.name} is still being saved; try again")
        replacing = target.lstat().st_size if existed and owner == who.name and overwrite else 0
        _check_space(reg, who, rel, len(data), replacing)
        # Replace only what was there when ownership was checked: a file that appeared since
        # is refused (409) by save_upload's hard link, not replaced unseen.
        saved = save_upload(upload, data, overwrite and existed, replace_hint)
        if existed:
            reg.claim(rel, who.name)  # an unowned file an admin replaced becomes theirs
        else:
            reg.record(rel, who.name)
    return saved


def with_owners(listing: dict[str, Any]) -> dict[str, Any]:
    """Add `owner` (a user name, or None for no one) to every entry of a data listing."""
    entries = [(e, f"datasets/{e['name']}") for e in listing["datasets"] + listing["raw_texts"]]
    entries += [(e, f"formats/{e['file']}") for e in listing["formats"]
                if e.get("source") == "user"]
    found = owners().many([rel for _, rel in entries])
    for e in listing["datasets"] + listing["raw_texts"] + listing["formats"]:
        e["owner"] = None
    for e, rel in entries:
        e["owner"] = found.get(rel)
    return listing


def admit_train_job(spec: dict[str, Any], job_owner: str) -> str:
    """Claim (or check) the LoRA name a training job writes; see owners.admit_lora_write.
    Raises dispatcher.access.owners.OwnerRefused, which the API answers with 403."""
    return admit_lora_write(owners(), services().settings.paths.loras,
                            str(spec.get("lora_name") or ""), job_owner, actor())


__all__ = ["admit_train_job", "owners", "save_owned", "with_owners"]
