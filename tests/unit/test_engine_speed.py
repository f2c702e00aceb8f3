"""The engine's speed levers are exact: on the CPU in fp32, a run with a lever on gives the losses
recorded from today's engine (tests/unit/test_engine_seams.py's RECORDED), and each lever's
pieces equal the plain computation they replace, gradients included."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gpuworker.engine import attention, levers
from gpuworker.engine.boundary import config_from_spec
from gpuworker.engine.config import Levers
from gpuworker.engine.report import Report
from gpuworker.engine.train import run_training
from tests.unit.test_engine import Recorder, make_spec, paths, tiny_model_dir  # noqa: F401
from tests.unit.test_engine_seams import RECORDED, assert_recorded


def run_with(paths, rec: Recorder, changes: dict[str, Any], **lever_names: Any  # noqa: F811
             ) -> dict[str, Any]:
    # The levers themselves, on the CPU too (where the job settings skip compiling and packing).
    cfg = config_from_spec(make_spec(**changes), paths,
                           Levers(**{"gpu_levers_on_cpu": True, **lever_names}))
    return run_training(cfg, Report(rec.progress, rec.should_stop, rec.lines.append),
                        device="cpu")


def test_chunked_linear_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (10,))
    plain = F.cross_entropy(hidden @ weight.t(), target, reduction="sum")
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    for chunk in (3, 10, 64):  # chunks that split the rows unevenly, exactly, not at all
        fused = levers.chunked_linear_loss_sum(hidden, weight, target, chunk=chunk)
        g_fused = torch.autograd.grad(fused, (hidden, weight))
        assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
        for a, b in zip(g_fused, g_plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_the_fused_loss_trains_to_the_recorded_losses(paths, case):  # noqa: F811
    """The whole run with loss=fused (on the CPU: the chunked implementation, logits only at the
    label positions) against the losses recorded from today's engine: every step, the final
    loss and the evaluation losses within 1e-5, relative."""
    changes, losses, final, evals = RECORDED[case]
    rec = Recorder()
    result = run_with(paths, rec, changes, loss="fused")
    assert [e["loss"] for e in rec.of("train")] == pytest.approx(losses, rel=1e-5)
    assert result["final_loss"] == pytest.approx(final, rel=1e-5)
    assert [e["eval_loss"] for e in rec.of("eval")] == pytest.approx(evals, rel=1e-5)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["loss"] == "fused (chunked)"
    assert log["speed"]["batching"] == "pad"


def test_a_kernel_hook_that_does_not_apply_is_skipped_with_its_reason(paths):  # noqa: F811
    """Liger's kernels on the CPU: the run trains as without them (the recorded losses, bit for
    bit), the log says why they were skipped, and training_log.json records it."""
    rec = Recorder()
    result = run_with(paths, rec, RECORDED["dropout"][0], prepare=("liger_kernels",))
    assert_recorded("dropout", rec, result, evals=False)
    assert any("liger_kernels skipped: Liger's kernels need a CUDA GPU" in line
               for line in rec.lines)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["prepare"] == {"liger_kernels": "skipped: Liger's kernels need a CUDA GPU"}
    assert log["speed"]["loss"] == "fp32_logits"


def test_the_fused_loss_falls_back_where_the_logits_are_more_than_a_product(
        paths, tiny_model_dir):  # noqa: F811
    """A model that scales its logits (here: a config that says so) cannot use the fused loss:
    the run uses fp32_logits and says why."""
    cfg_file = paths.models / "tiny" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    rec = Recorder()
    run_with(paths, rec, {}, loss="fused")
    assert any("loss fused does not apply" in line and "final_logit_softcapping" in line
               for line in rec.lines)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["loss"].startswith("fp32_logits (fused skipped:")


# --------------------------------------------------------------------------- packing

SAMPLES = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
           {"input_ids": [1, 8], "labels": [-100, 8]},
           {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]}]


def test_the_packing_batcher_puts_a_micro_batch_in_one_row():
    packed, = levers.PackBatcher().step([SAMPLES])
    t = packed.tensors
    assert t["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 1, 9, 10]]
    # Each sample's first token is never a target, so no sample predicts the next one's start.
    assert t["labels"].tolist() == [[-100, -100, 6, 7, -100, 8, -100, 9, 10]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    mask = t["attention_mask"][0, 0].int().tolist()
    assert mask[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # the first sample's last token
    assert mask[5] == [0, 0, 0, 0, 1, 1, 0, 0, 0]  # the second sample sees only itself
    assert mask[8] == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert (packed.tokens, packed.targets, packed.padded) == (9, 5, False)
    padded = levers.PadBatcher(pad_id=3).step([SAMPLES])
    assert packed.targets == sum(b.targets for b in padded)  # the step's label tokens


def test_a_micro_batch_of_one_length_keeps_its_rows():
    """Nothing to pack: samples of one length stay rows of their own, without a mask or
    positions (the plain causal attention), as the padded batcher makes them."""
    same = [SAMPLES[0], {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}]
    batch, = levers.PackBatcher(pad_id=3).step([same])
    plain, = levers.PadBatcher(pad_id=3).step([same])
    assert batch.tensors.keys() == plain.tensors.keys() == {"input_ids", "labels",
                                                           "attention_mask"}
    for key, value in plain.tensors.items():
        assert torch.equal(batch.tensors[key], value)
    assert (batch.tokens, batch.targets, batch.padded) == (8, 5, False)


def test_a_micro_batch_longer_than_a_row_is_split_between_samples():
    batcher = levers.PackBatcher(row_tokens=6)
    rows = batcher.step([SAMPLES, SAMPLES[:1]])
    assert [r.tensors["input_ids"].tolist() for r in rows] == [
        [[1, 5, 6, 7, 1, 8]], [[1, 9, 10]], [[1, 5, 6, 7]]]
    assert [len(list(batcher.evaluation(SAMPLES, 2)))] == [1 + 1]  # [s0 s1] and [s2]


@pytest.mark.parametrize("loss", ["fp32_logits", "fused"])
def test_the_packed_loss_and_gradients_equal_the_padded_ones(tiny_model_dir, loss):  # noqa: F811
    """The same samples through the tiny model (fp32, LoRA on): the loss summed over a packed
    row equals the padded micro-batch's (1e-5, relative), and so does every LoRA gradient."""
    import contextlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    levers.check_packing(model)
    rng = torch.Generator().manual_seed(1)
    samples = []
    for n in (7, 3, 12, 5):
        ids = torch.randint(4, 200, (n,), generator=rng).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    fn = levers.LOSSES[loss](contextlib.nullcontext)
    results = []
    attention.install()  # a packed row with its samples' offsets, not its mask (a job's way)
    for batcher in (levers.PadBatcher(pad_id=0), levers.PackBatcher(),
                    levers.PackBatcher(varlen=16)):
        model.zero_grad()
        total = sum(fn(model, b) for b in batcher.step([samples]))
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((total.item(), grads))
    (pad_loss, pad_grads), *packed = results
    for pack_loss, pack_grads in packed:
        assert pack_loss == pytest.approx(pad_loss, rel=1e-5)
        for name, g in pad_grads.items():
            torch.testing.assert_close(pack_grads[name], g, rtol=1e-4, atol=1e-6)


