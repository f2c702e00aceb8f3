"""Format files and dataset rows: exact rendering, the matching rule, and the error messages."""

from __future__ import annotations

import json

import pytest

from formats import (
    SHIPPED_DIR,
    FormatError,
    InvalidJSONError,
    NoMatchingTemplateError,
    ValueTypeError,
    load_format,
    load_rows,
    parse_format,
    parse_rows,
    render_row,
    shipped_formats,
)

CHATBOT = {
    "instruction,output": "User: %instruction%\nAssistant: %output%",
    "instruction,input,output": "User: %instruction%: %input%\nAssistant: %output%",
}


@pytest.fixture
def chatbot():
    return parse_format(CHATBOT, source="formats/chatbot.json")


def test_render_without_input(chatbot) -> None:
    row = {"instruction": "Add 2 and 3", "output": "5"}
    assert render_row(chatbot, row) == "User: Add 2 and 3\nAssistant: 5"


def test_render_with_input(chatbot) -> None:
    row = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert render_row(chatbot, row) == "User: Translate: chat\nAssistant: cat"


def test_empty_and_blank_input_select_the_entry_without_input(chatbot) -> None:
    for empty in ("", "   \n", None):
        row = {"instruction": "Hi", "input": empty, "output": "Hello"}
        assert render_row(chatbot, row) == "User: Hi\nAssistant: Hello"


def test_blank_value_is_still_substituted_verbatim() -> None:
    fmt = parse_format({"a": "[%a%][%b%]"})
    assert render_row(fmt, {"a": "x", "b": "  "}) == "[x][  ]"
    assert render_row(fmt, {"a": "x", "b": None}) == "[x][]"


def test_values_are_not_trimmed(chatbot) -> None:
    row = {"instruction": "  Hi ", "output": "Hello\n"}
    assert render_row(chatbot, row) == "User:   Hi \nAssistant: Hello\n"


def test_first_matching_entry_in_file_order_wins() -> None:
    fmt = parse_format('{"a,b": "first %a% %b%", "b,a": "second %a% %b%", "a": "only %a%"}')
    assert render_row(fmt, {"b": "B", "a": "A"}) == "first A B"
    assert render_row(fmt, {"a": "A", "b": ""}) == "only A"


def test_key_names_in_the_format_are_trimmed() -> None:
    fmt = parse_format({"instruction, output": "%instruction%=%output%"})
    assert render_row(fmt, {"instruction": "q", "output": "a"}) == "q=a"


def test_numbers_are_text() -> None:
    fmt = parse_format({"q,a": "%q% -> %a%"})
    assert render_row(fmt, {"q": "half of 5", "a": 2.5}) == "half of 5 -> 2.5"
    assert render_row(fmt, {"q": 7, "a": 0}) == "7 -> 0"


def test_single_pass_substitution_does_not_expand_placeholders_inside_values() -> None:
    fmt = parse_format({"a,b": "%a%|%b%"})
    assert render_row(fmt, {"a": "%b%", "b": "B"}) == "%b%|B"


def test_unknown_placeholders_and_lone_percent_signs_stay() -> None:
    fmt = parse_format({"a": "100% %a% %zzz%"})
    assert render_row(fmt, {"a": "sure"}) == "100% sure %zzz%"


def test_no_matching_entry_names_row_key_set_and_format_key_sets(chatbot) -> None:
    with pytest.raises(NoMatchingTemplateError) as caught:
        render_row(
            chatbot,
            {"output": "x", "context": "y", "input": ""},
            row_index=3,
            source="datasets/x.json",
        )
    assert str(caught.value) == (
        "datasets/x.json row 4: keys {context, output} match no entry of format "
        "formats/chatbot.json (its key sets: {instruction, output}; {input, instruction, output})"
    )
    assert caught.value.row == 3
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(["a", "b"], "a list"), ({"x": 1}, "an object"), (True, "a boolean")],
)
def test_non_text_values_are_errors_naming_row_and_key(chatbot, value, kind) -> None:
    with pytest.raises(ValueTypeError) as caught:
        render_row(
            chatbot, {"instruction": "q", "output": value}, row_index=3, source="datasets/x.json"
        )
    assert str(caught.value) == f"datasets/x.json row 4: key 'output' is {kind}, expected text"
    assert (caught.value.row, caught.value.key) == (3, "output")


def test_format_file_must_be_an_object_of_text_templates() -> None:
    with pytest.raises(FormatError) as caught:
        parse_format("[1, 2]", source="f.json")
    assert str(caught.value) == (
        "f.json: a format file must be a JSON object mapping key lists to templates, got a list"
    )
    with pytest.raises(FormatError) as caught:
        parse_format({"a,b": ["x"]}, source="f.json")
    assert str(caught.value) == "f.json: entry 'a,b': the template is a list, expected text"
    with pytest.raises(FormatError) as caught:
        parse_format({"a,,b": "x"}, source="f.json")
    assert str(caught.value) == "f.json: entry 'a,,b': an empty key name (check the commas)"
    with pytest.raises(FormatError, match="no entries"):
        parse_format("{}", source="f.json")


def test_invalid_format_json_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": "x",\n  "b" "y"\n}', encoding="utf-8")
    with pytest.raises(InvalidJSONError) as caught:
        load_format(path)
    assert str(caught.value) == f"{path}: invalid JSON at line 3, column 7: Expecting ':' delimiter"


