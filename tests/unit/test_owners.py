"""Owners of data files and LoRAs, links that lead out of the data folder, long names, shipped
format names and upload space, through the real app on a real Redis (accounts mode: admin ana,
members bo and cy, each with an API token)."""

from __future__ import annotations

import io
import json
import os

import pytest

from dashboard.app import create_app
from dispatcher.access.accounts import Accounts
from dispatcher.access.limits import Limits
from dispatcher.access.owners import Owners
from formats.rawtext import raw_text_files
from tests.appclient import client_for
from tests.datafolder import small_data_folder

PASSWORD = "correct horse battery"
ROWS = [{"instruction": "hi", "output": "yo"}, {"instruction": "a", "output": "b"}]
FORMAT = {"instruction,output": "%instruction% %output%"}
SPEC = {"lora_name": "ana-lora", "base_model": "tiny", "dataset": "d.json",
        "format": "my-format", "epochs": 1, "micro_batch_size": 1, "batch_size": 1}


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    s = small_data_folder(tmp_path / "home", redis_server, prefix, users=True, files={
        "datasets/d.json": json.dumps(ROWS),  # put there by hand
        "formats/my-format.json": json.dumps(FORMAT)})
    (s.paths.formats / "alpaca-format.json").unlink()
    return s


class User:
    """One account's API calls (a token: no CSRF token needed)."""

    def __init__(self, app, settings, name):
        self.c = client_for(app)
        self.h = {"Authorization": f"Bearer {Accounts(settings.home).new_token(name)}"}

    def upload(self, name, content, **form):
        data = content.encode() if isinstance(content, str) else content
        return self.c.post("/api/v1/datasets", data={"file": (io.BytesIO(data), name), **form},
                           content_type="multipart/form-data", headers=self.h)

    def post(self, url, body):
        return self.c.post(url, json=body, headers=self.h)

    def get(self, url):
        return self.c.get(url, headers=self.h)


@pytest.fixture
def users(settings):
    app = create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True})
    return {n: User(app, settings, n) for n in ("ana", "bo", "cy")}


def owners(settings):
    import redis

    return Owners(redis.Redis.from_url(settings.redis_url, decode_responses=True),
                  settings.prefix)


# files ----------------------------------------------------------------------------------------
def test_a_member_cannot_replace_another_users_file_an_admin_can(users, settings):
    bo, cy, ana = users["bo"], users["cy"], users["ana"]
    target = settings.paths.datasets / "x.json"
    assert bo.upload("x.json", json.dumps(ROWS)).status_code == 201
    for overwrite in ("1", ""):
        resp = cy.upload("x.json", json.dumps(ROWS[:1]), overwrite=overwrite)
        assert resp.status_code == 403, resp.json
        assert resp.json["error"] == ("datasets/x.json belongs to bo; only bo or an admin may "
                                      "replace it")
    assert json.loads(target.read_text()) == ROWS
    assert bo.upload("x.json", json.dumps(ROWS[:1]), overwrite="1").status_code == 201
    # A copy of a format onto another member's format file is refused the same way.
    assert bo.post("/api/v1/formats/copy", {"from": "my-format", "name": "bo-format"}
                   ).status_code == 201
    resp = cy.post("/api/v1/formats/copy", {"from": "alpaca-format", "name": "bo-format",
                                            "overwrite": True})
    assert resp.status_code == 403 and "formats/bo-format.json belongs to bo" in resp.json["error"]
    assert json.loads((settings.paths.formats / "bo-format.json").read_text()) == FORMAT
    # A file put there by hand is no one's: members use it, only an admin replaces it.
    resp = cy.upload("d.json", json.dumps(ROWS[:1]), overwrite="1")
    assert resp.status_code == 403 and "belongs to no one" in resp.json["error"]
    # An admin may replace anything; bo's file stays bo's, the unowned one becomes ana's.
    assert ana.upload("x.json", json.dumps(ROWS), overwrite="1").status_code == 201
    assert ana.upload("d.json", json.dumps(ROWS), overwrite="1").status_code == 201
    reg = owners(settings)
    assert reg.get("datasets/x.json") == "bo" and reg.get("datasets/d.json") == "ana"


