"""The single-user dashboard's token, the way Jupyter does it on a shared machine.

With no accounts the dashboard serves only loopback, which every local OS account can reach, so
it also wants a token: made once at random in the data folder (`.dashboard_token`, mode 0600)
and printed by `lorafleet up` as part of the dashboard's URL. Whoever can read the data folder's
private files is the fleet's owner; nobody else gets in.

The CLI finds the token by itself, and only ever sends it to the URL it belongs to:
- the data folder's own dashboard (`$LORAFLEET_HOME`, default ./lorafleet-data, and its
  LORAFLEET_HOST/PORT), or
- an entry of the per-user registry (`~/.config/lorafleet/dashboards.json`, 0600), which every
  dashboard writes when it starts: URL -> path of its token file. It holds paths, not tokens:
  the secret stays in one place, and replacing the token file needs no second edit.
On Linux it also checks that the socket listening on that port belongs to the same OS user, so
another account that took the port while the fleet was down never receives the token.
Loopback names (localhost, 127.0.0.1, [::1]) count as one host when a URL is matched.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from dispatcher.host.private import (
    foreign_listener,
    read_secret,
    secret_file,
    write_private,
)
from dispatcher.settings import Settings, config_home

TOKEN_FILE = ".dashboard_token"


def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def dashboard_token(home: Path) -> str:
    """The data folder's token, made now if there is none."""
    return secret_file(token_path(home), 32)


def read_token(home: Path) -> str:
    """The data folder's token, or "" (none yet, or not readable by this OS user)."""
    return read_secret(token_path(home))


def fingerprint(token: str) -> str:
    """What a session keeps of the token: replacing the token file ends those sessions."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def tokens_match(sent: str | None, want: str) -> bool:
    return bool(sent and want) and hmac.compare_digest(sent.encode(), want.encode())


# -- URLs ---------------------------------------------------------------------------------------
# Names of this machine's loopback: one dashboard on 127.0.0.1 is reached as any of them
# (LORAFLEET_URL=http://localhost:8765), and the listener check guards where the token goes.
LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")


def normal_url(url: str) -> str:
    """scheme://host:port of `url`, lower-case, with the default port filled in and loopback
    names written as 127.0.0.1."""
    parts = urlsplit(url.strip())
    scheme = (parts.scheme or "http").lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 0
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in LOOPBACK else host
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def own_url(settings: Settings) -> str:
    host = settings.dashboard_host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{settings.dashboard_port}"


def printed_url(settings: Settings, token: str) -> str:
    """What `lorafleet up` prints: opening it logs the browser in (single-user mode)."""
    return f"{own_url(settings)}/?token={token}"


def url_to_open(settings: Settings) -> str:
    """The URL to open: with the token in single-user mode (opening it logs the browser in),
    the plain one with accounts."""
    from dispatcher.access.accounts import Accounts

    if Accounts(settings.home).has_users():
        return own_url(settings) + "/"
    return printed_url(settings, dashboard_token(settings.home))


# -- the per-user registry ----------------------------------------------------------------------
def registry_path(env: Mapping[str, str] | None = None) -> Path:
    return config_home(env) / "lorafleet" / "dashboards.json"


def _registry(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(settings: Settings, env: Mapping[str, str] | None = None) -> None:
    """Record (for this OS user's CLI) which token file belongs to this dashboard's URL.
    Under a lock next to the registry: two dashboards starting at once both stay in it."""
    path = registry_path(env)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(path.with_name(path.name + ".lock"),
                   os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _registry(path)
        data[normal_url(own_url(settings))] = {"token_file": str(token_path(settings.home))}
        write_private(path, json.dumps(data, indent=1, sort_keys=True))
    finally:
        os.close(lock)  # closing releases the lock


def token_for(url: str, env: Mapping[str, str] | None = None) -> str:
    """The token this OS user holds for the dashboard at `url`, or "" if none belongs to it."""
    want = normal_url(url)
    local = Settings.from_env(env)  # $LORAFLEET_HOME, else ./lorafleet-data
    entry = _registry(registry_path(env)).get(want) or {}
    files = []
    if local.home_given and normal_url(own_url(local)) == want:
        files.append(token_path(local.home))
    if isinstance(entry.get("token_file"), str):
        files.append(Path(entry["token_file"]))
    if normal_url(own_url(local)) == want:
        files.append(token_path(local.home))
    for f in files:
        token = read_secret(f)
        if token:
            # The URL as given: it is where the token goes ([::1] is not 127.0.0.1's socket).
            return token if listener_is_mine(url) else ""
    return ""


# -- who listens on a port (Linux; the reading of /proc is in dispatcher.host.private) ---------------
def listener_is_mine(url: str) -> bool:
    """False when a socket of another OS user listens at `url` (where the token would go)."""
    parts = urlsplit(url)
    return foreign_listener(parts.hostname or "", parts.port or 80) is None
