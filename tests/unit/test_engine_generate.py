"""Generation on the tiny Llama: the prompt through a format file, greedy and seeded sampling
against model.generate itself, and the base and LoRA answers side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.jobs.specs import TrainSpec
from dispatcher.settings import DataPaths
from formats import SHIPPED_DIR, parse_format
from gpuworker.engine import EngineError, train
from gpuworker.engine.generate import format_prompt, generate
from tests.recorder import Recorder as BaseRecorder
from tests.tiny import make_tiny_model, write_tiny_dataset

ALPACA = {
    "instruction,output": "### Instruction:\n%instruction%\n\n### Response:\n%output%",
    "instruction,input,output":
        "### Instruction:\n%instruction%\n\n### Input:\n%input%\n\n### Response:\n%output%",
}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> DataPaths:
    """The tiny model (given a chat template), the Alpaca format and a LoRA trained with it."""
    from transformers import AutoTokenizer

    p = DataPaths(tmp_path_factory.mktemp("gen") / "home")
    p.ensure()
    make_tiny_model(p.models / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(p.models / "tiny")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(p.models / "tiny")
    assert AutoTokenizer.from_pretrained(p.models / "tiny").chat_template == CHAT_TEMPLATE
    write_tiny_dataset(p.datasets / "tiny.json", n=24)
    (p.formats / "alpaca-test.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    spec = TrainSpec(lora_name="qa", base_model="tiny", dataset="tiny.json",
                     format="alpaca-test", cutoff_len=64, batch_size=4, micro_batch_size=2,
                     epochs=2, warmup_steps=0, learning_rate="1e-2", lora_rank=8,
                     lora_alpha=16, lora_dropout=0.0, precision="fp32",
                     target_modules=["all"])
    train(spec, p, lambda e: None, lambda: False, lambda s: None, device="cpu")
    return p


class Recorder(BaseRecorder):
    def should_stop(self) -> bool:  # true after the engine asked `stop_after` times
        self.calls += 1
        return self.stop_after is not None and self.calls > self.stop_after

    def run(self, paths: DataPaths, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = dict(base_model="tiny", lora=None, prompt="What is the capital "
                                    "of France?", format_file=None, max_new_tokens=12,
                                    temperature=0.0, precision="fp32")
        args.update(kw)
        return generate(paths=paths, progress=self.progress, should_stop=self.should_stop,
                        log=self.lines.append, device="cpu", **args)


def reference(paths: DataPaths, prompt_text: str, lora: str | None = None, seed: int = 0,
              **sampling: Any) -> str:
    """model.generate called directly, on the prompt's plain token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths.models / "tiny")
    model = AutoModelForCausalLM.from_pretrained(paths.models / "tiny", dtype=torch.float32)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(paths.loras / lora))
    model.eval()
    ids = torch.tensor([tokenizer(prompt_text).input_ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- the prompt (pure)


@pytest.mark.parametrize("prompt, expected", [
    ("Say hi", "### Instruction:\nSay hi\n\n### Response:\n"),
    # A placeholder typed in the prompt is text, not a place to cut.
    ("use %output% and %input%", "### Instruction:\nuse %output% and %input%\n\n### Response:\n"),
    ("", "### Instruction:\n\n\n### Response:\n"),
    ("\ue0000\ue000", "### Instruction:\n\ue0000\ue000\n\n### Response:\n"),
])
def test_the_prompt_is_the_training_text_up_to_the_output(prompt, expected):
    assert format_prompt(parse_format(ALPACA), prompt) == expected


def test_the_text_after_the_output_placeholder_is_cut():
    chatml = parse_format((SHIPPED_DIR / "chatml-format.json").read_text())
    assert format_prompt(chatml, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # The first {instruction, output} entry wins, wherever it is in the file.
    fmt = parse_format({"instruction,input,output": "X %instruction% %input% %output%",
                        "instruction": "Q: %instruction%\nA:",
                        "instruction,output": "Q: %instruction%\nA: %output%</s>%output%",
                        "output,instruction": "never"})
    assert format_prompt(fmt, "why?") == "Q: why?\nA: "


def test_an_instruction_only_entry_is_rendered_whole():
    fmt = parse_format({"instruction": "Q: %instruction%\nA:", "system,instruction": "S"})
    assert format_prompt(fmt, "why?") == "Q: why?\nA:"


def test_a_format_without_an_instruction_entry_is_refused():
    fmt = parse_format({"instruction,input,output": "%instruction% %input% %output%"}, "f.json")
    with pytest.raises(EngineError, match=r"format f.json has no entry for the keys "
                       r"\{instruction, output\} or \{instruction\}.*\{input, instruction, output\}"):
        format_prompt(fmt, "x")


# --------------------------------------------------------------------------- against generate


def test_greedy_is_deterministic_and_equals_model_generate(paths):
    rec = Recorder()
    first = rec.run(paths)
    second = Recorder().run(paths)
    assert first == {**second, "base": {**second["base"], "seconds": first["base"]["seconds"]}}
    # No chat template is applied, though the tokenizer has one.
    assert first["prompt_text"] == "What is the capital of France?"
    assert first["base"]["text"] == reference(paths, first["prompt_text"], do_sample=False)
    assert first["base"]["tokens"] == 12 and first["base"]["text"]
    assert first["lora"] is None and first["stopped"] is False
    assert first["settings"] == {
        "max_new_tokens": 12, "temperature": 0.0, "top_p": 0.9, "seed": 0, "do_sample": False,
        "precision": "fp32", "device": "cpu", "base_model": "tiny", "lora": None,
        "format": None}
    assert rec.events == [{"type": "generate_progress", "answer": "base", "answers": 1,
                           **first["base"]}]


def test_sampling_is_seeded_and_equals_model_generate(paths):
    a = Recorder().run(paths, temperature=0.8, top_p=0.95, seed=7)
    b = Recorder().run(paths, temperature=0.8, top_p=0.95, seed=7)
    c = Recorder().run(paths, temperature=0.8, top_p=0.95, seed=8)
    assert a["base"]["text"] == b["base"]["text"] != c["base"]["text"]
    assert a["base"]["text"] == reference(paths, a["prompt_text"], seed=7, do_sample=True,
                                          temperature=0.8, top_p=0.95, top_k=0)
    assert a["settings"]["do_sample"] is True


def test_the_lora_answer_differs_and_the_base_answer_is_the_plain_models(paths):
    fmt = paths.formats / "alpaca-test.json"
    prompt = "What is the capital of Italy?"
    rec = Recorder()
    both = rec.run(paths, lora="qa", format_file=fmt, prompt=prompt)
    alone = Recorder().run(paths, format_file=fmt, prompt=prompt)
    text = "### Instruction:\nWhat is the capital of Italy?\n\n### Response:\n"
    assert both["prompt_text"] == alone["prompt_text"] == text
    assert both["base"]["text"] == alone["base"]["text"] == reference(paths, text,
                                                                      do_sample=False)
    assert both["lora"]["text"] == reference(paths, text, lora="qa", do_sample=False)
    assert both["lora"]["text"] != both["base"]["text"]
    assert both["settings"]["lora"] == "qa" and both["settings"]["format"] == "alpaca-test.json"
    assert [(e["type"], e["answer"], e["answers"]) for e in rec.events] == [
        ("generate_progress", "base", 2), ("generate_progress", "lora", 2)]
    assert rec.events[1]["text"] == both["lora"]["text"]


def test_sampled_answers_start_from_the_same_seed(paths):
    both = Recorder().run(paths, lora="qa", temperature=0.8, seed=3)
    alone = Recorder().run(paths, temperature=0.8, seed=3)
    assert both["base"]["text"] == alone["base"]["text"]
    assert both["lora"]["text"] == reference(paths, both["prompt_text"], lora="qa", seed=3,
                                             do_sample=True, temperature=0.8, top_p=0.9, top_k=0)


def test_stop_ends_generation_and_skips_the_lora_answer(paths):
    # should_stop() is asked after every new token: false three times, then true.
    rec = Recorder(stop_after=3)
    result = rec.run(paths, lora="qa")
    assert result["stopped"] is True and result["lora"] is None
    assert result["base"]["tokens"] == 4
    assert [e["answer"] for e in rec.events] == ["base"]


# --------------------------------------------------------------------------- errors


def test_errors_name_what_to_fix(paths):
    bad = paths.loras / "rank4"
    shutil.copytree(paths.loras / "qa", bad, dirs_exist_ok=True)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    (paths.formats / "broken.json").write_text("{", encoding="utf-8")
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(base_model="nope"), "base model 'nope' was not found in models/"),
        (dict(lora="ghost"), "LoRA 'ghost' was not found in loras/"),
        (dict(lora="rank4"), "LoRA 'rank4' does not fit base model 'tiny'"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1 (now 0)"),
        (dict(temperature=-0.1), "temperature must be 0 (greedy) or more (now -0.1)"),
        (dict(top_p=0.0), "top_p must be more than 0 and at most 1 (now 0.0)"),
        (dict(format_file=paths.formats / "gone.json"), "format file 'gone.json' was not found"),
        (dict(format_file=paths.formats / "broken.json"), "broken.json"),
        (dict(precision="8bit"), "needs a CUDA GPU"),
    ]
    for kw, message in cases:
        rec = Recorder()
        with pytest.raises(EngineError) as err:
            rec.run(paths, **kw)
        assert message in str(err.value), (kw, str(err.value))
        assert str(paths.home) not in str(err.value)
        assert rec.events == [], kw


def test_no_file_of_the_data_folder_changes(paths):
    before = {p: p.stat().st_mtime_ns for p in Path(paths.home).rglob("*") if p.is_file()}
    Recorder().run(paths, lora="qa", format_file=paths.formats / "alpaca-test.json")
    after = {p: p.stat().st_mtime_ns for p in Path(paths.home).rglob("*") if p.is_file()}
    assert before == after
