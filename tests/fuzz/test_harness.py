"""The fuzz harness's own checks can fail: a write, a 500, a traceback, a leaked secret, a 400
without its field and a redirect away are each caught, and only the documented keys pass; a
live session ended by a refusal and a write outside the data folder are caught; every session
id and token digest is looked for; the figures say "n/a" for what they did not measure."""

from __future__ import annotations

import json
import os

import pytest
from werkzeug.datastructures import Headers

from dashboard.app import SECURITY_HEADERS
from dashboard.sessions import Sessions
from tests.fuzz import tally
from tests.fuzz.harness import (
    ACCOUNTS,
    SINGLE_USER,
    Answer,
    Req,
    changes,
    check_answer,
    outside_changes,
    snapshot,
)

pytestmark = pytest.mark.fuzz


@pytest.fixture
def fleet(fleets):
    return fleets[SINGLE_USER]


def answer(status: int, body: bytes, mimetype: str = "application/json", **headers) -> Answer:
    return Answer(status, Headers({**SECURITY_HEADERS, **headers}), body, mimetype)


def test_changes_sees_files_and_keys(fleet):
    before = snapshot(fleet)
    (fleet.home / "datasets" / "written.json").write_text("[]")
    fleet.r.hset(f"{fleet.prefix}:job:{fleet.jobs['bo-queued']}", "priority", "urgent")
    try:
        found = changes(before, snapshot(fleet))
        assert "datasets/written.json" in found.files and found.bytes_written >= 2
        assert found.keys == [f"job:{fleet.jobs['bo-queued']}"]
    finally:
        (fleet.home / "datasets" / "written.json").unlink()
        fleet.r.hset(f"{fleet.prefix}:job:{fleet.jobs['bo-queued']}", "priority", "normal")
    assert not changes(before, snapshot(fleet)).keys


def test_changes_allows_only_the_documented_keys(fleet):
    before = snapshot(fleet)
    fleet.r.incr(f"{fleet.prefix}:login-failures:name:fz")
    fleet.r.incr(f"{fleet.prefix}:token-failures:address:10.0.0.7")
    assert not changes(before, snapshot(fleet))
    assert changes(before, snapshot(fleet), strict=True).keys
    fleet.r.hset(f"{fleet.prefix}:session:made-by-a-refusal", "user", "local")
    assert changes(before, snapshot(fleet)).keys == ["session:made-by-a-refusal"]
    fleet.r.delete(f"{fleet.prefix}:session:made-by-a-refusal",
                   f"{fleet.prefix}:login-failures:name:fz",
                   f"{fleet.prefix}:token-failures:address:10.0.0.7")
    # an ended session removed by a refusal is allowed; one made is not (above)
    fleet.r.hset(f"{fleet.prefix}:session:ended", "user", "local")
    before = snapshot(fleet)
    fleet.r.delete(f"{fleet.prefix}:session:ended")
    assert not changes(before, snapshot(fleet))


REQ = Req(method="POST", path="/api/v1/jobs", body=b"{}")


@pytest.mark.parametrize("ans,why", [
    (answer(500, b'{"error": "x"}'), "500"),
    (answer(200, b'File "/work/main/dashboard/api.py", line 3, in x'), "traceback"),
    (answer(400, b'{"error": "bad"}'), "names no field"),
    (answer(400, b'{"error": "bad", "errors": [{"field": "", "message": "m"}]}'), "field"),
    (answer(403, b"<html>forbidden</html>", "text/html"), "is text/html"),
    (answer(302, b"", Location="https://evil.example/"), "redirects away"),
    (answer(302, b"", Location="//evil.example/"), "redirects away"),
    (Answer(200, Headers(), b"{}", "application/json"), "header"),
])
def test_check_answer_catches(fleet, ans, why):
    with pytest.raises(AssertionError, match=why):
        check_answer(fleet, REQ, ans, fleet.secrets())


