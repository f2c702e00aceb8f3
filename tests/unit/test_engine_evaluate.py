"""Sliding-window perplexity on the tiny Llama: against direct forward passes and a reference
loop written here, with a LoRA trained for a few steps, with two LoRAs at once, and its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.jobs.specs import TrainSpec
from dispatcher.settings import DataPaths
from gpuworker.engine import EngineError, train
from gpuworker.engine.evaluate import Window, perplexity, plan_windows
from tests.recorder import Recorder as BaseRecorder
from tests.tiny import CORPUS, make_tiny_model, write_tiny_raw_text

SHORT_TEXT = "The sky is blue on a clear day. Birds sing in the morning."


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> DataPaths:
    """A data folder with the tiny model, texts and a LoRA trained on story.txt (lr 1e-2).

    The tiny model is random and its head is not trained, so a LoRA moves its perplexity (about
    the vocabulary size, 400) only a little: every linear layer and three epochs lower it by ~8 %.
    """
    p = DataPaths(tmp_path_factory.mktemp("eval") / "home")
    p.ensure()
    make_tiny_model(p.models / "tiny")
    write_tiny_raw_text(p.datasets / "story.txt")
    (p.datasets / "short.txt").write_text(SHORT_TEXT, encoding="utf-8")
    (p.datasets / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (p.datasets / "empty.txt").write_text("", encoding="utf-8")
    (p.datasets / "rows.json").write_text("[]", encoding="utf-8")
    spec = TrainSpec(lora_name="story", base_model="tiny", raw_text_file="story.txt",
                     cutoff_len=64, overlap_len=16, batch_size=4, micro_batch_size=2, epochs=3,
                     warmup_steps=0, learning_rate="1e-2", lora_rank=8, lora_alpha=16,
                     lora_dropout=0.0, precision="fp32", target_modules=["all"])
    train(spec, p, lambda e: None, lambda: False, lambda s: None, device="cpu")
    return p


class Recorder(BaseRecorder):
    def should_stop(self) -> bool:  # an evaluation reports no train steps: count every event
        return self.stop_after is not None and len(self.events) >= self.stop_after

    def run(self, paths: DataPaths, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = dict(base_model="tiny", loras=[], text_file="corpus.txt",
                                    precision="fp32")
        args.update(kw)
        return perplexity(paths=paths, progress=self.progress, should_stop=self.should_stop,
                          log=self.lines.append, device="cpu", **args)


def load_tiny(paths: DataPaths) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(paths.models / "tiny", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(paths.models / "tiny")


def reference_perplexity(model: Any, ids: list[int], max_length: int, stride: int
                         ) -> tuple[float, int]:
    """The Hugging Face guide's loop, written out with the model's own loss: (ppl, scored)."""
    seq = torch.tensor([ids])
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg_len = end - prev_end
            window = seq[:, begin:end]
            labels = window.clone()
            labels[:, :-trg_len] = -100
            # The model shifts labels by one: the window's first label is never a target.
            n = int((labels[:, 1:] != -100).sum())
            nll_sum += float(model(input_ids=window, labels=labels).loss) * n
            n_scored += n
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll_sum / n_scored), n_scored


# --------------------------------------------------------------------------- windows (pure)


def test_overlapping_windows_score_every_token_but_the_first_once():
    ws = plan_windows(10, max_length=4, stride=2)
    assert ws == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert sum(w.scored for w in ws) == 9
    # Each scored id lies in exactly one window's [first, end).
    scored = [t for w in ws for t in range(w.first, w.end)]
    assert scored == list(range(1, 10))


def test_windows_without_overlap_lose_each_windows_first_token():
    ws = plan_windows(10, max_length=4, stride=4)
    assert ws == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert sum(w.scored for w in ws) == 10 - 3


def test_a_text_shorter_than_a_window_is_one_window():
    assert plan_windows(5, max_length=512, stride=512) == [Window(0, 5, 1)]
    assert plan_windows(2, max_length=2, stride=1) == [Window(0, 2, 1)]


@pytest.mark.parametrize("n, max_length, stride", [(1, 4, 2), (10, 4, 0), (10, 4, 5), (10, 1, 1)])
def test_impossible_window_plans_are_refused(n, max_length, stride):
    with pytest.raises(ValueError):
        plan_windows(n, max_length, stride)


# --------------------------------------------------------------------------- against references


def test_one_window_equals_a_direct_forward_pass(paths):
    model, tokenizer = load_tiny(paths)
    ids = tokenizer(SHORT_TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        loss = float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss)

    rec = Recorder()
    result = rec.run(paths, text_file="short.txt", stride=16)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["tokens"] == len(ids) - 1 and result["text_tokens"] == len(ids)
    assert result["windows"] == result["windows_total"] == 1
    # max_length 0 is the model's context (max_position_embeddings of the tiny model).
    assert result["max_length"] == 512 and result["stride"] == 16
    assert result["stopped"] is False and result["runtime_s"] > 0
    assert rec.events == [{"type": "eval_progress", "window": 1, "windows": 1,
                           "ppl_so_far": result["perplexity"]}]


@pytest.mark.parametrize("max_length, stride", [(64, 24), (48, 48), (40, 39)])
def test_many_windows_match_the_reference_loop(paths, max_length, stride):
    model, tokenizer = load_tiny(paths)
    ids = tokenizer(CORPUS).input_ids
    expected, n_scored = reference_perplexity(model, ids, max_length, stride)

    rec = Recorder()
    result = rec.run(paths, text_file="corpus", max_length=max_length, stride=stride)
    n_windows = len(plan_windows(len(ids), max_length, stride))
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == n_scored
    if stride < max_length:
        assert result["tokens"] == len(ids) - 1
    else:  # no overlap: each later window's first id has no context
        assert result["tokens"] == len(ids) - n_windows
    assert result["windows"] == n_windows > 10
    assert [e["window"] for e in rec.events] == list(range(1, n_windows + 1))
    assert all(e["windows"] == n_windows for e in rec.events)
    assert rec.events[-1]["ppl_so_far"] == result["perplexity"]


def test_a_folder_of_texts_is_read_like_raw_text_training(paths):
    folder = paths.datasets / "book"
    folder.mkdir(exist_ok=True)
    (folder / "part2.txt").write_text("Birds sing in the morning.", encoding="utf-8")
    (folder / "part10.txt").write_text("Cats like to sleep.", encoding="utf-8")
    (paths.datasets / "book-joined.txt").write_text(
        "Birds sing in the morning.\n\n\nCats like to sleep.", encoding="utf-8")
    a = Recorder().run(paths, text_file="book", stride=8)
    b = Recorder().run(paths, text_file="book-joined.txt", stride=8)
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == b["tokens"]


def test_stop_returns_the_value_so_far(paths):
    rec = Recorder(stop_after=3)
    result = rec.run(paths, max_length=64, stride=32)
    assert result["stopped"] is True
    assert result["windows"] == 3 and result["windows_total"] > 10
    assert result["perplexity"] == rec.events[-1]["ppl_so_far"]
    assert result["tokens"] == 63 + 32 + 32
    assert f"Stopped after 3 of {result['windows_total']} windows" in rec.lines

    before = Recorder(stop_after=0).run(paths, max_length=64, stride=32)
    assert before["stopped"] is True and before["perplexity"] is None
    assert before["windows"] == before["tokens"] == 0


# --------------------------------------------------------------------------- LoRAs


def test_the_trained_lora_lowers_perplexity_on_its_training_text(paths):
    # corpus.txt is a third of story.txt, the LoRA's training text.
    base = Recorder().run(paths, max_length=128, stride=64)
    tuned = Recorder().run(paths, loras=["story"], max_length=128, stride=64)
    assert tuned["loras"] == ["story"] and tuned["tokens"] == base["tokens"]
    assert tuned["perplexity"] < 0.95 * base["perplexity"], (base, tuned)


def _doubled_copy(paths: DataPaths, src: str, dest: str, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(paths.loras / src, paths.loras / dest, dirs_exist_ok=True)
    weights = paths.loras / dest / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v * factor if "lora_B" in k else v for k, v in state.items()}, str(weights))


def test_two_loras_are_active_together_and_their_updates_add_up(paths):
    # Two copies of one LoRA together add its update twice: the same as one LoRA whose B
    # matrices are doubled (the update is B @ A * alpha / r).
    _doubled_copy(paths, "story", "story.copy", 1.0)
    _doubled_copy(paths, "story", "story-x2", 2.0)
    one = Recorder().run(paths, loras=["story"], max_length=128, stride=64)
    both = Recorder().run(paths, loras=["story", "story.copy"], max_length=128, stride=64)
    double = Recorder().run(paths, loras=["story-x2"], max_length=128, stride=64)
    assert both["perplexity"] == pytest.approx(double["perplexity"], rel=1e-5)
    assert abs(both["perplexity"] - one["perplexity"]) > 1e-3 * one["perplexity"]
    assert both["loras"] == ["story", "story.copy"]


# --------------------------------------------------------------------------- errors


def _lora_with_config(paths: DataPaths, name: str, **changes: Any) -> str:
    shutil.copytree(paths.loras / "story", paths.loras / name, dirs_exist_ok=True)
    cfg_path = paths.loras / name / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return name


def _shallow_model(paths: DataPaths) -> str:
    """tiny with one layer instead of two: a LoRA of tiny has weights it cannot hold."""
    dest = paths.models / "tiny-1layer"
    shutil.copytree(paths.models / "tiny", dest, dirs_exist_ok=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (dest / "config.json").write_text(json.dumps(cfg))
    return "tiny-1layer"


def test_errors_name_what_to_fix(paths):
    (paths.loras / "unsaved").mkdir(exist_ok=True)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(base_model="nope"), "base model 'nope' was not found in models/"),
        (dict(loras=["ghost"]), "LoRA 'ghost' was not found in loras/"),
        (dict(loras=["../story"]), "must be a folder name inside loras/"),
        (dict(loras=["unsaved"]), "LoRA 'unsaved' has no saved adapter"),
        (dict(loras=["story", "story"]), "LoRA 'story' is listed twice"),
        (dict(text_file="missing.txt"), "text_file 'missing.txt' was not found in datasets/"),
        (dict(text_file="rows.json"), "'rows.json' is a dataset; perplexity reads plain .txt"),
        (dict(text_file="../etc/passwd"), "no absolute paths, no '..'"),
        (dict(text_file="empty.txt"), "text_file 'empty.txt' is 1 token(s) long"),
        (dict(stride=0), "stride must be at least 1 (now 0)"),
        (dict(stride=65, max_length=64), "stride (65) cannot be larger than max_length (64)"),
        (dict(stride=1024), "stride (1024) cannot be larger than max_length (512)"),
        (dict(max_length=1, stride=1), "max_length must be 0"),
        (dict(precision="4bit"), "needs a CUDA GPU"),
        (dict(loras=[_lora_with_config(paths, "rank4", r=4)]),
         "LoRA 'rank4' does not fit base model 'tiny' (Error(s) in loading state_dict"),
        (dict(loras=[_lora_with_config(paths, "odd", target_modules=["w_nope"])]),
         "LoRA 'odd' does not fit base model 'tiny' (Target modules {'w_nope'} not found"),
        (dict(base_model=_shallow_model(paths), loras=["story"]),
         "LoRA 'story' does not fit base model 'tiny-1layer': it has weights for modules the "
         "model lacks (base_model.model.model.layers.1."),
    ]
    for kw, message in cases:
        rec = Recorder()
        with pytest.raises(EngineError) as err:
            rec.run(paths, **kw)
        assert message in str(err.value), (kw, str(err.value))
        assert rec.events == [], kw


def test_max_length_past_the_models_context_is_a_warning(paths):
    rec = Recorder()
    result = rec.run(paths, text_file="short.txt", max_length=600, stride=300)
    assert result["max_length"] == 600
    assert [e["type"] for e in rec.events] == ["warning", "eval_progress"]
    assert "longer than the 512 tokens" in rec.events[0]["message"]


def test_no_file_of_the_data_folder_changes(paths):
    before = {p: p.stat().st_mtime_ns for p in Path(paths.home).rglob("*") if p.is_file()}
    Recorder().run(paths, loras=["story"], text_file="short.txt", stride=8)
    after = {p: p.stat().st_mtime_ns for p in Path(paths.home).rglob("*") if p.is_file()}
    assert before == after
