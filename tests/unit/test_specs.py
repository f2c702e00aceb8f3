"""The training spec: defaults, coercion of form/CLI text, and every refusal naming its field."""

from __future__ import annotations

import json

import pytest

from dispatcher.jobs.specs import (
    FIELD_DOCS,
    SpecError,
    TrainSpec,
    default_spec,
    list_choices,
    parse_train_spec,
    resolve_data_name,
)
from dispatcher.settings import DataPaths


@pytest.fixture
def paths(tmp_path):
    p = DataPaths(tmp_path)
    p.ensure()
    (p.models / "tiny").mkdir()
    (p.models / "tiny" / "config.json").write_text("{}")
    (p.models / "not-a-model").mkdir()
    (p.datasets / "d.json").write_text("[]")
    (p.datasets / "notes.txt").write_text("hello")
    (p.datasets / "book").mkdir()
    (p.datasets / "book" / "a.txt").write_text("x")
    (p.formats / "mine.json").write_text(json.dumps({"instruction,output": "%instruction%"}))
    (p.formats / "broken.json").write_text("{not json")
    return p


def good(**over):
    spec = {"lora_name": "my-lora", "base_model": "tiny", "dataset": "d", "format": "mine"}
    spec.update(over)
    return spec


def fields_of(exc: SpecError) -> list[str]:
    return [e["field"] for e in exc.errors]


def test_defaults_are_text_generation_webuis():
    d = default_spec()
    assert d["lora_rank"] == 32 and d["lora_alpha"] == 64 and d["lora_dropout"] == 0.05
    assert d["micro_batch_size"] == 4 and d["batch_size"] == 128 and d["epochs"] == 3.0
    assert d["learning_rate"] == "3e-4" and d["lr_scheduler_type"] == "linear"
    assert d["cutoff_len"] == 256 and d["overlap_len"] == 128 and d["newline_favor_len"] == 128
    assert d["warmup_steps"] == 100 and d["save_steps"] == 0 and d["eval_steps"] == 100
    assert d["optimizer"] == "adamw_torch" and d["hard_cut_string"] == "\\n\\n\\n"
    assert d["target_modules"] == ["q", "v"]
    assert set(FIELD_DOCS) == set(d) and all(FIELD_DOCS.values())


def test_good_spec_resolves_names(paths):
    s = parse_train_spec(good(dataset="d.json"), paths)
    assert isinstance(s, TrainSpec)
    assert (s.base_model, s.dataset, s.format) == ("tiny", "d.json", "mine")
    s2 = parse_train_spec(good(dataset=None, format="", raw_text_file="notes"), paths)
    assert s2.raw_text_file == "notes.txt"
    s3 = parse_train_spec(good(dataset="", format="", raw_text_file="book"), paths)
    assert s3.raw_text_file == "book"
    # A shipped format file is found when the user has none of that name.
    assert parse_train_spec(good(format="alpaca-format"), paths).format == "alpaca-format"


def test_form_text_is_coerced(paths):
    s = parse_train_spec(good(lora_rank="8", lora_dropout="0.1", epochs="2",
                              add_eos_token="on", target_modules="q, k,v"), paths)
    assert (s.lora_rank, s.lora_dropout, s.epochs, s.add_eos_token) == (8, 0.1, 2.0, True)
    assert s.target_modules == ["q", "k", "v"]


@pytest.mark.parametrize("over,field,words", [
    ({"lora_rank": 0}, "lora_rank", "between 1 and 1024"),
    ({"lora_rank": 2048}, "lora_rank", "higher_rank_limit"),
    ({"learning_rate": "abc"}, "learning_rate", "not a number"),
    ({"learning_rate": "2"}, "learning_rate", "between 0 and 1"),
    ({"overlap_len": 256, "dataset": "", "format": "", "raw_text_file": "notes"}, "overlap_len",
     "less than cutoff_len (256)"),
    ({"dataset": "", "format": ""}, "dataset", "raw_text_file"),
    ({"dataset": "", "format": "", "raw_text_file": "notes", "eval_dataset": "d"},
     "eval_dataset", "not with raw text"),
    ({"base_model": "nope"}, "base_model", "not found"),
    ({"base_model": "not-a-model"}, "base_model", "config.json"),
    ({"base_model": "/etc"}, "base_model", "no absolute paths"),
    ({"dataset": "../../etc/passwd"}, "dataset", "no absolute paths, no '..'"),
    ({"lora_name": "../../etc/passwd"}, "lora_name", "letters, digits"),
    ({"lora_name": ""}, "lora_name", "required"),
    ({"format": "broken"}, "format", "not valid JSON"),
    ({"format": ""}, "format", "required with a dataset"),
    ({"lora_dropout": 1.5}, "lora_dropout", "less than 1"),
    ({"micro_batch_size": 8, "batch_size": 4}, "batch_size", "at least micro_batch_size"),
    ({"lr_scheduler_type": "wobbly"}, "lr_scheduler_type", "one of linear"),
    ({"optimizer": "lion"}, "optimizer", "one of adamw_torch"),
    ({"precision": "int3"}, "precision", "one of auto"),
    ({"target_modules": ["q", "zz"]}, "target_modules", "unknown zz"),
    ({"epochs": "lots"}, "epochs", "must be a number"),
    ({"lora_rank": 2.5}, "lora_rank", "whole number"),
    ({"raw_text_file": "notes"}, "raw_text_file", "not both"),
    ({"colour": "red"}, "colour", "not a known training parameter"),
])
def test_each_bad_value_is_named(paths, over, field, words):
    with pytest.raises(SpecError) as ei:
        parse_train_spec(good(**over), paths)
    msgs = {e["field"]: e["message"] for e in ei.value.errors}
    assert field in msgs, ei.value.errors
    assert words in msgs[field]


