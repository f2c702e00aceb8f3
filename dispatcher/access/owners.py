"""Who made each user file and LoRA of the data folder, and who may change it.

One Redis hash holds the owners, keyed by the path inside the data folder:

  {p}:owners        hash: "datasets/x.json" | "formats/f.json" | "loras/name" -> user name
  {p}:owned:{user}  set: the paths of the hash that belong to `user` (changed with it)

Uploads (datasets, raw texts, format files and format copies) record their uploader when they
create a file; a training job's LoRA name is claimed for the job's owner when the job (or the
sweep that makes it) is accepted, so two users cannot both queue a new name. Names are claimed
all or none (claim_loras); a claim whose job ended without making the folder is released by
the dispatcher (dispatcher/schedule/claims.py). A file with no
entry was put in the data folder by hand: it belongs to no one, everyone may read it, and only
an admin may replace it (or, for a LoRA, continue, override or resume it).

A member may change only what they own; an admin may change anything. An admin's replacement
keeps the file's owner (it was done for them); an unowned file an admin writes becomes theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.jobs.record import JobRecord

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


# Claim every path of ARGV[2..] for ARGV[1], or none: if any is someone else's, return those
# paths with their owners (path, owner, path, owner, ...) and write nothing. KEYS: the owners
# hash and the claimer's index. One script, so no other claim can come between check and claim.
_CLAIM_ALL = """
local taken = {}
for i = 2, #ARGV do
  local who = redis.call('HGET', KEYS[1], ARGV[i])
  if who and who ~= ARGV[1] then taken[#taken + 1] = ARGV[i]; taken[#taken + 1] = who end
end
if #taken > 0 then return taken end
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return taken
"""
# Set (ARGV[3] = "set") or drop the owner of ARGV[1] (only if it is ARGV[2], when given for a
# drop), keeping the owners' index sets ({prefix}:owned:{user}, prefix in ARGV[4]) in step.
_CHANGE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] ~= 'set' and ARGV[2] ~= '' and old ~= ARGV[2] then return 0 end
if old then redis.call('SREM', ARGV[4] .. ':owned:' .. old, ARGV[1]) end
if ARGV[3] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', ARGV[4] .. ':owned:' .. ARGV[2], ARGV[1])
elseif old then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  return 0
end
return 1
"""


class Owners:
    """The owners hash with a set per user of what they own ({p}:owned:{user}), changed
    together by Redis scripts: an upload's space check reads one user's set, not every
    owner of the data folder."""

    def __init__(self, redis: Any, prefix: str = "lf"):
        self.r = redis
        self.p = prefix
        self.key = f"{prefix}:owners"

    def index_key(self, user: str) -> str:
        return f"{self.p}:owned:{user}"

    def get(self, rel: str) -> str | None:
        return self.r.hget(self.key, rel)

    def many(self, rels: list[str]) -> dict[str, str | None]:
        return dict(zip(rels, self.r.hmget(self.key, rels), strict=True)) if rels else {}

    def claim_all(self, rels: list[str], user: str) -> dict[str, str]:
        """Make `user` the owner of every path in `rels` no one holds, all or none: returns
        {path: owner} of those someone else holds (then nothing was claimed), else {}."""
        if not rels:
            return {}
        taken = self.r.eval(_CLAIM_ALL, 2, self.key, self.index_key(user), user, *rels)
        return dict(zip(taken[::2], taken[1::2], strict=True))

    def claim(self, rel: str, user: str) -> str:
        """Make `user` the owner unless someone already is; returns the owner now."""
        return self.claim_all([rel], user).get(rel, user)

    def record(self, rel: str, user: str) -> None:
        self.r.eval(_CHANGE, 1, self.key, rel, user, "set", self.p)

    def drop(self, rel: str) -> None:
        self.r.eval(_CHANGE, 1, self.key, rel, "", "drop", self.p)

    def release(self, rel: str, user: str) -> bool:
        """Drop `rel`'s owner if it is still `user`; True if it was dropped."""
        return bool(self.r.eval(_CHANGE, 1, self.key, rel, user, "drop", self.p))

    def owned_by(self, user: str, under: str = "") -> list[str]:
        """The paths `user` owns (those starting with `under`, e.g. "datasets/")."""
        return sorted(rel for rel in self.r.smembers(self.index_key(user))
                      if rel.startswith(under))

    def reindex(self) -> None:
        """Fill every user's set from the owners hash (entries written before the sets)."""
        for rel, who in self.r.hscan_iter(self.key, count=1000):
            self.r.sadd(self.index_key(who), rel)


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
            owners.release(rel, user)  # removed by hand: it holds no space, its name is free
        except OSError:
            pass
    return total


# LoRA folders --------------------------------------------------------------------------------
LORA_VERB = "train into it (continue, override or resume it)"


def lora_rel(name: str) -> str:
    return f"loras/{name}"


def claim_loras(owners: Owners, names: list[str], job_owner: str) -> dict[str, str]:
    """Claim the LoRA names of a single job or of every trial of a sweep for `job_owner`, all
    or none (the one way LoRA names are claimed): returns {name: owner} of the names someone
    else holds, and then claims nothing."""
    taken = owners.claim_all([lora_rel(n) for n in names], job_owner)
    return {rel.removeprefix("loras/"): who for rel, who in taken.items()}


def folder_exists(folder: Path) -> bool:
    """Is there a LoRA folder (or a link in its place) at `folder`?"""
    return folder.exists() or folder.is_symlink()


def admit_lora_write(owners: Owners, loras: Path, name: str, job_owner: str,
                     actor: Actor) -> str:
    """Check that `actor` may queue a job (owned by `job_owner`) that writes loras/`name`, and
    claim the name for `job_owner` when no one holds it. Returns "" or, when an admin admits a
    write into a folder owned by someone else, the admin's name (the worker checks it again).
    Raises OwnerRefused naming the owner."""
    rel = lora_rel(name)
    owner = owners.get(rel)
    if owner is None and not folder_exists(loras / name):
        # A new name: the first to claim it has it.
        owner = claim_loras(owners, [name], job_owner).get(name, job_owner)
    why = refusal(rel, owner, actor, LORA_VERB)
    if why is not None:
        raise OwnerRefused(why + " (choose another lora_name)", "lora_name")
    if owner is None:  # an admin writing an unowned folder: it becomes the job owner's
        owner = claim_loras(owners, [name], job_owner).get(name, job_owner)
    if owner != job_owner:
        # An admin queueing for bo into ana's LoRA: allowed, and said so on the job.
        return actor.name
    return ""


def job_write_refusal(owners: Owners, loras: Path, rec: JobRecord | Mapping[str, Any]
                      ) -> str | None:
    """The worker's own check before a training job touches its LoRA folder. It passes when
    the name is the job owner's, when an admin admitted the job (`lora_admitted_by`), or when
    neither the folder nor a claim exists (the name is then claimed for the job owner). A
    folder that exists with no owner (made by hand) is refused without an admin's word: a job
    record that skipped the dashboard does not take it over. `rec` is the job's record (a
    JobRecord or its dict: both are read through `get`)."""
    name = str((rec.get("spec") or {}).get("lora_name") or "")
    job_owner = str(rec.get("owner") or "")
    if not name:
        return None
    admitted = bool(rec.get("lora_admitted_by"))
    owner = owners.get(lora_rel(name))
    if owner is None and folder_exists(loras / name):
        if admitted:
            return None
        return (f"loras/{name} was put in the data folder by hand and belongs to no one: the "
                "job does not touch it (only an admin may admit a job into it)")
    if owner is None:
        owner = claim_loras(owners, [name], job_owner).get(name, job_owner)
    if owner == job_owner or admitted:
        return None
    return (f"loras/{name} belongs to {owner}, not to this job's owner {job_owner}: the job "
            "does not touch it (only its owner or an admin may train into it)")
