"""`python -m formats.previewer`: one JSON request on stdin, one JSON answer on stdout, in a real
subprocess on a tiny real tokenizer (as the dashboard runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from formats import SHIPPED_DIR, RawTextOptions
from formats.previewer import EXIT_USER_ERROR, PreviewRequest, run
from tests.tiny import make_tiny_model, write_tiny_dataset, write_tiny_raw_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tok"))


def previewer(req: PreviewRequest) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "formats.previewer"], cwd=ROOT,
                          input=json.dumps(req.to_json()), capture_output=True, text=True,
                          timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_a_dataset_preview_with_its_trained_part(tok, tmp_path):
    ds = write_tiny_dataset(tmp_path / "d.json", n=4)
    code, answer = previewer(PreviewRequest(
        tokenizer=str(tok), dataset=str(ds), format=str(SHIPPED_DIR / "alpaca-format.json"),
        train_only_after="### Response:", add_eos_token=True, limit=3))
    assert code == 0, answer
    assert len(answer["samples"]) == 3
    for row in answer["samples"]:
        assert row["tokens"] == len(row["input_ids"]) and row["truncated"] is False
        assert row["prompt_text"].endswith("### Response:") and row["trained_text"].endswith("</s>")
    assert answer["stats"]["samples"] == 4 and answer["stats"]["shown"] == 3
    assert answer["stats"]["cutoff_len"] == 256


def test_raw_text_options_reach_the_chunker(tok, tmp_path):
    raw = str(write_tiny_raw_text(tmp_path / "r.txt"))
    small = PreviewRequest(tokenizer=str(tok), raw_text=raw, cutoff_len=32, limit=0,
                           raw_text_options=RawTextOptions(overlap_len=8, newline_favor_len=0))
    result = run(small)
    assert result.samples and all(r["tokens"] <= 32 for r in result.samples)
    assert PreviewRequest.from_json(json.loads(json.dumps(small.to_json()))) == small
    wider = run(PreviewRequest(tokenizer=str(tok), raw_text=raw, cutoff_len=32, limit=0,
                               raw_text_options=RawTextOptions(overlap_len=0,
                                                               newline_favor_len=0)))
    assert wider.stats["tokens"] < result.stats["tokens"]  # no overlap: no token twice


def test_the_users_errors_are_an_error_answer(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "y"}]')
    code, answer = previewer(PreviewRequest(
        tokenizer=str(tok), dataset=str(bad), format=str(SHIPPED_DIR / "alpaca-format.json")))
    assert code == EXIT_USER_ERROR
    assert answer["error"].startswith(f"{bad} row 2: key 'instruction' is a list")
    code, answer = previewer(PreviewRequest(tokenizer=str(tmp_path), dataset=str(bad),
                                            format=str(SHIPPED_DIR / "alpaca-format.json")))
    assert code == EXIT_USER_ERROR and "cannot load a tokenizer" in answer["error"]
