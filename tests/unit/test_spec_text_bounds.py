"""Every text field and list of a spec has a bound, and so have a whole spec and a sweep
definition (REVIEW #2: a 20 MB train_only_after with target_modules ['q'] * 10**6 was
accepted: 25 MB per job record)."""

from __future__ import annotations

import pytest

from dispatcher.jobs.specs import (
    MAX_SPEC_CHARS,
    TEXT_BOUNDS,
    EvalSpec,
    GenerateSpec,
    SpecError,
    TrainSpec,
    parse_spec,
    parse_train_spec,
)
from dispatcher.schedule.sweeps import MAX_SWEEP_CHARS, parse_sweep
from tests.unit.test_spec_bounds import paths, problems, train  # noqa: F401 (fixture)

KIND_BASE = {
    "train": lambda **o: train(**o),
    "evaluate": lambda **o: {"base_model": "tiny", "text_file": "notes", **o},
    "generate": lambda **o: {"base_model": "tiny", "prompt": "hi", **o},
}
CLASSES = {"train": TrainSpec, "evaluate": EvalSpec, "generate": GenerateSpec}


def test_the_reviewers_giant_spec_is_refused_by_its_size(paths):  # noqa: F811
    got = problems(parse_train_spec, train(train_only_after="x" * 20_000_000,
                                           target_modules=["q"] * 10**6), paths)
    assert got == {"spec": f"is 25000124 characters as JSON; at most {MAX_SPEC_CHARS}"}


@pytest.mark.parametrize("kind, field, most", [
    (kind, field, most) for kind, bounds in TEXT_BOUNDS.items() for field, most in bounds.items()])
def test_each_text_field_and_list_is_bounded(paths, kind, field, most):  # noqa: F811
    too_many = ["x"] * (most + 1)
    is_list = CLASSES[kind].__dataclass_fields__[field].type == "list[str]"
    value = too_many if is_list else "x" * (most + 1)
    got = problems(lambda d, p: parse_spec(kind, d, p), KIND_BASE[kind](**{field: value}), paths)
    unit = "entries" if is_list else "characters"
    assert got == {field: f"at most {most} {unit} (got {most + 1})"}


def test_every_text_field_of_every_kind_has_a_bound():
    for kind, cls in CLASSES.items():
        texts = {n for n, f in cls.__dataclass_fields__.items() if f.type in ("str", "list[str]")}
        assert texts == set(TEXT_BOUNDS[kind]), kind


def test_target_modules_are_deduplicated_and_at_most_eight(paths):  # noqa: F811
    spec = parse_train_spec(train(target_modules=["q", "v", "q", "v"]), paths)
    assert spec.target_modules == ["q", "v"]
    got = problems(parse_train_spec, train(target_modules=["q"] * 20), paths)
    assert got == {"target_modules": "at most 8 entries (got 20)"}
    assert parse_train_spec(train(target_modules=["q", "k", "v", "o", "gate", "up", "down",
                                                  "all"]), paths).target_modules[-1] == "all"


def test_a_real_prompt_and_sixteen_loras_pass_their_bounds(paths):  # noqa: F811
    assert parse_spec("generate", KIND_BASE["generate"](prompt="word " * 6400), paths)
    got = problems(lambda d, p: parse_spec("evaluate", d, p),
                   KIND_BASE["evaluate"](loras=[f"l{i}" for i in range(16)]), paths)
    assert "entries" not in got["loras"]  # refused for not existing, not for their number


def test_a_sweep_definition_is_bounded(paths):  # noqa: F811
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": train(train_only_after="x" * 300_000),
                     "parameters": {"lora_rank": [4, 8]}}, paths)
    assert e.value.errors == [{"field": "sweep", "message": "is 300151 characters as JSON; "
                                                            f"at most {MAX_SWEEP_CHARS}"}]
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": train(), "method": "random", "trials": 2,
                     "parameters": {"seed": list(range(1001))}}, paths)
    assert e.value.errors == [{"field": "parameters.seed",
                               "message": "lists 1001 values; at most 1000"}]
    with pytest.raises(SpecError) as e:
        parse_sweep({"base": train(), "parameters": {"train_only_after": ["a", "x" * 5000]}},
                    paths)
    assert {"field": "parameters.train_only_after",
            "message": f"value '{'x' * 56}...: at most 1000 characters (got 5000)"
            } in e.value.errors
