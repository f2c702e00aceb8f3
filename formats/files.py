"""The one way lorafleet writes a file of the data folder: whole or not at all.

Every write goes to a temporary file beside the target, reaches the disk (fsync), gets its mode,
and then takes the target's name in one step, so a reader (another process, a crash, a full
disk) sees the old file or the new one, never half of one. `replace=False` refuses to replace an
existing file (a hard link, which fails when the name is taken, instead of a rename).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def umask_mode(kind: int = 0o666) -> int:
    """The mode an ordinary write would give (`kind` less the process's umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return kind & ~umask


def atomic_write(path: Path, data: bytes | str, *, mode: int | None = None,
                 replace: bool = True) -> bool:
    """Write `data` to `path` whole. `mode`: the file's mode (default: 0666 less the umask, as
    any ordinary write; 0o600 for a private file, which is never readable by others, not even
    for a moment). Returns False, writing nothing, when `replace` is False and `path` exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short name beside the target (not the target's name with a suffix), so a file whose
    # own name is near the file system's limit (255 bytes) can still be written.
    tmp = path.with_name(f".{secrets.token_hex(8)}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the target's name
        os.chmod(tmp, umask_mode() if mode is None else mode)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any, *, mode: int | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n", mode=mode)
