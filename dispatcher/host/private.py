"""The data folder's private parts: secrets made once, file modes, and who else may write there.

The fleet's OS user is the only one that may read Redis's password and append-only file, the
accounts file, the session key and the dashboard token: any of them hands out the fleet. Other
local accounts may be able to list the data folder, never to read or replace these.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

from formats.files import atomic_write

# Files readable by the fleet's OS user only (0600), by name in the data folder.
PRIVATE_FILES = (".redis_password", ".secret_key", ".dashboard_token", "accounts.json",
                 "accounts.lock")
# Folders only the fleet's OS user may enter (0700); everything directly inside is 0600.
# logs/: a request line of the dashboard's log may hold the token of the URL `up` prints.
PRIVATE_DIRS = ("redis", "logs")


def make_folder(path: Path) -> None:
    """Make `path` (and its parents) if missing, the new folder the fleet's OS user's alone
    (0700): the data folder made by whichever command comes first (`up`, `user add`, …)."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_private(path: Path) -> str:
    """`path`'s text, never through a link (a link put in place of a private file could hand
    out another file, or make us read one that is not the fleet's). FileNotFoundError when
    there is none; OSError (ELOOP) when it is a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def read_secret(path: Path) -> str:
    """The secret in `path`, or "" when there is none (no file, an empty one, a link, or one
    this OS user may not read)."""
    try:
        return read_private(Path(path)).strip()
    except OSError:
        return ""


def write_private(path: Path, text: str, *, replace: bool = True) -> bool:
    """Put `text` in `path`, readable by this OS user only from the first byte on (0600), whole
    (formats.files.atomic_write: never through a file someone else made or linked there). With
    replace=False an existing `path` is kept (the first writer wins) and False is returned."""
    return atomic_write(Path(path), text, mode=0o600, replace=replace)


def secret_file(path: Path, nbytes: int = 32) -> str:
    """The secret kept in `path`, made once at random (mode 0600) if there is none yet.

    The first writer wins and everyone uses that secret. A file this OS user may not read
    raises PermissionError, and a link in its place OSError: it is not ours, never replaced."""
    path = Path(path)
    try:
        value = read_private(path).strip()
    except FileNotFoundError:
        value = ""
    if value:
        return value
    make_folder(path.parent)
    made = secrets.token_urlsafe(nbytes) + "\n"
    if not write_private(path, made, replace=False) and not read_private(path).strip():
        write_private(path, made)  # an empty file left by a crash: replace it
    return read_private(path).strip()


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


def private_group(gid: int) -> bool:
    """True when group `gid` is this OS user's own (per-user) group: its primary group, named
    like the user, with no other members. Group rights on it reach nobody else (distros with
    user private groups and umask 002 make every folder group-writable)."""
    try:
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return me.pw_gid == gid and group.gr_name == me.pw_name and not group.gr_mem


def _others_bits(st: os.stat_result, group_bits: int, other_bits: int) -> int:
    """The bits of `st` that reach other OS users: the group's count unless it is ours alone."""
    bits = st.st_mode & other_bits
    if st.st_mode & group_bits and not private_group(st.st_gid):
        bits |= st.st_mode & group_bits
    return bits


def _private_file_warnings(home: Path) -> list[str]:
    """A private file (or folder) that is a link, or that another OS user owns: the fleet
    neither reads nor tightens it, and someone else may be reading what it holds."""
    out: list[str] = []
    me = os.geteuid()
    for name in PRIVATE_FILES + PRIVATE_DIRS:
        path = home / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            out.append(f"{path} is a link (to {os.readlink(path)}); private files must be "
                       f"plain files of yours: remove the link (rm {path})")
        elif st.st_uid != me:
            out.append(f"{path} belongs to another OS user (uid {st.st_uid}), who can read "
                       f"it; remove it so that the fleet makes its own (rm -r {path})")
    return out


def readable_note(home: Path) -> str:
    """One line when other OS users may read the data folder (datasets, LoRAs, models, logs,
    evaluations.csv: everything but its private files), else "". Not a warning: a team may
    want to share models, so the folder is left as its owner made it."""
    try:
        st = home.stat()
    except FileNotFoundError:
        return ""
    if not _others_bits(st, stat.S_IRGRP | stat.S_IXGRP, stat.S_IROTH | stat.S_IXOTH):
        return ""
    return (f"other OS users can read the data folder {home} (datasets, LoRAs, models, logs, "
            f"evaluations.csv; not its private files); to close it: chmod 700 {home}")


