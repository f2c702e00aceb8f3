"""What the fuzz suite found, each failing example kept as a plain test (fixed in the product the
same day; the comment says what the answer was before)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dashboard.data_files import check_upload
from dashboard.errors import DashboardError
from dispatcher.cli import main
from dispatcher.settings import DataPaths
from formats import SHIPPED_DIR
from tests.fuzz.harness import ACCOUNTS, SINGLE_USER, Req, changes, check_answer, send, snapshot

pytestmark = pytest.mark.fuzz

DEEP = b'{"spec":' * 50_000 + b"1" + b"}" * 50_000


def ask(fleet, method, path, body=None, ctype="application/json", **kw):
    """Send one request as the fleet's admin (token), checked like every fuzz answer; the
    answer and whether the request changed anything."""
    fleet.heal()
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    path, _, query = path.partition("?")
    kw.setdefault("query", query.encode())
    kw.setdefault("who", "token")
    kw.setdefault("user", fleet.users[0])
    req = Req(method=method, path=path, body=raw, content_type=ctype, **kw)
    secret_values = fleet.secrets()
    before = snapshot(fleet)
    ans = send(fleet, req)
    check_answer(fleet, req, ans, secret_values)
    return ans, changes(before, snapshot(fleet))


def fields(ans) -> list[str]:
    return [e["field"] for e in json.loads(ans.body).get("errors", [])]


# 500 (RecursionError in json.loads) for a JSON body nested deeper than Python's recursion limit.
@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/estimate", "/api/v1/users/bo/role",
                                  "/api/v1/sweeps", "/api/v1/limits"])
def test_a_deeply_nested_body_is_a_400_naming_the_body(fleets, path):
    ans, changed = ask(fleets[ACCOUNTS], "POST", path, DEEP)
    assert ans.status == 400 and not changed
    assert fields(ans) in (["body"], ["role"], ["sweep"]), ans.body


# 500 (TypeError: unhashable type) for a priority that is a list or an object.
@pytest.mark.parametrize("priority", [[], {"a": 1}, [["urgent"]]])
def test_a_priority_that_is_not_text_is_a_400_naming_it(fleets, priority):
    fleet = fleets[ACCOUNTS]
    spec = {"lora_name": "fz-prio", "base_model": "tiny", "dataset": "d.json",
            "format": "alpaca-format"}
    for path, body in (("/api/v1/jobs", {"kind": "train", "spec": spec, "priority": priority}),
                       (f"/api/v1/jobs/{fleet.jobs['bo-queued']}/priority", {"priority": priority}),
                       ("/api/v1/sweeps", {"base": spec, "parameters": {"lora_rank": [4]},
                                           "method": "grid", "priority": priority})):
        ans, changed = ask(fleet, "POST", path, body)
        assert ans.status == 400 and "priority" in fields(ans) and not changed, (path, ans.body)


# 500 (TypeError from hmac.compare_digest) for an X-CSRF-Token header with a non-ASCII letter.
@pytest.mark.parametrize("mode", [SINGLE_USER, ACCOUNTS])
def test_a_csrf_token_with_non_ascii_letters_is_a_403(fleets, mode):
    fleet = fleets[mode]
    ans, changed = ask(fleet, "POST", f"/api/v1/users/{fleet.users[1]}/unlock", {},
                       who="browser", csrf="missing", headers=[("X-CSRF-Token", "å\x9b")])
    assert ans.status == 403 and b"CSRF" in ans.body and not changed


# A 400 whose problem named the field "" (a request key that is the empty string).
def test_an_empty_key_is_named(fleets):
    fleet = fleets[SINGLE_USER]
    spec = {"lora_name": "fz-empty", "base_model": "tiny", "dataset": "d.json",
            "format": "alpaca-format"}
    for path, body, want in (
            ("/api/v1/jobs", {"kind": "train", "spec": spec, "": 1}, '""'),
            ("/api/v1/sweeps/preview", {"base": spec, "parameters": {"lora_rank": [4]},
                                        "method": "grid", "": {}}, '""'),
            # found by the long run (seed 15): the limits route named its own problems
            ("/api/v1/limits", {"name": "max_queued_jobs", "value": None, "": None}, '""')):
        ans, changed = ask(fleet, "POST", path, body)
        assert ans.status == 400 and want in fields(ans) and not changed, ans.body


# 400s that named no field: a body that is no JSON object, a query number that is no number.
@pytest.mark.parametrize("method,path,body,field", [
    ("POST", "/api/v1/jobs", b"", "body"),
    ("POST", "/api/v1/estimate", b"[]", "body"),
    ("POST", "/api/v1/estimate", {"kind": "nope", "spec": {}}, "kind"),
    ("POST", "/api/v1/estimate", {"kind": "train", "spec": []}, "spec"),
    ("POST", "/api/v1/formats/copy", b"", "body"),
    ("POST", "/api/v1/limits", b"", "body"),
    ("POST", "/api/v1/limits", {"name": "max_queued_jobs"}, "value"),
    ("POST", "/api/v1/users", b"", "body"),
    ("POST", "/api/v1/users", {"name": "  7  ", "role": []}, "role"),
    ("GET", "/api/v1/jobs?offset=nan", None, "offset"),
    ("GET", "/api/v1/jobs?limit=%7E", None, "limit"),
    ("GET", "/api/v1/jobs?before=nojob", None, "before"),
])
def test_every_400_names_its_field(fleets, method, path, body, field):
    ans, changed = ask(fleets[SINGLE_USER], method, path, body)
    assert ans.status == 400 and field in fields(ans) and not changed, ans.body


# A refused change of an account that is not there (404), in single-user mode, created the
# data folder's accounts.lock: a write on a refusal.
@pytest.mark.parametrize("action", ["remove", "role", "token", "token/revoke"])
def test_a_refused_account_change_writes_no_lock_file(fleets, action):
    fleet = fleets[SINGLE_USER]
    lock = fleet.home / "accounts.lock"
    if lock.exists():
        lock.unlink()
    ans, changed = ask(fleet, "POST", f"/api/v1/users/nobody/{action}", {"role": "member"})
    assert ans.status == 404 and not changed and not lock.exists()


def test_a_refused_first_account_writes_no_lock_file(fleets):
    fleet = fleets[SINGLE_USER]
    ans, changed = ask(fleet, "POST", "/api/v1/users",
                       {"name": "dee", "role": "member", "password": "long enough password 1"})
    assert ans.status == 400 and fields(ans) == ["role"] and not changed
    assert not (fleet.home / "accounts.lock").exists()


# Data files: a dataset nested too deeply, or holding a 5,000-digit number, crashed the upload
# check (500: RecursionError / ValueError from json.loads) and `lorafleet data preview`
# (a traceback).
BAD_FILES = {
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
    "deep.jsonl": b'{"instruction": ' * 50_000 + b"1" + b"}" * 50_000,
    "long-number.jsonl": b'{"epochs": 1' + b"0" * 5000 + b"}",
    "long-number.json": b'[{"instruction": "a", "output": 1' + b"0" * 5000 + b"}]",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_dataset_the_parser_cannot_take_is_a_400(name):
    with pytest.raises(DashboardError) as e:
        check_upload(name, "dataset", BAD_FILES[name], DataPaths(SHIPPED_DIR))
    assert e.value.status == 400 and e.value.errors[0]["field"] == "file"
    assert "invalid JSON" in e.value.message


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_dataset_the_parser_cannot_take_is_an_error_in_the_preview(tokenizer_dir, tmp_path,
                                                                     name):
    data = tmp_path / name
    data.write_bytes(BAD_FILES[name])
    result = CliRunner().invoke(main, ["data", "preview", "--tokenizer", str(tokenizer_dir),
                                       "--dataset", str(data), "--format",
                                       str(SHIPPED_DIR / "alpaca-format.json")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "invalid JSON" in result.output and "Traceback" not in result.output


def test_a_format_file_nested_too_deeply_is_an_error_not_a_crash(fleets):
    fleet = fleets[SINGLE_USER]
    (fleet.home / "formats" / "deep-format.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    ans, changed = ask(fleet, "POST", "/api/v1/jobs", {"kind": "train", "spec": {
        "lora_name": "fz-deep", "base_model": "tiny", "dataset": "d.json",
        "format": "deep-format"}})
    assert ans.status == 400 and "format" in fields(ans) and not changed
    ans, _ = ask(fleet, "GET", "/api/v1/formats/deep-format")
    assert ans.status == 400 and fields(ans) == ["name"]


# Found by asking what the seeded fleet could not reach (a data folder whose evaluation table
# was never written): an admin's comment on an evaluation that is not there (404) created
# evals/evaluations.lock.
def test_a_refused_comment_writes_no_lock_file(fleets):
    fleet = fleets[SINGLE_USER]
    evals = fleet.home / "evals"
    kept = {p.name: p.read_bytes() for p in evals.iterdir()}
    for p in evals.iterdir():
        p.unlink()
    try:
        ans, changed = ask(fleet, "POST", "/api/v1/evaluations/nope", {"comment": "x"})
        assert ans.status == 404 and not changed and not list(evals.iterdir())
    finally:
        for name, raw in kept.items():
            (evals / name).write_bytes(raw)


# 500 (JSONDecodeError) for a raw text holding U+0085, U+2028 or another character that
# str.splitlines() takes for a line's end: the preview process wrote its answer as raw UTF-8
# and the dashboard cut it there. (The long fuzz run of seed 16.)
@pytest.mark.parametrize("odd", ["\x85", "\u2028", "\x1c"])
def test_a_preview_of_text_with_unicode_line_ends_is_a_200(fleets, tokenizer_dir, odd):
    import shutil
    from urllib.parse import urlencode

    fleet = fleets[SINGLE_USER]
    model = fleet.home / "models" / "fz-tiny"
    if not model.exists():
        shutil.copytree(tokenizer_dir, model)
    (fleet.home / "datasets" / "fz-odd.txt").write_text(f"tea{odd}and trains. " * 30,
                                                        encoding="utf-8")
    query = urlencode({"raw_text_file": "fz-odd.txt", "overlap_len": "0", "model": "fz-tiny",
                       "cutoff_len": "16"})
    ans, wrote = ask(fleet, "GET", f"/api/v1/datasets/preview?{query}")
    assert ans.status == 200, ans.body[:500]
    assert not wrote
    assert any(odd in sample["text"] for sample in json.loads(ans.body)["samples"])