def test_a_varlen_row_carries_its_samples_offsets_instead_of_a_mask():
    packed, = levers.PackBatcher(varlen=512).step([SAMPLES])
    t = packed.tensors
    assert t["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 1, 9, 10]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert t["cu_seq_lens"].tolist() == [0, 4, 6, 9] and t["cu_seq_lens"].dtype == torch.int32
    assert t["attention_mask"].tolist() == [[1] * 9]  # no (T, T) mask is built
    assert (packed.tokens, packed.targets, packed.padded, packed.segment_max) == (9, 5, False, 512)
    # A pack's copies of the row (one per trial) share the one layout of samples.
    three = packed.repeat(3)
    assert three.tensors["input_ids"].shape == (3, 9)
    assert three.tensors["cu_seq_lens"].tolist() == [0, 4, 6, 9] and three.segment_max == 512


def test_varlen_attention_equals_the_masked_attention_with_grouped_heads():
    """attention.packed_attention on the CPU (each sample's slice, causal) against SDPA over
    the row's block-diagonal mask: two rows of one layout, 4 query heads sharing 2 key/value
    heads, fp32; outputs and the gradients of q, k and v."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    out = attention.packed_attention(q, k, v, cu, 16, scaling=0.3)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([4, 2, 3]))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask, scale=0.3).transpose(1, 2)
    assert out.shape == (2, 9, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["dataset", "raw"])
@pytest.mark.parametrize("loss", ["fp32_logits", "fused"])
def test_packed_runs_train_to_the_recorded_losses(paths, case, loss):  # noqa: F811
    """Whole runs with batching=pack (and either loss) reproduce the padded runs' recorded losses:
    the same samples make up every step. (The recorded dropout case is left out: LoRA dropout
    draws its masks for the tensors' shapes, which packing changes.)"""
    changes, losses, final, evals = RECORDED[case]
    rec = Recorder()
    result = run_with(paths, rec, changes, batching="pack", loss=loss)
    assert [e["loss"] for e in rec.of("train")] == pytest.approx(losses, rel=1e-5)
    assert result["final_loss"] == pytest.approx(final, rel=1e-5)
    assert [e["eval_loss"] for e in rec.of("eval")] == pytest.approx(evals, rel=1e-5)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["batching"] == "pack"
    # No padding: every token counted is a sample's own.
    padded = Recorder()
    run_with(paths, padded, {**changes, "lora_name": "padded"})
    assert log["tokens"] == json.loads(
        (paths.loras / "padded" / "training_log.json").read_text())["tokens"]


def test_a_packed_run_resumes_exactly(paths):  # noqa: F811
    """Stopped after step 3 (with LoRA dropout on, so the RNG state matters) and resumed: the
    packed run's steps and final weights are the uninterrupted packed run's."""
    from tests.unit.test_engine import lora_weights

    changes = dict(micro_batch_size=2, batch_size=4, epochs=3, lora_dropout=0.1, save_steps=2)
    whole = Recorder()
    run_with(paths, whole, {**changes, "lora_name": "whole"}, batching="pack")

    class Stopper(Recorder):
        def should_stop(self) -> bool:
            return len(self.of("train")) >= 3

    first, second = Stopper(), Recorder()
    assert run_with(paths, first, {**changes, "lora_name": "parted"}, batching="pack")["stopped"]
    cfg = config_from_spec(make_spec(**changes, lora_name="parted"), paths,
                           Levers(batching="pack", gpu_levers_on_cpu=True))
    run_training(cfg, Report(second.progress, second.should_stop, second.lines.append),
                 device="cpu", resume_from="latest")
    got = [e["loss"] for e in first.of("train") + second.of("train")]
    assert got == pytest.approx([e["loss"] for e in whole.of("train")], abs=1e-6)
    want = lora_weights(paths.loras / "whole")
    for k, w in lora_weights(paths.loras / "parted").items():
        torch.testing.assert_close(w, want[k], atol=1e-6, rtol=0)


def test_the_fused_loss_checks_the_logits_are_a_plain_product(tiny_model_dir):  # noqa: F811
    """A model that does more to its logits than no config key says (here: a hook doubling
    them) is found by the one-time comparison, and the loss is not fused for it."""
    import contextlib

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    decoder, head = levers.split_causal_lm(model)
    levers.check_logits_are_a_product(model, decoder, head, contextlib.nullcontext)
    model.train()

    def doubled(module, args, out):
        out.logits = out.logits * 2
        return out

    model.register_forward_hook(doubled)
    with pytest.raises(levers.LeverSkipped, match="not its decoder's hidden states times"):
        levers.check_logits_are_a_product(model, decoder, head, contextlib.nullcontext)
    assert model.training  # left as it was


def test_a_micro_batch_without_label_tokens_adds_nothing_and_has_a_backward():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = levers.chunked_linear_loss_sum(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    # The graph reaches back through the hidden states (to the LoRA weights in a real run).
    assert loss.item() == 0.0 and hidden.grad is not None and hidden.grad.shape == (0, 8)


def test_checkpointing_is_limited_to_the_first_layers(tiny_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert levers.limit_checkpointing(model, 1) is None  # nothing is checkpointed: left alone
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert levers.limit_checkpointing(model, None) == "2 of 2 layers"
    assert levers.limit_checkpointing(model, 1) == "1 of 2 layers"
    assert [b.gradient_checkpointing for b in levers.checkpointed_blocks(model)] == [True, False]


def test_the_layers_a_memory_budget_leaves_checkpointed():
    gib = 2**30
    # 8 GiB with all 32 checkpointed, 0.75 GiB per layer that keeps its activations, a 17 GiB
    # budget less 5 %: 8.15 GiB of room, 10 layers keep theirs, 22 stay checkpointed.
    assert levers.layers_to_checkpoint(32, 8 * gib, 3 * gib // 4, 17 * gib) == 22
    assert levers.layers_to_checkpoint(32, 8 * gib, 3 * gib // 4, 100 * gib) == 0
    assert levers.layers_to_checkpoint(32, 17 * gib, 3 * gib // 4, 17 * gib) == 32  # no room
    assert levers.layers_to_checkpoint(32, 8 * gib, 0, 17 * gib) == 32  # nothing measured


def test_the_jobs_speed_settings_choose_the_levers_and_the_estimate_follows(tmp_path):
    """A training spec's speed fields become the engine's levers, and the dispatcher's memory
    estimate follows the loss they choose (the fused loss never holds all the logits)."""
    from dispatcher.jobs.specs import TrainSpec
    from dispatcher.schedule import estimate
    from gpuworker.engine.boundary import levers_from_spec

    # The defaults: every lever the benchmark chose (README, "Performance").
    assert levers_from_spec(TrainSpec()) == Levers(loss="fused", batching="pack",
                                                   prepare=("compile",), upcast=False,
                                                   checkpoint_budget=True, cuda_graphs=True)
    off = TrainSpec(fused_loss=False, packing=False, compile=False, fp32_norms=True,
                    gradient_checkpointing="all")
    assert levers_from_spec(off) == Levers()  # the engine as it was before the levers
    fast = TrainSpec(fused_kernels=True)
    assert levers_from_spec(fast) == Levers(loss="fused", batching="pack",
                                            prepare=("liger_kernels", "compile"), upcast=False,
                                            checkpoint_budget=True, cuda_graphs=True)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, model_type="llama")))
    spec = {"base_model": "m", "precision": "4bit", "micro_batch_size": 8, "cutoff_len": 2048}
    plain = estimate.job_memory_mb("train", {**spec, "fused_loss": False}, tmp_path)
    fused = estimate.job_memory_mb("train", spec, tmp_path)  # the default
    # 16384 tokens' fp32 logits (10 bytes x 128256 each, about 20 GB) against a 1024-row chunk.
    assert plain - fused > 15000
    # A model that caps its logits gets the plain loss from the engine, and the estimate knows.
    from gpuworker.engine.losses import LOGIT_TRANSFORMS

    assert LOGIT_TRANSFORMS == estimate.LOGIT_TRANSFORMS
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    assert estimate.job_memory_mb("train", spec, tmp_path) == plain



def test_the_memory_budget_measures_steps_2_and_3_per_token(monkeypatch):
    """The budget's arithmetic, with the card's memory counters given (the GPU run is the real
    test): after step 1, 8 GiB stay allocated (weights, optimizer state); step 2 (all layers
    checkpointed) peaks 1 GiB above that at 4096 tokens; step 3 (the last two layers keeping
    their activations) 0.875 GiB above at 2048 tokens: 0.75 GiB per layer at 4096 tokens, the
    largest micro-batch. A 17 GiB budget less 5 % leaves room for 9 layers: 23 of 32 stay
    checkpointed from step 4."""
    gib = 2**30
    readings = iter([(8 * gib, 8.5 * gib), (8 * gib, 9 * gib), (8 * gib, 8.875 * gib)])
    current = {}

    def read() -> None:
        current["alloc"], current["peak"] = next(readings)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: int(current["peak"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: int(current["alloc"]))
    # The card: 60 GiB free, 10 GiB held by this process: the 17 GiB limit is what counts.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 10 * gib)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: resets.append(1))

    class Block:
        gradient_checkpointing = True

    blocks = [Block() for _ in range(32)]
    lines: list[str] = []
    budget = levers.CheckpointBudget(blocks, torch.device("cuda", 0), 17 * gib, 4096,
                                     lines.append)
    for step, tokens in ((1, 4096), (2, 4096), (3, 2048)):
        read()
        budget.after_step(step, tokens)
        if step == 2:
            assert [b.gradient_checkpointing for b in blocks] == [True] * 30 + [False] * 2
    assert [b.gradient_checkpointing for b in blocks] == [True] * 23 + [False] * 9
    assert len(resets) == 3 and budget.done
    assert lines == ["Gradient checkpointing from step 4: 23 of 32 layers (memory budget 17.0 GiB; "
                     "at 4096 tokens a micro-batch 9.0 GiB with every layer checkpointed, "
                     "0.75 GiB per layer that is not)"]
    budget.after_step(4, 4096)  # measured once: nothing more is read
    # A limit above what the card can still give (another process took memory) gives way.
    readings = iter([(8 * gib, 8.5 * gib)])
    read()
    wide = levers.CheckpointBudget(blocks, torch.device("cuda", 0), 100 * gib, 4096, print)
    wide.after_step(1, 4096)
    assert wide.budget == 70 * gib


def test_speed_and_eta_leave_the_first_step_out_and_follow_the_last_twenty():
    """A compiled run's first step takes a minute: tokens/s and the ETA would be wrong for the
    rest of a short run if they averaged it in."""
    from gpuworker.engine.loop import LoopOutcome

    out = LoopOutcome()

    def step(seconds: float) -> None:
        out.part_tokens += 100  # as the loop counts its micro-batches' tokens
        out.note_step(seconds, 100)

    step(30.0)  # warm-up and compilation
    assert out.tokens_per_s == pytest.approx(100 / 30)
    step(1.0)
    assert out.tokens_per_s == 100.0
    for _ in range(25):
        step(0.5)
    out.steps = 27
    assert out.tokens_per_s == 200.0  # the last 20 steps only
    assert out.eta_s(100) == pytest.approx(0.5 * 73)
    assert out.runtime_s == pytest.approx(30 + 1 + 12.5)


def test_the_memory_budget_is_the_jobs_own_limit_under_the_workers_cap(monkeypatch):
    from dispatcher.jobs.specs import TrainSpec
    from dispatcher.settings import WORKER_MEMORY_ENV
    from gpuworker.engine.boundary import levers_from_spec

    monkeypatch.delenv(WORKER_MEMORY_ENV, raising=False)
    mib = 2**20
    assert levers_from_spec(TrainSpec()).memory_budget_bytes is None  # the card's free memory
    # Limits are card memory; the CUDA context's 512 MB are not the allocator's to use.
    assert levers_from_spec(TrainSpec(min_gpu_memory_mb=18114)).memory_budget_bytes == 17602 * mib
    monkeypatch.setenv(WORKER_MEMORY_ENV, "12000")  # lorafleet worker --memory-mb 12000
    assert levers_from_spec(TrainSpec()).memory_budget_bytes == 11488 * mib
    assert levers_from_spec(TrainSpec(min_gpu_memory_mb=18114)).memory_budget_bytes == 11488 * mib
    assert levers_from_spec(TrainSpec(min_gpu_memory_mb=8000)).memory_budget_bytes == 7488 * mib
    monkeypatch.setenv(WORKER_MEMORY_ENV, "lots")  # not the worker's doing: ignored
    assert levers_from_spec(TrainSpec()).memory_budget_bytes is None


def test_the_budget_scales_to_the_largest_forward_pass_a_packing_run_can_have(
        paths, tiny_model_dir):  # noqa: F811
    """A packing run keeps a micro-batch of one length as its rows (raw text's chunks): 8
    samples of 2048 tokens are one 16,384-token forward pass, beyond the 4096-token row cap,
    and the budget must plan for it."""
    from transformers import AutoModelForCausalLM

    from gpuworker.engine.levers import checkpoint_budget

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = config_from_spec(make_spec(micro_batch_size=8, batch_size=8, cutoff_len=2048), paths,
                           Levers(batching="pack", checkpoint_budget=True,
                                  memory_budget_bytes=40 << 30))
    budget = checkpoint_budget(model, cfg, torch.device("cuda", 0), lambda line: None)
    assert budget is not None and budget.max_tokens == 8 * 2048


def test_a_cpu_job_with_the_default_settings_says_what_it_skipped(paths):  # noqa: F811
    """On the CPU the defaults' fused loss applies; compiling, packing and the memory budget
    do not, and the job's record says why."""
    rec = Recorder()
    result = rec.run(make_spec(), paths)
    speed = result["speed"]
    assert speed["loss"] == "fused (chunked)"
    assert speed["batching"] == ("pad (pack skipped: on the CPU, attention over a packed row's "
                                 "mask costs more than the padding it saves)")
    assert speed["prepare"] == {
        "compile": "skipped: compiling pays on a GPU; on the CPU it takes longer than it saves"}
    assert any("memory-budgeted checkpointing does not apply" in line for line in rec.lines)


# CUDA graphs: when a run may replay them (kernels.graphs_refusal) ---------------------------


class _Block(torch.nn.Module):
    def __init__(self, checkpointed: bool = False, compiled: bool = True):
        super().__init__()
        self.gradient_checkpointing = checkpointed
        if compiled:
            self.compile()


def test_cuda_graphs_only_where_every_condition_holds():
    from dispatcher.jobs.specs import TrainSpec
    from gpuworker.engine.boundary import levers_from_spec
    from gpuworker.engine.kernels import graphs_refusal

    on, cuda = Levers(prepare=("compile",), cuda_graphs=True), torch.device("cuda")
    blocks = [_Block(), _Block()]
    assert graphs_refusal(on, cuda, blocks, lanes=1, sample_lengths=1) is None
    assert graphs_refusal(Levers(prepare=("compile",)), cuda, blocks, 1, 1) == "off"
    assert graphs_refusal(on, cuda, [_Block(compiled=False)], 1, 1) == "the layers are not compiled"
    assert graphs_refusal(on, cuda, [], 1, 1) == "the layers are not compiled"
    assert graphs_refusal(on, torch.device("cpu"), blocks, 1, 1) == "they need a CUDA GPU"
    assert graphs_refusal(on, cuda, blocks, 4, 1) == (
        "a pack's trials each draw from their own random generators")
    assert graphs_refusal(on, cuda, blocks, 1, 3) == (
        "the samples have 3 different lengths (a graph would be recorded for every shape)")
    assert graphs_refusal(on, cuda, [_Block(True), _Block()], 1, 1) == (
        "1 of 2 layers recompute their activations")
    assert levers_from_spec(TrainSpec(compile=False)).cuda_graphs is False

