"""Secrets made once at random and kept in the data folder, readable by the fleet's OS user only.

`secret_file(path)` returns the secret in `path`, making it first if there is none: written whole
to a temporary file (mode 0600) and then linked into place, so another process sees either no
file or a whole one, and when two start at once the first link wins and both use that secret.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_secret(path: Path) -> str:
    """The secret in `path`, or "" when there is none (no file, an empty one, or unreadable)."""
    try:
        return Path(path).read_text().strip()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return ""


def secret_file(path: Path, nbytes: int = 48) -> str:
    path = Path(path)
    value = read_secret(path)
    if value:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(nbytes))
    try:
        os.link(tmp, path)
    except FileExistsError:
        if not read_secret(path):  # an empty file left by a crash: replace it
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
