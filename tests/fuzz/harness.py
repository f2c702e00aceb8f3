"""The fuzz properties' fleet: a dashboard over a seeded data folder and a real Redis server, the
requests sent to it, the snapshot a refusal must leave unchanged, and the checks every answer
gets.

A `Fleet` is one dashboard app (Flask's test client; a real Redis server under its own key
prefix) in single-user or accounts mode, seeded with what a team's fleet holds: jobs of every
kind and state by several owners, a sweep, evaluation rows, uploaded files, a trained LoRA, and
links that lead out of the data folder (to a folder whose "secret" must never be served).

What a refusal may write (`REFUSAL_MAY_WRITE`), and why:
- `{prefix}:login-failures:name:*` and `{prefix}:login-failures:address:*`: every login attempt
  is counted *before* the password is checked (README, Accounts: Throttle), so a wrong password
  (401) or a throttled one (429) adds to these counters. That is the throttle working.
- `{prefix}:token-failures:address:*`: a wrong dashboard token in single-user mode is counted
  per address the same way (README, Accounts).
- Deleting `{prefix}:session:*` (and the id from `{prefix}:sessions:*`): a request that carries
  a session which has ended (logout, a password or role change, a removed account, a replaced
  dashboard token) has that session removed before it is refused. Only deletions, and only of
  a session that had already ended before the request (the snapshot asks the dashboard's own
  validity checks, `account_of` / `token_session_ok`): a refusal never creates or changes a
  session, and never ends a live one.
Nothing else, in Redis or the data folder (files, folders, sizes, mtimes), may change. The
folder outside the data folder (`outside/`, which links in the data folder lead to) may not
change at all, whatever the answer: `outside_changes`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import secrets
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from dashboard.app import SECURITY_HEADERS, create_app
from dashboard.sessions import Sessions, account_of, token_session_ok
from dispatcher.access.accounts import Accounts
from dispatcher.access.dashtoken import fingerprint, read_token
from dispatcher.jobs.evaltable import EvalTable
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from tests.datafolder import PASSWORD, small_data_folder

MEMBERS = ("bo", "cy")
ADMIN = "ana"
SINGLE_USER, ACCOUNTS = "single-user", "accounts"

# Refusals may change these keys (see the module's doc): a pattern on the key without the
# prefix, and whether it may be created/changed ("write") or only deleted ("delete").
REFUSAL_MAY_WRITE = (
    (re.compile(r"^login-failures:(name|address):"), "write"),
    (re.compile(r"^token-failures:address:"), "write"),
    (re.compile(r"^sessions?:"), "delete an ended session"),
)

TRACEBACK = re.compile(
    rb"Traceback \(most recent call last\)|File \"[^\"\n]+\", line \d+|"
    rb"werkzeug\.exceptions\.|jinja2\.exceptions\.|UndefinedError|"
    rb"\b(?:KeyError|TypeError|AttributeError|IndexError|UnicodeEncodeError|"
    rb"UnicodeDecodeError|RecursionError|OverflowError|ZeroDivisionError)\b")

OUTSIDE_SECRET = "OUTSIDE-THE-DATA-FOLDER-" + "5ecret"


# -- the seeded fleet ---------------------------------------------------------------------------
@dataclass
class Fleet:
    """A dashboard app over a seeded data folder, and what the fuzz strategies draw names from."""

    mode: str
    app: Any
    settings: Any
    raw: Any  # a Redis client without decoding: DUMP values are bytes
    home: Path
    prefix: str
    outside: Path
    api_tokens: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)  # label -> job id
    job_owner: dict[str, str] = field(default_factory=dict)  # job id -> owner
    sweeps: dict[str, str] = field(default_factory=dict)  # label -> sweep id
    eval_rows: dict[str, str] = field(default_factory=dict)  # label -> row id
    owned_files: dict[str, str] = field(default_factory=dict)  # rel path -> owner
    loras: dict[str, str] = field(default_factory=dict)  # lora name -> owner
    browser_sessions: dict[str, tuple[str, str]] = field(default_factory=dict)
    strategies: dict[Any, Any] = field(default_factory=dict)  # built once per fleet

    @functools.cached_property
    def r(self) -> Any:
        """A decoding Redis client of the fleet's server (one connection pool for the run)."""
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def __repr__(self) -> str:
        return f"Fleet({self.mode}, {self.home})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))  # what hypothesis prints of a failing example's fixtures

    # names the strategies use
    @property
    def users(self) -> tuple[str, ...]:
        return (ADMIN, *MEMBERS) if self.mode == ACCOUNTS else ("local", *MEMBERS)

    @property
    def dashboard_token(self) -> str:
        return read_token(self.home)

    def secrets(self) -> dict[str, str]:
        """What no answer may hold unless the request itself sent it: the data folder's private
        files, the users' API tokens and password hashes, server-side session ids, the text of
        a file outside the data folder."""
        out = {"dashboard token": self.dashboard_token,
               "secret key": (self.home / ".secret_key").read_text().strip(),
               "redis password": self.settings.redis_url.split(":", 2)[2].split("@")[0],
               "outside file": OUTSIDE_SECRET, "password": PASSWORD}
        for user, token in self.api_tokens.items():
            out[f"API token of {user}"] = token
        accounts = self.home / "accounts.json"
        if accounts.exists():
            for name, u in json.loads(accounts.read_text()).get("users", {}).items():
                out[f"password hash of {name}"] = u["password"].rsplit("$", 1)[-1]
                for i, t in enumerate(u.get("tokens", [])):
                    out[f"token digest {i} of {name} ({t.get('label')})"] = t["sha256"]
        for key in self.raw.scan_iter(match=f"{self.prefix}:session:*", count=1000):
            sid = key.decode().rsplit(":", 1)[1]
            out[f"session id {sid[:6]}..."] = sid
        return {k: v for k, v in out.items() if v and len(v) >= 8}

    def session_check(self) -> Any:
        """Whether the dashboard would take a session (its record) now: its own checks, in the
        mode the data folder is in (accounts once there is one; dashboard/auth.py,
        dashboard/solo.py)."""
        accounts = Accounts(self.home)
        if accounts.has_users():
            return lambda record: account_of(record, accounts) is not None
        token = self.dashboard_token
        return lambda record: token_session_ok(record, fingerprint(token) if token else "")

    # who asks
    def bearer(self, user: str) -> str:
        """The token `user` sends: the dashboard token in single-user mode, else their own."""
        return self.dashboard_token if self.mode == SINGLE_USER else self.api_tokens[user]

    def browser_session(self, user: str) -> tuple[str, str]:
        """A server-side session of `user` (as a login or `?token=` makes it) and its CSRF
        token, for a browser-like client: the one made before while it still counts (so the
        fuzz does not pile up sessions), else a new one."""
        s = Sessions(self.r, self.prefix)
        kept = self.browser_sessions.get(user)
        if kept:
            record = s.get(kept[0])
            if record and (account_of(record, Accounts(self.home)) if self.mode == ACCOUNTS
                           else token_session_ok(record, fingerprint(self.dashboard_token))):
                return kept
        if self.mode == ACCOUNTS:
            sid = s.for_account(Accounts(self.home).get(user))
        else:
            sid = s.for_token(fingerprint(self.dashboard_token))
        self.browser_sessions[user] = (sid, secrets.token_urlsafe(32))
        return self.browser_sessions[user]

    def session_user(self, user: str) -> str:
        """Whose browser session a request of `user` carries (single-user mode: the one
        token session, whatever name the request gives)."""
        return user if self.mode == ACCOUNTS else "local"

    def other_session_user(self, user: str) -> str:
        """Whose session's CSRF token a request of `user` with "another session's" token
        sends: another user's (single-user mode: another browser's token session)."""
        if self.mode == SINGLE_USER:
            return "another tab"
        return next(u for u in self.users if u != user)

    def heal(self) -> None:
        """Undo what earlier examples did to the fleet's people (not to its jobs or files):
        the single-user fleet keeps no accounts (its admin may make the first one), the accounts
        fleet keeps ana (admin), bo and cy (members) and their API tokens."""
        acc = Accounts(self.home)
        if self.mode == SINGLE_USER:
            if acc.has_users():
                (self.home / "accounts.json").unlink()
            self.browser_session("local")
            self.browser_session(self.other_session_user("local"))
            return
        for user in self.users:
            want = "admin" if user == ADMIN else "member"
            account = acc.get(user)
            if account is None:
                acc.add(user, PASSWORD, want)
            elif account.role != want:
                acc.set_role(user, want)
            if acc.for_token(self.api_tokens.get(user, "")) is None:
                self.api_tokens[user] = acc.new_token(user, "fuzz")
        for user in self.users:
            self.browser_session(user)  # made before a request's snapshot, not inside it