def test_format_file_with_bom(tmp_path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHATBOT).encode())
    fmt = load_format(path)
    assert [entry.keys for entry in fmt.entries] == [
        frozenset({"instruction", "output"}),
        frozenset({"instruction", "input", "output"}),
    ]
    assert fmt.templates() == {
        "template_0": CHATBOT["instruction,output"],
        "template_1": CHATBOT["instruction,input,output"],
    }


# -- datasets ---------------------------------------------------------------------------------


def test_json_array_dataset(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"x": None, "n": 3}]))
    rows = load_rows(path)
    assert [(r.index, r.texts, r.line) for r in rows] == [
        (0, {"instruction": "a", "output": "b"}, None),
        (1, {"x": "", "n": "3"}, None),
    ]


def test_json_lines_dataset_with_bom_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": "1"}\r\n\r\n{"a": "2"}\n')
    rows = load_rows(path)
    assert [(r.index, r.texts, r.line) for r in rows] == [(0, {"a": "1"}, 1), (1, {"a": "2"}, 3)]


def test_json_lines_row_error_names_row_and_line() -> None:
    with pytest.raises(ValueTypeError) as caught:
        parse_rows('{"a": "1"}\n\n{"a": [1]}\n', source="d.json")
    assert str(caught.value) == "d.json row 2 (line 3): key 'a' is a list, expected text"


def test_invalid_json_lines_names_line_and_column() -> None:
    with pytest.raises(InvalidJSONError) as caught:
        parse_rows('{"a": "1"}\n{"a": 2,}\n', source="d.json")
    assert str(caught.value) == (
        "d.json: invalid JSON Lines at line 2, column 9: "
        "Expecting property name enclosed in double quotes"
    )


def test_broken_json_array_names_line_and_column() -> None:
    with pytest.raises(InvalidJSONError) as caught:
        parse_rows('[\n {"a": "1"},\n {"a": "2"\n]', source="d.json")
    assert str(caught.value) == "d.json: invalid JSON at line 4, column 1: Expecting ',' delimiter"


def test_row_that_is_not_an_object() -> None:
    with pytest.raises(FormatError) as caught:
        parse_rows('[{"a": "1"}, "text"]', source="d.json")
    assert str(caught.value) == "d.json row 2: is text, expected an object of key/text pairs"


def test_top_level_must_be_rows() -> None:
    with pytest.raises(FormatError, match="JSON array of objects or JSON Lines"):
        parse_rows("42", source="d.json")
    assert [r.texts for r in parse_rows('{\n "a": "x"\n}')] == [{"a": "x"}]


# -- shipped formats --------------------------------------------------------------------------


def test_shipped_formats_exist_and_cover_the_alpaca_key_sets() -> None:
    names = set(shipped_formats())
    assert names == {
        "alpaca-format",
        "alpaca-chatbot-format",
        "vicuna-format",
        "chatml-format",
        "llama2-chat-format",
    }
    plain = {"instruction": "Name a colour.", "output": "Blue."}
    with_input = {"instruction": "Translate.", "input": "rouge", "output": "red"}
    for name in names:
        fmt = load_format(SHIPPED_DIR / f"{name}.json")
        keysets = {entry.keys for entry in fmt.entries}
        assert frozenset({"instruction", "output"}) in keysets, name
        assert frozenset({"instruction", "input", "output"}) in keysets, name
        for row in (plain, with_input):
            text = render_row(fmt, row)
            assert "%" not in text, name
            assert all(value in text for value in row.values()), name
            assert text.endswith(row["output"]) or text.endswith(row["output"] + "<|im_end|>")


def test_shipped_chatbot_format_renders_exactly() -> None:
    fmt = load_format(SHIPPED_DIR / "alpaca-chatbot-format.json")
    row = {"instruction": "Translate", "input": "chat", "output": "cat"}
    assert render_row(fmt, row) == "User: Translate: chat\nAssistant: cat"
    row = {"instruction": "Translate", "input": "", "output": "cat"}
    assert render_row(fmt, row) == "User: Translate\nAssistant: cat"


def test_shipped_alpaca_format_renders_exactly() -> None:
    fmt = load_format(SHIPPED_DIR / "alpaca-format.json")
    assert render_row(fmt, {"instruction": "Say hi.", "input": " ", "output": "Hi!"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!"
    )


def test_json_and_json_lines_count_rows_alike_from_1() -> None:
    """Issue 11, point 18: the third row is "row 3" in a JSON array and in JSON Lines."""
    rows = [{"a": "1"}, {"a": "2"}, {"a": ["x"]}]
    with pytest.raises(ValueTypeError) as as_json:
        parse_rows(json.dumps(rows), source="d.json")
    with pytest.raises(ValueTypeError) as as_lines:
        parse_rows("\n".join(json.dumps(r) for r in rows), source="d.jsonl")
    assert str(as_json.value) == "d.json row 3: key 'a' is a list, expected text"
    assert str(as_lines.value) == "d.jsonl row 3 (line 3): key 'a' is a list, expected text"
    assert as_json.value.row == as_lines.value.row == 2  # the attribute stays an index
