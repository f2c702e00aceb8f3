"""Who made each user file and LoRA of the data folder, and who may change it.

One Redis hash holds the owners, keyed by the path inside the data folder:

  {p}:owners    hash: "datasets/x.json" | "formats/f.json" | "loras/name" -> user name

Uploads (datasets, raw texts, format files and format copies) record their uploader when they
create a file; a training job's LoRA name is claimed for the job's owner when the job (or the
sweep that makes it) is accepted, so two users cannot both queue a new name. A file with no
entry was put in the data folder by hand: it belongs to no one, everyone may read it, and only
an admin may replace it (or, for a LoRA, continue, override or resume it).

A member may change only what they own; an admin may change anything. An admin's replacement
keeps the file's owner (it was done for them); an unowned file an admin writes becomes theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_ONE = "—"  # how listings show a file that belongs to no one


class OwnerRefused(PermissionError):
    """A change of someone else's file or LoRA (HTTP 403); `field` names the request field."""

    def __init__(self, message: str, field: str = "file"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Actor:
    """Who asks for a change: their name and whether they are an admin."""

    name: str
    is_admin: bool


class Owners:
    def __init__(self, redis: Any, prefix: str = "lf"):
        self.r = redis
        self.key = f"{prefix}:owners"

    def get(self, rel: str) -> str | None:
        return self.r.hget(self.key, rel)

    def many(self, rels: list[str]) -> dict[str, str | None]:
        return dict(zip(rels, self.r.hmget(self.key, rels), strict=True)) if rels else {}

    def claim(self, rel: str, user: str) -> str:
        """Make `user` the owner unless someone already is; returns the owner now."""
        if self.r.hsetnx(self.key, rel, user):
            return user
        return self.r.hget(self.key, rel) or user

    def record(self, rel: str, user: str) -> None:
        self.r.hset(self.key, rel, user)

    def drop(self, rel: str) -> None:
        self.r.hdel(self.key, rel)

    def owned_by(self, user: str, under: str = "") -> list[str]:
        """The paths `user` owns (those starting with `under`, e.g. "datasets/")."""
        return sorted(rel for rel, who in self.r.hgetall(self.key).items()
                      if who == user and rel.startswith(under))


def refusal(rel: str, owner: str | None, actor: Actor, verb: str = "replace") -> str | None:
    """Why `actor` may not change the existing `rel` owned by `owner` (None: they may)."""
    if actor.is_admin or owner == actor.name:
        return None
    if owner is None:
        return (f"{rel} was put in the data folder by hand and belongs to no one; only an "
                f"admin may {verb} it")
    return f"{rel} belongs to {owner}; only {owner} or an admin may {verb} it"


def used_space(owners: Owners, home: Path, user: str) -> int:
    """Bytes of the uploaded files `user` owns (a file that is gone counts 0 and its entry is
    dropped). Links are not followed: their size is not the user's."""
    total = 0
    for rel in owners.owned_by(user):
        if rel.startswith("loras/"):
            continue
        try:
            total += (home / rel).lstat().st_size
        except FileNotFoundError:
            owners.drop(rel)  # removed by hand: it holds no space, and its name is free
        except OSError:
            pass
    return total


# LoRA folders --------------------------------------------------------------------------------
LORA_VERB = "train into it (continue, override or resume it)"


def lora_rel(name: str) -> str:
    return f"loras/{name}"


def admit_lora_write(owners: Owners, loras: Path, name: str, job_owner: str,
                     actor: Actor) -> str:
    """Check that `actor` may queue a job (owned by `job_owner`) that writes loras/`name`, and
    claim the name for `job_owner` when no one holds it. Returns "" or, when an admin admits a
    write into a folder owned by someone else, the admin's name (the worker checks it again).
    Raises OwnerRefused naming the owner."""
    rel = lora_rel(name)
    owner = owners.get(rel)
    if owner is None and not (loras / name).exists() and not (loras / name).is_symlink():
        owner = owners.claim(rel, job_owner)  # a new name: the first to claim it has it
    why = refusal(rel, owner, actor, LORA_VERB)
    if why is None and owner is not None and owner != job_owner:
        # An admin queueing for bo into ana's LoRA: allowed, and said so on the job.
        return actor.name
    if why is not None:
        raise OwnerRefused(why + " (choose another lora_name)", "lora_name")
    if owner is None:  # an admin writing an unowned folder: it becomes the job owner's
        owners.claim(rel, job_owner)
    return ""


def job_write_refusal(owners: Owners, rec: dict[str, Any]) -> str | None:
    """The worker's own check before a training job touches its LoRA folder: the name must be
    the job owner's, or an admin must have admitted the job (`lora_admitted_by`)."""
    name = str((rec.get("spec") or {}).get("lora_name") or "")
    job_owner = str(rec.get("owner") or "")
    if not name:
        return None
    owner = owners.claim(lora_rel(name), job_owner)
    if owner == job_owner or rec.get("lora_admitted_by"):
        return None
    return (f"loras/{name} belongs to {owner}, not to this job's owner {job_owner}: the job "
            "does not touch it (only its owner or an admin may train into it)")