def test_the_listing_shows_each_files_owner(users, settings):
    users["bo"].upload("b.jsonl", json.dumps(ROWS[0]) + "\n")
    users["cy"].upload("notes.txt", "some text\n")
    listing = users["cy"].get("/api/v1/datasets").json
    by_name = {e["name"]: e["owner"] for kind in ("datasets", "raw_texts", "formats")
               for e in listing[kind] if e.get("source", "user") == "user"}
    assert by_name == {"b.jsonl": "bo", "d.json": None, "notes.txt": "cy", "my-format": None}
    assert all(f["owner"] is None for f in listing["formats"] if f["source"] == "shipped")
    page = users["cy"].get("/datasets").data.decode()
    assert "<th>Owner</th>" in page


def test_members_may_not_take_a_shipped_format_name(users, settings):
    bo, ana = users["bo"], users["ana"]
    resp = bo.post("/api/v1/formats/copy", {"from": "my-format", "name": "alpaca-format"})
    assert resp.status_code == 403
    assert "alpaca-format is a shipped format" in resp.json["error"]
    assert "every user" in resp.json["error"]
    resp = bo.upload("alpaca-format.json", json.dumps(FORMAT), kind="format")
    assert resp.status_code == 403
    assert not (settings.paths.formats / "alpaca-format.json").exists()
    resp = ana.post("/api/v1/formats/copy", {"from": "my-format", "name": "alpaca-format"})
    assert resp.status_code == 201 and resp.json["owner"] == "ana"


def test_an_upload_over_the_users_upload_space_is_refused(users, settings):
    bo, cy = users["bo"], users["cy"]
    Limits(owners(settings).r, settings.prefix).set("bo", "upload_space_mb", 1)
    text = "word " * (120 * 1024)  # 600 KB
    assert bo.upload("one.txt", text).status_code == 201
    resp = bo.upload("two.txt", text)
    assert resp.status_code == 400, resp.json
    assert "upload_space_mb = 1" in resp.json["error"] and "would be 2" in resp.json["error"]
    assert not (settings.paths.datasets / "two.txt").exists()
    assert cy.upload("two.txt", text).status_code == 201  # cy's limit is the default
    # Replacing one's own file counts the new size instead of the old one.
    assert bo.upload("one.txt", text + "more", overwrite="1").status_code == 201
    # A file removed by hand no longer counts.
    (settings.paths.datasets / "one.txt").unlink()
    assert bo.upload("two-b.txt", text).status_code == 201
    assert owners(settings).owned_by("bo") == ["datasets/two-b.txt"]


# LoRAs ----------------------------------------------------------------------------------------
def test_a_member_cannot_train_into_another_users_lora(users, settings):
    ana, bo, cy = users["ana"], users["bo"], users["cy"]
    store_key = f"{settings.prefix}:jobs"
    r = owners(settings).r
    assert ana.post("/api/v1/jobs", {"spec": SPEC}).status_code == 201
    queued = r.zcard(store_key)
    for extra in ({}, {"always_override": True}, {"resume_from_checkpoint": "latest"}):
        resp = bo.post("/api/v1/jobs", {"spec": {**SPEC, **extra}})
        assert resp.status_code == 403, resp.json
        assert "loras/ana-lora belongs to ana; only ana or an admin may" in resp.json["error"]
        assert resp.json["errors"][0]["field"] == "lora_name"
    assert r.zcard(store_key) == queued  # nothing queued
    # The name was claimed when ana's job was accepted, before any folder exists; once it does,
    # the same holds.
    (settings.paths.loras / "ana-lora").mkdir()
    assert bo.post("/api/v1/jobs", {"spec": {**SPEC, "always_override": True}}
                   ).status_code == 403
    # An admin may, also for another user; the job says who let it write there.
    resp = users["ana"].post("/api/v1/jobs", {"spec": {**SPEC, "always_override": True},
                                              "owner": "cy"})
    assert resp.status_code == 201
    assert r.hget(f"{settings.prefix}:job:{resp.json['id']}", "lora_admitted_by") == "ana"
    # A new name is the first submitter's.
    assert cy.post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": "cy-lora"}}).status_code == 201
    assert bo.post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": "cy-lora"}}).status_code == 403