def test_overlap_not_below_cutoff_is_refused_only_for_raw_text(paths):
    """A dataset job ignores overlap_len (as in the webui); raw text is cut with it."""
    assert parse_train_spec(good(cutoff_len=128, overlap_len=128), paths).cutoff_len == 128
    assert parse_train_spec(good(cutoff_len=128), paths).overlap_len == 128
    raw = {"dataset": "", "format": "", "raw_text_file": "notes"}
    with pytest.raises(SpecError) as ei:
        parse_train_spec(good(cutoff_len=128, overlap_len=128, **raw), paths)
    assert ei.value.errors == [{"field": "overlap_len",
                                "message": "must be less than cutoff_len (128)"}]
    assert parse_train_spec(good(cutoff_len=128, overlap_len=127, **raw), paths).cutoff_len == 128


def test_all_problems_reported_at_once(paths):
    with pytest.raises(SpecError) as ei:
        parse_train_spec(good(lora_rank=0, learning_rate="abc", overlap_len=999,
                              lora_name="a/b", dataset="", format="", raw_text_file="notes"),
                         paths)
    assert set(fields_of(ei.value)) == {"lora_rank", "learning_rate", "overlap_len", "lora_name"}


def test_not_an_object():
    with pytest.raises(SpecError) as ei:
        parse_train_spec(["a"], DataPaths(__import__("pathlib").Path("/nonexistent")))
    assert fields_of(ei.value) == ["spec"]


