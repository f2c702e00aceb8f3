"""The training engine on a real tiny Llama: real tokenizer, real LoRA, real optimizer steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.jobs.specs import TrainSpec
from dispatcher.settings import DataPaths
from gpuworker.engine import EngineError, train
from gpuworker.engine.data import StepPlan, optimizer_steps
from gpuworker.engine.targets import resolve_target_modules
from tests.recorder import Recorder as BaseRecorder
from tests.tiny import make_tiny_model, write_tiny_dataset, write_tiny_raw_text

LORA_FILES = {"adapter_model.safetensors", "adapter_config.json", "training_parameters.json",
              "training_prompt.json", "training_log.json"}
TRAIN_KEYS = {"type", "step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_s",
              "tokens", "eta_s", "gpu_mem_mb"}
ALPACA = {
    "instruction,output": "### Instruction:\n%instruction%\n\n### Response:\n%output%",
    "instruction,input,output":
        "### Instruction:\n%instruction%\n\n### Input:\n%input%\n\n### Response:\n%output%",
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def paths(tmp_path, tiny_model_dir) -> DataPaths:
    p = DataPaths(tmp_path / "home")
    p.ensure()
    shutil.copytree(tiny_model_dir, p.models / "tiny")
    write_tiny_dataset(p.datasets / "tiny.json", n=24)
    write_tiny_dataset(p.datasets / "heldout.json", n=6)
    write_tiny_raw_text(p.datasets / "story.txt")
    (p.formats / "alpaca-test.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    return p


def make_spec(**kw: Any) -> TrainSpec:
    base: dict[str, Any] = dict(
        lora_name="tiny-lora", base_model="tiny", dataset="tiny.json", format="alpaca-test",
        batch_size=4, micro_batch_size=2, epochs=1, cutoff_len=64, warmup_steps=0,
        learning_rate="1e-2", lora_rank=8, lora_alpha=16, lora_dropout=0.0, precision="fp32",
        eval_steps=100)
    base.update(kw)
    return TrainSpec(**base)


class Recorder(BaseRecorder):
    """Collects what the engine reports; `stop_after` makes should_stop() true after N steps."""

    def run(self, spec: TrainSpec, paths: DataPaths) -> dict[str, Any]:
        return train(spec, paths, self.progress, self.should_stop, self.lines.append, device="cpu")


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- a whole run


def test_train_reports_every_step_and_writes_a_loadable_lora(paths):
    rec = Recorder()
    spec = make_spec(epochs=2)
    result = rec.run(spec, paths)

    # 24 samples / micro 2 = 12 micro-batches per epoch; 2 per optimizer step; 2 epochs.
    steps = rec.of("train")
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert all(set(e) == TRAIN_KEYS and e["total_steps"] == 12 for e in steps)
    assert steps[-1]["epoch"] == pytest.approx(2.0) and steps[5]["epoch"] == pytest.approx(1.0)
    assert all(e["gpu_mem_mb"] is None and e["tokens_per_s"] > 0 for e in steps)
    assert steps[-1]["eta_s"] == 0
    # Linear schedule without warm-up: the first step uses the full rate, then it decays.
    assert steps[0]["learning_rate"] == pytest.approx(1e-2)
    assert steps[-1]["learning_rate"] == pytest.approx(1e-2 / 12)
    losses = [e["loss"] for e in steps]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.03, losses

    assert result["lora_dir"] == "loras/tiny-lora"
    assert result["steps"] == result["total_steps"] == 12
    assert result["stopped"] is False and result["final_loss"] == pytest.approx(losses[-1])
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["train_runtime_s"] > 0 and result["tokens_per_s"] > 0

    lora_dir = paths.loras / "tiny-lora"
    assert {p.name for p in lora_dir.iterdir()} == LORA_FILES
    params = json.loads((lora_dir / "training_parameters.json").read_text())
    assert params == json.loads(json.dumps(spec.training_parameters()))
    prompt = json.loads((lora_dir / "training_prompt.json").read_text())
    assert prompt["template_type"] == "dataset"
    assert [prompt["template_1"], prompt["template_2"]] == list(ALPACA.values())
    log = json.loads((lora_dir / "training_log.json").read_text())
    assert log["loss"] == pytest.approx(losses[-1]) and log["current_steps"] == 12
    assert log["base_model_name"] == "tiny" and log["base_model_class"] == "LlamaForCausalLM"
    assert log["base_loaded_in_4bit"] is False and log["projections"] == "q, v"
    assert log["trainable_params"] == result["trainable_params"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(paths.models / "tiny")
    model = PeftModel.from_pretrained(base, lora_dir)
    saved = lora_weights(lora_dir)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(loaded) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for name, tensor in saved.items():
        # Saved keys drop the adapter name ("default") that the live parameters carry.
        live = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[live], tensor), name
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # it learned


def test_same_seed_same_losses(paths):
    a, b = Recorder(), Recorder()
    a.run(make_spec(lora_name="a"), paths)
    b.run(make_spec(lora_name="b"), paths)
    assert [e["loss"] for e in a.of("train")] == [e["loss"] for e in b.of("train")]
    assert lora_weights(paths.loras / "a").keys() == lora_weights(paths.loras / "b").keys()


def test_stop_request_saves_the_incomplete_lora(paths):
    rec = Recorder(stop_after=1)
    result = rec.run(make_spec(), paths)
    assert result["stopped"] is True and result["steps"] == 1 and result["total_steps"] == 6
    assert len(rec.of("train")) == 1
    lora_dir = paths.loras / "tiny-lora"
    assert LORA_FILES <= {p.name for p in lora_dir.iterdir()}
    assert json.loads((lora_dir / "training_log.json").read_text())["stopped"] is True


def test_stop_at_loss_ends_the_run_early_without_counting_as_stopped(paths):
    rec = Recorder()
    result = rec.run(make_spec(stop_at_loss=50.0), paths)  # any first loss is below 50
    assert result["steps"] == 1 and result["stopped"] is False
    assert "stop_at_loss" in result["reason"]


def test_raw_text_training(paths):
    rec = Recorder()
    result = rec.run(make_spec(dataset="", format="", raw_text_file="story.txt",
                               overlap_len=16, newline_favor_len=16), paths)
    assert result["steps"] >= 1 and not result["stopped"]
    lora_dir = paths.loras / "tiny-lora"
    assert {p.name for p in lora_dir.iterdir()} == LORA_FILES
    prompt = json.loads((lora_dir / "training_prompt.json").read_text())
    assert prompt["template_type"] == "raw_text" and prompt["raw_text_file"] == "story.txt"


def test_eval_dataset_is_scored_every_eval_steps_and_at_the_end(paths):
    rec = Recorder()
    result = rec.run(make_spec(eval_dataset="heldout.json", eval_steps=4), paths)
    evals = rec.of("eval")
    assert [e["step"] for e in evals] == [4, 6]  # every 4 optimizer steps, and the last one
    assert all(set(e) == {"type", "step", "eval_loss"} and e["eval_loss"] > 0 for e in evals)
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])


def test_save_steps_write_resumable_checkpoints(paths):
    rec = Recorder()
    rec.run(make_spec(save_steps=2), paths)
    lora_dir = paths.loras / "tiny-lora"
    # Steps 2 and 4; the run's end (step 6) is the adapter itself.
    assert sorted(p.name for p in lora_dir.iterdir() if p.is_dir()) == ["checkpoint-2",
                                                                        "checkpoint-4"]
    ckpt = lora_dir / "checkpoint-4"
    assert {p.name for p in ckpt.iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json", "training_log.json",
        "training_prompt.json", "training_state.pt", "training_state.json"}
    summary = json.loads((ckpt / "training_state.json").read_text())
    assert summary["step"] == 4 and summary["micro_batches_done"] == 8
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    assert state["step"] == 4 and state["optimizer"]["state"] and state["scheduler"]
    assert json.loads((ckpt / "training_log.json").read_text())["current_steps"] == 4
    assert not any(p.name.startswith(".") for p in lora_dir.iterdir())  # no temp leftovers


# --------------------------------------------------------------------------- continuing a LoRA


def test_continue_loads_the_saved_weights_and_keeps_a_backup(paths):
    first = Recorder()
    first.run(make_spec(), paths)
    lora_dir = paths.loras / "tiny-lora"
    before = lora_weights(lora_dir)

    again = Recorder()
    again.run(make_spec(), paths)
    # Same data order and seed: only the loaded weights can make the first loss differ.
    assert again.of("train")[0]["loss"] < first.of("train")[0]["loss"]
    backups = [p for p in lora_dir.iterdir() if p.name.startswith("backup-")]
    assert len(backups) == 1
    kept = lora_weights(backups[0])
    assert all(torch.equal(kept[k], before[k]) for k in before)


def test_continue_with_another_rank_is_refused_before_anything_changes(paths):
    Recorder().run(make_spec(), paths)
    lora_dir = paths.loras / "tiny-lora"
    listing = sorted(p.name for p in lora_dir.iterdir())
    with pytest.raises(EngineError, match="rank cannot change"):
        Recorder().run(make_spec(lora_rank=4), paths)
    assert sorted(p.name for p in lora_dir.iterdir()) == listing


def test_always_override_moves_the_old_lora_into_a_backup(paths):
    Recorder().run(make_spec(), paths)
    rec = Recorder()
    rec.run(make_spec(lora_rank=4, lora_alpha=8, always_override=True), paths)
    lora_dir = paths.loras / "tiny-lora"
    backups = [p for p in lora_dir.iterdir() if p.name.startswith("backup-")]
    assert len(backups) == 1 and LORA_FILES <= {p.name for p in backups[0].iterdir()}
    assert json.loads((backups[0] / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 4


# --------------------------------------------------------------------------- refusals


def test_4bit_on_cpu_is_refused_naming_cuda(paths):
    with pytest.raises(EngineError, match="CUDA"):
        Recorder().run(make_spec(precision="4bit"), paths)
    assert list(paths.loras.iterdir()) == []


@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "adamw_bnb_8bit"])
def test_gpu_only_optimizers_are_refused_on_cpu(paths, optimizer):
    with pytest.raises(EngineError, match="CUDA"):
        Recorder().run(make_spec(optimizer=optimizer), paths)


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd", "adagrad"])
def test_other_optimizers_train(paths, optimizer):
    result = Recorder().run(make_spec(optimizer=optimizer, epochs=0.5), paths)
    assert result["steps"] == 3


def test_missing_files_and_bad_rows_are_engine_errors(paths):
    with pytest.raises(EngineError, match="base model 'nope' was not found"):
        Recorder().run(make_spec(base_model="nope"), paths)
    with pytest.raises(EngineError, match="dataset 'missing.json' was not found"):
        Recorder().run(make_spec(dataset="missing.json"), paths)
    with pytest.raises(EngineError, match="format 'nope' was not found"):
        Recorder().run(make_spec(format="nope"), paths)
    (paths.datasets / "bad.json").write_text(json.dumps([{"question": "x", "answer": "y"}]))
    with pytest.raises(EngineError, match="bad.json") as err:
        Recorder().run(make_spec(dataset="bad.json"), paths)
    assert "row 1" in str(err.value) and str(paths.home) not in str(err.value)
    assert list(paths.loras.iterdir()) == []


def test_short_names_on_an_unknown_architecture_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(EngineError, match="'gpt2'.*'all'"):
        resolve_target_modules(model, ["q", "v"])
    assert resolve_target_modules(model, ["all"]) == ["c_attn", "c_fc", "c_proj"]


def test_all_means_every_linear_layer_but_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert resolve_target_modules(model, ["all"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_target_modules(model, ["v", "q", "v"]) == ["v_proj", "q_proj"]


# --------------------------------------------------------------------------- step arithmetic


@pytest.mark.parametrize("n, micro, batch, epochs, per_epoch, micro_total, steps", [
    (24, 2, 4, 1, 12, 12, 6),
    (24, 2, 4, 1.5, 12, 18, 9),
    (5, 2, 8, 3, 3, 9, 3),      # accumulation 4: the last step has one micro-batch
    (10, 4, 6, 3, 3, 9, 9),     # batch not a multiple of micro: accumulation 6 // 4 = 1
    (3, 4, 4, 0.1, 1, 1, 1),    # never less than one step
])
def test_step_plan(n, micro, batch, epochs, per_epoch, micro_total, steps):
    plan = StepPlan.make(n, micro, batch, epochs)
    assert (plan.micro_per_epoch, plan.total_micro, plan.total_steps) == (
        per_epoch, micro_total, steps)
    groups = list(optimizer_steps(plan, seed=7))
    assert len(groups) == steps
    assert sum(len(g) for g in groups) == micro_total


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    plan = StepPlan.make(7, 2, 2, 2)
    flat = [i for g in optimizer_steps(plan, seed=3) for mb in g for i in mb]
    assert sorted(flat[:7]) == sorted(flat[7:]) == list(range(7))
    assert flat[:7] != flat[7:]  # a fresh permutation per epoch
    assert flat == [i for g in optimizer_steps(plan, seed=3) for mb in g for i in mb]


def test_lora_files_are_readable_by_the_team(paths):
    """Atomic writes go through private temp files; the saved folder must not stay private."""
    import os
    import stat

    Recorder().run(make_spec(save_steps=2), paths)
    umask = os.umask(0)
    os.umask(umask)
    lora = paths.loras / "tiny-lora"
    for p in [lora, *lora.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_a_loss_of_nan_or_inf_fails_the_run_and_keeps_the_last_checkpoint(paths):
    """A learning rate far too high makes the weights overflow after the first step: the run
    fails with the seed's advice, and the checkpoint written before that stays."""
    rec = Recorder()
    spec = make_spec(optimizer="sgd", learning_rate="1e38", save_steps=1)
    with pytest.raises(EngineError, match="probably broken.*lower learning_rate"):
        rec.run(spec, paths)
    losses = [e["loss"] for e in rec.of("train")]
    assert losses and all(0 < x < float("inf") for x in losses)  # only good steps reported
    lora_dir = paths.loras / "tiny-lora"
    checkpoints = sorted(p.name for p in lora_dir.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] == f"checkpoint-{len(losses)}"
    assert (lora_dir / checkpoints[-1] / "adapter_model.safetensors").exists()
    assert not (lora_dir / "adapter_model.safetensors").exists()  # no broken final adapter