def _outside_links(home: Path, outside: Path) -> None:
    """Links in the data folder that lead out of it (and one that leads to a private file)."""
    (home / "datasets" / "outside.json").symlink_to(outside / "secret.json")
    (home / "datasets" / "outside.txt").symlink_to(outside / "secret.txt")
    (home / "datasets" / "outside-dir").symlink_to(outside)
    (home / "formats" / "outside-format.json").symlink_to(outside / "secret.json")
    (home / "formats" / "token-format.json").symlink_to(home / ".dashboard_token")
    (home / "loras" / "escape").symlink_to(outside)
    (home / "models" / "escape").symlink_to(outside)
    (home / "datasets" / "inside.json").symlink_to("d.json")  # stays inside: allowed


def _lora_folder(folder: Path, outside: Path, rank: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16}))
    (folder / "training_log.json").write_text(json.dumps({"current_steps": 3}))
    (folder / "training_parameters.json").write_text(json.dumps(
        {"lora_name": folder.name, "lora_rank": rank, "base_model": "tiny", "dataset": "d",
         "format": "alpaca-format"}))
    (folder / "checkpoint-2").mkdir(exist_ok=True)
    (folder / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\x01" * 16)
    (folder / "leak").symlink_to(outside / "secret.txt")  # a zip must not follow it


def build_fleet(root: Path, redis_url: str, prefix: str, mode: str) -> Fleet:
    """A seeded fleet under `root` (the data folder is root/home; root/outside is outside it)."""
    outside = root / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.json").write_text(json.dumps([{"instruction": OUTSIDE_SECRET,
                                                      "output": OUTSIDE_SECRET}]))
    (outside / "secret.txt").write_text(OUTSIDE_SECRET + "\n")
    s = small_data_folder(root / "home", redis_url, prefix, users=mode == ACCOUNTS, files={
        "datasets/notes.txt": "raw text\nmore raw text\n",
        "datasets/rows.jsonl": json.dumps({"instruction": "a", "output": "b"}) + "\n",
        "datasets/books/a.txt": "a book\n",
        "formats/my-format.json": json.dumps({"instruction,output": "%instruction%\n%output%"}),
    })
    app = create_app({"LORAFLEET_SETTINGS": s, "TESTING": False, "LORAFLEET_SSE_BLOCK_MS": 20,
                      "LORAFLEET_SSE_GRACE_MS": 10, "LORAFLEET_PREVIEW_TIMEOUT_S": 120})
    fleet = Fleet(mode=mode, app=app, settings=s, raw=redis.Redis.from_url(redis_url),
                  home=s.home, prefix=prefix, outside=outside)
    _outside_links(s.home, outside)
    if mode == ACCOUNTS:
        acc = Accounts(s.home)
        for user in fleet.users:
            fleet.api_tokens[user] = acc.new_token(user, "fuzz")
    _seed(fleet)
    return fleet