def test_a_lora_folder_made_by_hand_is_for_admins_only(users, settings):
    hand = settings.paths.loras / "hand-lora"
    hand.mkdir()
    (hand / "adapter_config.json").write_text("{}")
    resp = users["bo"].post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": "hand-lora"}})
    assert resp.status_code == 403
    assert "loras/hand-lora was put in the data folder by hand and belongs to no one" in \
        resp.json["error"]
    resp = users["ana"].post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": "hand-lora"},
                                              "owner": "bo"})
    assert resp.status_code == 201
    assert owners(settings).get("loras/hand-lora") == "bo"  # the admin gave it to bo's job


def test_sweep_trial_names_are_claimed_and_checked(users, settings):
    bo, cy = users["bo"], users["cy"]
    sweep = {"base": {**SPEC, "lora_name": "sw"}, "parameters": {"lora_rank": [4, 8]}}
    resp = bo.post("/api/v1/sweeps", sweep)
    assert resp.status_code == 201, resp.json
    trial_names = [t["name"] for t in resp.json["trials"]]
    assert all(owners(settings).get(f"loras/{n}") == "bo" for n in trial_names)
    assert bo.post(f"/api/v1/sweeps/{resp.json['id']}/cancel", {}).status_code == 200
    # The trials are cancelled (their names no longer busy), but they are still bo's.
    resp = cy.post("/api/v1/sweeps", sweep)
    assert resp.status_code == 403, resp.json
    assert f"loras/{trial_names[0]} belongs to bo" in resp.json["error"]
    # A single job on a trial's name is refused as well.
    resp = cy.post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": trial_names[0]}})
    assert resp.status_code == 403


# links ----------------------------------------------------------------------------------------
def test_links_out_of_the_data_folder_are_neither_listed_nor_used(users, settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps([{"secret_key_name": "x", "output": "y"}]))
    (outside / "fmt.json").write_text(json.dumps({"secret_template_key": "%x%"}))
    (outside / "secret.txt").write_text("the secret text\n")
    lora = outside / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    (lora / "training_parameters.json").write_text(json.dumps({"lora_rank": 4}))
    ds, fmts, loras = settings.paths.datasets, settings.paths.formats, settings.paths.loras
    os.symlink(outside / "secret.json", ds / "linked.json")
    os.symlink(outside / "fmt.json", fmts / "linked-format.json")
    os.symlink(outside / "secret.txt", ds / "linked.txt")
    (ds / "texts").mkdir()
    (ds / "texts" / "a.txt").write_text("own text\n")
    os.symlink(outside / "secret.txt", ds / "texts" / "b.txt")
    os.symlink(lora, loras / "out-lora")
    os.symlink(ds / "d.json", ds / "alias.json")  # stays inside: usable

    bo = users["bo"]
    listing = bo.get("/api/v1/datasets")
    assert listing.status_code == 200
    text = listing.data.decode()
    assert "secret" not in text and "linked" not in text
    assert "alias.json" in text
    assert [t["size"] for t in listing.json["raw_texts"] if t["name"] == "texts"] == [9]
    assert raw_text_files(ds / "texts") == [ds / "texts" / "a.txt"]
    assert "linked" not in json.dumps(bo.get("/api/v1/choices").json)

    for field, value in (("dataset", "linked.json"), ("format", "linked-format"),
                         ("raw_text_file", "linked.txt"), ("lora_name", "out-lora")):
        spec = {**SPEC, "lora_name": "bo-l", field: value}
        if field == "raw_text_file":
            spec.pop("dataset")
        resp = users["ana"].post("/api/v1/jobs", {"spec": spec})
        assert resp.status_code == 400, (field, resp.json)
        problems = {e["field"]: e["message"] for e in resp.json["errors"]}
        assert "link" in problems[field] and value in problems[field], problems
    resp = users["ana"].post("/api/v1/jobs", {"kind": "evaluate", "spec": {
        "base_model": "tiny", "loras": ["out-lora"], "text_file": "texts"}})
    assert resp.status_code == 400 and "leads outside loras/" in resp.json["errors"][0]["message"]
    resp = users["ana"].post("/api/v1/jobs", {"kind": "generate", "spec": {
        "base_model": "tiny", "lora": "out-lora", "prompt": "hi"}})
    assert resp.status_code == 400 and "leads outside loras/" in resp.json["errors"][0]["message"]
    assert bo.get("/api/v1/loras/out-lora/parameters").status_code == 404
    assert bo.get("/api/v1/formats/linked-format").status_code == 404
    resp = bo.post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": "bo-l", "dataset": "alias"}})
    assert resp.status_code == 201, resp.json