def test_the_engines_loss_honours_train_only_after(paths, tiny_model_dir):
    """The mask reaches the loss the engine itself computes (not only Hugging Face's): its loss
    equals the model's own on the same batch, a masked position's prediction gets no gradient,
    and a job with train_only_after trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import formats
    from gpuworker.engine.levers import Forward, PadBatcher, token_loss_sum

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = formats.build_samples(
        tokenizer=tok, cutoff_len=64, dataset_path=paths.datasets / "tiny.json",
        format_path=paths.formats / "alpaca-test.json", train_only_after="### Response:\n",
        add_eos_token=True)[:3]
    batch = PadBatcher(tok.pad_token_id or 0).collate(samples)
    labels = batch.tensors["labels"]
    masked = labels == -100
    assert masked[:, 0].all() and (~masked).any(dim=1).all()  # every row: a prompt, then trained

    logits = Forward()(model, batch).detach().requires_grad_(True)  # (B, T, V)
    loss_sum = token_loss_sum(logits, labels)
    engine_loss = loss_sum / batch.targets
    with torch.no_grad():
        hf_loss = model(input_ids=batch.tensors["input_ids"],
                        attention_mask=batch.tensors["attention_mask"], labels=labels).loss
    assert float(engine_loss.detach()) == pytest.approx(float(hf_loss), rel=1e-5)

    loss_sum.backward()
    # The logits at position t predict token t+1: they matter exactly where labels[t+1] is kept.
    predicts_trained = torch.zeros_like(masked)
    predicts_trained[:, :-1] = ~masked[:, 1:]
    grad_norm = logits.grad.abs().sum(dim=-1)  # (B, T)
    assert (grad_norm[~predicts_trained] == 0).all()
    assert (grad_norm[predicts_trained] > 0).all()

    rec = Recorder()
    result = rec.run(make_spec(train_only_after="### Response:\n", add_eos_token=True), paths)
    losses = [e["loss"] for e in rec.of("train")]
    assert result["steps"] == result["total_steps"] == 6 and not result["stopped"]
    assert losses[-1] < losses[0], losses
    params = json.loads((paths.loras / "tiny-lora" / "training_parameters.json").read_text())
    assert params["train_only_after"] == "### Response:\n"