def _api(fleet: Fleet, user: str, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {fleet.bearer(user)}"}
    if fleet.mode == SINGLE_USER:
        headers["X-Lorafleet-User"] = user
    client = fleet.app.test_client(use_cookies=False)
    resp = client.open(path, method=method, headers=headers, **kw)
    assert resp.status_code < 300, (path, resp.status_code, resp.get_data(as_text=True))
    return resp.get_json()


def _seed(fleet: Fleet) -> None:
    """Jobs, a sweep, files, a LoRA and evaluation rows of two members and an admin (single-user
    mode: of the names the local admin submits for)."""
    a, b, c = fleet.users  # admin (or local), bo, cy
    store = JobStore(redis.Redis.from_url(fleet.settings.redis_url, decode_responses=True),
                     fleet.prefix)

    def upload(user: str, name: str, text: str, kind: str = "") -> None:
        _api(fleet, user, "POST", "/api/v1/datasets", data={
            "file": (io.BytesIO(text.encode()), name), "kind": kind})
        folder = "formats" if kind == "format" or name.endswith("-format.json") else "datasets"
        fleet.owned_files[f"{folder}/{name}"] = user

    rows = json.dumps([{"instruction": "hi", "output": "yo"}, {"instruction": "a", "output": "b"}])
    upload(b, f"{b}-data.json", rows)
    upload(c, f"{c}-data.json", rows)
    upload(c, f"{c}-notes.txt", "some raw text\n")
    upload(c, f"{c}-format.json", json.dumps({"instruction,output": "%instruction% %output%"}))

    def submit(user: str, label: str, kind: str = "train", priority: str = "normal",
               **spec: Any) -> str:
        base = {"train": {"lora_name": f"{label}", "base_model": "tiny", "dataset": "d.json",
                          "format": "alpaca-format", "epochs": 1},
                "evaluate": {"base_model": "tiny", "text_file": "notes.txt"},
                "generate": {"base_model": "tiny", "prompt": "hello"}}[kind]
        body = {"kind": kind, "spec": {**base, **spec}, "priority": priority}
        job_id = _api(fleet, user, "POST", "/api/v1/jobs", json=body)["id"]
        fleet.jobs[label] = job_id
        fleet.job_owner[job_id] = user
        if kind == "train":
            fleet.loras[spec.get("lora_name", label)] = user
        return job_id

    def move(job_id: str, *states: JobState, **fields: Any) -> None:
        for st in states:
            store.transition(job_id, st, reason="seeded", **fields)

    for user in (a, b, c):
        submit(user, f"{user}-queued")
    submit(a, f"{a}-urgent", priority="urgent" if fleet.mode == ACCOUNTS else "high")
    move(submit(c, f"{c}-running"), JobState.ASSIGNED, JobState.RUNNING, worker="gpu0")
    done = submit(c, f"{c}-lora")
    move(done, JobState.ASSIGNED, JobState.RUNNING, JobState.SUCCEEDED, worker="gpu0")
    _lora_folder(fleet.home / "loras" / f"{c}-lora", fleet.outside)
    move(submit(b, f"{b}-failed"), JobState.ASSIGNED, JobState.FAILED, worker="gpu1")
    move(submit(b, f"{b}-cancelled"), JobState.CANCELLED)
    ev = submit(c, f"{c}-eval", kind="evaluate", loras=[f"{c}-lora"])
    move(ev, JobState.ASSIGNED, JobState.RUNNING, JobState.SUCCEEDED, worker="gpu0")
    submit(b, f"{b}-generate", kind="generate")
    sweep = _api(fleet, c, "POST", "/api/v1/sweeps", json={
        "name": f"{c}-sweep", "base": {"lora_name": f"{c}-sw", "base_model": "tiny",
                                       "dataset": "d.json", "format": "alpaca-format"},
        "parameters": {"lora_rank": [4, 8]}, "method": "grid", "max_concurrent": 1})
    fleet.sweeps[f"{c}-sweep"] = sweep["id"]
    for t in sweep["trials"]:
        fleet.loras[t["name"]] = c
    table = EvalTable(fleet.home / "evals" / "evaluations.csv")
    fleet.eval_rows[f"{c}-row"] = table.add(
        base_model="tiny", loras=[f"{c}-lora"], text_file="notes.txt", perplexity=3.5,
        stride=512, max_length=0, tokens=10, job=ev, comment="cy's")["id"]
    fleet.eval_rows["hand-row"] = table.add(
        base_model="tiny", loras=[], text_file="notes.txt", perplexity=4.0, stride=512,
        max_length=0, tokens=10, comment="by hand")["id"]
    # a LoRA put there by hand (no owner) and an unfinished checkpoint-only folder
    _lora_folder(fleet.home / "loras" / "by-hand", fleet.outside, rank=16)
    (fleet.home / "loras" / "half").mkdir()
    (fleet.home / "loras" / "half" / "checkpoint-1").mkdir()


# -- what a refusal must not change -------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    files: dict[str, tuple[int, int, int, int]]  # rel path -> (mtime_ns, size, inode, mode)
    keys: dict[bytes, Any]  # key (without prefix) -> (type, value)
    outside_keys: int  # keys of the database not under the prefix
    ended: frozenset[str] = frozenset()  # ids of sessions the dashboard would not take
    outside: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # outside/


def _read_all(r: Any, keys: list[bytes]) -> list[Any]:
    """Each key's value as a comparable value (hash and set contents sorted): Redis's own
    serialisation (DUMP) of a hash or set changes with its table's rehashing, without a write."""
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = pipe.execute()
    readers = {b"string": lambda p, k: p.get(k), b"hash": lambda p, k: p.hgetall(k),
               b"set": lambda p, k: p.smembers(k), b"list": lambda p, k: p.lrange(k, 0, -1),
               b"zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
               # (a stream is only appended to: its last entry shows a write)
               b"stream": lambda p, k: p.xrevrange(k, count=1)}
    for k, t in zip(keys, types, strict=True):
        readers.get(t, lambda p, k: p.exists(k))(pipe, k)
    out = []
    for t, v in zip(types, pipe.execute(), strict=True):
        if t == b"hash":
            v = sorted(v.items())
        elif t == b"set":
            v = sorted(v)
        out.append((t, v))
    return out


def _size(value: Any) -> int:
    """Bytes held by a value as _read_all returns it."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items())
    return len(str(value)) if value is not None else 0


def _walk(top: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file and folder under `top` (links not followed): rel path -> (mtime_ns, size,
    inode, mode)."""
    files = {}
    for root, dirs, names in os.walk(str(top)):
        for n in dirs + names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            files[os.path.relpath(p, top)] = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)
    return files


