"""The fuzz harness's own checks can fail: a write, a 500, a traceback, a leaked secret, a 400
without its field and a redirect away are each caught, and only the documented keys pass."""

from __future__ import annotations

import json

import pytest
from werkzeug.datastructures import Headers

from dashboard.app import SECURITY_HEADERS
from tests.fuzz.harness import SINGLE_USER, Answer, Req, changes, check_answer, snapshot

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
