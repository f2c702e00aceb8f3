"""The frozen NF4 base layers' product as one autograd function of tensors only.

bitsandbytes runs a 4-bit layer's product through its own autograd function, which takes the
weight's quantisation state (a Python object) as an argument; torch.compile cannot put that
into a compiled graph, so every 4-bit layer splits a compiled decoder layer into pieces with
Python between them. `nf4_linear` does the same arithmetic with bitsandbytes' registered
operators (dequantise the block scales, dequantise the weight, multiply) and takes only
tensors and numbers, so a compiled layer stays whole. Like bitsandbytes' it keeps only the
packed weight for backward and dequantises it again there (the base is frozen: no weight
gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from gpuworker.engine.config import EngineConfig
from gpuworker.errors import LeverSkipped


def nf4_weight(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None,
               absmax2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int,
               nested_blocksize: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The dequantised weight; `code`, `absmax2` and `offset` are double quantisation's (the
    block scales themselves quantised to 8 bits), None without it."""
    ops = torch.ops.bitsandbytes
    if code is not None:
        absmax = ops.dequantize_blockwise.default(absmax, absmax2, code, nested_blocksize,
                                                  torch.float32) + offset
    return ops.dequantize_4bit.default(packed, absmax, blocksize, "nf4", list(shape), dtype)


# Two operators torch.compile sees as one call each. The product and its gradient are distinct
# operators so that a compiled graph cannot merge the backward's dequantisation into the
# forward's and keep the dequantised weight for backward (a bf16 copy of the layer's weight,
# which is what 4-bit storage is there to avoid); only the packed weight is kept.
@torch.library.custom_op("lorafleet::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
               code: torch.Tensor | None, absmax2: torch.Tensor | None,
               offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
               shape: list[int]) -> torch.Tensor:
    """x @ W.t() for the NF4 weight W of `shape` (out_features, in_features)."""
    return torch.nn.functional.linear(x, nf4_weight(
        packed, absmax, code, absmax2, offset, blocksize, nested_blocksize, shape, x.dtype))


@torch.library.custom_op("lorafleet::nf4_linear_grad", mutates_args=())
def nf4_linear_grad(grad: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                    code: torch.Tensor | None, absmax2: torch.Tensor | None,
                    offset: torch.Tensor | None, blocksize: int, nested_blocksize: int,
                    shape: list[int]) -> torch.Tensor:
    """grad @ W: the product's gradient with respect to x."""
    return grad @ nf4_weight(packed, absmax, code, absmax2, offset, blocksize, nested_blocksize,
                             shape, grad.dtype)


@nf4_linear.register_fake
def _(x, packed, absmax, code, absmax2, offset, blocksize, nested_blocksize, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


@nf4_linear_grad.register_fake
def _(grad, packed, absmax, code, absmax2, offset, blocksize, nested_blocksize, shape):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _keep(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # The frozen weight's tensors and numbers; not x (the base is frozen: no weight gradient).
    ctx.save_for_backward(*inputs[1:6])
    ctx.numbers = inputs[6:]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return (nf4_linear_grad(grad, *ctx.saved_tensors, *ctx.numbers),) + (None,) * 8


nf4_linear.register_autograd(_backward, setup_context=_keep)


def _forward(layer: Any) -> Any:
    state = layer.weight.quant_state
    nested = state.nested
    args = (layer.weight.data, state.absmax,
            state.state2.code if nested else None, state.state2.absmax if nested else None,
            state.offset if nested else None, state.blocksize,
            state.state2.blocksize if nested else 0, list(state.shape))
    compute = layer.compute_dtype or state.dtype

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = nf4_linear(x.to(compute), *args)
        if layer.bias is not None:
            out = out + layer.bias.to(compute)
        return out.to(x.dtype)

    return forward


def nf4_layers(model: Any, config: EngineConfig) -> Any:
    """Give every NF4 base layer the tensors-only product (the `nf4_op` preparation hook)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LeverSkipped("bitsandbytes is not installed") from None
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        raise LeverSkipped("the model has no 4-bit layers")
    for layer in layers:
        state = layer.weight.quant_state
        if state is None or state.quant_type != "nf4":
            raise LeverSkipped("only NF4 weights are supported")
    for layer in layers:
        layer.forward = _forward(layer)
    return model
