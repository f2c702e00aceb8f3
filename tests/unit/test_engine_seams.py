"""The engine's config and levers: today's run gives exactly today's losses, and each seam
(preparation hooks, loss_fn, batcher) is used when chosen.

The expected values were recorded from the engine before it took a plain config and levers
(CPU, fp32, the tiny model of tests/tiny.py, the seeds of make_spec): the refactored engine must
reproduce them to the last digit the events carry, and the final loss bit for bit.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.schedule import estimate
from gpuworker.engine import EngineError, levers
from gpuworker.engine.boundary import config_from_spec
from gpuworker.engine.config import Levers
from gpuworker.engine.report import Report
from gpuworker.engine.train import run_training
from tests.unit.test_engine import Recorder, make_spec, paths, tiny_model_dir  # noqa: F401

ENGINE = Path(__file__).resolve().parents[2] / "gpuworker" / "engine"

# (spec changes, per-step losses as the events carry them, final loss, eval losses)
RECORDED = {
    "dataset": (dict(epochs=2, eval_dataset="heldout.json", eval_steps=4),
                [5.967735, 5.943113, 5.922052, 5.910553, 5.895977, 5.888799, 5.88856, 5.881702,
                 5.881904, 5.877578, 5.86508, 5.869659],
                5.869659423828125, [5.894461, 5.879453, 5.87115]),
    "dropout": (dict(lora_dropout=0.1, train_only_after="### Response:\n", add_eos_token=True),
                [5.969897, 5.949119, 5.920144, 5.944492, 5.933797, 5.937852],
                5.937851905822754, []),
    "raw": (dict(dataset="", format="", raw_text_file="story.txt", overlap_len=16,
                 newline_favor_len=16),
            [5.986087, 5.989443, 5.978163, 5.978752, 5.963246, 5.933402, 5.97006, 5.952901,
             5.958348],
            5.958348274230957, []),
}


# The speed settings that give the engine as it was when RECORDED was taken.
LEVERS_OFF = dict(fused_loss=False, packing=False, compile=False, fp32_norms=True,
                  gradient_checkpointing="all")


def assert_recorded(case: str, rec: Recorder, result: dict, evals: bool = True) -> None:
    """The run's losses are RECORDED[case]'s. The events carry six decimals; a new release of
    transformers or torch may move an fp32 loss by a few 1e-7 and so flip the sixth decimal's
    rounding, which is all the tolerance allows (any change of the engine's arithmetic moves
    these losses by far more)."""
    _, losses, final, eval_losses = RECORDED[case]
    assert [e["loss"] for e in rec.of("train")] == pytest.approx(losses, rel=0, abs=1.5e-6)
    assert result["final_loss"] == pytest.approx(final, rel=0, abs=1.5e-6)
    if evals:
        assert [e["eval_loss"] for e in rec.of("eval")] == pytest.approx(
            eval_losses, rel=0, abs=1.5e-6)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_the_levers_off_give_exactly_the_recorded_losses(paths, case):  # noqa: F811
    rec = Recorder()
    result = rec.run(make_spec(**RECORDED[case][0], **LEVERS_OFF), paths)
    assert_recorded(case, rec, result)


def run_config(paths, rec: Recorder, **lever_names: Any) -> dict[str, Any]:  # noqa: F811
    """A run driven through the engine's own entry, with the given levers."""
    cfg = config_from_spec(make_spec(), paths, Levers(**lever_names))
    return run_training(cfg, Report(rec.progress, rec.should_stop, rec.lines.append),
                        device="cpu")


def test_the_config_entry_is_the_same_run(paths):  # noqa: F811
    a, b = Recorder(), Recorder()
    a.run(make_spec(lora_name="a"), paths)
    cfg = replace(config_from_spec(make_spec(lora_name="b"), paths))
    run_training(cfg, Report(b.progress, b.should_stop, b.lines.append), device="cpu")
    assert [e["loss"] for e in a.of("train")] == [e["loss"] for e in b.of("train")]


