"""Data files nobody planned for: random bytes, and random but valid-looking datasets, format files
and raw texts, through the upload check (dashboard/data_files.check_upload, what POST
/api/v1/datasets runs before it writes), through `lorafleet data preview` (the command itself,
on a real tokenizer) and through the dashboard's preview. Each gives a result or a clear error
(the upload check: a 400 naming the field; the command: "Error: ..." and exit 1 or 2; the
dashboard: a 400 naming the field), never a crash."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from dashboard.data_files import check_upload
from dashboard.errors import DashboardError
from dispatcher.cli import main
from dispatcher.settings import DataPaths
from formats import SHIPPED_DIR
from tests.fuzz import tally
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import SINGLE_USER, Req, changes, check_answer, send, snapshot
from tests.fuzz.strategies import json_values, odd_text, raw_json

pytestmark = pytest.mark.fuzz

ROW_KEYS = ("instruction", "input", "output", "system", "text", "user", "response", "")
CELL = st.one_of(st.text(max_size=60), odd_text(30), st.integers(), st.none(), st.booleans(),
                 st.lists(st.text(max_size=5), max_size=2), st.floats())
TEMPLATE = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(
    [f"%{k}%" for k in ROW_KEYS] + ["%", "%%", "%unknown%", "\n", "### Response:", "<s>"])),
    max_size=8).map("".join)


def rows() -> st.SearchStrategy[list]:
    row = st.dictionaries(st.sampled_from(ROW_KEYS) | odd_text(10), CELL, max_size=4)
    return st.lists(row | json_values(), max_size=6)


# Cells of plausible rows: never empty (an empty cell counts as a missing key, and a row then
# matches no template: an error, which the random rows reach often enough).
TEXT = st.text(min_size=1, max_size=80).filter(str.strip) | st.sampled_from((
    "### Response:", "\n\n\nx", "é" * 50, "<s></s>", "%output%", "\u2028\x00\ufeff"))
PLAUSIBLE_ROW = st.one_of(
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}),
    st.fixed_dictionaries({"instruction": TEXT, "input": TEXT, "output": TEXT}),
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT,
                                                                          "system": TEXT}))


def dataset_bytes(data) -> tuple[bytes, str]:
    """A dataset file: plausible rows (alpaca-like, any text) or random ones, as JSON or JSON
    lines, or broken JSON, or random bytes."""
    how = data.draw(st.sampled_from(("json", "json", "jsonl", "broken", "bytes", "any")),
                    label="dataset as")
    plausible = data.draw(st.integers(0, 2), label="random rows") != 2
    value = data.draw(st.lists(PLAUSIBLE_ROW, min_size=1, max_size=6) if plausible else rows(),
                      label="rows")
    if how == "json":
        return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass"), ".json"
    if how == "jsonl":
        lines = [json.dumps(r, allow_nan=True) for r in value]
        if lines and data.draw(st.booleans(), label="blank line"):
            lines.insert(data.draw(st.integers(0, len(lines))), "")
        return "\n".join(lines).encode("utf-8", "surrogatepass"), ".jsonl"
    if how == "broken":
        return raw_json(data, value), ".json"
    if how == "any":
        return json.dumps(data.draw(json_values()), allow_nan=True).encode(
            "utf-8", "surrogatepass"), ".json"
    return data.draw(st.binary(max_size=500), label="bytes"), data.draw(
        st.sampled_from((".json", ".jsonl")))


def format_bytes(data) -> bytes:
    """A format file: key sets -> templates (plausible ones for alpaca-like rows, or random),
    or something that only looks like one."""
    how = data.draw(st.sampled_from(("format", "format", "broken", "bytes", "any")),
                    label="format as")
    if data.draw(st.integers(0, 2), label="random format") != 2:
        value = {keys: data.draw(TEMPLATE, label=keys) + "".join(
                     f"%{k}%" for k in keys.split(","))
                 for keys in ("instruction,output", "instruction,input,output")}
    else:
        keysets = st.lists(st.sampled_from(ROW_KEYS), max_size=3).map(",".join) | odd_text(15)
        value = data.draw(st.dictionaries(keysets, TEMPLATE | json_values(), max_size=4),
                          label="format")
    if how == "format":
        return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    if how == "broken":
        return raw_json(data, value)
    if how == "any":
        return json.dumps(data.draw(json_values()), allow_nan=True).encode(
            "utf-8", "surrogatepass")
    return data.draw(st.binary(max_size=300), label="bytes")


def raw_text_bytes(data) -> bytes:
    """A raw text: prose with odd characters, lines and hard cuts, or random bytes."""
    how = data.draw(st.sampled_from(("text", "lines", "lines", "bytes", "blank")),
                    label="text as")
    if how == "bytes":
        return data.draw(st.binary(max_size=2000), label="bytes")
    if how == "blank":
        return data.draw(st.sampled_from((b"", b"\n\n\n", b"   \t\n")), label="blank")
    if how == "lines":
        parts = data.draw(st.lists(st.text(min_size=1, max_size=80) | st.sampled_from(
            ("\n\n\n", "\n", "   ", "\r\n", "\u2028", "###", "The quick brown fox. " * 5)),
            min_size=1, max_size=30), label="lines")
        return "".join(parts).encode("utf-8", "surrogatepass")
    return data.draw(st.text(min_size=20, max_size=3000), label="text").encode(
        "utf-8", "surrogatepass")


# -- the upload check ---------------------------------------------------------------------------
@fuzz_settings(short=60, weight=6)
@given(data=st.data())
def test_upload_check_gives_a_result_or_a_400_naming_the_field(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(("", "dataset", "format", "raw_text", "auto")), label="kind")
    which = data.draw(st.sampled_from(("dataset", "format", "raw_text")), label="content")
    if which == "dataset":
        content, ext = dataset_bytes(data)
    elif which == "format":
        content, ext = format_bytes(data), data.draw(st.sampled_from(("-format.json", ".json")))
    else:
        content, ext = raw_text_bytes(data), ".txt"
    name = "fz" + ext
    paths = DataPaths(Path("/nonexistent/lorafleet-fuzz"))  # the check reads no file
    # A function call, no data folder: what it wrote is not measured ("n/a" in the figures).
    tally.case("data files: upload check")
    try:
        checked = check_upload(name, kind, content, paths)
    except DashboardError as e:
        tally.answer("data files: upload check", e.status, True)
        assert e.status == 400, (e.status, e.message)
        assert e.message and e.errors and all(p["field"] in ("file", "kind") and p["message"]
                                              for p in e.errors), e.errors
        return
    except Exception:
        tally.answer("data files: upload check", 500, True)  # a crash: counted, then shown
        raise
    tally.answer("data files: upload check", 201, False)
    assert checked.name == name and checked.kind in ("dataset", "format", "raw_text")
    if checked.kind == "dataset":
        assert checked.rows and checked.rows > 0
    if checked.kind == "format":
        assert checked.key_sets


# -- `lorafleet data preview` -------------------------------------------------------------------
def preview_options(data) -> list[str]:
    cutoff = data.draw(st.integers(1, 300) | st.sampled_from((1, 2, 3)), label="cutoff")
    args = ["--cutoff-len", str(cutoff)]
    if data.draw(st.booleans(), label="overlap"):
        args += ["--overlap-len", str(data.draw(st.integers(0, max(0, cutoff - 1))))]
    else:
        args += ["--overlap-len", "0"]
    for opt, strat in (("--newline-favor-len", st.integers(0, 400).map(str)),
                       ("--hard-cut-string", st.sampled_from(("\\n\\n\\n", "", "\\n", "###",
                                                              "\\", "\\\\n")) | st.text(max_size=5)),
                       ("--train-only-after", st.sampled_from(("### Response:", "", "\n",
                                                               "yo")) | st.text(max_size=8)),
                       ("--min-chars", st.integers(0, 500).map(str)),
                       ("--limit", st.integers(0, 30).map(str))):
        if data.draw(st.booleans(), label=f"send {opt}"):
            value = data.draw(strat, label=opt)
            if "\x00" not in value:  # argv cannot carry a NUL byte
                args += [opt, value]
    for flag in ("--add-eos-token", "--json", "--stats"):
        if data.draw(st.booleans(), label=flag):
            args.append(flag)
    return args


def run_preview(args: list[str]):
    return CliRunner().invoke(main, ["data", "preview", *args])


def cli_status(result) -> int:
    """The command's outcome as the tally counts answers: 200 a result, 400 its error message,
    500 a crash (an exception other than click's exit)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return 500
    return 200 if result.exit_code == 0 else 400


def preview_counted(prop: str, args: list[str]) -> None:
    """`lorafleet data preview ARGS`, counted under `prop` and checked (check_cli). What the
    command wrote is not measured ("n/a" in the figures)."""
    tally.case(prop)
    result = run_preview(args)
    tally.answer(prop, cli_status(result), result.exit_code != 0)
    check_cli(result, args)


def check_cli(result, args) -> None:
    """Exit 0 with its output, or 1/2 with click's "Error: ..." line: never an exception."""
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"lorafleet data preview {args} crashed: {result.exception!r}\n{out[-2000:]}"
    assert "Traceback" not in out, out[-2000:]
    if result.exit_code == 0:
        if "--json" in args:
            for line in out.rstrip("\n").split("\n"):  # (not splitlines: U+2028 is in text)
                json.loads(line)
        else:
            assert re.search(r"\d+ samples, \d+ tokens", out), out[-1000:]
    else:
        assert result.exit_code in (1, 2), (result.exit_code, out[-1000:])
        assert "Error: " in out, out[-1000:]


@fuzz_settings(short=25, weight=3)
@given(data=st.data())
def test_preview_of_a_dataset_gives_samples_or_an_error(tokenizer_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("preview")
    content, ext = dataset_bytes(data)
    dataset = folder / f"d{ext}"
    dataset.write_bytes(content)
    if data.draw(st.integers(0, 3), label="shipped format") == 0:
        fmt = data.draw(st.sampled_from(sorted(SHIPPED_DIR.glob("*.json"))), label="shipped")
    else:
        fmt = folder / "f.json"
        fmt.write_bytes(format_bytes(data))
    args = ["--tokenizer", str(tokenizer_dir), "--dataset", str(dataset), "--format", str(fmt),
            *preview_options(data)]
    preview_counted("data files: lorafleet data preview (dataset)", args)


@fuzz_settings(short=25, weight=3)
@given(data=st.data())
def test_preview_of_a_raw_text_gives_samples_or_an_error(tokenizer_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("raw")
    if data.draw(st.booleans(), label="a folder of texts"):
        target = folder / "texts"
        target.mkdir()
        for i in range(data.draw(st.sampled_from((1, 2, 3, 0)), label="files")):
            (target / f"part{i}.txt").write_bytes(raw_text_bytes(data))
        if data.draw(st.booleans(), label="a dataset in the folder"):
            (target / "rows.json").write_bytes(dataset_bytes(data)[0])
    else:
        target = folder / "t.txt"
        target.write_bytes(raw_text_bytes(data))
    args = ["--tokenizer", str(tokenizer_dir), "--raw-text", str(target), *preview_options(data)]
    preview_counted("data files: lorafleet data preview (raw text)", args)


# -- the dashboard's preview (a fresh Python per request: few examples) --------------------------
@fuzz_settings(short=1, weight=0.05)
@given(data=st.data())
def test_dashboard_preview_gives_samples_or_a_400(fleets, tokenizer_dir, data):
    import shutil

    prop = "data files: dashboard preview"
    fleet = fleets[SINGLE_USER]
    model = fleet.home / "models" / "fz-tiny"
    if not model.exists():
        shutil.copytree(tokenizer_dir, model)
    raw = data.draw(st.booleans(), label="raw text")
    if raw:
        (fleet.home / "datasets" / "fz-raw.txt").write_bytes(raw_text_bytes(data))
        query = {"raw_text_file": "fz-raw.txt", "overlap_len": "0"}
    else:
        content, ext = dataset_bytes(data)
        (fleet.home / "datasets" / f"fz-preview{ext}").write_bytes(content)
        (fleet.home / "formats" / "fz-preview-format.json").write_bytes(format_bytes(data))
        query = {"dataset": f"fz-preview{ext}", "format": "fz-preview-format"}
    query.update({"model": "fz-tiny", "cutoff_len": str(data.draw(st.integers(1, 128))),
                  "train_only_after": data.draw(st.sampled_from(("", "### Response:"))),
                  "hard_cut_string": data.draw(st.sampled_from(("\\n\\n\\n", "", "x")))})
    from urllib.parse import urlencode

    req = Req(method="GET", path="/api/v1/datasets/preview", query=urlencode(query).encode(),
              who="token", user="local")
    before = snapshot(fleet)
    tally.case(prop)
    ans = send(fleet, req)
    wrote = changes(before, snapshot(fleet))
    tally.answer(prop, ans.status, ans.status >= 400, wrote.bytes_written)
    check_answer(fleet, req, ans, fleet.secrets())
    assert ans.status in (200, 400), (ans.status, ans.body[:1000])
    assert not wrote, f"the preview ({ans.status}) wrote {wrote.describe()}"
    if ans.status == 200:
        assert "samples" in json.loads(ans.body)
