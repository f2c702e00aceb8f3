"""A full disk, told apart from other write failures and said the way a user reads it.

Only plain Python writes report a full disk as OSError(ENOSPC). torch.save reports it as an
opaque RuntimeError ("unexpected pos 576 vs 534") and safetensors as text ("No space left on
device (os error 28)"). So a failed write counts as "no space" when the error, or one it came
from, says so, or when the file system holding the folder has (almost) nothing left at the
moment of the failure, measured before the partial files are cleaned away. No torch here: the
worker's main process uses it too.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from gpuworker.errors import DiskFull

# A quota is a full disk too, as far as the user is concerned.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SAYS_FULL = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# Less than this free on the file system when a write fails: the write failed for want of
# space (a write that runs out fills the disk to within a block or two first).
ALMOST_FULL = 1 << 20


@dataclass(frozen=True)
class Space:
    """The file system holding a folder: bytes free to this process's user, and its size."""

    free: int
    total: int


def space_of(folder: Path) -> Space | None:
    """The file system holding `folder` (or its nearest existing parent); None if unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return Space(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def says_full(error: BaseException) -> bool:
    """Whether `error`, or an error it came from, reports a full disk or an exceeded quota."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(s in str(e).lower() for s in _SAYS_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a write into `folder` that failed with `error` failed for want of space. Call
    it before removing what the failed write left: that is what fills the disk."""
    if says_full(error):
        return True
    space = space_of(folder)
    return space is not None and space.free < ALMOST_FULL


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def disk_full(shown: str, doing: str, space: Space | None) -> DiskFull:
    """The error for a write that ran out of space: `shown` is the folder as the data folder
    names it ("loras/x/"), `doing` what was being written ("saving checkpoint-20")."""
    where = f" (its file system holds {human_bytes(space.total)})" if space is not None else ""
    return DiskFull(f"no space left on the device while {doing} in {shown}{where}")