# long names -----------------------------------------------------------------------------------
def test_a_5000_character_name_is_a_400_naming_its_field(users):
    ana = users["ana"]
    long = "a" * 5000
    train = {"dataset": long, "format": long, "eval_dataset": long, "base_model": long,
             "lora_name": long, "resume_from_checkpoint": "checkpoint-" + "1" * 5000}
    for field, value in train.items():
        resp = ana.post("/api/v1/jobs", {"spec": {**SPEC, field: value}})
        assert resp.status_code == 400, (field, resp.status_code)
        assert field in {e["field"] for e in resp.json["errors"]}
        assert len(resp.data) < 5000
    resp = ana.post("/api/v1/jobs", {"spec": {**SPEC, "dataset": "", "raw_text_file": long}})
    assert resp.status_code == 400 and resp.json["errors"][0]["field"] == "raw_text_file"
    for kind, spec, field in (
            ("evaluate", {"base_model": "tiny", "text_file": long}, "text_file"),
            ("evaluate", {"base_model": "tiny", "text_file": "x", "loras": [long]}, "loras"),
            ("generate", {"base_model": "tiny", "prompt": "hi", "lora": long}, "lora"),
            ("generate", {"base_model": "tiny", "prompt": "hi", "format": long}, "format")):
        resp = ana.post("/api/v1/jobs", {"kind": kind, "spec": spec})
        assert resp.status_code == 400 and field in {e["field"] for e in resp.json["errors"]}
    assert ana.upload(long + ".json", json.dumps(ROWS)).status_code == 400
    resp = ana.post("/api/v1/formats/copy", {"from": "my-format", "name": long})
    assert resp.status_code == 400 and resp.json["errors"][0]["field"] == "name"
    resp = ana.post("/api/v1/formats/copy", {"from": long, "name": "n"})
    assert resp.status_code == 400 and resp.json["errors"][0]["field"] == "from"
    assert ana.get(f"/api/v1/formats/{long}").status_code == 400
    resp = ana.get(f"/api/v1/datasets/preview?model=tiny&dataset={long}&format=my-format")
    assert resp.status_code == 400 and "dataset" in {e["field"] for e in resp.json["errors"]}
    resp = ana.post("/api/v1/sweeps", {"base": {**SPEC, "dataset": long},
                                       "parameters": {"lora_rank": [4, 8]}})
    assert resp.status_code == 400


