"""The lock on a LoRA folder: loras/<lora_name>/.lock, an exclusive flock.

A training process takes it before it reads anything in the LoRA folder and holds it until it
has saved (gpuworker.engine.folder); the kernel drops it when the process ends, however it
ends, so a lock is never left behind by a killed process. What removes the half-saved work of
a process that died (gpuworker.checkpoints.clear_staging) runs only while holding it: a live
process's staging folders are never taken for a dead one's, and a second job on the same LoRA
finds the lock held and waits for it (or is refused) instead of clearing the first one's
files.

The holder writes who it is into the file (one JSON object: job, pid, host, what it does), so
whoever finds the lock held can say by whom, and removes the file when it releases the lock: it
is there only while someone works in the folder (or after a holder died, until the next one).
A lock file left by a process of another OS user (one this user may only read) still gives
the lock: a read-only descriptor takes a flock too, and the file is replaced by one of this
user's where the folder lets it.
It is hidden, and the LoRA's own files are untouched (text-generation-webui and peft read only
theirs). No torch: the worker's main process clears folders too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import weakref
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"

# Locks this process holds: a process forked from it (a data loader, a compile worker) must
# not keep one alive after this process dies, so the forked child closes its copies at once.
# (Weak: a lock dropped without release is closed by its __del__.)
_held: weakref.WeakSet[FolderLock] = weakref.WeakSet()


class FolderLock:
    """A held lock on one LoRA folder; `release` (or leaving a `with` block) drops it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        _held.add(self)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (closing the only descriptor of the open
        file drops the flock): a folder nobody works in has no lock file. Removing it while
        still holding it is safe: whoever opened it meanwhile and locks it after us finds the
        name gone or naming another file (try_lock checks), and tries again."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        _held.discard(self)
        try:
            if _same_file(self.path, fd):
                self.path.unlink()
        except OSError:  # (the folder went away, or became unwritable: the lock drops anyway)
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit; the kernel drops it anyway
            pass


def _close_in_child() -> None:
    for lock in list(_held):
        try:
            os.close(lock.fd)
        except OSError:
            pass
        lock.fd = -1
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def me(job: str = "", doing: str = "training") -> dict[str, Any]:
    """What a holder writes into the lock file."""
    return {"job": job, "pid": os.getpid(), "host": socket.gethostname(), "doing": doing}


def try_lock(lora_dir: Path, holder: dict[str, Any]) -> FolderLock | None:
    """The lock on `lora_dir` (which must exist), or None when another process holds it.
    Never waits. `holder` (see `me`) is written into the lock file once it is ours."""
    path = lora_dir / LOCK_NAME
    while True:
        fd, writable = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The file may have been removed (by the holder before us, releasing) and made again
        # by someone else between our open and our lock: the lock counts only on the file the
        # name names now.
        if not _same_file(path, fd):
            os.close(fd)
            continue
        if not writable:
            # Ours, on a file another OS user's process left: who holds it cannot be written
            # into it. Its name is removed while it is held (as `release` does) and the lock
            # taken again on a file of our own; where the folder does not let us remove it,
            # the lock is held on this file as it is.
            try:
                path.unlink()
            except OSError:
                return FolderLock(path, fd)
            os.close(fd)
            continue
        lock = FolderLock(path, fd)
        try:
            data = json.dumps(holder).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            lock.release()
            raise
        return lock


def _open(path: Path) -> tuple[int, bool]:
    """The lock file, made if missing, and whether it is open for writing: read-only where
    its mode lets this OS user only read it (flock does not need a writable descriptor)."""
    # O_NOFOLLOW: a link planted under the name is refused (ELOOP), never followed.
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666), True
    except PermissionError as refused:
        try:
            return os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:  # none to lock, and none may be made here
            raise refused from None


def _same_file(path: Path, fd: int) -> bool:
    """Does `path` (not followed) name the file open as `fd`?"""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def holder_of(lora_dir: Path) -> dict[str, Any]:
    """What the lock's holder wrote ({} when unreadable: none yet, or being written)."""
    try:
        fd = os.open(lora_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as f:
            got = json.loads(f.read(4096) or "{}")
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}
