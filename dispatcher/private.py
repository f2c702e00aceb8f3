"""The data folder's private parts: secrets made once, file modes, and who else may write there.

The fleet's OS user is the only one that may read Redis's password and append-only file, the
accounts file, the session key and the dashboard token: any of them hands out the fleet. Other
local accounts may be able to list the data folder, never to read or replace these.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

# Files readable by the fleet's OS user only (0600), by name in the data folder.
PRIVATE_FILES = (".redis_password", ".secret_key", ".dashboard_token", "accounts.json",
                 "accounts.lock")
# Folders only the fleet's OS user may enter (0700); everything directly inside is 0600.
PRIVATE_DIRS = ("redis",)


def read_secret(path: Path) -> str:
    """The secret in `path`, or "" when there is none (no file, an empty one, or one this OS
    user may not read)."""
    try:
        return Path(path).read_text().strip()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return ""


def secret_file(path: Path, nbytes: int = 32) -> str:
    """The secret kept in `path`, made once at random (mode 0600) if there is none yet.

    Written whole to a temporary file, then linked into place: another process sees either no
    file or a whole one; the first link wins and everyone uses that secret. A file this OS user
    may not read raises PermissionError: it is someone else's, and is never replaced."""
    path = Path(path)
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(nbytes) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        if not path.read_text().strip():  # an empty file left by a crash: replace it
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def _chmod_own(path: Path, mode: int) -> bool:
    """Set `path`'s mode if it is ours and not a link; True when it changed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return False
    if stat.S_IMODE(st.st_mode) == mode:
        return False
    os.chmod(path, mode)
    return True


def tighten(home: Path) -> list[Path]:
    """Make the data folder's private files 0600 and private folders (and their files) 0700 /
    0600; returns what changed (files made by an older version or with a loose umask)."""
    changed = [home / n for n in PRIVATE_FILES if _chmod_own(home / n, 0o600)]
    for name in PRIVATE_DIRS:
        folder = home / name
        if _chmod_own(folder, 0o700):
            changed.append(folder)
        if folder.is_dir() and not folder.is_symlink():
            changed += [p for p in folder.iterdir() if p.is_file() and _chmod_own(p, 0o600)]
    return changed


def exposure_warnings(home: Path) -> list[str]:
    """One line per way another OS user could change the data folder under the fleet: the
    folder itself writable by group or others (or not ours), or a folder above it that they
    could write without the sticky bit (they could rename the data folder away and put their
    own in its place). A sticky folder like /tmp only lets its owner rename what is ours."""
    out: list[str] = []
    try:
        st = home.stat()
    except FileNotFoundError:
        return out
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        out.append(f"the data folder {home} belongs to another OS user (uid {st.st_uid}), who "
                   "can read and change everything in it; use a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        out.append(f"the data folder {home} can be written by other OS users; "
                   f"fix: chmod g-w,o-w {home}")
    for parent in home.parents:
        try:
            pst = parent.stat()
        except OSError:
            continue
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            out.append(f"{parent} (above the data folder) can be written by other OS users, "
                       f"who could replace the data folder; fix: chmod g-w,o-w {parent}")
        if pst.st_uid not in (me, 0):
            out.append(f"{parent} (above the data folder) belongs to another OS user "
                       f"(uid {pst.st_uid}), who could replace the data folder")
    return out