# review: all-or-nothing claims, the worker's check, parallel uploads ---------------------------
def test_a_refused_sweep_claims_none_of_its_trial_names(users, settings):
    """One trial name held by cy refuses bo's sweep, and none of its other names is bo's."""
    bo, cy = users["bo"], users["cy"]
    sweep = {"base": {**SPEC, "lora_name": "sq"}, "parameters": {"lora_rank": [4, 8, 16]}}
    names = [t["name"] for t in bo.post("/api/v1/sweeps/preview", sweep).json["trials"]]
    job = cy.post("/api/v1/jobs", {"spec": {**SPEC, "lora_name": names[1]}}).json["id"]
    # Cancelled: the name is not busy, but cy's claim stays until the dispatcher's release.
    assert cy.post(f"/api/v1/jobs/{job}/cancel", {}).status_code == 200
    resp = bo.post("/api/v1/sweeps", sweep)
    assert resp.status_code == 403, resp.json
    assert f"loras/{names[1]} belongs to cy" in resp.json["error"]
    reg = owners(settings)
    assert reg.many([f"loras/{n}" for n in names]) == {
        f"loras/{names[0]}": None, f"loras/{names[1]}": "cy", f"loras/{names[2]}": None}
    assert reg.owned_by("bo") == []


def test_claims_keep_each_users_index_in_step(settings):
    reg = owners(settings)
    assert reg.claim_all(["loras/a", "loras/b"], "bo") == {}
    assert reg.claim_all(["loras/b", "loras/c"], "cy") == {"loras/b": "bo"}
    assert reg.get("loras/c") is None  # all or none
    reg.record("datasets/x.json", "cy")
    reg.record("loras/a", "cy")  # an owner changes: both users' sets follow
    assert reg.owned_by("bo") == ["loras/b"] and reg.owned_by("cy") == ["datasets/x.json",
                                                                        "loras/a"]
    assert not reg.release("loras/b", "cy") and reg.release("loras/b", "bo")
    reg.drop("datasets/x.json")
    assert reg.owned_by("bo") == [] and reg.owned_by("cy", "loras/") == ["loras/a"]
    assert reg.r.hgetall(reg.key) == {"loras/a": "cy"}


def test_the_workers_check_claims_no_hand_made_folder(settings):
    """REVIEW #10: job_write_refusal refuses a folder that exists with no owner (no admin's
    word on the job) and claims nothing; a new name is claimed for the job owner."""
    from dispatcher.access.owners import job_write_refusal

    reg, loras = owners(settings), settings.paths.loras
    (loras / "hand").mkdir()
    rec = {"owner": "bo", "spec": {"lora_name": "hand"}}
    why = job_write_refusal(reg, loras, rec)
    assert why == ("loras/hand was put in the data folder by hand and belongs to no one: the "
                   "job does not touch it (only an admin may admit a job into it)")
    assert reg.get("loras/hand") is None
    assert job_write_refusal(reg, loras, {**rec, "lora_admitted_by": "ana"}) is None
    assert reg.get("loras/hand") is None
    assert job_write_refusal(reg, loras, {"owner": "bo", "spec": {"lora_name": "new"}}) is None
    assert reg.get("loras/new") == "bo"
    assert "belongs to bo" in job_write_refusal(reg, loras, {"owner": "cy",
                                                             "spec": {"lora_name": "new"}})


def test_parallel_uploads_stay_within_the_upload_space(settings):
    """REVIEW #8: 8 uploads of 300 KB sent at once by bo, whose limit is 1 MB, against a real
    threaded server: at most 3 are saved (before, every one passed the check)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from werkzeug.serving import make_server

    Limits(owners(settings).r, settings.prefix).set("bo", "upload_space_mb", 1)
    token = Accounts(settings.home).new_token("bo")
    server = make_server("127.0.0.1", 0, create_app({"LORAFLEET_SETTINGS": settings,
                                                     "TESTING": True}), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    body = ("word " * (60 * 1024)).encode()  # 300 KB
    barrier = threading.Barrier(8)

    def upload(i):
        barrier.wait()
        return requests.post(f"http://127.0.0.1:{server.server_port}/api/v1/datasets",
                             files={"file": (f"p{i}.txt", body)},
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)

    try:
        with ThreadPoolExecutor(8) as pool:
            codes = sorted(r.status_code for r in pool.map(upload, range(8)))
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    saved = sorted(settings.paths.datasets.glob("p*.txt"))
    assert codes == [201] * 3 + [400] * 5, codes
    assert sum(p.stat().st_size for p in saved) <= 1024 * 1024
    assert len(owners(settings).owned_by("bo")) == 3