def snapshot(fleet: Fleet) -> Snapshot:
    pre = f"{fleet.prefix}:".encode()
    keys = list(fleet.raw.scan_iter(match=pre + b"*", count=5000))
    values = _read_all(fleet.raw, keys)
    total = fleet.raw.dbsize()
    by_key = {k[len(pre):]: v for k, v in zip(keys, values, strict=True)}
    valid = fleet.session_check()
    ended = frozenset(
        k[len(b"session:"):].decode("utf-8", "replace") for k, (t, v) in by_key.items()
        if k.startswith(b"session:") and not (
            t == b"hash" and valid({a.decode("utf-8", "replace"): b.decode("utf-8", "replace")
                                    for a, b in v})))
    return Snapshot(_walk(fleet.home), by_key, total - len(keys), ended, _walk(fleet.outside))


def outside_changes(fleet: Fleet, before: Snapshot) -> list[str]:
    """What changed in the folder outside the data folder since `before` (a request may never
    write there, whatever its answer): one line each."""
    now = _walk(fleet.outside)
    return [f"outside/{p}" for p in sorted(set(before.outside) | set(now))
            if before.outside.get(p) != now.get(p)]


@dataclass
class Changes:
    """What changed between two snapshots, less what a refusal may change."""

    files: list[str]
    keys: list[str]
    outside_keys: int
    bytes_written: int
    outside_files: list[str] = field(default_factory=list)  # under outside/: never allowed

    def __bool__(self) -> bool:
        return bool(self.files or self.keys or self.outside_keys > 0 or self.outside_files)

    def describe(self) -> str:
        return (f"files changed: {self.files}; Redis keys changed: {self.keys}; keys outside "
                f"the prefix added: {max(0, self.outside_keys)}; files outside the data "
                f"folder changed: {self.outside_files}; {self.bytes_written} bytes")


