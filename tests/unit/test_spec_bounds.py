"""Every number of a spec has an upper bound a real job could need, named in the refusal
(issue 10, finding 10: micro_batch_size 1e9, batch_size 1e18, stride 1 with max_length 1e9)."""

from __future__ import annotations

import json

import pytest

from dispatcher.jobs.specs import (
    MAX_SEED,
    UPPER_BOUNDS,
    SpecError,
    parse_eval_spec,
    parse_generate_spec,
    parse_train_spec,
)
from dispatcher.schedule.sweeps import parse_sweep
from dispatcher.settings import DataPaths
from tests.appclient import client_for


@pytest.fixture
def paths(tmp_path):
    p = DataPaths(tmp_path)
    p.ensure()
    (p.models / "tiny").mkdir()
    (p.models / "tiny" / "config.json").write_text("{}")
    (p.models / "ctx4k").mkdir()
    (p.models / "ctx4k" / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 4096}))
    (p.datasets / "d.json").write_text("[]")
    (p.datasets / "notes.txt").write_text("hello")
    (p.formats / "mine.json").write_text(json.dumps({"instruction,output": "%instruction%"}))
    return p


def train(**over):
    return {"lora_name": "my-lora", "base_model": "tiny", "dataset": "d", "format": "mine",
            **over}


def problems(parse, spec, paths) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        parse(spec, paths)
    return {err["field"]: err["message"] for err in e.value.errors}


def test_the_giant_spec_of_the_issue_is_refused_naming_each_bound(paths):
    got = problems(parse_train_spec, train(micro_batch_size=10**9, batch_size=10**18), paths)
    assert got == {"micro_batch_size": "at most 4096 (got 1000000000)",
                   "batch_size": "at most 65536 (got 1000000000000000000)"}
    with pytest.raises(SpecError) as e:
        parse_train_spec(train(micro_batch_size=10**9, batch_size=10**9), paths)
    assert str(e.value) == ("micro_batch_size: at most 4096 (got 1000000000); "
                            "batch_size: at most 65536 (got 1000000000)")


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 1000.5, "must be more than 0 and at most 1000"),
    ("cutoff_len", 10**9, "must be between 8 and 131072 tokens"),
    ("overlap_len", 200000, "at most 131072 (got 200000)"),
    ("newline_favor_len", 200000, "at most 131072 (got 200000)"),
    ("lora_alpha", 10**6, "must be between 1 and 4096"),
    ("save_steps", 10**6 + 1, "at most 1000000 (got 1000001)"),
    ("eval_steps", 10**7, "at most 1000000 (got 10000000)"),
    ("warmup_steps", 10**12, "at most 1000000 (got 1000000000000)"),
    ("stop_at_loss", 1e6, "at most 100 (got 1000000.0)"),
    ("min_chars", 10**8, "at most 10000000 (got 100000000)"),
    ("seed", 2**32, f"at most {MAX_SEED} (got 4294967296)"),
    ("min_gpu_memory_mb", 10**12, "must be between 0 (use the estimate) and 16777216"),
])
def test_each_training_number_has_a_bound(paths, field, value, message):
    spec = train(**{field: value})
    if field == "overlap_len":
        spec["cutoff_len"] = 131072
    assert problems(parse_train_spec, spec, paths) == {field: message}


def test_the_bounds_themselves_are_accepted(paths):
    t = UPPER_BOUNDS["train"]
    s = parse_train_spec(train(
        micro_batch_size=t["micro_batch_size"], batch_size=t["batch_size"], epochs=1000,
        cutoff_len=131072, overlap_len=131071, newline_favor_len=131072, lora_rank=2048,
        higher_rank_limit=True, lora_alpha=4096, save_steps=10**6, eval_steps=10**6,
        warmup_steps=10**6, stop_at_loss=100, min_chars=10**7, seed=MAX_SEED), paths)
    assert (s.micro_batch_size, s.batch_size, s.seed) == (4096, 65536, MAX_SEED)


def test_a_rank_over_its_limit_is_named_once(paths):
    assert problems(parse_train_spec, train(lora_rank=4096), paths) == {
        "lora_rank": "must be between 1 and 1024 (2048 with higher_rank_limit)"}