def test_check_answer_catches_a_secret_the_request_did_not_send(fleet):
    secrets = fleet.secrets()
    leak = answer(200, json.dumps({"token": fleet.dashboard_token}).encode())
    with pytest.raises(AssertionError, match="dashboard token"):
        check_answer(fleet, REQ, leak, secrets)
    echo = Req(method="POST", path="/api/v1/jobs", body=fleet.dashboard_token.encode())
    check_answer(fleet, echo, leak, secrets)  # the sender's own words, echoed: no leak


def test_a_refusal_may_end_only_a_session_that_had_ended_before(fleet):
    fleet.heal()
    sessions = Sessions(fleet.r, fleet.prefix)
    live, _ = fleet.browser_session("local")
    # An ended session (made from a dashboard token since replaced) beside the live one.
    ended = sessions.create("local", kind="token", fp="0" * 32)
    before = snapshot(fleet)
    assert ended in before.ended and live not in before.ended
    sessions.delete(ended)  # what a refused request carrying it does
    assert not changes(before, snapshot(fleet))
    sessions.delete(live)  # a refusal that logs a live browser out
    try:
        found = changes(before, snapshot(fleet))
        assert found.keys == [f"session:{live}", "sessions:local"], found.describe()
    finally:
        fleet.browser_sessions.pop("local", None)
        fleet.heal()


def test_a_write_outside_the_data_folder_is_caught_whatever_the_answer(fleet):
    before = snapshot(fleet)
    # through a link in the data folder that leads out of it
    (fleet.home / "loras" / "escape" / "written-through-a-link").write_text("x")
    try:
        found = changes(before, snapshot(fleet))
        assert found and found.outside_files == ["outside/written-through-a-link"]
        assert found.files == [] and found.bytes_written == 1
        assert outside_changes(fleet, before) == ["outside/written-through-a-link"]
    finally:
        (fleet.outside / "written-through-a-link").unlink()
    assert outside_changes(fleet, before) == []
    secret = fleet.outside / "secret.txt"
    st = secret.stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    assert outside_changes(fleet, before) == ["outside/secret.txt"]


def test_every_session_id_and_token_digest_is_a_secret(fleets):
    fleet = fleets[ACCOUNTS]
    fleet.heal()
    sessions = Sessions(fleet.r, fleet.prefix)
    extra = [sessions.create("bo", kind="account", uid="x", version=0) for _ in range(3)]
    try:
        found = fleet.secrets()
        values = set(found.values())
        ids = {k.decode().rsplit(":", 1)[1]
               for k in fleet.raw.scan_iter(match=f"{fleet.prefix}:session:*")}
        assert len(ids) >= 4 and ids <= values
        accounts = json.loads((fleet.home / "accounts.json").read_text())["users"]
        digests = [t["sha256"] for u in accounts.values() for t in u.get("tokens", [])]
        assert len(digests) >= 3 and set(digests) <= values
        # the first session made, not only the last one seen, is looked for in answers
        leak = answer(200, json.dumps({"sid": extra[0]}).encode())
        with pytest.raises(AssertionError, match="session id"):
            check_answer(fleet, REQ, leak, found)
    finally:
        for sid in extra:
            sessions.delete(sid)


def test_the_figures_say_na_for_bytes_not_measured():
    row = dict.fromkeys(tally.FIELDS, 0)
    assert tally.bytes_shown(row) == "0"
    tally.answer("harness self-test", 403, True)  # not measured
    tally.answer("harness self-test", 403, True, 0)
    tally.answer("harness self-test", 200, False, 0)
    counts = tally.as_json(tally.TALLY)["harness self-test"]
    del tally.TALLY["harness self-test"]
    assert (counts["requests"], counts["refusals"], counts["refusals_measured"]) == (3, 2, 1)
    assert tally.bytes_shown(counts) == "0 of 1"
    assert tally.bytes_shown({**counts, "refusals_measured": 0}) == "n/a"
    assert tally.bytes_shown({**counts, "refusals_measured": 2, "bytes_written_on_refusals": 5}) \
        == "5"
