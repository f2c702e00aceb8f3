"""The evaluations table: rows appended by workers, comments edited by the dashboard."""

from __future__ import annotations

import threading

import pytest

from dispatcher.jobs.evaltable import EvalTable


def add(t: EvalTable, ppl: float, loras=(), stride=512, comment=""):
    return t.add(base_model="m", loras=list(loras), text_file="t.txt", perplexity=ppl,
                 stride=stride, max_length=0, tokens=100, job="j1", comment=comment)


def test_rows_round_trip_and_find_the_latest_same_combination(tmp_path):
    t = EvalTable(tmp_path / "evals" / "evaluations.csv")
    assert t.rows() == [] and t.find("m", [], "t.txt", 512, 0) is None
    add(t, 12.5)
    add(t, 9.25, loras=["b", "a"])
    newer = add(t, 9.0, loras=["a", "b"], comment="second, with a comma")
    rows = t.rows()
    assert [r["perplexity"] for r in rows] == [12.5, 9.25, 9.0]
    assert rows[1]["loras"] == ["b", "a"] and rows[2]["comment"] == "second, with a comma"
    assert t.find("m", ["a", "b"], "t.txt", 512, 0)["id"] == newer["id"]  # order of LoRAs: same
    assert t.find("m", ["a"], "t.txt", 512, 0) is None
    assert t.find("m", [], "t.txt", 256, 0) is None  # another stride is another combination


def test_comment_edit_keeps_other_rows(tmp_path):
    t = EvalTable(tmp_path / "e.csv")
    a, b = add(t, 3.0), add(t, 4.0)
    t.set_comment(b["id"], 'quoted "text"\nand a newline')
    rows = {r["id"]: r for r in t.rows()}
    assert rows[b["id"]]["comment"] == 'quoted "text"\nand a newline'
    assert rows[a["id"]]["perplexity"] == 3.0
    with pytest.raises(KeyError):
        t.set_comment("nope", "x")


def test_concurrent_writers_lose_nothing(tmp_path):
    t = EvalTable(tmp_path / "e.csv")
    threads = [threading.Thread(target=lambda i=i: add(t, float(i))) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(r["perplexity"] for r in t.rows()) == [float(i) for i in range(20)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_formula_comment_is_plain_text_in_the_file_and_survives_edits_unchanged(tmp_path):
    """A comment (or name) a spreadsheet would run as a formula is written with one leading
    apostrophe; reading it back gives the text as typed, and editing the table again (here:
    twice) never adds a second apostrophe."""
    import csv

    t = EvalTable(tmp_path / "evaluations.csv")
    formula = '=HYPERLINK("http://x","y")'
    row = add(t, 7.5, loras=["@lora"], comment=formula)
    add(t, 8.0, comment="-2+3")
    for _ in range(2):  # each edit reads the whole table back and rewrites it
        t.set_comment(row["id"], formula)
    with open(t.path, newline="") as f:
        cells = list(csv.DictReader(f))
    assert cells[0]["comment"] == "'" + formula
    assert cells[0]["loras"] == "'@lora"
    assert cells[1]["comment"] == "'-2+3" and cells[1]["perplexity"] == "8.0"
    rows = t.rows()
    assert rows[0]["comment"] == formula and rows[0]["loras"] == ["@lora"]
    assert rows[1]["comment"] == "-2+3"
    t.set_comment(row["id"], "'=typed with its own apostrophe")
    assert t.rows()[0]["comment"] == "'=typed with its own apostrophe"


def test_with_base_compares_on_the_same_text_and_settings_only(tmp_path):
    from dispatcher.jobs.evaltable import with_base

    t = EvalTable(tmp_path / "e.csv")
    t.add(base_model="m", loras=[], text_file="a.txt", perplexity=20.0, stride=512, max_length=64, tokens=1)
    t.add(base_model="m", loras=[], text_file="a.txt", perplexity=10.0, stride=512, max_length=64, tokens=1)
    t.add(base_model="m", loras=["x"], text_file="a.txt", perplexity=8.0, stride=512, max_length=64, tokens=1)
    t.add(base_model="m", loras=["x"], text_file="a.txt", perplexity=8.0, stride=256, max_length=64, tokens=1)
    rows = with_base(t.rows())
    assert [r["base_perplexity"] for r in rows] == [None, None, 10.0, None]  # the newest base
    assert rows[2]["vs_base"] == -2.0 and rows[2]["vs_base_pct"] == -20.0
    assert rows[3]["vs_base"] is None  # another stride: never measured
