"""Levers that trade a little recomputation for memory are exact: on the CPU in fp32 they give
the same numbers as the plain run, bit for bit, and keep fewer bytes for backward."""

from __future__ import annotations

import torch

from gpuworker.engine import levers
from tests.unit.test_engine import Recorder, paths, tiny_model_dir  # noqa: F401
from tests.unit.test_engine_seams import RECORDED, assert_recorded
from tests.unit.test_engine_speed import run_with


class Attention(torch.nn.Module):
    """Three projections that read the same input, as q, k and v do."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(x) + self.v(x)


def lora_attention(lean: bool) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["q", "k", "v"]),
        Attention())
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # peft starts B at zero; any values will do here
            torch.nn.init.normal_(p)
    if lean:
        levers.lean_lora_dropout(model, None)
    return model.train()


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward during a forward, each storage once, parameters (kept
    anyway) left out."""
    kept: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(kept.values()), out


def test_lean_dropout_gives_the_same_values_and_gradients_and_keeps_less():
    x = torch.randn(64, 32, requires_grad=True)  # as a layer's input is
    runs = {}
    for lean in (False, True):
        model = lora_attention(lean)
        torch.manual_seed(1)  # the dropout masks
        kept, out = saved_bytes(model, x)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads["x"], x.grad = x.grad, None
        runs[lean] = (kept, out.detach(), grads)
    (kept_plain, out_plain, g_plain), (kept_lean, out_lean, g_lean) = runs[False], runs[True]
    assert torch.equal(out_plain, out_lean)
    assert g_plain.keys() == g_lean.keys() and len(g_plain) == 7
    for name in g_plain:
        assert torch.equal(g_plain[name], g_lean[name]), name
    # Plain: each projection keeps its dropped input and its mask (on the CPU a float tensor,
    # the size of x; on CUDA one byte a value); lean keeps x once. Both keep the rest alike.
    size_of_x = 64 * 32 * 4
    assert kept_plain - kept_lean == 3 * 2 * size_of_x - size_of_x


def test_lean_dropout_trains_to_the_recorded_losses_bit_for_bit(paths):  # noqa: F811
    rec = Recorder()
    result = run_with(paths, rec, RECORDED["dropout"][0], prepare=("lean_dropout",))
    assert_recorded("dropout", rec, result)
    assert result["speed"]["prepare"] == {"lean_dropout": "on"}


def test_lean_dropout_is_skipped_without_dropout(paths):  # noqa: F811
    changes, losses, _, _ = RECORDED["raw"]
    rec = Recorder()
    result = run_with(paths, rec, {**changes, "lora_dropout": 0.0}, prepare=("lean_dropout",))
    assert result["speed"]["prepare"] == {
        "lean_dropout": "skipped: the model has no LoRA layer with dropout"}


def test_the_nf4_operators_keep_the_packed_weight_and_give_the_input_gradient(monkeypatch):
    """The registered NF4 product's autograd on the CPU, with the dequantisation (bitsandbytes',
    GPU only here; tests/unit/test_engine_speed_gpu.py compares it with bitsandbytes' own
    layer bit for bit) replaced by a stand-in: output x @ W.t(), input gradient g @ W, the
    weight's tensors no gradient, and nothing the size of W kept for backward."""
    from gpuworker.engine import nf4

    torch.manual_seed(0)
    weight = torch.randn(6, 4, dtype=torch.float64)
    monkeypatch.setattr(nf4, "nf4_weight", lambda packed, *rest: weight.to(rest[-1]))
    packed, absmax = torch.zeros(12, 1, dtype=torch.uint8), torch.ones(1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = nf4.nf4_linear(x, packed, absmax, None, None, None, 64, 0, [6, 4])
    torch.testing.assert_close(out, x @ weight.t(), rtol=0, atol=0)
    g = torch.randn(3, 6, dtype=torch.float64)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ weight, rtol=0, atol=0)
    assert all(t.dtype == torch.uint8 or t.numel() == 1 for t in kept)
