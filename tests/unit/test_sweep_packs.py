"""Which trials may train together (dispatcher/schedule/sweeps/packs.py): exact cases."""

from __future__ import annotations

from dataclasses import fields

import pytest

from dispatcher.jobs.specs import TrainSpec
from dispatcher.schedule.sweeps.packs import MAX_PACK, PER_TRIAL, can_share, group, share_key

BASE = TrainSpec(lora_name="t", base_model="tiny", dataset="d.json", format="alpaca-format",
                 precision="4bit").to_dict()

# One changed value for each field in which trials may differ...
DIFFER = {
    "lora_name": "other", "lora_rank": 8, "lora_alpha": 3, "lora_dropout": 0.2,
    "target_modules": ["all"], "learning_rate": "1e-3", "lr_scheduler_type": "cosine",
    "warmup_steps": 7, "optimizer": "sgd", "stop_at_loss": 1.5, "save_steps": 9,
    "higher_rank_limit": True, "always_override": True, "resume_from_checkpoint": "latest",
}
# ... and for each that shapes the base model, the data stream or the shared card.
APART = {
    "base_model": "other", "precision": "bf16", "dataset": "e.json", "format": "chat",
    "raw_text_file": "story.txt", "overlap_len": 3, "newline_favor_len": 3,
    "hard_cut_string": "##", "min_chars": 5, "cutoff_len": 64, "micro_batch_size": 1,
    "batch_size": 64, "epochs": 1.0, "seed": 3, "train_only_after": "A:",
    "add_eos_token": True, "eval_dataset": "h.json", "eval_steps": 5,
    "min_gpu_memory_mb": 9000, "fused_loss": False, "packing": False, "fused_kernels": True,
    "compile": False, "fp32_norms": True, "gradient_checkpointing": "all",
}


def test_every_field_of_the_training_spec_is_named_here():
    """A new spec field must be sorted into one of the two lists (the code keeps an unlisted
    field apart, which this test makes someone decide on)."""
    names = {f.name for f in fields(TrainSpec)}
    assert set(DIFFER) == set(PER_TRIAL)
    assert names == set(DIFFER) | set(APART)


@pytest.mark.parametrize("name", sorted(DIFFER))
def test_trials_that_differ_in_their_own_lora_settings_share(name):
    assert DIFFER[name] != BASE[name]
    assert can_share(BASE, {**BASE, name: DIFFER[name]})


@pytest.mark.parametrize("name", sorted(APART))
def test_trials_that_differ_in_the_base_or_the_data_do_not_share(name):
    assert APART[name] != BASE[name]
    assert not can_share(BASE, {**BASE, name: APART[name]})


def test_the_key_ignores_key_order_and_all_per_trial_fields_at_once():
    other = dict(reversed(list({**BASE, **DIFFER}.items())))
    assert share_key(other) == share_key(BASE)


def test_grouping_keeps_order_fills_packs_and_leaves_the_odd_trial_alone():
    a = BASE
    b = {**BASE, "seed": 1}
    trials = [("1", a), ("2", b), ("3", {**a, "lora_rank": 4}), ("4", a), ("5", {**b, "lora_rank": 2}),
              ("6", {**BASE, "cutoff_len": 32}), ("7", a)]
    assert group(trials, size=2) == [["1", "3"], ["2", "5"], ["4", "7"], ["6"]]
    assert group(trials) == [["1", "3", "4", "7"], ["2", "5"], ["6"]]
    assert group(trials, size=1) == [["1"], ["2"], ["3"], ["4"], ["5"], ["6"], ["7"]]
    assert group([(str(i), a) for i in range(20)], size=50) == [
        [str(i) for i in range(k, min(k + MAX_PACK, 20))] for k in range(0, 20, MAX_PACK)]
    assert group([]) == []
