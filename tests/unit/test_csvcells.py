"""The one CSV-cell guard every exported CSV uses."""

from __future__ import annotations

import pytest

from dispatcher.jobs.csvcells import cell, restore


@pytest.mark.parametrize("text", ['=HYPERLINK("http://x","y")', "+1+2", "-2+3", "@SUM(A1)",
                                  "\tcmd", "\rcmd", "'=x", "''@y"])
def test_formulas_get_one_apostrophe_and_restore_gives_them_back(text):
    assert cell(text) == "'" + text
    assert restore(cell(text)) == text


@pytest.mark.parametrize("text", ["plain", "-5e-4", "+3", "'quoted", "", "a=b", "'-1"])
def test_other_text_and_numbers_stay_as_they_are(text):
    assert cell(text) == text
    assert restore(cell(text)) == text


def test_values():
    assert cell(None) == "" and cell(-3) == "-3" and cell(2.5) == "2.5"
    assert cell(["q", "v"]) == "q v" and cell(["=a", "b"]) == "'=a b"