def _ended_only(removed: set[bytes], before: Snapshot) -> bool:
    """Every session id in `removed` belonged to a session that had ended before (or had no
    session left at all)."""
    return all(sid.decode("utf-8", "replace") in before.ended
               or b"session:" + sid not in before.keys for sid in removed)


def _may_change(key: bytes, old: Any, new: Any, before: Snapshot) -> bool:
    name = key.decode("utf-8", "replace")
    for pattern, how in REFUSAL_MAY_WRITE:
        if not pattern.match(name):
            continue
        if how == "write":
            return True
        if name.startswith("session:"):  # deleted, and it had ended before the request
            return new is None and name[len("session:"):] in before.ended
        # sessions:<user>: may only lose the ids of sessions that had ended
        had = set(old[1]) if old and old[0] == b"set" else set()
        has = set(new[1]) if new and new[0] == b"set" else set()
        return old is not None and (new is None or new[0] == b"set") and has <= had \
            and _ended_only(had - has, before)
    return False


def changes(before: Snapshot, after: Snapshot, strict: bool = False) -> Changes:
    """What changed, less what REFUSAL_MAY_WRITE allows (with `strict`: everything). A change
    under outside/ is always counted."""
    files = sorted(p for p in set(before.files) | set(after.files)
                   if before.files.get(p) != after.files.get(p))
    written = sum(after.files[p][1] for p in files
                  if p in after.files and not stat.S_ISDIR(after.files[p][3]))
    outside = sorted(p for p in set(before.outside) | set(after.outside)
                     if before.outside.get(p) != after.outside.get(p))
    written += sum(after.outside[p][1] for p in outside
                   if p in after.outside and not stat.S_ISDIR(after.outside[p][3]))
    keys = []
    for k in set(before.keys) | set(after.keys):
        old, new = before.keys.get(k), after.keys.get(k)
        if old != new and (strict or not _may_change(k, old, new, before)):
            keys.append(k.decode("utf-8", "replace"))
            written += _size(new[1]) if new else 0
    return Changes(files, sorted(keys), after.outside_keys - before.outside_keys, written,
                   [f"outside/{p}" for p in outside])