def test_every_bounded_field_is_a_spec_number():
    from dataclasses import fields

    from dispatcher.jobs.specs import SPEC_CLASSES

    for kind, bounds in UPPER_BOUNDS.items():
        types = {f.name: str(f.type) for f in fields(SPEC_CLASSES[kind])}
        assert set(bounds) <= set(types), kind
        assert all(types[n] in ("int", "float") for n in bounds), kind
        numbers = {n for n, t in types.items() if t in ("int", "float")}
        assert numbers == set(bounds), f"{kind}: unbounded {numbers - set(bounds)}"


# evaluation -----------------------------------------------------------------------------------
def evaluation(**over):
    return {"base_model": "tiny", "text_file": "notes", **over}


def test_stride_1_with_a_billion_token_window_is_refused(paths):
    assert problems(parse_eval_spec, evaluation(stride=1, max_length=10**9), paths) == {
        "max_length": "at most 131072 (got 1000000000)"}
    assert problems(parse_eval_spec, evaluation(stride=10**9, max_length=0), paths) == {
        "stride": "at most 131072 (got 1000000000)"}


def test_stride_must_keep_the_window_overlap_bounded(paths):
    got = problems(parse_eval_spec, evaluation(stride=64, max_length=131072), paths)
    assert got == {"stride": "at least 128 with a 131072-token window (got 64): each token "
                             "would be scored 2048 times, at most 1024"}
    assert parse_eval_spec(evaluation(stride=128, max_length=131072), paths).stride == 128
    assert parse_eval_spec(evaluation(stride=1, max_length=1024), paths).stride == 1
    # max_length 0 is the model's context, read from its config.json.
    got = problems(parse_eval_spec, evaluation(base_model="ctx4k", stride=2), paths)
    assert got["stride"].startswith("at least 4 with a 4096-token window (got 2)")
    assert parse_eval_spec(evaluation(base_model="ctx4k", stride=4), paths).stride == 4


# generation -----------------------------------------------------------------------------------
def test_generation_numbers_are_bounded(paths):
    got = problems(parse_generate_spec, {"base_model": "tiny", "prompt": "hi",
                                         "max_new_tokens": 10**9, "temperature": 1e9,
                                         "seed": 2**40}, paths)
    assert got == {"max_new_tokens": "must be between 1 and 4096",
                   "temperature": "must be between 0 and 5",
                   "seed": f"at most {MAX_SEED} (got 1099511627776)"}


# sweeps ---------------------------------------------------------------------------------------
def test_a_sweep_value_over_a_bound_is_named_with_its_parameter(paths):
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": train(batch_size=4), "parameters": {"epochs": [1, 10**4]}}, paths)
    assert e.value.errors == [{"field": "parameters.epochs",
                               "message": "value 10000: must be more than 0 and at most 1000"}]
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": train(), "parameters": {"seed": [1, 2**33]}}, paths)
    assert e.value.errors == [{"field": "parameters.seed",
                               "message": f"value 8589934592: at most {MAX_SEED} (got 8589934592)"}]


def test_the_forms_number_inputs_carry_the_bounds(tmp_path, redis_server, prefix):
    from dashboard.app import create_app
    from dashboard.forms import form_fields
    from dispatcher.jobs.specs import EvalSpec
    from dispatcher.settings import Settings

    by_name = {f.name: f for f in form_fields({})}
    assert (by_name["micro_batch_size"].max, by_name["batch_size"].max) == (4096, 65536)
    assert by_name["lora_name"].max is None
    assert {f.name: f.max for f in form_fields({}, spec_cls=EvalSpec)
            if f.widget == "number"} == UPPER_BOUNDS["evaluate"]
    app = create_app({"LORAFLEET_SETTINGS": Settings(home=tmp_path, redis_url=redis_server,
                                                     prefix=prefix), "TESTING": True})
    page = client_for(app).get("/jobs/new").get_data(as_text=True)
    assert 'name="micro_batch_size" value="4"\n             step="1" max="4096">' in page