def test_symlink_out_of_the_data_folder_is_refused(paths, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.json").write_text("[]")
    (paths.datasets / "link.json").symlink_to(outside / "secret.json")
    rel, err = resolve_data_name("link", paths.datasets, (".json",), allow_dir=False)
    assert rel is None and "outside" in err


def test_choices_list_the_data_folder(paths):
    c = list_choices(paths)
    assert c["models"] == ["tiny"]
    assert c["datasets"] == ["d.json"]
    assert c["raw_texts"] == ["book", "notes.txt"]
    assert "mine" in c["formats"] and "alpaca-format" in c["formats"]
    assert "broken" in c["formats"]  # listed; refused with a reason when chosen


# A training_parameters.json as text-generation-webui writes it (its keys and habits).
WEBUI_PARAMS = {
    "lora_name": "webui-lora", "always_override": False, "q_proj_en": True, "v_proj_en": True,
    "k_proj_en": False, "o_proj_en": True, "gate_proj_en": False, "down_proj_en": False,
    "up_proj_en": False, "save_steps": 0, "micro_batch_size": 4, "batch_size": 128,
    "epochs": 3, "learning_rate": "3e-4", "lr_scheduler_type": "linear", "lora_rank": 32,
    "lora_alpha": 64, "lora_dropout": 0.05, "cutoff_len": 256, "dataset": "d",
    "eval_dataset": "None", "format": "mine", "eval_steps": 100, "raw_text_file": "None",
    "overlap_len": 128, "newline_favor_len": 128, "higher_rank_limit": False,
    "warmup_steps": 100, "optimizer": "adamw_torch", "hard_cut_string": "\\n\\n\\n",
    "train_only_after": "", "stop_at_loss": 0, "add_eos_token": False, "min_chars": 0,
    "report_to": "None",
}


def test_training_parameters_are_written_the_way_the_webui_writes_them(paths):
    """Our training_parameters.json carries every key of the webui's file with the webui's
    values (so its "Copy parameters from" fills its form), and copying it back into lorafleet
    gives the same spec."""
    from dispatcher.jobs.specs import WEBUI_PARAMETERS, lora_parameters

    s = parse_train_spec({"lora_name": "ours", "base_model": "tiny", "dataset": "d",
                          "format": "mine", "target_modules": ["q", "v", "o"],
                          "learning_rate": "2e-4"}, paths)
    written = json.loads(json.dumps(s.training_parameters()))
    assert list(written)[:len(WEBUI_PARAMETERS)] == list(WEBUI_PARAMETERS)
    # Every key the webui writes, with the value it would write for the same settings.
    assert {k: written[k] for k in WEBUI_PARAMS} == {
        **WEBUI_PARAMS, "lora_name": "ours", "learning_rate": "2e-4", "epochs": 3.0}
    assert written["all_linear"] is False and written["target_modules"] == ["q", "v", "o"]
    every = parse_train_spec({"lora_name": "all", "base_model": "tiny", "raw_text_file": "notes",
                              "target_modules": ["all"]}, paths).training_parameters()
    assert every["all_linear"] is True and every["raw_text_file"] == "notes"
    assert all(every[k] for k in WEBUI_PARAMETERS if k.endswith("_proj_en"))
    assert every["dataset"] == every["format"] == "None"

    (paths.loras / "ours").mkdir()
    (paths.loras / "ours" / "training_parameters.json").write_text(json.dumps(written))
    copied = lora_parameters("ours", paths)
    expected = s.to_dict()
    del expected["resume_from_checkpoint"]
    assert copied == expected
    # "d" could be d.json or d.jsonl once both exist: lorafleet's exact names decide.
    (paths.datasets / "d.jsonl").write_text("")
    jsonl = parse_train_spec({**expected, "dataset": "d.jsonl"}, paths).training_parameters()
    assert jsonl["dataset"] == "d" and jsonl["lorafleet_files"]["dataset"] == "d.jsonl"
    (paths.loras / "ours" / "training_parameters.json").write_text(json.dumps(jsonl))
    assert lora_parameters("ours", paths)["dataset"] == "d.jsonl"


def test_copy_parameters_from_a_webui_lora(paths):
    from dispatcher.jobs.specs import lora_parameters, spec_from_training_parameters

    spec = spec_from_training_parameters(WEBUI_PARAMS)
    assert spec["target_modules"] == ["q", "v", "o"]
    assert spec["eval_dataset"] == "" and spec["raw_text_file"] == ""
    assert "report_to" not in spec and "q_proj_en" not in spec
    # It is a valid spec once a base model is chosen (webui's file does not name one).
    s = parse_train_spec({**spec, "base_model": "tiny"}, paths)
    assert (s.lora_rank, s.dataset, s.format, s.target_modules) == (32, "d.json", "mine",
                                                                    ["q", "v", "o"])
    # From a LoRA folder on disk, and the errors when there is nothing to copy.
    (paths.loras / "webui-lora").mkdir()
    (paths.loras / "webui-lora" / "training_parameters.json").write_text(json.dumps(WEBUI_PARAMS))
    # On disk, a name without extension becomes the file that is there (the form's choice).
    assert lora_parameters("webui-lora", paths) == {**spec, "dataset": "d.json"}
    with pytest.raises(SpecError, match="has no training_parameters.json"):
        lora_parameters("missing", paths)
    with pytest.raises(SpecError, match="not a LoRA name"):
        lora_parameters("../x", paths)


# A training_parameters.json as text-generation-webui writes it (its keys, in its order).
WEBUI_FILE = {
    "lora_name": "from-webui", "always_override": False, "all_linear": False,
    "q_proj_en": True, "v_proj_en": True, "k_proj_en": False, "o_proj_en": True,
    "gate_proj_en": False, "down_proj_en": False, "up_proj_en": False, "save_steps": 0,
    "micro_batch_size": 4, "batch_size": 128, "epochs": 3, "learning_rate": "3e-4",
    "lr_scheduler_type": "linear", "lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.05,
    "cutoff_len": 256, "dataset": "d", "eval_dataset": "None", "format": "mine",
    "eval_steps": 100, "raw_text_file": "None", "overlap_len": 128, "newline_favor_len": 128,
    "higher_rank_limit": False, "warmup_steps": 100, "optimizer": "adamw_torch",
    "hard_cut_string": "\\n\\n\\n", "train_only_after": "", "stop_at_loss": 0,
    "add_eos_token": False, "min_chars": 0, "report_to": "None"}


def test_a_webui_training_parameters_file_is_a_spec(paths):
    # The webui trains the model it has loaded, so its file names none: base_model is added.
    s = parse_train_spec({**WEBUI_FILE, "base_model": "tiny"}, paths)
    assert (s.lora_name, s.dataset, s.eval_dataset, s.raw_text_file, s.format) == (
        "from-webui", "d.json", "", "", "mine")
    assert s.target_modules == ["q", "v", "o"] and s.lora_rank == 32
    assert parse_train_spec({**WEBUI_FILE, "base_model": "tiny",
                             "all_linear": True}, paths).target_modules == ["all"]
    # lorafleet's own file reads back to the same spec, resume included when submitted.
    own = parse_train_spec({**s.training_parameters(), "resume_from_checkpoint": "latest"}, paths)
    assert own.to_dict() == {**s.to_dict(), "resume_from_checkpoint": "latest"}


def test_a_webui_file_with_an_unknown_key_is_still_refused_by_name(paths):
    with pytest.raises(SpecError) as ei:
        parse_train_spec({**WEBUI_FILE, "base_model": "tiny", "colour": "red"}, paths)
    assert ei.value.errors == [
        {"field": "colour", "message": "is not a known training parameter"}]


def test_a_webui_checkbox_written_as_the_string_false_is_off():
    from dispatcher.jobs.specs import spec_from_training_parameters

    got = spec_from_training_parameters({"all_linear": "False", "q_proj_en": True,
                                         "v_proj_en": "false", "k_proj_en": "true"})
    assert got["target_modules"] == ["q", "k"]
