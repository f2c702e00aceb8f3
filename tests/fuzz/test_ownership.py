"""Accounts mode, two members and an admin: whatever member bo sends about member cy's things
(cancel, re-prioritise, overwrite, copy over, claim, cancel a sweep, edit a comment, the users
and limits routes, with his API token or his browser session), it is refused and nothing of cy's
changes: her job records and histories, her sweep, her files and LoRA folder (bytes and mtimes),
their owner records, her evaluation row, her account, tokens, sessions and limits. Nor anything
else (the data folder and Redis, less what any refusal may change: tests/fuzz/harness.py), nor
anything outside the data folder. And no answer to bo holds a token (cy's, ana's, the
dashboard's) or another secret."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.jobs.store import PRIORITIES
from tests.fuzz import tally
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import ACCOUNTS, Fleet, Req, changes, check_answer, send, snapshot
from tests.fuzz.strategies import (
    HEADERS,
    field_value,
    json_values,
    odd_text,
    quoted,
    spec_body,
    sweep_body,
    upload,
)

pytestmark = pytest.mark.fuzz

VICTIM, ACTOR = "cy", "bo"


def trial_jobs(r: redis.Redis, prefix: str, sweep_id: str) -> list[str]:
    return [t["job"] for t in json.loads(r.hget(f"{prefix}:sweep:{sweep_id}", "trials") or "[]")]


def cys_things(fleet: Fleet) -> dict:
    """Everything of cy's that bo must not be able to change."""
    r = redis.Redis.from_url(fleet.settings.redis_url, decode_responses=True)
    p = fleet.prefix
    out: dict = {}
    for job_id, owner in fleet.job_owner.items():
        if owner == VICTIM:
            out[f"job {job_id}"] = (r.hgetall(f"{p}:job:{job_id}"),
                                    r.lrange(f"{p}:job:{job_id}:history", 0, -1),
                                    r.exists(f"{p}:stop:{job_id}"))
    for sweep_id in fleet.sweeps.values():
        out[f"sweep {sweep_id}"] = r.hgetall(f"{p}:sweep:{sweep_id}")
        for t in trial_jobs(r, p, sweep_id):
            out[f"trial {t}"] = (r.hgetall(f"{p}:job:{t}"), r.exists(f"{p}:stop:{t}"))
    for rel, owner in fleet.owned_files.items():
        if owner == VICTIM:
            path = fleet.home / rel
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    for root, _dirs, files in os.walk(fleet.home / "loras" / f"{VICTIM}-lora"):
        for n in files:
            st_ = os.lstat(os.path.join(root, n))
            out[os.path.join(root, n)] = (st_.st_size, st_.st_mtime_ns)
    owners = {k: v for k, v in r.hgetall(f"{p}:owners").items() if v == VICTIM}
    out["owner records"] = owners
    out["owner index"] = sorted(r.smembers(f"{p}:owned:{VICTIM}"))
    rows = (fleet.home / "evals" / "evaluations.csv").read_text()
    out["evaluations"] = rows
    account = json.loads((fleet.home / "accounts.json").read_text())["users"].get(VICTIM)
    out["account"] = account
    out["sessions"] = sorted(r.smembers(f"{p}:sessions:{VICTIM}"))
    out["limits"] = {k: v for k, v in r.hgetall(f"{p}:limits").items()
                     if k.startswith(f"{VICTIM}:") or k.startswith("*:")}
    return out


def _cys(fleet: Fleet, what: str) -> list[str]:
    if what == "job":
        ids = [j for j, o in fleet.job_owner.items() if o == VICTIM]
        r = redis.Redis.from_url(fleet.settings.redis_url, decode_responses=True)
        for sweep_id in fleet.sweeps.values():
            ids += trial_jobs(r, fleet.prefix, sweep_id)
        return sorted(ids)
    if what == "lora":
        return sorted(n for n, o in fleet.loras.items() if o == VICTIM) + ["by-hand"]
    return []


