"""The evaluations table: rows appended by workers, comments edited by the dashboard."""

from __future__ import annotations

import threading

import pytest

from dispatcher.evaltable import EvalTable


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