# -- one request --------------------------------------------------------------------------------
@dataclass
class Req:
    """One request as a client sends it."""

    method: str
    path: str  # quoted
    query: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    content_type: str | None = None
    who: str = "owner"  # see IDENTITIES
    user: str = ""  # whose credentials (accounts mode), or the X-Lorafleet-User (single-user)
    csrf: str = "right"  # right | missing | wrong | other (another session's)
    host: str = "localhost"
    remote_addr: str = "127.0.0.1"
    endpoint: str = ""

    def sent(self) -> bytes:
        """Everything the request carries, to tell an echo from a leak."""
        parts = [self.path.encode(), self.query, self.body or b""]
        parts += [f"{k}: {v}".encode("utf-8", "surrogatepass") for k, v in self.headers]
        return b"\n".join(parts)


# token: a bearer token (the dashboard's or the user's own); browser: a session cookie and its
# CSRF token (`csrf` says which); anonymous: nothing; wrong-token: a bearer nobody has;
# dashboard-token: the data folder's token, in accounts mode too (where it is refused).
IDENTITIES = ("token", "browser", "anonymous", "wrong-token", "dashboard-token")


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes
    mimetype: str


def send(fleet: Fleet, req: Req) -> Answer:
    client = fleet.app.test_client(use_cookies=req.who == "browser")
    headers = list(req.headers)
    names = {k.lower() for k, _ in headers}
    if req.who == "token" and "authorization" not in names:
        headers.append(("Authorization", f"Bearer {fleet.bearer(req.user or fleet.users[1])}"))
    elif req.who == "wrong-token" and "authorization" not in names:
        headers.append(("Authorization", "Bearer lf_" + "x" * 43))
    elif req.who == "dashboard-token" and "authorization" not in names:
        headers.append(("Authorization", f"Bearer {fleet.dashboard_token}"))
    if fleet.mode == SINGLE_USER and req.user and "x-lorafleet-user" not in names:
        headers.append(("X-Lorafleet-User", req.user))
    if req.who == "browser":
        user = fleet.session_user(req.user or fleet.users[1])
        sid, csrf = fleet.browser_session(user)
        with client.session_transaction(base_url=f"http://{req.host}") as sess:
            sess["sid"] = sid
            sess["csrf"] = csrf
            sess.permanent = True
        sent = {"right": csrf, "missing": None, "wrong": "x" * 43,
                "other": fleet.browser_session(fleet.other_session_user(user))[1]}[req.csrf]
        if sent is not None and "x-csrf-token" not in names:
            headers.append(("X-CSRF-Token", sent))
    resp = client.open(req.path, method=req.method, query_string=req.query.decode("latin-1"),
                       headers=headers,
                       data=req.body, content_type=req.content_type, buffered=False,
                       base_url=f"http://{req.host}",
                       environ_base={"REMOTE_ADDR": req.remote_addr})
    try:
        if resp.mimetype == "text/event-stream":
            body = b""
            for i, chunk in enumerate(resp.response):
                body += chunk if isinstance(chunk, bytes) else chunk.encode()
                if i >= 4 or len(body) > 256 * 1024:
                    break
        else:
            body = resp.get_data()
    finally:
        resp.close()
    return Answer(resp.status_code, resp.headers, body, resp.mimetype)