def exposure_warnings(home: Path) -> list[str]:
    """One line per way another OS user could change the data folder under the fleet: the
    folder itself writable by group or others (or not ours), or a folder above it that they
    could write without the sticky bit (they could rename the data folder away and put their
    own in its place); a private file that is a link or someone else's. A sticky folder like
    /tmp only lets its owner rename what is ours. A group that is the user's own private
    group counts as the user."""
    out: list[str] = []
    try:
        st = home.stat()
    except FileNotFoundError:
        return out
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        out.append(f"the data folder {home} belongs to another OS user (uid {st.st_uid}), who "
                   "can read and change everything in it; use a folder of your own")
    if _others_bits(st, stat.S_IWGRP, stat.S_IWOTH):
        out.append(f"the data folder {home} can be written by other OS users; "
                   f"fix: chmod g-w,o-w {home}")
    out += _private_file_warnings(home)
    for parent in home.parents:
        try:
            pst = parent.stat()
        except OSError:
            continue
        if _others_bits(pst, stat.S_IWGRP, stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            out.append(f"{parent} (above the data folder) can be written by other OS users, "
                       f"who could replace the data folder; fix: chmod g-w,o-w {parent}")
        if pst.st_uid not in (me, 0):
            out.append(f"{parent} (above the data folder) belongs to another OS user "
                       f"(uid {pst.st_uid}), who could replace the data folder")
    return out


# -- who listens on a port (Linux) --------------------------------------------------------------
def _proc_addr(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return ipaddress.ip_address(raw[::-1])
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def _listening(table: Path, port: int) -> list[tuple[Any, int]]:
    """(address, uid) of every socket in LISTEN state on `port` in one /proc/net table."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        f = line.split()
        if len(f) < 8 or f[3] != "0A":  # 0A: LISTEN
            continue
        hexaddr, hexport = f[1].split(":")
        if int(hexport, 16) == port:
            out.append((_proc_addr(hexaddr), int(f[7])))
    return out


def _receivers(target: Any, v4: list[tuple[Any, int]], v6: list[tuple[Any, int]]) -> set[int]:
    """The uids of the sockets a connection to `target` reaches, as the kernel picks them: a
    listener on the exact address before a wildcard one of the same family; for an IPv4
    address with no IPv4 listener, an IPv6 one (v4-mapped, or the dual-stack wildcard). So an
    IPv6-only wildcard socket that another user binds beside the fleet's 127.0.0.1 listener is
    not mistaken for it: while an IPv4 listener holds the port, IPv4 connections go there."""
    same = v4 if target.version == 4 else v6
    for pick in (lambda a: a == target, lambda a: a.is_unspecified):
        found = {uid for addr, uid in same if pick(addr)}
        if found:
            return found
    if target.version == 4:
        for pick in (lambda a: getattr(a, "ipv4_mapped", None) == target,
                     lambda a: a.is_unspecified):
            found = {uid for addr, uid in v6 if pick(addr)}
            if found:
                return found
    return set()


def listener_uids(host: str, port: int) -> set[int] | None:
    """OS user ids of the sockets listening where host:port connects; None where unknown
    (no /proc/net/tcp, or a host name that does not resolve)."""
    if not Path("/proc/net/tcp").exists():
        return None
    try:
        targets = {ipaddress.ip_address(a[4][0].split("%")[0])
                   for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError):
        return None
    v4 = _listening(Path("/proc/net/tcp"), port)
    v6 = _listening(Path("/proc/net/tcp6"), port)
    uids: set[int] = set()
    for target in targets:
        uids |= _receivers(target, v4, v6)
    return uids


def foreign_listener(host: str, port: int) -> int | None:
    """The uid of another OS user's socket listening at host:port, or None (nobody listens,
    only this user does, or it cannot be told: not Linux). A secret sent there would go to
    whoever took the port while the fleet's own server was down."""
    uids = listener_uids(host, port)
    others = sorted((uids or set()) - {os.geteuid()})
    return others[0] if others else None
