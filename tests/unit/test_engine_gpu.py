"""The training engine on a CUDA GPU: half precision, fused AdamW, QLoRA, out-of-memory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from gpuworker.engine import EngineError
from tests.unit.test_engine import Recorder, lora_weights, make_spec, paths, tiny_model_dir  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run_on_gpu(rec: Recorder, spec, paths):  # noqa: F811
    from gpuworker.engine import train

    return train(spec, paths, rec.progress, rec.should_stop, rec.lines.append, device="cuda")


@pytest.mark.parametrize("precision, optimizer", [
    ("bf16", "adamw_torch_fused"), ("fp16", "adamw_torch"), ("fp32", "adamw_torch")])
def test_half_precision_training_on_the_gpu(paths, precision, optimizer):  # noqa: F811
    rec = Recorder()
    result = run_on_gpu(rec, make_spec(precision=precision, optimizer=optimizer, epochs=2), paths)
    steps = rec.of("train")
    assert result["steps"] == 12 and result["precision"] == precision
    assert all(e["gpu_mem_mb"] > 0 for e in steps)
    assert result["peak_gpu_memory_mb"] > 0
    assert sum(e["loss"] for e in steps[-3:]) / 3 < steps[0]["loss"] - 0.03
    # The LoRA weights stay fp32 on a half-precision base, so the optimizer updates them fully.
    assert {t.dtype for t in lora_weights(paths.loras / "tiny-lora").values()} == {torch.float32}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes")
@pytest.mark.parametrize("precision, optimizer", [
    ("4bit", "paged_adamw_8bit"), ("4bit", "adamw_torch"), ("8bit", "adamw_bnb_8bit")])
def test_quantised_training(paths, precision, optimizer):  # noqa: F811
    rec = Recorder()
    result = run_on_gpu(rec, make_spec(precision=precision, optimizer=optimizer, epochs=2), paths)
    assert result["steps"] == 12 and result["precision"] == precision
    steps = rec.of("train")
    assert sum(e["loss"] for e in steps[-3:]) / 3 < steps[0]["loss"] - 0.03
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log[f"base_loaded_in_{precision}"] is True


def test_out_of_memory_names_the_settings_and_frees_the_gpu(paths):  # noqa: F811
    torch.cuda.synchronize()
    hog = []
    # Fill the card, so that the engine's first allocations fail for real.
    for size in (2**30, 2**26, 2**21, 2**16):
        while True:
            try:
                hog.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    before = torch.cuda.memory_allocated()
    try:
        with pytest.raises(EngineError, match="micro_batch_size.*cutoff_len.*lora_rank"):
            run_on_gpu(Recorder(), make_spec(precision="fp32"), paths)
        assert torch.cuda.memory_allocated() == before  # nothing of the run is left behind
    finally:
        del hog
        torch.cuda.empty_cache()
    assert not (paths.loras / "tiny-lora" / "adapter_model.safetensors").exists()
