"""The Datasets API: checked uploads, the listing, and sample previews through the CLI's preview
in a real subprocess on a tiny real tokenizer (the dashboard itself never imports torch)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from dashboard.app import create_app
from dashboard.data_files import parse_preview_request
from dispatcher.settings import Settings
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
    return app.test_client()


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
    ("bad.json", BAD_ROW, {}, 400, "bad.json row 3: key 'output' is a list, expected text"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": true, "output": "b"}\n',
     {}, 400, "bad.jsonl row 1 (line 2): key 'instruction' is a boolean"),
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
    assert broken["rows"] is None and broken["error"].startswith("broken.json row 0: key 'a'")
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
    """What the subprocess is asked for (the CLI's own tests cover what it then does)."""
    (settings.paths.datasets / "texts").mkdir()
    (settings.paths.datasets / "texts" / "a.txt").write_text("text")
    req = parse_preview_request({
        "model": "tiny", "raw_text_file": "texts", "cutoff_len": "24", "overlap_len": "4",
        "hard_cut_string": "", "train_only_after": "--- ", "add_eos_token": "on"},
        settings.paths)
    assert req.cli_args() == [
        "data", "preview", "--json", "--stats", f"--tokenizer={settings.paths.models / 'tiny'}",
        f"--raw-text={settings.paths.datasets / 'texts'}", "--cutoff-len=24", "--overlap-len=4",
        "--newline-favor-len=128", "--min-chars=0", "--limit=10", "--hard-cut-string=",
        "--train-only-after=--- ", "--add-eos-token"]
    # Left out, the hard cut is the job default; a format is ignored for raw text.
    req = parse_preview_request({"model": "tiny", "raw_text_file": "texts", "format": "x"},
                                settings.paths)
    assert "--hard-cut-string=\\n\\n\\n" in req.cli_args() and req.format_file is None


def test_preview_reports_a_row_that_matches_no_format_entry(client, settings):
    (settings.paths.datasets / "odd.json").write_text(
        json.dumps([{"instruction": "a", "output": "b"}, {"question": "q", "answer": "a"}]))
    res = client.get("/api/v1/datasets/preview", query_string={
        "model": "tiny", "dataset": "odd.json", "format": "alpaca-format"})
    assert res.status_code == 400
    # The CLI's FormatError, with the data folder's path taken out.
    assert res.json["error"].startswith("datasets/odd.json row 1")
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

    from dispatcher.specs import default_spec

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
