"""The Datasets API: checked uploads, the listing, and sample previews through formats.previewer
in a real subprocess on a tiny real tokenizer (the dashboard itself never imports torch)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from dashboard.app import create_app
from dashboard.previews import parse_preview_request
from dispatcher.settings import Settings
from formats import RawTextOptions
from tests.appclient import browser_for, client_for
from tests.tiny import make_tiny_model, tiny_rows

ALPACA_ROWS = tiny_rows(5)
FORMAT = {"instruction,output": "Q: %instruction%\nA: %output%",
          "instruction,input,output": "Q: %instruction% (%input%)\nA: %output%"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tinymodel"))


@pytest.fixture
def settings(tmp_path, redis_server, prefix, tiny_model):
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    # A copy, not a link: names that resolve outside models/ are refused.
    shutil.copytree(tiny_model, s.paths.models / "tiny")
    (s.paths.datasets / "d.json").write_text(json.dumps(ALPACA_ROWS))
    return s


@pytest.fixture
def app(settings):
    return create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True,
                       "LORAFLEET_UPLOAD_MAX_BYTES": 4096})


@pytest.fixture
def client(app):
    return client_for(app)


def upload(client, name, content, **form):
    data = content.encode() if isinstance(content, str) else content
    return client.post("/api/v1/datasets", data={"file": (io.BytesIO(data), name), **form},
                       content_type="multipart/form-data")


def snapshot(settings):
    """Every entry (hidden ones too) of the folders an upload may write to, with contents."""
    return {p.relative_to(settings.home).as_posix(): p.read_bytes()
            for folder in (settings.paths.datasets, settings.paths.formats)
            for p in sorted(folder.rglob("*"))}


# uploads --------------------------------------------------------------------------------------
def test_good_uploads_land_in_their_folders_and_are_listed(client, settings):
    jsonl = "\n".join(json.dumps(r) for r in ALPACA_ROWS[:3]) + "\n"
    cases = [  # name, content, form, folder, kind
        ("alpaca.json", json.dumps(ALPACA_ROWS), {}, "datasets", "dataset"),
        ("lines.jsonl", jsonl, {}, "datasets", "dataset"),
        ("notes.txt", "Some raw text.\n\nMore of it.\n", {}, "datasets", "raw_text"),
        ("qa.json", json.dumps(FORMAT), {"kind": "format"}, "formats", "format"),
        ("short-format.json", json.dumps(FORMAT), {}, "formats", "format"),  # kind from the name
    ]
    for name, content, form, folder, kind in cases:
        res = upload(client, name, content, **form)
        assert res.status_code == 201, res.json
        assert res.json["kind"] == kind and res.json["path"] == f"{folder}/{name}"
        assert (settings.home / folder / name).read_text() == content
    assert upload(client, "alpaca.json", "[]").status_code == 400  # (its rows are checked)

    listing = client.get("/api/v1/datasets").json
    datasets = {d["name"]: d for d in listing["datasets"]}
    assert datasets["alpaca.json"]["rows"] == 5 and datasets["lines.jsonl"]["rows"] == 3
    assert datasets["d.json"]["size"] == len(json.dumps(ALPACA_ROWS))
    assert [r["name"] for r in listing["raw_texts"]] == ["notes.txt"]
    user = {f["name"]: f for f in listing["formats"] if f["source"] == "user"}
    assert user["qa"]["key_sets"] == ["instruction,output", "instruction,input,output"]
    assert "short-format" in user
    assert any(f["name"] == "alpaca-format" and f["source"] == "shipped"
               for f in listing["formats"])
    assert listing["max_upload_bytes"] == 4096
    # No temporary file is left beside them.
    assert not [p for p in settings.paths.datasets.iterdir() if p.name.startswith(".")]


BAD_ROW = json.dumps([{"instruction": "a", "output": "b"}] * 3
                     + [{"instruction": "a", "output": ["x", "y"]}])


@pytest.mark.parametrize("name, content, form, status, message", [
    ("bad.json", '[{"instruction": "a", "output": "b"},', {}, 400,
     "bad.json: invalid JSON at line 1"),
    ("bad.json", BAD_ROW, {}, 400, "bad.json row 4: key 'output' is a list, expected text"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": true, "output": "b"}\n',
     {}, 400, "bad.jsonl row 2 (line 2): key 'instruction' is a boolean"),
    ("none.json", "[]", {}, 400, "none.json: the dataset has no rows"),
    ("x-format.json", '{"instruction,output": 3}', {}, 400,
     "x-format.json: entry 'instruction,output': the template is a number"),
    ("x.json", '{"instruction,output": ["a"]}', {"kind": "format"}, 400, "x.json: entry"),
    ("empty.txt", "  \n\n ", {}, 400, "empty.txt: the file is empty"),
    ("latin.txt", "caf\xe9".encode("latin-1"), {}, 400, "latin.txt: not UTF-8 text (byte 3"),
    ("../x.json", json.dumps(ALPACA_ROWS), {}, 400, "'../x.json' is not a usable file name"),
    (".hidden.json", json.dumps(ALPACA_ROWS), {}, 400, "is not a usable file name"),
    ("a b.json", json.dumps(ALPACA_ROWS), {}, 400, "is not a usable file name"),
    ("data.csv", "a,b\n", {}, 400, "data.csv: unknown file type '.csv'"),
    ("notes.txt", "text", {"kind": "format"}, 400, "a format file must end in .json"),
    ("d.json", json.dumps(ALPACA_ROWS), {"kind": "weights"}, 400, "kind must be one of"),
    ("big.json", json.dumps(tiny_rows(100)), {}, 413,
     "big.json is larger than the upload limit of 4.0 KB"),
    ("d.json", json.dumps(ALPACA_ROWS[:1]), {}, 409,
     "datasets/d.json already exists; tick 'overwrite' to replace it"),
])
def test_bad_uploads_are_refused_and_change_nothing(client, settings, name, content, form,
                                                    status, message):
    before = snapshot(settings)
    res = upload(client, name, content, **form)
    assert res.status_code == status, res.json
    assert message in res.json["error"]
    if form.get("kind") != "weights":
        assert res.json["errors"][0]["field"] == "file"
        assert message in res.json["errors"][0]["message"]
    assert snapshot(settings) == before


def test_overwrite_replaces_an_existing_file(client, settings):
    res = upload(client, "d.json", json.dumps(ALPACA_ROWS[:2]), overwrite="1")
    assert res.status_code == 201 and res.json["replaced"] is True and res.json["rows"] == 2
    assert json.loads((settings.paths.datasets / "d.json").read_text()) == ALPACA_ROWS[:2]
    # A bad file is refused even with overwrite, and the old one stays.
    res = upload(client, "d.json", BAD_ROW, overwrite="1")
    assert res.status_code == 400
    assert json.loads((settings.paths.datasets / "d.json").read_text()) == ALPACA_ROWS[:2]


def test_a_request_without_a_file_or_over_the_limit(client):
    res = client.post("/api/v1/datasets", data={"kind": "dataset"},
                      content_type="multipart/form-data")
    assert res.status_code == 400 and "field 'file'" in res.json["error"]
    # Over the limit as a whole request (the body is never parsed).
    res = upload(client, "huge.json", b"x" * 200_000)
    assert res.status_code == 413 and "upload limit of 4.0 KB" in res.json["error"]


def test_the_listing_reports_broken_files_already_in_the_folder(client, settings):
    (settings.paths.datasets / "broken.json").write_text('[{"a": [1]}]')
    (settings.paths.formats / "broken.json").write_text("[]")
    listing = client.get("/api/v1/datasets").json
    broken = next(d for d in listing["datasets"] if d["name"] == "broken.json")
    assert broken["rows"] is None and broken["error"].startswith("broken.json row 1: key 'a'")
    fmt = next(f for f in listing["formats"] if f["name"] == "broken")
    assert fmt["key_sets"] == [] and "must be a JSON object" in fmt["error"]


def test_files_that_are_not_utf8_are_listed_with_the_reason(client, settings):
    """A Latin-1 export copied into the folder by hand: listed with its error, and the page,
    the listing and a preview of it still answer (they used to fail on the decode error)."""
    latin = '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1")
    (settings.paths.datasets / "latin.json").write_bytes(latin)
    (settings.paths.formats / "latin.json").write_bytes(b'{"instruction,output": "\xff"}')
    listing = client.get("/api/v1/datasets").json
    ds = next(d for d in listing["datasets"] if d["name"] == "latin.json")
    assert ds["rows"] is None
    assert ds["error"] == "latin.json: not UTF-8 text (byte 21: invalid continuation byte)"
    fmt = next(f for f in listing["formats"] if f["name"] == "latin")
    assert fmt["error"].startswith("latin.json: not UTF-8 text (byte 24")
    assert client.get("/datasets").status_code == 200
    res = client.get("/api/v1/datasets/preview", query_string={
        "model": "tiny", "dataset": "latin", "format": "alpaca-format"})
    assert res.status_code == 400
    assert res.json["error"] == "datasets/latin.json: not UTF-8 text (byte 21: invalid " \
                                "continuation byte)"


# preview --------------------------------------------------------------------------------------
def test_preview_of_a_dataset_highlights_the_trained_part(client, settings):
    (settings.paths.formats / "qa.json").write_text(json.dumps(FORMAT))
    res = client.get("/api/v1/datasets/preview", query_string={
        "model": "tiny", "dataset": "d", "format": "qa", "train_only_after": "A:",
        "add_eos_token": "1", "limit": 3})
    assert res.status_code == 200, res.json
    body = res.json
    assert len(body["samples"]) == 3
    for sample, row in zip(body["samples"], ALPACA_ROWS, strict=False):
        assert sample["prompt_text"].endswith("A:") and row["instruction"] in sample["prompt_text"]
        assert sample["trained_text"] == f" {row['output']}</s>"
        assert 0 < sample["trained_tokens"] < sample["tokens"] == len(sample["input_ids"])
        assert sample["truncated"] is False
    st = body["stats"]
    assert st["samples"] == 5 and st["shown"] == 3 and st["truncated"] == 0
    assert st["untrained"] == 0 and st["cutoff_len"] == 256
    assert body["request"]["dataset"] == "d.json" and body["request"]["format"] == "qa"


def test_raw_text_preview_arguments(settings):
    """What the subprocess is asked for (formats' own tests cover what it then does)."""
    (settings.paths.datasets / "texts").mkdir()
    (settings.paths.datasets / "texts" / "a.txt").write_text("text")
    req = parse_preview_request({
        "model": "tiny", "raw_text_file": "texts", "cutoff_len": "24", "overlap_len": "4",
        "hard_cut_string": "", "train_only_after": "--- ", "add_eos_token": "on"},
        settings.paths)
    assert req.to_json() == {
        "tokenizer": str(settings.paths.models / "tiny"), "dataset": None, "format": None,
        "raw_text": str(settings.paths.datasets / "texts"), "cutoff_len": 24,
        "raw_text_options": {"overlap_len": 4, "newline_favor_len": 128, "hard_cut_string": "",
                             "min_chars": 0},
        "add_eos_token": True, "train_only_after": "--- ", "limit": 10}
    # Left out, the hard cut is the job default; a format is ignored for raw text.
    req = parse_preview_request({"model": "tiny", "raw_text_file": "texts", "format": "x"},
                                settings.paths)
    assert req.raw_text_options == RawTextOptions(hard_cut_string="\\n\\n\\n")
    assert req.format is None


def test_preview_reports_a_row_that_matches_no_format_entry(client, settings):
    (settings.paths.datasets / "odd.json").write_text(
        json.dumps([{"instruction": "a", "output": "b"}, {"question": "q", "answer": "a"}]))
    res = client.get("/api/v1/datasets/preview", query_string={
        "model": "tiny", "dataset": "odd.json", "format": "alpaca-format"})
    assert res.status_code == 400
    # The CLI's FormatError, with the data folder's path taken out.
    assert res.json["error"].startswith("datasets/odd.json row 2")
    assert str(settings.home) not in res.json["error"]


@pytest.mark.parametrize("query, field, message", [
    ({"dataset": "d", "format": "alpaca-format"}, "model", "is required"),
    ({"model": "../tiny", "dataset": "d", "format": "alpaca-format"}, "model", "no '..'"),
    ({"model": "tiny"}, "dataset", "choose a dataset"),
    ({"model": "tiny", "dataset": "d", "raw_text_file": "x"}, "dataset", "not both"),
    ({"model": "tiny", "dataset": "/etc/passwd", "format": "alpaca-format"}, "dataset",
     "no absolute paths"),
    ({"model": "tiny", "dataset": "missing", "format": "alpaca-format"}, "dataset",
     "'missing' was not found in datasets/"),
    ({"model": "tiny", "dataset": "d"}, "format", "is required with a dataset"),
    ({"model": "tiny", "dataset": "d", "format": "nope"}, "format", "'nope' was not found"),
    ({"model": "tiny", "dataset": "d", "format": "alpaca-format", "cutoff_len": "abc"},
     "cutoff_len", "must be a whole number"),
    ({"model": "tiny", "dataset": "d", "format": "alpaca-format", "limit": "0"}, "limit",
     "at least 1"),
])
def test_preview_parameters_are_checked_before_anything_runs(client, query, field, message):
    res = client.get("/api/v1/datasets/preview", query_string=query)
    assert res.status_code == 400
    assert any(e["field"] == field and message in e["message"] for e in res.json["errors"]), \
        res.json
    assert res.json["error"].startswith("cannot preview:")


def test_overlap_must_be_below_cutoff_for_raw_text(client, settings):
    (settings.paths.datasets / "r.txt").write_text("text")
    res = client.get("/api/v1/datasets/preview", query_string={
        "model": "tiny", "raw_text_file": "r", "cutoff_len": 16, "overlap_len": 16})
    assert res.status_code == 400
    assert res.json["errors"] == [{"field": "overlap_len",
                                   "message": "(16) must be less than cutoff_len (16)"}]


def test_the_dashboard_imports_no_torch():
    code = ("import sys; from dashboard.app import create_app; create_app(); "
            "import dashboard.datasets; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


# page -----------------------------------------------------------------------------------------
def test_datasets_page_and_new_job_preview_button(client):
    html = client.get("/datasets").get_data(as_text=True)
    for testid in ("upload-form", "upload-file", "upload-submit", "upload-error",
                   "datasets-table", "preview-form", "preview-run", "preview-results"):
        assert f'data-testid="{testid}"' in html
    assert 'data-testid="nav-datasets"' in html
    assert '<option value="tiny">tiny</option>' in html
    listing = html.split('id="datasets-listing">', 1)[1].split("</script>", 1)[0]
    assert [d["name"] for d in json.loads(listing)["datasets"]] == ["d.json"]
    html = client.get("/jobs/new").get_data(as_text=True)
    assert 'data-testid="job-preview-run"' in html and 'data-testid="job-preview"' in html
    assert 'data-preview-api="/api/v1/datasets/preview"' in html


def test_preview_form_offers_the_raw_text_settings_at_their_defaults(client):
    """overlap_len, newline_favor_len, hard_cut_string and min_chars are in the preview form,
    hidden until a raw text is chosen (datasets.js shows them), with the job spec's defaults."""
    from html.parser import HTMLParser

    from dispatcher.jobs.specs import default_spec

    class Fields(HTMLParser):
        def __init__(self):
            super().__init__()
            self.wrappers: dict[str, dict] = {}
            self.inputs: dict[str, dict] = {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "div" and "data-raw-only" in a:
                self.wrappers[a["data-testid"]] = a
            elif tag == "input" and a.get("name"):
                self.inputs[a["name"]] = a

    page = Fields()
    page.feed(client.get("/datasets").get_data(as_text=True))
    defaults = default_spec()
    names = ("overlap_len", "newline_favor_len", "hard_cut_string", "min_chars")
    assert sorted(page.wrappers) == sorted(f"preview-field-{n}" for n in names)
    assert all("hidden" in w for w in page.wrappers.values())
    for name in names:
        assert page.inputs[name]["value"] == str(defaults[name]), name
    assert page.inputs["hard_cut_string"]["value"] == "\\n\\n\\n"  # typed form: backslash-n
    assert page.inputs["overlap_len"]["type"] == "number"


# format files: view and copy ------------------------------------------------------------------
def shipped_file(name: str):
    import formats

    return formats.SHIPPED_DIR / f"{name}.json"


SHIPPED = json.loads(shipped_file("alpaca-format").read_text())


def copy(client, body, **kwargs):
    return client.post("/api/v1/formats/copy", json=body, **kwargs)


def test_view_a_shipped_and_a_user_format(client, settings):
    res = client.get("/api/v1/formats/alpaca-format")
    assert res.status_code == 200, res.json
    body = res.json
    assert body["source"] == "shipped" and body["name"] == "alpaca-format"
    assert body["file"] == "alpaca-format.json" and body["hidden_by_user_file"] is False
    assert body["templates"] == SHIPPED
    assert body["key_sets"] == list(SHIPPED)  # the file's order
    assert client.get("/api/v1/formats/alpaca-format.json").json["templates"] == SHIPPED

    (settings.paths.formats / "qa.json").write_text(json.dumps(FORMAT))
    body = client.get("/api/v1/formats/qa").json
    assert body["source"] == "user" and body["templates"] == FORMAT
    assert body["key_sets"] == ["instruction,output", "instruction,input,output"]

    # A user file of a shipped name is the one a job uses, so it is the one shown; the shipped
    # one can still be asked for.
    (settings.paths.formats / "alpaca-format.json").write_text(json.dumps(FORMAT))
    body = client.get("/api/v1/formats/alpaca-format").json
    assert body["source"] == "user" and body["templates"] == FORMAT
    body = client.get("/api/v1/formats/alpaca-format?source=shipped").json
    assert body["source"] == "shipped" and body["templates"] == SHIPPED
    assert body["hidden_by_user_file"] is True
    assert client.get("/api/v1/formats/qa?source=user").json["source"] == "user"


@pytest.mark.parametrize("url, status, message", [
    ("/api/v1/formats/nope", 404, "format 'nope' was not found in formats/ or among the shipped"),
    ("/api/v1/formats/qa?source=shipped", 404, "format 'qa' was not found among the shipped"),
    ("/api/v1/formats/chatml-format?source=user", 404, "'chatml-format' was not found in formats/"),
    ("/api/v1/formats/..%2Fx", 400, "'../x' is not a usable file name"),
    ("/api/v1/formats/sub/alpaca-format", 400, "'sub/alpaca-format' is not a usable file name"),
    ("/api/v1/formats/.secret", 400, "'.secret' is not a usable file name"),
    ("/api/v1/formats/a%20b", 400, "'a b' is not a usable file name"),
    ("/api/v1/formats/qa?source=theirs", 400, "source must be one of user, shipped"),
    ("/api/v1/formats/broken", 400,
     "the user format broken cannot be used: broken.json: invalid JSON at line 1"),
])
def test_viewing_a_missing_or_badly_named_format(client, settings, url, status, message):
    (settings.paths.formats / "qa.json").write_text(json.dumps(FORMAT))
    (settings.paths.formats / "broken.json").write_text('{"instruction,output": ')
    (settings.home / "x.json").write_text(json.dumps(FORMAT))  # what '../x' would reach
    res = client.get(url)
    assert res.status_code == status, res.json
    assert message in res.json["error"], res.json["error"]


def test_copy_a_shipped_format_then_view_it_as_a_user_format(client, settings):
    res = copy(client, {"from": "alpaca-format", "name": "my-format"})
    assert res.status_code == 201, res.json
    entry = res.json
    assert entry["name"] == "my-format" and entry["file"] == "my-format.json"
    assert entry["source"] == "user" and entry["kind"] == "format"
    assert entry["key_sets"] == list(SHIPPED) and entry["error"] is None
    assert entry["replaced"] is False
    copied = settings.paths.formats / "my-format.json"
    assert copied.read_bytes() == shipped_file("alpaca-format").read_bytes()
    # The answer is the entry the listing now has.
    listed = next(f for f in client.get("/api/v1/datasets").json["formats"]
                  if f["name"] == "my-format")
    assert {**listed, "replaced": False} == entry
    body = client.get("/api/v1/formats/my-format").json
    assert body["source"] == "user" and body["templates"] == SHIPPED

    # From a user format, ".json" given in the new name; nothing is left beside the copies.
    res = copy(client, {"from": "my-format", "name": "second.json"})
    assert res.status_code == 201 and res.json["name"] == "second"
    assert sorted(p.name for p in settings.paths.formats.iterdir()) == \
        ["my-format.json", "second.json"]

    # A shipped name: the user file takes its place, as the listing reports.
    res = copy(client, {"from": "vicuna-format", "name": "chatml-format"})
    assert res.status_code == 201, res.json
    chatml = [f for f in client.get("/api/v1/datasets").json["formats"]
              if f["name"] == "chatml-format"]
    assert [(f["source"], f["hidden_by_user_file"]) for f in chatml] == \
        [("user", False), ("shipped", True)]
    vicuna = json.loads(shipped_file("vicuna-format").read_text())
    assert client.get("/api/v1/formats/chatml-format").json["templates"] == vicuna


def test_copy_a_shipped_format_hidden_by_a_user_file(client, settings):
    (settings.paths.formats / "alpaca-format.json").write_text(json.dumps(FORMAT))
    res = copy(client, {"from": "alpaca-format", "name": "a", "source": "shipped"})
    assert res.status_code == 201, res.json
    assert json.loads((settings.paths.formats / "a.json").read_text()) == SHIPPED
    res = copy(client, {"from": "alpaca-format", "name": "b"})  # the user's, as a job would use
    assert json.loads((settings.paths.formats / "b.json").read_text()) == FORMAT


@pytest.mark.parametrize("body, status, field, message", [
    ({"from": "alpaca-format", "name": "a b"}, 400, "name", "'a b' is not a usable file name"),
    ({"from": "alpaca-format", "name": "../x"}, 400, "name", "'../x' is not a usable file name"),
    ({"from": "alpaca-format", "name": "sub/x"}, 400, "name", "'sub/x' is not a usable"),
    ({"from": "alpaca-format", "name": ".json"}, 400, "name", "'.json' is not a usable"),
    ({"from": "alpaca-format", "name": "x" * 125}, 400, "name", ".json' is not a usable"),
    ({"from": "alpaca-format", "name": ""}, 400, "name", "name is required"),
    ({"from": "alpaca-format"}, 400, "name", "name is required"),
    ({"from": "alpaca-format", "name": ["x"]}, 400, "name", "name is required"),
    ({"from": "nope", "name": "x"}, 404, "from",
     "format 'nope' was not found in formats/ or among the shipped formats"),
    ({"from": "qa", "name": "x", "source": "shipped"}, 404, "from",
     "format 'qa' was not found among the shipped formats"),
    ({"from": "../x", "name": "y"}, 400, "from", "'../x' is not a usable file name"),
    ({"name": "y"}, 400, "from", "from is required"),
    ({"from": "qa", "name": "y", "source": "mine"}, 400, "source", "source must be one of"),
    ({"from": "broken", "name": "y", "overwrite": True}, 400, "from",
     "the user format broken cannot be used: broken.json: invalid JSON"),
    ({"from": "alpaca-format", "name": "qa"}, 409, "name",
     "formats/qa.json already exists; choose another name, or copy with overwrite"),
    ({"from": "qa", "name": "qa.json", "overwrite": False}, 409, "name", "already exists"),
    ({"from": "alpaca-format", "name": "x", "overwrite": "maybe?"}, None, None, None),
    ({"from": "alpaca-format", "name": "x", "overwrite": 1}, 400, "overwrite",
     "overwrite must be true or false"),
])
def test_bad_copies_are_refused_and_change_nothing(client, settings, body, status, field,
                                                   message):
    (settings.paths.formats / "qa.json").write_text(json.dumps(FORMAT))
    (settings.paths.formats / "broken.json").write_text('{"instruction,output": ')
    (settings.home / "x.json").write_text(json.dumps(FORMAT))
    before = snapshot(settings)
    res = copy(client, body)
    if status is None:  # a word that is not a "yes" is a no, as for the upload form's checkbox
        assert res.status_code == 201 and res.json["replaced"] is False
        return
    assert res.status_code == status, res.json
    assert message in res.json["error"], res.json["error"]
    assert res.json["errors"][0]["field"] == field
    assert snapshot(settings) == before
    assert (settings.home / "x.json").read_text() == json.dumps(FORMAT)


def test_copy_needs_a_json_object(client, settings):
    before = snapshot(settings)
    for data in ("not json", "[1, 2]", ""):
        res = client.post("/api/v1/formats/copy", data=data, content_type="application/json")
        assert res.status_code == 400 and "send a JSON object" in res.json["error"]
    assert snapshot(settings) == before


def test_copy_with_overwrite_replaces_a_user_format(client, settings):
    target = settings.paths.formats / "qa.json"
    target.write_text(json.dumps(FORMAT))
    res = copy(client, {"from": "alpaca-format", "name": "qa", "overwrite": True})
    assert res.status_code == 201, res.json
    assert res.json["replaced"] is True and res.json["key_sets"] == list(SHIPPED)
    assert target.read_bytes() == shipped_file("alpaca-format").read_bytes()
    # Onto itself: the same bytes again.
    res = copy(client, {"from": "qa", "name": "qa", "overwrite": "true"})
    assert res.status_code == 201 and res.json["replaced"] is True
    assert json.loads(target.read_text()) == SHIPPED
    assert sorted(p.name for p in settings.paths.formats.iterdir()) == ["qa.json"]


def _log_in(app, name):
    """A browser-like client logged in as `name`, and the CSRF header its pages carry."""
    import re

    c = client_for(app)
    page = c.get("/login")
    token = re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()
    res = c.post("/login", data={"username": name, "password": ACCOUNT_PASSWORD,
                                 "csrf_token": token})
    assert res.status_code == 302, res.data
    page = c.get("/datasets")
    token = re.search(rb'name="csrf-token" content="([^"]+)"', page.data).group(1).decode()
    return c, {"X-CSRF-Token": token}


ACCOUNT_PASSWORD = "correct horse battery"


def test_format_copies_follow_the_upload_rules_for_who_may_write(settings):
    """With accounts: no login, no copy (nor upload); a member may copy with the page's CSRF
    token and not without it, like an upload; an API token needs no CSRF token."""
    from dispatcher.access.accounts import Accounts

    accounts = Accounts(settings.home)
    accounts.add("ana", ACCOUNT_PASSWORD, "admin")  # the first account must be an admin
    accounts.add("bo", ACCOUNT_PASSWORD, "member")
    token = accounts.new_token("bo")
    app = create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True})
    anonymous = client_for(app)
    before = snapshot(settings)
    assert anonymous.get("/api/v1/formats/alpaca-format").status_code == 401
    assert copy(anonymous, {"from": "alpaca-format", "name": "a"}).status_code == 401
    assert upload(anonymous, "a-format.json", json.dumps(FORMAT)).status_code == 401

    bo, csrf = _log_in(app, "bo")
    res = copy(bo, {"from": "alpaca-format", "name": "a"})
    assert res.status_code == 403 and "CSRF" in res.json["error"]
    assert upload(bo, "a-format.json", json.dumps(FORMAT)).status_code == 403
    assert snapshot(settings) == before

    assert bo.get("/api/v1/formats/alpaca-format").json["source"] == "shipped"
    assert copy(bo, {"from": "alpaca-format", "name": "a"}, headers=csrf).status_code == 201
    res = bo.post("/api/v1/datasets", headers=csrf, content_type="multipart/form-data",
                  data={"file": (io.BytesIO(json.dumps(FORMAT).encode()), "b-format.json")})
    assert res.status_code == 201
    res = copy(client_for(app), {"from": "a", "name": "c"},
               headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 201, res.json
    assert sorted(p.name for p in settings.paths.formats.iterdir()) == \
        ["a.json", "b-format.json", "c.json"]


def test_single_user_browser_copies_need_the_csrf_token(app, settings):
    """A cross-site page posting from the user's browser is refused, as for an upload."""
    client, _ = browser_for(app)  # the user's browser: its session cookie, no CSRF token
    before = snapshot(settings)
    evil = {"Origin": "https://evil.example"}
    assert copy(client, {"from": "alpaca-format", "name": "a"}, headers=evil).status_code == 403
    res = client.post("/api/v1/datasets", headers=evil, content_type="multipart/form-data",
                      data={"file": (io.BytesIO(json.dumps(FORMAT).encode()), "a-format.json")})
    assert res.status_code == 403
    assert snapshot(settings) == before