# -- the checks every answer gets ---------------------------------------------------------------
def _zip_text(body: bytes) -> bytes:
    """A zip's member names and contents, to look for what must not be in it."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            return b"\n".join([n.encode() for n in z.namelist()]
                              + [z.read(n) for n in z.namelist()])
    except zipfile.BadZipFile:
        return body


def check_answer(fleet: Fleet, req: Req, ans: Answer, secret_values: dict[str, str]) -> None:
    """The properties of every answer: below 500; no traceback; no secret the request did not
    send itself; every security header; a redirect only to this dashboard; a refusal under
    /api/ is JSON with one sentence and, for a 400, the problems by field; a refused page is a
    page with its message."""
    where = f"{req.method} {req.path}?{req.query!r} as {req.who}/{req.user}/{req.csrf}"
    assert ans.status < 500, f"{where}: {ans.status} {ans.body[:2000]!r}"
    body = _zip_text(ans.body) if ans.mimetype == "application/zip" else ans.body
    tb = TRACEBACK.search(body)
    assert tb is None, f"{where}: traceback text {tb.group(0)!r} in {ans.body[:2000]!r}"
    sent = req.sent()
    for what, value in secret_values.items():
        raw = value.encode()
        assert raw not in body or raw in sent, f"{where}: the answer holds the {what}"
    for name, value in SECURITY_HEADERS.items():
        assert ans.headers.get(name) == value, f"{where}: no {name} header"
    if 300 <= ans.status < 400:
        loc = urlsplit(ans.headers.get("Location", ""))
        assert loc.netloc in ("", req.host) and not ans.headers["Location"].startswith("//"), \
            f"{where}: redirects away, to {ans.headers.get('Location')!r}"
    if ans.status < 400:
        return
    if req.path.startswith("/api/") and req.method != "HEAD":
        assert ans.mimetype == "application/json", f"{where}: {ans.status} is {ans.mimetype}"
        doc = json.loads(ans.body)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], \
            f"{where}: {ans.status} without an error sentence: {doc!r}"
        if ans.status == 400:
            errors = doc.get("errors")
            assert isinstance(errors, list) and errors, \
                f"{where}: 400 names no field: {doc!r}"
            for e in errors:
                assert isinstance(e, dict) and isinstance(e.get("field"), str) and e["field"] \
                    and isinstance(e.get("message"), str) and e["message"], \
                    f"{where}: a problem without field and message: {e!r}"
    elif req.method != "HEAD":
        assert ans.mimetype == "text/html", f"{where}: a refused page is {ans.mimetype}"
        assert re.search(rb'data-testid="(error-message|login-error|token-error)"[^>]*>[^<\s]',
                         body) or (ans.status == 401 and b'data-testid="token-page"' in body), \
            f"{where}: {ans.status} page without its message: {body[:1500]!r}"


def refused(ans: Answer) -> bool:
    return ans.status >= 400

