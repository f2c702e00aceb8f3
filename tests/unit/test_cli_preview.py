"""`lorafleet data preview`: runs without Redis or a server, on a real tokenizer."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from formats import SHIPPED_DIR
from tests.tiny import make_tiny_model, write_tiny_dataset, write_tiny_raw_text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tok"))


def run(*args):
    return CliRunner().invoke(main, ["data", "preview", *map(str, args)])


def test_table_for_a_dataset(tok, tmp_path):
    ds = write_tiny_dataset(tmp_path / "d.json", n=5)
    res = run("--tokenizer", tok, "--dataset", ds, "--format", SHIPPED_DIR / "alpaca-format.json")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["#", "tokens", "trained", "cut", "text"]
    assert "5 samples" in res.output


def test_json_lines_with_masking(tok, tmp_path):
    ds = write_tiny_dataset(tmp_path / "d.json", n=3)
    res = run("--tokenizer", tok, "--dataset", ds, "--format",
              SHIPPED_DIR / "alpaca-format.json", "--train-only-after", "### Response:", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"])
        assert r["labels"][0] == -100 and r["labels"][-1] != -100
        assert "### Response:" in r["text"]


def test_raw_text_chunks_fit_the_cutoff(tok, tmp_path):
    raw = write_tiny_raw_text(tmp_path / "r.txt")
    res = run("--tokenizer", tok, "--raw-text", raw, "--cutoff-len", 32, "--overlap-len", 8,
              "--json", "--limit", 0)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) > 3 and all(len(r["input_ids"]) <= 32 for r in rows)


def test_errors_name_the_row_and_exit_non_zero(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "y"}]')
    res = run("--tokenizer", tok, "--dataset", bad, "--format", SHIPPED_DIR / "alpaca-format.json")
    assert res.exit_code != 0
    assert "bad.json row 2: key 'instruction' is a list" in res.output
    res = run("--tokenizer", tok, "--raw-text", bad, "--cutoff-len", 16, "--overlap-len", 16)
    assert res.exit_code != 0 and "--overlap-len (16) must be less than --cutoff-len" in res.output
    res = run("--tokenizer", tok)
    assert res.exit_code != 0 and "either --dataset" in res.output


def test_json_carries_counts_and_the_trained_part(tok, tmp_path):
    ds = write_tiny_dataset(tmp_path / "d.json", n=4)
    res = run("--tokenizer", tok, "--dataset", ds, "--format", SHIPPED_DIR / "alpaca-format.json",
              "--train-only-after", "### Response:", "--add-eos-token", "--json", "--stats",
              "--limit", 3)
    assert res.exit_code == 0, res.output
    *rows, last = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["tokens"] == len(r["input_ids"]) and r["truncated"] is False
        assert r["trained_tokens"] == sum(1 for label in r["labels"] if label != -100)
        # The masked prefix ends with the marker; what follows it is trained, EOS included.
        assert r["prompt_text"].startswith("<s>") and r["prompt_text"].endswith("### Response:")
        assert r["trained_text"].endswith("</s>")
        assert r["prompt_text"] + r["trained_text"] == "<s>" + r["text"] + "</s>"
    stats = last["stats"]
    assert stats["samples"] == 4 and stats["shown"] == 3 and stats["truncated"] == 0
    assert stats["untrained"] == 0 and stats["longest"] >= max(r["tokens"] for r in rows)
    assert stats["trained_tokens"] < stats["tokens"]


def test_stats_count_samples_cut_at_the_cutoff(tok, tmp_path):
    ds = write_tiny_dataset(tmp_path / "d.json", n=2)
    res = run("--tokenizer", tok, "--dataset", ds, "--format", SHIPPED_DIR / "alpaca-format.json",
              "--cutoff-len", 8, "--json", "--stats")
    assert res.exit_code == 0, res.output
    *rows, last = [json.loads(line) for line in res.output.splitlines()]
    assert [r["truncated"] for r in rows] == [True, True]
    assert all(r["tokens"] == 8 == r["trained_tokens"] for r in rows)
    for r in rows:  # nothing masked: the trained part is the start of the text, cut short
        assert r["prompt_text"] == "" and ("<s>" + r["text"]).startswith(r["trained_text"])
        assert len(r["trained_text"]) < len(r["text"])
    assert last["stats"] == {"samples": 2, "tokens": 16, "trained_tokens": 16, "truncated": 2,
                             "untrained": 0, "longest": 8, "shown": 2, "cutoff_len": 8}
    # Without --json, --stats still ends the table output with the JSON line.
    res = run("--tokenizer", tok, "--dataset", ds, "--format", SHIPPED_DIR / "alpaca-format.json",
              "--cutoff-len", 8, "--stats")
    assert "2 samples" in res.output
    assert json.loads(res.output.splitlines()[-1])["stats"]["truncated"] == 2


def test_errors_go_to_stderr_and_nothing_to_stdout(tok, tmp_path):
    fmt = SHIPPED_DIR / "alpaca-format.json"
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    cases = [
        # A file that is not UTF-8 is named, with the first bad byte (no traceback).
        (["--tokenizer", tok, "--dataset", latin, "--format", fmt],
         f"{latin}: not UTF-8 text (byte 21: invalid continuation byte)"),
        (["--tokenizer", tok, "--dataset", latin], "--dataset needs --format"),
        (["--tokenizer", tmp_path, "--dataset", latin, "--format", fmt],
         f"{tmp_path}: cannot load a tokenizer"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.exit_code != 0, res.output
        assert message in res.stderr and res.stdout == "", res.output
        assert "Traceback" not in res.output


def test_raw_text_folder_with_hard_cut_min_chars_and_newline_favor(tok, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    # Name order: a.txt before b.txt; CRs are removed; "##" typed with \n around it is the cut.
    (folder / "b.txt").write_bytes(b"second file line one\r\nline two of the second file\r\n")
    (folder / "a.txt").write_text("first part here\n##\nshort\n##\nthird part is long enough\n")
    res = run("--tokenizer", tok, "--raw-text", folder, "--hard-cut-string", "\\n##\\n",
              "--min-chars", 6, "--newline-favor-len", 0, "--cutoff-len", 64,
              "--overlap-len", 8, "--json", "--limit", 0)
    assert res.exit_code == 0, res.output
    texts = [json.loads(line)["text"] for line in res.stdout.splitlines()]
    # "short" (5 characters) is dropped; each file starts a part of its own; no CR survives.
    # A chunk's text is its tokens decoded, BOS included (as text-generation-webui decodes them).
    assert texts == ["<s>first part here", "<s>third part is long enough\n",
                     "<s>second file line one\nline two of the second file\n"]


def test_raw_text_refuses_a_single_file_that_is_not_txt(tok, tmp_path):
    # Raw text is "a .txt file, or a folder of them": a JSON dataset given as --raw-text would
    # otherwise be chunked as text, braces and all.
    ds = write_tiny_dataset(tmp_path / "d.json", n=3)
    res = run("--tokenizer", tok, "--raw-text", ds)
    assert res.exit_code == 2, res.output
    assert f"--raw-text {ds}: not a .txt file" in res.stderr and res.stdout == ""
    assert "--dataset" in res.stderr and "Traceback" not in res.output
    # A folder is fine whatever else it holds: only its .txt files are read, so the folder
    # with d.json and r.txt gives exactly the samples of r.txt alone.
    raw = write_tiny_raw_text(tmp_path / "r.txt")
    outputs = []
    for path in (tmp_path, raw):
        res = run("--tokenizer", tok, "--raw-text", path, "--cutoff-len", 32, "--overlap-len", 8,
                  "--json", "--limit", 0)
        assert res.exit_code == 0, res.output
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) > 3