def test_a_preparation_hook_runs_on_the_lora_wrapped_model(paths, monkeypatch):  # noqa: F811
    seen: list[tuple[int, str]] = []

    def hook(model: Any, cfg: Any) -> Any:
        lora = [n for n, p in model.named_parameters() if p.requires_grad]
        seen.append((len(lora), cfg.lora_name))
        return model

    monkeypatch.setitem(levers.PREPARE_HOOKS, "count", hook)
    rec = Recorder()
    result = run_config(paths, rec, prepare=("count",))
    assert seen == [(8, "tiny-lora")]  # once, with the LoRA layers on: 2 layers x (q, v) x (A, B)
    assert "Preparing the model: count" in rec.lines and result["steps"] == 6


def test_a_loss_computed_inside_the_model_fits_the_seam(paths, monkeypatch):  # noqa: F811
    """Hugging Face's own loss (labels passed to the model) as the loss_fn: it is the one used,
    and it trains to the same losses as today's outside-the-model loss."""
    calls = []

    def in_model(autocast: Any) -> Any:
        def loss_fn(model: Any, batch: levers.Batch) -> torch.Tensor:
            calls.append(batch.targets)
            t = batch.tensors
            with autocast():
                mean = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                             labels=t["labels"]).loss
            return mean * batch.targets  # the seam wants the sum over label tokens
        return loss_fn

    monkeypatch.setitem(levers.LOSSES, "in_model", in_model)
    rec = Recorder()
    run_config(paths, rec, loss="in_model")
    assert len(calls) == 12 and all(n > 0 for n in calls)  # 6 steps x 2 micro-batches
    baseline = Recorder()
    baseline.run(make_spec(lora_name="base"), paths)
    losses = [e["loss"] for e in rec.of("train")]
    assert losses == pytest.approx([e["loss"] for e in baseline.of("train")], rel=1e-5)


def test_the_padding_batcher(tiny_model_dir):  # noqa: F811
    samples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
               {"input_ids": [1, 8], "labels": [-100, 8]},
               {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]}]
    batcher = levers.PadBatcher(pad_id=3)
    first, second = batcher.step([samples[:2], samples[2:]])
    assert first.tensors["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 3, 3]]
    assert first.tensors["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    assert first.tensors["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert (first.tokens, first.targets, first.padded) == (6, 3, True)
    assert (second.tokens, second.targets, second.padded) == (3, 2, False)
    assert all(t.dtype == torch.long for t in first.tensors.values())
    evaluation = list(batcher.evaluation(samples, 2))
    assert [b.tensors["input_ids"].shape[0] for b in evaluation] == [2, 1]
    assert evaluation[0].tensors["input_ids"].tolist() == first.tensors["input_ids"].tolist()


def test_an_unknown_lever_is_refused_before_anything_loads(paths):  # noqa: F811
    rec = Recorder()
    with pytest.raises(EngineError, match="unknown batching 'bucket'.*known: pack, pad"):
        run_config(paths, rec, batching="bucket")
    assert not (paths.loras / "tiny-lora").exists() and not rec.lines


def test_the_estimate_knows_the_engines_lever_names():
    assert set(estimate.LOSS_LOGIT_BYTES) == set(levers.LOSSES)
    assert set(estimate.BATCH_TOKENS) == set(levers.BATCHERS)
    shape = estimate.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4,
                                vocab=400)
    args = (shape, "bf16", 8, ["q", "v"], 4, 256)
    assert estimate.train_peak_bytes(*args) == estimate.train_peak_bytes(
        *args, loss="fp32_logits", batching="pad")


def test_only_the_boundary_imports_the_apps_types():
    """The engine takes a plain config: the job model and the settings stop at boundary.py."""
    app = ("dispatcher.jobs.specs", "dispatcher.settings")
    importers = set()
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(app):
                importers.add(path.name)
            elif isinstance(node, ast.Import) and any(a.name.startswith(app) for a in node.names):
                importers.add(path.name)
    assert importers == {"boundary.py"}


def test_the_engines_quantised_precisions_are_the_job_models():
    from dispatcher.jobs.precisions import QUANTISED
    from gpuworker.engine import config

    assert config.QUANTISED == QUANTISED
