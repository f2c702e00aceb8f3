"""The engine's speed levers on a CUDA GPU (bf16 / 4-bit): they change speed and memory, not
what is learned. 50 optimizer steps of the tiny model on the same data, each lever against the
plain run: the losses agree within bf16 noise."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch

from gpuworker.engine.boundary import config_from_spec
from gpuworker.engine.config import Levers
from gpuworker.engine.report import Report
from gpuworker.engine.train import run_training
from tests.tiny import write_tiny_dataset
from tests.unit.test_engine import Recorder, make_spec, paths, tiny_model_dir  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# 64 rows, micro batch 4, batch 8: 8 steps an epoch; 6.25 epochs = 50 steps.
SETTINGS = dict(dataset="many.json", micro_batch_size=4, batch_size=8, epochs=6.25,
                lora_dropout=0.0, learning_rate="2e-3")


def gpu_run(paths, name: str, precision: str, **lever_names: Any  # noqa: F811
            ) -> tuple[list[float], dict[str, Any]]:
    rec = Recorder()
    spec = make_spec(lora_name=name, precision=precision, **SETTINGS)
    run_training(config_from_spec(spec, paths, Levers(**lever_names)),
                 Report(rec.progress, rec.should_stop, rec.lines.append), device="cuda")
    log = json.loads((paths.loras / name / "training_log.json").read_text())
    return [e["loss"] for e in rec.of("train")], log


def precisions() -> list[str]:
    return ["bf16"] + (["4bit"] if importlib.util.find_spec("bitsandbytes") else [])


@pytest.mark.parametrize("precision", precisions())
def test_levers_learn_what_the_plain_run_learns(paths, precision):  # noqa: F811
    write_tiny_dataset(paths.datasets / "many.json", n=64)
    plain, _ = gpu_run(paths, "plain", precision)
    assert len(plain) == 50
    runs = {
        "fused": dict(loss="fused"),
        "pack": dict(batching="pack"),
        "all": dict(loss="fused", batching="pack", prepare=("liger_kernels",), upcast=False,
                    checkpoint_budget=True),
        "compiled": dict(loss="fused", batching="pack", prepare=("compile",), upcast=False,
                         checkpoint_budget=True),
    }
    for name, levers in runs.items():
        losses, log = gpu_run(paths, name, precision, **levers)
        assert len(losses) == 50, name
        # bf16 noise: each step within 2 % of the plain run's, the last ten on average 1 %.
        for step, (a, b) in enumerate(zip(losses, plain, strict=True), start=1):
            assert a == pytest.approx(b, rel=0.02), (name, step, a, b)
        assert sum(losses[-10:]) == pytest.approx(sum(plain[-10:]), rel=0.01), name
        assert log["speed"]["batching"] == levers.get("batching", "pad")
        if "loss" in levers:
            assert log["speed"]["loss"].startswith("fused"), log["speed"]


@pytest.mark.parametrize("precision", precisions())
def test_compiled_layers_with_dropout_learn_what_the_plain_run_learns(paths, precision):  # noqa: F811
    """The defaults' compiled path with LoRA dropout on (recomputed inside the compiled layers,
    masks from torch's generator): the plain run's losses within bf16 noise."""
    write_tiny_dataset(paths.datasets / "many.json", n=64)
    runs = {}
    for name, levers in (("plain", {}), ("compiled", dict(prepare=("compile",), upcast=False))):
        rec = Recorder()
        spec = make_spec(lora_name=name, precision=precision, **{**SETTINGS, "lora_dropout": 0.05})
        result = run_training(config_from_spec(spec, paths, Levers(**levers)),
                              Report(rec.progress, rec.should_stop, rec.lines.append),
                              device="cuda")
        runs[name] = ([e["loss"] for e in rec.of("train")], result)
    (plain, _), (compiled, result) = runs["plain"], runs["compiled"]
    assert len(compiled) == len(plain) == 50
    for step, (a, b) in enumerate(zip(compiled, plain, strict=True), start=1):
        assert a == pytest.approx(b, rel=0.02), (step, a, b)
    assert result["speed"]["prepare"]["compile"].startswith("on ("), result["speed"]


@pytest.mark.parametrize("precision", precisions())
def test_cuda_graphs_learn_what_the_plain_run_learns(paths, precision):  # noqa: F811
    """Samples of one length (every row longer than cutoff_len) and no layer checkpointed:
    the compiled layers move on to CUDA graphs once the memory budget has settled, and the
    losses stay the plain run's within bf16 noise, dropout on."""
    rows = [{"instruction": " ".join(["tea and trains"] * (20 + i % 7)), "input": "",
             "output": "birds"} for i in range(64)]
    (paths.datasets / "long.json").write_text(json.dumps(rows))
    settings = {**SETTINGS, "dataset": "long.json", "cutoff_len": 48, "lora_dropout": 0.05}
    runs = {}
    for name, levers in (("plain", {}), ("graphs", dict(
            loss="fused", batching="pack", prepare=("compile",), upcast=False,
            checkpoint_budget=True, cuda_graphs=True))):
        rec = Recorder()
        spec = make_spec(lora_name=name, precision=precision, **settings)
        result = run_training(config_from_spec(spec, paths, Levers(**levers)),
                              Report(rec.progress, rec.should_stop, rec.lines.append),
                              device="cuda")
        runs[name] = ([e["loss"] for e in rec.of("train")], result)
    (plain, _), (graphs, result) = runs["plain"], runs["graphs"]
    # From the step after the budget settles: step 4 where it measures (4-bit, checkpointed
    # layers to decide), step 2 where there is none to settle (bf16 keeps every layer).
    assert result["speed"]["cuda_graphs"] == (
        "on from step 4" if result["speed"]["checkpointing"] else "on from step 2"), result["speed"]
    assert len(graphs) == len(plain) == 50
    for step, (a, b) in enumerate(zip(graphs, plain, strict=True), start=1):
        assert a == pytest.approx(b, rel=0.02), (step, a, b)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_tensors_only_nf4_product_equals_bitsandbytes(double_quant):
    """nf4.Nf4Linear against bitsandbytes' own 4-bit layer: the same output and input
    gradient, bit for bit, with and without double quantisation."""
    import bitsandbytes as bnb

    from gpuworker.engine.nf4 import _forward

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 192, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(192, 256)})
    layer = layer.cuda()
    x = torch.randn(3, 40, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 40, 192, device="cuda", dtype=torch.bfloat16)
    outs = []
    for forward in (layer.forward, _forward(layer)):
        out = forward(x)
        (grad,) = torch.autograd.grad(out, x, g)
        outs.append((out, grad))
    (out_a, grad_a), (out_b, grad_b) = outs
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)
