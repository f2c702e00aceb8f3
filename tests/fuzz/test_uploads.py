"""Random uploads (POST /api/v1/datasets) by an admin and by a member, in both modes: a 201 saved
exactly the bytes sent, under the name the answer gives, as the sender's file; anything else is
a 4xx naming the field that changed nothing. And the upload limit at its edge: 50 MB + 1 byte is
a 413 naming the file, a body past the request cap is refused before it is read."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from tests.fuzz import tally
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import ACCOUNTS, SINGLE_USER, Req, changes, check_answer, send, snapshot
from tests.fuzz.strategies import upload

pytestmark = pytest.mark.fuzz


@pytest.mark.parametrize("mode", [SINGLE_USER, ACCOUNTS])
@fuzz_settings(short=20, weight=2)
@given(data=st.data())
def test_an_upload_is_saved_whole_or_refused_without_a_trace(fleets, mode, data):
    fleet = fleets[mode]
    prop = f"uploads {mode}"
    fleet.heal()
    up = upload(data, fleet)
    user = data.draw(st.sampled_from(fleet.users), label="user")
    owners_before = fleet.r.hgetall(f"{fleet.prefix}:owners")
    req = Req(method="POST", path="/api/v1/datasets", body=up.body,
              content_type=up.content_type, who="token", user=user)
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    tally.case(prop)
    ans = send(fleet, req)
    changed = changes(before, snapshot(fleet))
    tally.answer(prop, ans.status, ans.status >= 400,
                 changed.bytes_written if ans.status >= 400 else 0)
    check_answer(fleet, req, ans, secret_values)
    assert not changed.outside_files, f"an upload ({ans.status}) wrote {changed.describe()}"
    if ans.status >= 400:
        assert not changed, f"a refused upload ({ans.status}) wrote {changed.describe()}"
        return
    assert ans.status == 201, (ans.status, ans.body[:300])
    doc = json.loads(ans.body)
    assert up.filename is not None and doc["name"] == up.filename
    saved = fleet.home / doc["path"]
    assert saved.read_bytes() == up.content and doc["size"] == len(up.content)
    # a new file is the sender's; one replaced keeps its owner (an admin's replacement of a
    # file with no owner makes it the admin's)
    owner = fleet.r.hget(f"{fleet.prefix}:owners", doc["path"])
    assert owner == (owners_before.get(doc["path"]) or user), (doc["path"], owner, user)
    assert set(changed.files) <= {doc["path"], doc["path"].split("/")[0]}, changed.files


def test_an_upload_one_byte_over_the_limit_is_a_413_naming_the_file(fleets):
    fleet = fleets[ACCOUNTS]
    fleet.heal()
    limit = fleet.app.config["LORAFLEET_UPLOAD_MAX_BYTES"]
    assert limit == 50 * 1024 * 1024  # the default, as users get it
    form = MultiDict([("file", FileStorage(io.BytesIO(b"a" * (limit + 1)),
                                           filename="big.txt", name="file"))])
    boundary, body = encode_multipart(form)
    req = Req(method="POST", path="/api/v1/datasets", body=body, who="token", user="bo",
              content_type=f"multipart/form-data; boundary={boundary}")
    before = snapshot(fleet)
    ans = send(fleet, req)
    check_answer(fleet, req, ans, fleet.secrets())
    assert ans.status == 413
    assert json.loads(ans.body)["errors"][0]["field"] == "file"
    assert not changes(before, snapshot(fleet), strict=True)


def test_a_body_past_the_request_cap_is_refused_before_it_is_read(fleets):
    fleet = fleets[SINGLE_USER]
    fleet.heal()
    cap = fleet.app.config["MAX_CONTENT_LENGTH"]
    body = b'{"lora_name": "' + b"x" * (cap + 1) + b'"}'
    req = Req(method="POST", path="/api/v1/jobs", body=body, content_type="application/json",
              who="token", user="local")
    before = snapshot(fleet)
    ans = send(fleet, req)
    check_answer(fleet, req, ans, fleet.secrets())
    assert ans.status == 413 and json.loads(ans.body)["error"]
    assert not changes(before, snapshot(fleet), strict=True)
