"""The GPU memory estimate: parameter counts, LoRA sizes, and the calibration measurements."""

from __future__ import annotations

import json

import pytest

from dispatcher.schedule.estimate import (
    MB,
    ModelShape,
    job_memory_mb,
    lora_params,
    pack_lane_mb,
    pack_memory_mb,
    safetensors_params,
    shape_from_config,
    to_card_mb,
    train_peak_bytes,
)

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": True, "max_position_embeddings": 131072}


def shape() -> ModelShape:
    s = shape_from_config(LLAMA_1B)
    assert s is not None
    return s


def test_parameter_count_of_llama_3_2_1b():
    s = shape()
    assert s.linear_params == 973_078_528
    assert s.params == 1_235_814_400  # the published 1.24 B
    untied = shape_from_config({**LLAMA_1B, "tie_word_embeddings": False})
    assert untied.params == 1_235_814_400 + 128256 * 2048


def test_lora_parameters_by_target():
    s = shape()
    assert lora_params(s, 32, ["all"]) == 22_544_384  # what peft reports for r=32, all linear
    assert lora_params(s, 8, ["q", "v"]) == 16 * 8 * ((2048 + 2048) + (2048 + 512))
    assert lora_params(s, 32, ["all"]) == lora_params(s, 32, list("qkvo") + ["gate", "up", "down"])


def test_a_pack_adds_each_trials_row_of_the_stacks(tmp_path):
    """In a pack every trial's LoRA also sits in the layers' stacks (fp32 weight and gradient),
    padded to the sweep's largest rank over every projection any trial targets."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_1B))
    specs = [{"base_model": "m", "lora_rank": 8, "target_modules": ["q", "v"]},
             {"base_model": "m", "lora_rank": 64, "target_modules": "q,k"}]
    row = lora_params(shape(), 64, ["q", "k", "v"]) * 8
    assert pack_lane_mb(specs, tmp_path) == -(-row // MB) == 72
    assert pack_lane_mb([{"base_model": "absent"}], tmp_path) == 0
    assert pack_lane_mb([{"base_model": "../m"}], tmp_path) == 0
    # A trial alone has no stacks; a pack of three holds the base once and three rows.
    assert pack_memory_mb([(3000, 2000, 72)]) == 3000
    assert pack_memory_mb([(3000, 2000, 72)] * 3) == 3 * 3000 - 2 * 2000 + 3 * 72


def test_missing_sizes_give_no_shape():
    assert shape_from_config({"hidden_size": 8}) is None


@pytest.mark.parametrize(("precision", "rank", "batch", "tokens", "measured_mb", "estimated_mb"), [
    ("4bit", 32, 4, 512, 5.45 * 1024, 5581),
    ("4bit", 32, 2, 2048, 8.65 * 1024, 8854),
    ("bf16", 32, 4, 512, 10.27 * 1024, 10582),
    ("4bit", 16, 4, 100, 4107, 4115),
    ("bf16", 16, 4, 100, 6614, 6637),
    ("8bit", 16, 4, 100, 4558, 4625),
])
def test_calibration_against_h100_measurements(precision, rank, batch, tokens, measured_mb,
                                               estimated_mb):
    peak = train_peak_bytes(shape(), precision, rank, ["all"], batch, tokens) / MB
    assert round(peak) == estimated_mb
    # Within 0.1% below (the margin covers it) to 1.5% above the measurement.
    assert 0.999 <= peak / measured_mb <= 1.015


def test_card_figure_adds_margin_and_context():
    assert to_card_mb(5581 * MB) == 6400  # 5581 x 1.05 + 500 = 6360.05 -> next 64 MB
    assert to_card_mb(0) == 512


def test_job_memory_from_the_model_folder(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA_1B))
    # The full logits in fp32 (the fused loss, the default, is tests/unit/test_engine_speed.py's).
    spec = {"base_model": "llama", "precision": "4bit", "lora_rank": 32, "fused_loss": False,
            "target_modules": ["all"], "micro_batch_size": 4, "cutoff_len": 512}
    assert job_memory_mb("train", spec, tmp_path) == 6400
    assert job_memory_mb("train", {**spec, "precision": "auto"}, tmp_path) == 6400
    # The user's own figure wins over the estimate.
    assert job_memory_mb("train", {**spec, "min_gpu_memory_mb": 30000}, tmp_path) == 30000
    # Bigger batches need more; an unknown model or a path outside gives 0 (not gated).
    assert job_memory_mb("train", {**spec, "micro_batch_size": 8}, tmp_path) > 6400
    assert job_memory_mb("train", {**spec, "base_model": "nope"}, tmp_path) == 0
    assert job_memory_mb("train", {**spec, "base_model": "../llama"}, tmp_path) == 0
    # Inference: weights in 4 bits plus one window.
    ev = job_memory_mb("evaluate", {"base_model": "llama", "max_length": 1024}, tmp_path)
    gen = job_memory_mb("generate", {"base_model": "llama", "max_new_tokens": 128}, tmp_path)
    assert 1000 < gen < ev < 6400


def test_safetensors_header_parameter_count(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                         "__metadata__": {"format": "pt"}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                 + b"\0" * 48)
    assert safetensors_params(tmp_path) == 12
    # A folder without a config falls back to the weights, doubled for training.
    assert job_memory_mb("train", {"base_model": ".", "precision": "fp32"}, tmp_path) == 512