def attempt(data, fleet: Fleet) -> tuple[str, str, object]:
    """(method, path, JSON body or ("multipart", bytes, content type)) of one attempt on cy's
    things."""
    job = st.sampled_from(_cys(fleet, "job"))
    what = data.draw(st.sampled_from((
        "cancel", "priority", "sweep-cancel", "comment", "upload", "copy-format", "claim-lora",
        "submit-as-cy", "sweep-as-cy", "sweep-over-trials", "user-action", "add-admin",
        "limits")), label="attempt")
    if what == "cancel":
        return "POST", f"/api/v1/jobs/{data.draw(job)}/cancel", data.draw(json_values())
    if what == "priority":
        return "POST", f"/api/v1/jobs/{data.draw(job)}/priority", {
            "priority": data.draw(st.sampled_from(list(PRIORITIES)) | json_values())}
    if what == "sweep-cancel":
        return "POST", f"/api/v1/sweeps/{fleet.sweeps[f'{VICTIM}-sweep']}/cancel", None
    if what == "comment":
        row = data.draw(st.sampled_from(sorted(fleet.eval_rows.values())))
        return "POST", f"/api/v1/evaluations/{row}", {"comment": data.draw(odd_text())}
    if what == "upload":  # over a file of cy's, one put there by hand, or a shipped format
        # (the kind left to the name: a kind given could send the file to the other folder,
        # where the name is free and the upload rightly bo's)
        up = upload(data, fleet, names=("cy-data.json", "cy-notes.txt", "cy-format.json",
                                        "d.json", "my-format.json", "alpaca-format.json",
                                        "chatml-format.json"), kinds=("", "auto"))
        return "POST", "/api/v1/datasets", (up.body, up.content_type)
    if what == "copy-format":
        return "POST", "/api/v1/formats/copy", {
            "from": data.draw(st.sampled_from(("alpaca-format", "my-format", "cy-format"))),
            "name": data.draw(st.sampled_from(("cy-format", "my-format", "alpaca-format",
                                               "chatml-format"))),
            "overwrite": data.draw(st.sampled_from((True, "1", "yes"))),
            "source": data.draw(st.sampled_from(("", "user", "shipped")))}
    if what == "claim-lora":
        body = spec_body(data, fleet)
        spec = body.get("spec", body) if isinstance(body, dict) else {}
        if not isinstance(spec, dict):
            spec = {}
        spec.update({"lora_name": data.draw(st.sampled_from(_cys(fleet, "lora"))),
                     "base_model": "tiny", "dataset": "d.json", "format": "alpaca-format",
                     "always_override": data.draw(st.booleans()),
                     "resume_from_checkpoint": data.draw(
                         st.booleans() | field_value(fleet, "train", "resume_from_checkpoint"))})
        return "POST", "/api/v1/jobs", {"kind": "train", "spec": spec}
    if what == "submit-as-cy":
        body = spec_body(data, fleet)
        if not isinstance(body, dict) or "spec" not in body:
            body = {"kind": "train", "spec": body}
        return "POST", "/api/v1/jobs", {**body, "owner": VICTIM}
    if what == "sweep-as-cy":
        body = sweep_body(data, fleet)
        return "POST", "/api/v1/sweeps", {**(body if isinstance(body, dict) else {}),
                                          "owner": VICTIM}
    if what == "sweep-over-trials":
        return "POST", "/api/v1/sweeps", {
            "base": {"lora_name": f"{VICTIM}-sw", "base_model": "tiny", "dataset": "d.json",
                     "format": "alpaca-format"},
            "parameters": {"lora_rank": data.draw(st.sampled_from(([4], [4, 8], [8, 16])))},
            "method": "grid"}
    if what == "user-action":
        action = data.draw(st.sampled_from(("remove", "role", "token", "token/revoke",
                                            "unlock")))
        who = data.draw(st.sampled_from((VICTIM, "ana")))
        return "POST", f"/api/v1/users/{who}/{action}", {
            "role": data.draw(st.sampled_from(("admin", "member"))), "label": "x"}
    if what == "add-admin":
        return "POST", "/api/v1/users", {"name": data.draw(st.sampled_from((VICTIM, "eve"))),
                                         "role": "admin", "password": "long enough password 1"}
    return "POST", "/api/v1/limits", {
        "name": data.draw(st.sampled_from(("max_queued_jobs", "upload_space_mb",
                                           "max_sweep_trials"))),
        "value": data.draw(st.sampled_from((0, 1, None))),
        "user": data.draw(st.sampled_from((VICTIM, "*", ACTOR)))}


@pytest.fixture(scope="module")
def fleet(fleets):
    return fleets[ACCOUNTS]


@fuzz_settings(short=40, weight=4)
@given(data=st.data())
def test_a_member_never_changes_anothers_things(fleet, data):
    prop = "ownership accounts"
    fleet.heal()
    method, path, body = attempt(data, fleet)
    if isinstance(body, tuple):  # an upload
        content = body
    else:
        content = (json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"),
                   "application/json")
    who = data.draw(st.sampled_from(("token", "browser")), label="as")
    extra = []
    if data.draw(st.integers(0, 3)) == 0:
        extra = [("X-Lorafleet-User", data.draw(st.sampled_from((VICTIM, "ana"))))]
    if data.draw(st.integers(0, 5)) == 0:
        extra.append(("Accept", data.draw(HEADERS["Accept"])))
    req = Req(method=method, path=quoted(path, safe="/"), body=content[0],
              content_type=content[1], who=who, user=ACTOR, csrf="right", headers=extra)
    secret_values = fleet.secrets()
    before = cys_things(fleet)
    snap = snapshot(fleet)
    tally.case(prop)
    ans = send(fleet, req)
    wrote = changes(snap, snapshot(fleet))
    after = cys_things(fleet)
    tally.answer(prop, ans.status, ans.status >= 400, wrote.bytes_written)
    check_answer(fleet, req, ans, secret_values)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, f"bo's {method} {path} changed cy's {sorted(changed)} ({ans.status})"
    assert 400 <= ans.status < 500, \
        f"bo's {method} {path} about cy's things was not refused: {ans.status} {ans.body[:500]!r}"
    assert not wrote, f"bo's refused {method} {path} ({ans.status}) wrote {wrote.describe()}"
